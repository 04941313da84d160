"""Broker and Cell: routing, registration, failure handling, all across real processes."""

import os
import signal
import socket
import sys
import threading

import pytest
import zmq

from fedstream.common import protocol as proto
from fedstream.common.errors import CellError, RegistrationError, RemoteError, RequestTimeout, UnreachableError
from fedstream.nodes import Cell, FLContext, PendingRequest
from fedstream.nodes.message import KIND_REQUEST, PAYLOAD_NONE, Meta, encode_meta
from tests.procs import wait_until

def start_echo(procs, name, address):
    proc = procs.start([sys.executable, "-m", "tests.helpers.bus_echo", name, address], cwd=str(procs.tmp_path))
    proc.expect("ready")
    return proc


@pytest.fixture
def cell(broker_address):
    with Cell("tester", broker_address) as c:
        yield c


def test_request_reply_round_trip_between_processes(procs, broker_address, cell):
    start_echo(procs, "site-1", broker_address)
    reply = cell.send_request("test", "ping", "site-1", {"n": 1}, timeout=10)
    assert reply == {"source": "tester", "topic": "ping", "payload": {"n": 1}, "headers": {}}
    assert cell.send_request("test", "raw", "site-1", b"bytes", timeout=10)["payload"] == "bytes"


def test_fire_and_forget_reaches_every_target(broker_address, cell):
    got = []
    with Cell("site-a", broker_address) as a, Cell("site-b", broker_address) as b:
        for c in (a, b):
            c.register_request_cb("test", "note", lambda m, c=c: got.append((c.fqcn, m.source, m.payload)))
        cell.fire_and_forget("test", "note", ["site-a", "site-b"], {"x": 1})
        wait_until(lambda: len(got) == 2, 10)
    assert sorted(got) == [("site-a", "tester", {"x": 1}), ("site-b", "tester", {"x": 1})]


def test_unreachable_target_fails_at_once_not_by_timeout(cell):
    with pytest.raises(UnreachableError, match="'site-9' is not connected"):
        cell.send_request("test", "ping", "site-9", b"x", timeout=60)


def test_missing_handler_is_an_immediate_error(procs, broker_address, cell):
    start_echo(procs, "site-1", broker_address)
    with pytest.raises(RemoteError, match="no handler for channel 'other'"):
        cell.send_request("other", "ping", "site-1", b"x", timeout=60)


def test_duplicate_fqcn_is_refused_with_a_clear_error(procs, broker_address):
    start_echo(procs, "site-1", broker_address)
    with pytest.raises(RegistrationError, match="'site-1' is already used by another live node"):
        Cell("site-1", broker_address).start(timeout=10)


def test_name_is_free_again_after_a_clean_stop(broker_address):
    Cell("site-1", broker_address).start().stop()
    Cell("site-1", broker_address).start().stop()


def _raw_dealer(ctx, address):
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 10_000
    sock.connect(address)
    return sock


def test_source_cannot_be_spoofed(procs, broker_address, cell):
    start_echo(procs, "site-1", broker_address)
    ctx = zmq.Context()
    try:
        mallory = _raw_dealer(ctx, broker_address)
        mallory.send_multipart([proto.REGISTER, b"mallory", proto.encode_json({"v": proto.VERSION})])
        assert mallory.recv_multipart()[:2] == [proto.REGISTERED, proto.REG_OK]
        forged = {"k": "req", "id": 7, "ch": "test", "tp": "ping", "pt": "n",
                  "src": "tester", "h": {"source": "tester"}}
        mallory.send_multipart([proto.SEND, b"site-1", proto.encode_json(forged)])
        cmd, source, meta, payload = mallory.recv_multipart()
        assert (cmd, source) == (proto.DELIVER, b"site-1")
        assert proto.decode_json(payload)["source"] == "mallory"

        # An unregistered connection cannot send at all.
        stranger = _raw_dealer(ctx, broker_address)
        stranger.send_multipart([proto.SEND, b"site-1", proto.encode_json(forged)])
        answers = [stranger.recv_multipart(), stranger.recv_multipart()]
        assert [proto.NOT_REGISTERED] in answers
        assert any(a[0] == proto.UNDELIVERABLE and b"not registered" in a[3] for a in answers)
    finally:
        ctx.destroy(linger=0)
    assert cell.send_request("test", "ping", "site-1", None, timeout=10)["source"] == "tester"


def test_garbage_sent_to_the_broker_leaves_it_serving(procs, broker_address, cell):
    start_echo(procs, "site-1", broker_address)
    host, port = broker_address.rsplit("/", 1)[1].split(":")
    for junk in (b"\x00" * 64, os.urandom(4096), b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=5) as raw:
            raw.sendall(junk)
    ctx = zmq.Context()
    try:
        bad = _raw_dealer(ctx, broker_address)
        for frames in ([b""], [b"\x09Z"], [b"toolong"], [proto.REGISTER, b"x"],
                       [proto.REGISTER, b"bad name!", b"{}"], [proto.REGISTER, b"ok", b"not json"],
                       [proto.SEND], [proto.SEND, b"site-1"], [proto.HEARTBEAT, b"extra"]):
            bad.send_multipart(frames)
        bad.send_multipart([proto.REGISTER, b"evil", b"{\"v\": 99}"])
        cmd, status, reason = bad.recv_multipart()
        assert (cmd, status) == (proto.REGISTERED, proto.REG_ERR) and b"version" in reason
    finally:
        ctx.destroy(linger=0)
    assert cell.send_request("test", "ping", "site-1", {"still": "ok"}, timeout=10)["payload"] == {"still": "ok"}


def test_a_peer_that_never_reads_does_not_stall_others(procs, broker_address, cell):
    stuck = start_echo(procs, "stuck", broker_address)
    start_echo(procs, "site-1", broker_address)
    stuck.signal(signal.SIGSTOP)
    blob = os.urandom(64 * 1024)
    done = threading.Event()

    def flood():
        for _ in range(4000):  # 256 MiB aimed at a process that reads nothing
            cell.fire_and_forget("test", "flood", "stuck", blob)
        done.set()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    for i in range(50):
        assert cell.send_request("test", "ping", "site-1", {"i": i}, timeout=10)["payload"] == {"i": i}
    assert done.wait(60), "sending to a stuck peer blocked the sender"
    stuck.signal(signal.SIGCONT)


def free_port_triplet() -> int:
    """A port p such that p, p+1 and p+2 are free on loopback (the broker and its fan-out)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 65000:
            continue
        try:
            for extra in (1, 2):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + extra))
            return port
        except OSError:
            continue
    raise RuntimeError("no three consecutive free ports")


def test_broker_restart_heals_without_restarting_cells(procs):
    address = f"tcp://127.0.0.1:{free_port_triplet()}"
    first = procs.fedstream("broker", "--bind", address)
    first.expect("tcp://")
    start_echo(procs, "site-1", address)
    with Cell("tester", address) as cell:
        assert cell.send_request("test", "ping", "site-1", 1, timeout=10)["payload"] == 1
        first.kill()
        second = procs.fedstream("broker", "--bind", address)
        second.expect("tcp://")

        def round_trip():
            try:
                return cell.send_request("test", "ping", "site-1", 2, timeout=2)["payload"] == 2
            except Exception:
                return False

        wait_until(round_trip, 30, interval=0.2)
        assert cell.is_registered


def test_expired_node_becomes_unreachable(procs):
    broker, address = procs.broker("--node-timeout", "1")
    echo = start_echo(procs, "site-1", address)
    with Cell("tester", address) as cell:
        echo.signal(signal.SIGSTOP)

        def unreachable():
            try:
                cell.send_request("test", "ping", "site-1", 1, timeout=0.5)
            except UnreachableError:
                return True
            except Exception:
                return False
            return False

        wait_until(unreachable, 15, interval=0.2)
        echo.signal(signal.SIGCONT)
        # The node notices it was forgotten and registers again by itself.
        wait_until(lambda: not unreachable(), 15, interval=0.2)


def test_fl_context_exposes_the_cell(broker_address):
    cell = Cell("site-1", broker_address)
    ctx = FLContext(cell)
    assert ctx.get_engine().get_cell() is cell
    assert ctx.get_identity_name() == "site-1"


def test_a_killed_nodes_name_can_be_reused_at_once(procs, broker_address):
    echo = start_echo(procs, "site-1", broker_address)
    echo.kill()

    def registers():
        try:
            Cell("site-1", broker_address).start(timeout=5).stop()
            return True
        except RegistrationError:
            return False

    wait_until(registers, 3, interval=0.2)  # well before the 5 s liveness timeout


def test_messages_sent_just_before_stop_are_delivered(broker_address):
    got = []
    with Cell("receiver", broker_address) as receiver:
        receiver.register_request_cb("test", "n", lambda m: got.append(m.payload))
        for round_ in range(5):  # the same name reconnects at once each round
            sender = Cell("sender", broker_address).start()
            for i in range(100):
                sender.fire_and_forget("test", "n", "receiver", [round_, i])
            sender.stop()
        wait_until(lambda: len(got) == 500, 10)
    assert sorted(map(tuple, got)) == [(r, i) for r in range(5) for i in range(100)]


def test_stop_may_be_called_again_from_a_stop_hook_or_a_handler(broker_address):
    cell = Cell("site-1", broker_address).start()
    cell.add_stop_hook(cell.stop)  # e.g. a user's timeout_cb that stops the cell
    cell.stop()
    assert not cell.is_registered

    with Cell("tester", broker_address) as tester:
        cell = Cell("site-2", broker_address)
        cell.register_request_cb("test", "quit", lambda m: cell.stop(), inline=True)
        cell.start()
        tester.fire_and_forget("test", "quit", "site-2", None)
        wait_until(lambda: not cell.is_registered, 10)


def _registered_dealer(ctx, address, name):
    sock = _raw_dealer(ctx, address)
    sock.send_multipart([proto.REGISTER, name.encode(), proto.encode_json({"v": proto.VERSION})])
    assert sock.recv_multipart()[:2] == [proto.REGISTERED, proto.REG_OK]
    return sock


def test_replies_are_accepted_only_from_the_node_asked(procs, broker_address, cell):
    start_echo(procs, "server", broker_address)
    ctx = zmq.Context()
    try:
        mallory = _registered_dealer(ctx, broker_address, "mallory")
        pending = cell.request_async("test", "slow", "server", 1.5)
        rid = pending.request_id  # as if mallory had guessed it
        forged = [{"k": "rep", "id": rid, "ch": "test", "tp": "slow", "pt": "j"},
                  {"k": "err", "id": rid, "ch": "test", "tp": "slow", "pt": "j"},
                  {"k": "rep", "id": rid, "ch": "test", "tp": "slow", "pt": "n", "h": {"err": "x", "msg": "forged"}}]
        for meta in forged:
            mallory.send_multipart([proto.SEND, b"tester", proto.encode_json(meta), proto.encode_json("forged")])
        wait_until(lambda: cell.stats["forged_replies"] >= len(forged), 10)
        assert not pending.done()
        reply = pending.result(10)
        assert reply.source == "server" and reply.payload["payload"] == 1.5
    finally:
        ctx.destroy(linger=0)


def test_request_ids_are_random_64_bit():
    cell = Cell("ids", "tcp://127.0.0.1:1")  # never started: ids are drawn without a broker
    ids = {cell._new_request_id() for _ in range(200)}
    assert len(ids) == 200 and all(0 < i < 2**64 for i in ids)
    assert max(ids) > 2**60  # not a counter


def test_too_large_messages_fail_at_once(procs, broker_address, cell):
    start_echo(procs, "site-1", broker_address)
    with pytest.raises(ValueError, match="too large"):
        cell.send_request("test", "ping", "site-1", b"x" * (proto.MAX_MESSAGE_SIZE + 1), timeout=60)
    with pytest.raises(ValueError, match="too large"):
        cell.send_request("test", "ping", "site-1", {"x": "y" * proto.MAX_JSON_PAYLOAD}, timeout=60)
    with pytest.raises(ValueError, match="too large"):
        cell.request("test", "ping", "site-1", headers={"h": "y" * proto.MAX_HEADER_SIZE}, timeout=60)
    assert cell.send_request("test", "ping", "site-1", 1, timeout=10)["payload"] == 1


def test_a_request_timeout_is_still_a_timeout(procs, broker_address, cell):
    start_echo(procs, "server", broker_address)
    with pytest.raises(RequestTimeout):
        cell.send_request("test", "slow", "server", 3, timeout=0.5)


def test_undeliverable_notices_fail_only_a_request_to_that_destination():
    cell = Cell("tester", "tcp://127.0.0.1:1")  # never started: the handler is driven directly
    pending = PendingRequest(cell, 42, "server")
    cell._pending[42] = pending
    meta = encode_meta(Meta(KIND_REQUEST, 42, "test", "ping", PAYLOAD_NONE))

    def notice(destination: bytes) -> list:
        return [zmq.Frame(f) for f in (proto.UNDELIVERABLE, destination, meta, destination + b" is not connected")]

    cell._on_undeliverable(notice(b"other"))
    assert not pending.done() and cell.stats["forged_replies"] == 1
    cell._on_undeliverable(notice(b"server"))
    with pytest.raises(UnreachableError):
        pending.result(1)


def test_a_full_worker_pool_answers_busy_at_once(broker_address, cell, monkeypatch):
    monkeypatch.setattr("fedstream.nodes.cell._MAX_QUEUED_CALLBACKS", 2)
    release = threading.Event()
    with Cell("slow", broker_address, workers=1) as slow:
        slow.register_request_cb("test", "block", lambda m: release.wait(10) and "done")
        pending = [cell.request_async("test", "block", "slow", i) for i in range(4)]
        with pytest.raises(RemoteError, match="busy"):
            pending[3].result(10)
        release.set()
        assert [p.result(10).payload for p in pending[:2]] == ["done", "done"]
        assert slow.stats["busy"] >= 1


@pytest.mark.timeout(120)
def test_hundreds_of_cells_share_one_context_and_all_exchange_messages(procs):
    broker, address = procs.broker()
    count = 300
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 3 * count + 16)  # the default 1,023 sockets hold about 341 Cells
    cells, notes = [], []
    try:
        for i in range(count):
            cell = Cell(f"many-{i}", address, context=ctx)
            cell.register_request_cb("test", "echo", lambda m, i=i: [i, m.payload])
            cell.register_request_cb("test", "note", lambda m: notes.append(m.payload))
            cells.append(cell.start())
        pending = [(i, cell.request_async("test", "echo", f"many-{(i + 1) % count}", i))
                   for i, cell in enumerate(cells)]
        for i, request in pending:
            assert request.result(30).payload == [(i + 1) % count, i]
        for i, cell in enumerate(cells):
            cell.fire_and_forget("test", "note", f"many-{(i + 7) % count}", i)
        wait_until(lambda: len(notes) == count, 30)
        assert sorted(notes) == list(range(count))
    finally:
        for cell in cells:
            cell.stop()
        ctx.term()  # returns only if every Cell closed its sockets
    assert "expired" not in broker.stderr


@pytest.mark.timeout(60)
def test_a_context_out_of_sockets_gives_a_clear_error_and_leaves_nothing_open(broker_address):
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 3 * 4 + 2)  # four Cells, and room for the fifth's first sockets only
    cells = []
    try:
        for i in range(4):
            cells.append(Cell(f"site-{i}", broker_address, context=ctx))
            cells[-1].register_request_cb("test", "echo", lambda m: m.payload)
            cells[-1].start()
        with pytest.raises(CellError, match=r"limit of 14 sockets .*zmq.MAX_SOCKETS"):
            Cell("site-4", broker_address, context=ctx).start()
        assert cells[0].send_request("test", "echo", "site-3", 1, timeout=10) == 1
    finally:
        for cell in cells:
            cell.stop()
        ctx.term()  # hangs (and the test times out) if the failed start left a socket open


@pytest.mark.timeout(60)
def test_idle_cells_keep_their_names_with_a_short_node_timeout(procs):
    broker, address = procs.broker("--node-timeout", "1")
    with Cell("idle-a", address) as a, Cell("idle-b", address) as b:
        b.register_request_cb("test", "echo", lambda m: m.payload)
        threading.Event().wait(3)  # three node timeouts without a message: only heartbeats
        assert a.send_request("test", "echo", "idle-b", 5, timeout=10) == 5
    assert "expired" not in broker.stderr


def test_the_heartbeat_fits_the_brokers_node_timeout():
    cell = Cell("site-1", "tcp://127.0.0.1:1", heartbeat_interval=2.0)  # never started
    assert cell._beat_for({"node_timeout": 5.0}) == 2.0
    assert cell._beat_for({"node_timeout": 1}) == pytest.approx(0.4)
    assert cell._beat_for({"node_timeout": 0.001}) == 0.1  # a broker cannot make a cell spin
    for nonsense in ({}, {"node_timeout": "5"}, {"node_timeout": -1}, {"node_timeout": float("nan")},
                     {"node_timeout": True}, [5.0]):
        assert cell._beat_for(nonsense) == 2.0
