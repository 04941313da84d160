"""The Cell's threads: its broker connection shared by many senders, its pool across a restart (real broker)."""

import signal
import threading
import time

import pytest

from fedstream.common.errors import CellError
from fedstream.nodes import Cell
from fedstream.nodes.message import Reply
from tests.procs import wait_until

SENDERS = 8
REQUESTS = 250


def test_many_threads_sending_while_messages_arrive_lose_no_wake_up(procs):
    """Senders share the DEALER while replies and one-way messages arrive on it.

    A send can consume the descriptor's signal of a message that just arrived; if the I/O thread were
    not woken then, that message would wait for its next heartbeat, here a minute away (the broker's
    long node timeout lets the cells beat once a minute), and the 10 s requests would time out.
    """
    _broker, address = procs.broker("--node-timeout", "600")
    notes: list = []
    with Cell("asker", address, heartbeat_interval=60) as asker, \
            Cell("answerer", address, heartbeat_interval=60) as answerer:
        asker.register_request_cb("test", "note", lambda message: notes.append(message.payload))

        def answer(message):  # answers in the pool, and sends a one-way note back while doing it
            answerer.fire_and_forget("test", "note", message.source, message.payload)
            return message.payload

        answerer.register_request_cb("test", "echo", answer)
        failures: list = []

        def send(sender: int) -> None:
            try:
                for number in range(REQUESTS):
                    payload = {"sender": sender, "n": number}
                    assert asker.send_request("test", "echo", "answerer", payload, timeout=10) == payload
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=send, args=(sender,)) for sender in range(SENDERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures, failures[:3]
        assert not any(thread.is_alive() for thread in threads)
        wait_until(lambda: len(notes) == SENDERS * REQUESTS, 20)
    assert sorted((note["sender"], note["n"]) for note in notes) == \
        [(sender, number) for sender in range(SENDERS) for number in range(REQUESTS)]


def test_a_sender_held_back_by_a_full_connection_fails_cleanly_when_the_cell_stops(procs):
    """Senders wait for room behind a connection that takes nothing, and get CellError once the cell stops."""
    broker, address = procs.broker("--node-timeout", "600")
    cell = Cell("sender", address, heartbeat_interval=60).start()
    with Cell("target", address):
        broker.signal(signal.SIGSTOP)  # the broker reads nothing: kernel buffers, then the DEALER's queue fill up
        outcome: list = []
        sent = [0]

        def flood() -> None:
            blob = b"x" * 1024
            try:
                while True:
                    cell.fire_and_forget("test", "flood", "target", blob)
                    sent[0] += 1
            except CellError as exc:
                outcome.append(exc)

        def stalled() -> bool:
            before = sent[0]
            time.sleep(0.5)
            return sent[0] == before

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            wait_until(stalled, 30)  # held back, not queueing without bound
            assert flooder.is_alive() and not outcome and sent[0] > 1000
            cell.stop()
            flooder.join(15)
            assert not flooder.is_alive()
            assert len(outcome) == 1 and "stopped" in str(outcome[0])
            with pytest.raises(CellError):
                cell.fire_and_forget("test", "flood", "target", b"late")
        finally:
            broker.signal(signal.SIGCONT)
            cell.stop()


def test_a_stopped_cell_says_it_stopped_and_one_never_started_says_so(broker_address):
    """A send on a cell that was stopped fails with 'stopped', whenever it comes; only a cell never started
    (or started again) answers otherwise."""
    cell = Cell("lifecycle", broker_address)
    with pytest.raises(CellError, match="'lifecycle' is not started"):
        cell.fire_and_forget("test", "note", "anyone", None)
    cell.start()
    cell.stop()
    with pytest.raises(CellError, match="'lifecycle' stopped"):
        cell.fire_and_forget("test", "note", "anyone", None)
    with pytest.raises(CellError, match="'lifecycle' stopped"):
        cell.send_request("test", "echo", "anyone", None, timeout=1)
    with cell:
        cell.register_request_cb("test", "echo", lambda message: message.payload)
        assert cell.send_request("test", "echo", "lifecycle", "again", timeout=10) == "again"


def test_callbacks_dropped_at_stop_do_not_leave_a_restarted_cell_busy(broker_address):
    """A stop drops the callbacks still queued; their share of the queue limits must be free again."""
    release = threading.Event()
    target = Cell("target", broker_address, workers=1)
    target.register_request_cb("test", "block", lambda message: release.wait(30))
    target.register_request_cb("test", "echo", lambda message: message.payload)
    try:
        with Cell("sender", broker_address) as sender:
            target.start()
            for _ in range(1100):  # one blocks the only worker, 1,023 wait, the rest are refused
                sender.fire_and_forget("test", "block", "target", None)
            wait_until(lambda: target.stats["busy"] > 0, 30)
            target.stop()  # the blocked call keeps running in the old pool's thread; the queued ones are dropped
            target.start()
            assert sender.send_request("test", "echo", "target", "still served", timeout=10) == "still served"
    finally:
        release.set()
        target.stop()


def test_a_cell_whose_io_thread_is_stuck_refuses_to_start_again_until_it_ends(broker_address):
    """stop() gives up on an I/O thread blocked in an inline callback; a start must not run a second one."""
    entered, release = threading.Event(), threading.Event()

    def stuck(message) -> None:
        entered.set()
        release.wait(30)

    cell = Cell("stuck", broker_address)
    cell.register_request_cb("test", "stuck", stuck, inline=True)
    try:
        with Cell("sender", broker_address) as sender:
            cell.start()
            sender.fire_and_forget("test", "stuck", "stuck", None)
            assert entered.wait(10)
            cell.stop()  # waits for the I/O thread, gives up, and logs it
            with pytest.raises(CellError, match="previous I/O thread has not ended"):
                cell.start()
            release.set()
            wait_until(lambda: not any(t.name == "cell-io-stuck" for t in threading.enumerate()), 20)
            cell.start()
            cell.register_request_cb("test", "echo", lambda message: message.payload)
            assert sender.send_request("test", "echo", "stuck", "back", timeout=10) == "back"
    finally:
        release.set()
        cell.stop()


def test_a_reply_made_while_the_cell_stops_still_goes_out(broker_address):
    """stop() lets a callback already running return, so its requester gets the answer, not a timeout."""
    target = Cell("target", broker_address)
    stop_called = threading.Event()

    def answer(message):  # the cell is told to stop while this callback still works on its answer
        threading.Thread(target=lambda: (stop_called.set(), target.stop()), daemon=True).start()
        stop_called.wait(10)
        time.sleep(0.3)
        return "answered"

    target.register_request_cb("test", "slow", answer)
    target.start()
    try:
        with Cell("asker", broker_address) as asker:
            assert asker.send_request("test", "slow", "target", None, 10) == "answered"
    finally:
        target.stop()


def test_what_a_handler_leaves_for_after_its_reply_runs_once_the_reply_went_out(broker_address):
    """`Reply.then` runs after the reply was handed to the connection: here it waits until the asker has the
    reply, which it could never have if `then` ran first on the same worker. A failing `then` is logged, and
    the cell goes on serving."""
    asker_has_it = threading.Event()
    waited: list = []

    def answer(message):
        if message.payload == b"fail":
            return Reply(b"ok", then=lambda: 1 / 0)
        return Reply(b"ok", {"n": 1}, then=lambda: waited.append(asker_has_it.wait(10)))

    with Cell("answerer", broker_address, workers=1) as answerer, Cell("asker", broker_address) as asker:
        answerer.register_request_cb("test", "then", answer)
        reply = asker.request("test", "then", "answerer", b"go", timeout=5)
        asker_has_it.set()
        assert (reply.payload, reply.headers) == (b"ok", {"n": 1})
        wait_until(lambda: waited, 10)
        assert waited == [True]
        assert asker.request("test", "then", "answerer", b"fail", timeout=5).payload == b"ok"
        assert asker.request("test", "then", "answerer", b"again", timeout=5).payload == b"ok"
