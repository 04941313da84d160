"""The pull protocol state without sockets: window, resends, resume, liveness, reply budget (milliseconds)."""

import random

import pytest

from fedstream.nodes.pull import wire
from fedstream.nodes.pull.budget import ReplyBudget
from fedstream.nodes.pull.kept import KeptBytes
from fedstream.nodes.pull.window import (
    Call,
    ChunkRequest,
    Failure,
    Foreign,
    Liveness,
    Policy,
    PullWindow,
    Rejected,
    Replied,
    RetryLater,
    Undeliverable,
    WindowGrowth,
    error_outcome,
)

TIMEOUT = 5.0
POLICY = Policy(timeout=TIMEOUT)


def make_window(size: int, start: int = 0, chunk: int = 10, window: int = 4, now: float = 0.0,
                policy: Policy = POLICY) -> PullWindow:
    return PullWindow(size, start, chunk, window, Liveness(policy, now))


def answer(win: PullWindow, requests: list[ChunkRequest], now: float = 0.0) -> list[int]:
    ready = []
    for request in requests:
        ready += win.handle(Replied(request.offset, request.length), now)
    return ready


def drain(win: PullWindow, order=lambda requests: requests, now: float = 0.0) -> list[int]:
    """Answer everything the window asks for, in the given order; return the write order."""
    written = []
    while not win.complete:
        requests = win.due(now)
        assert requests, "an incomplete window must have requests to send"
        written += answer(win, order(requests), now)
        assert win.failure is None
    return written


# -- the window ---------------------------------------------------------------------------------
def test_requests_fill_the_window_in_offset_order_and_clip_the_last_chunk():
    win = make_window(35, chunk=10, window=3)
    assert win.due(0) == [ChunkRequest(0, 10), ChunkRequest(10, 10), ChunkRequest(20, 10)]
    assert win.due(0) == []  # nothing new until something is answered
    assert win.handle(Replied(0, 10), 0) == [0]
    assert win.due(0) == [ChunkRequest(30, 5)]
    assert answer(win, [ChunkRequest(10, 10), ChunkRequest(20, 10), ChunkRequest(30, 5)]) == [10, 20, 30]
    assert win.complete and win.written == 35 and win.due(0) == []


def test_out_of_order_replies_are_written_in_offset_order():
    win = make_window(100, chunk=10, window=5)
    written = drain(win, order=lambda requests: list(reversed(requests)))
    assert written == list(range(0, 100, 10))


def test_random_reply_order_writes_every_offset_once_in_order():
    rng = random.Random(7)
    for _ in range(50):
        size = rng.randrange(0, 500)
        win = make_window(size, chunk=rng.randrange(1, 40), window=rng.randrange(1, 9))
        written = drain(win, order=lambda requests: rng.sample(requests, len(requests)))
        assert written == sorted(written) and win.written == size


def test_held_data_never_exceeds_the_window():
    win = make_window(1000, chunk=10, window=4)
    requests = win.due(0)
    assert win.handle(Replied(30, 10), 0) == [] and win.handle(Replied(20, 10), 0) == []
    assert win.due(0) == []  # two answers are held (waiting for 0): the window is still full
    assert win.in_flight() == 4
    assert answer(win, requests[:2]) == [0, 10, 20, 30]
    assert len(win.due(0)) == 4


def test_duplicate_and_stranger_replies_are_ignored():
    win = make_window(30, chunk=10, window=3)
    win.due(0)
    assert win.handle(Replied(0, 10), 0) == [0]
    assert not win.wants(0)
    assert win.handle(Replied(0, 10), 0) == []  # a second answer to the same request
    assert win.handle(Replied(5, 10), 0) == []  # an offset never asked for
    assert win.handle(Replied(999, 3), 0) == []
    assert answer(win, [ChunkRequest(20, 10), ChunkRequest(10, 10)]) == [10, 20]
    assert win.handle(Replied(20, 10), 0) == [] and win.complete and win.failure is None


@pytest.mark.parametrize("chunk", [1, 7, 10])
def test_resume_at_every_chunk_boundary_asks_only_for_the_rest(chunk):
    size = 50
    for start in range(0, size + 1):
        win = make_window(size, start=start, chunk=chunk, window=3)
        first = win.due(0)
        if start == size:
            assert win.complete and first == []
            continue
        assert first[0].offset == start
        written = answer(win, first) + drain(win)
        assert written[0] == start and win.written == size
        assert sum(min(chunk, size - o) for o in written) == size - start


def test_a_start_outside_the_file_is_refused():
    with pytest.raises(ValueError):
        make_window(10, start=11)


def test_empty_file_is_complete_at_once():
    win = make_window(0)
    assert win.complete and win.due(0) == []


def test_short_reply_or_early_eof_means_the_file_changed():
    for nbytes in (0, 5, 11):
        win = make_window(30, chunk=10, window=3)
        win.due(0)
        assert win.handle(Replied(10, nbytes), 0) == []
        assert win.failure is not None and win.failure.remove_part
        assert "changed" in win.failure.message and not win.complete
        assert win.due(0) == [] and win.handle(Replied(0, 10), 0) == []


def test_last_chunk_clipped_to_the_size_is_not_an_eof_error():
    win = make_window(25, chunk=10, window=4)
    assert [r.length for r in win.due(0)] == [10, 10, 5]
    assert answer(win, [ChunkRequest(20, 5), ChunkRequest(0, 10), ChunkRequest(10, 10)]) == [0, 10, 20]
    assert win.complete


# -- resends ------------------------------------------------------------------------------------
def test_lost_replies_are_resent_after_the_timeout_then_the_download_fails():
    win = make_window(40, chunk=10, window=4)
    assert len(win.due(0)) == 4
    assert win.handle(Replied(0, 10), 1.0) == [0]  # progress at 1.0
    assert win.due(1.0) == []  # the whole file is requested already
    assert win.deadline() == pytest.approx(2.0)  # a probe of the owner's presence, 1 s after the last answer
    assert win.probe_due(2.0) and not win.probe_due(2.5)
    assert win.deadline() == pytest.approx(3.0)
    assert win.due(1.0 + TIMEOUT - 0.01) == []
    resent = win.due(1.0 + TIMEOUT)
    assert [r.offset for r in resent] == [10, 20, 30]  # every unanswered request, once
    assert win.due(1.0 + TIMEOUT) == []
    assert win.handle(Replied(10, 10), 7.0) == [10]  # the resend was answered: progress again
    assert [r.offset for r in win.due(7.0 + TIMEOUT)] == [20, 30]
    assert win.due(7.0 + 2 * TIMEOUT) == []  # the third silent round is the last
    assert win.failure is not None and "no reply from the owner within 5 s (3 attempts)" in win.failure.message
    assert not win.failure.remove_part


def test_a_reply_to_an_earlier_send_of_a_resent_request_counts():
    win = make_window(10, chunk=10, window=1)
    win.due(0)
    assert win.due(TIMEOUT) == [ChunkRequest(0, 10)]
    assert win.handle(Replied(0, 10), TIMEOUT + 1) == [0] and win.complete


def test_progress_keeps_a_long_download_alive():
    win = make_window(10_000, chunk=10, window=2)
    now = 0.0
    while not win.complete:
        requests = win.due(now)
        now += TIMEOUT * 0.9  # each answer comes just within the timeout
        answer(win, requests, now)
        assert win.failure is None
    assert now > 100 * TIMEOUT


def test_undeliverable_requests_are_retried_without_counting_attempts():
    policy = Policy(timeout=1.0, retry_delay=0.1, first_contact=2.0, grace=5.0)
    win = make_window(20, chunk=10, window=2, policy=policy)
    win.due(0)
    win.handle(Undeliverable(0, "'owner' is not connected"), 0.01)
    assert win.due(0.05) == []
    assert win.due(0.11) == [ChunkRequest(0, 10)]
    assert win.handle(Replied(0, 10), 0.2) == [0]
    assert win.handle(Replied(10, 10), 0.3) == [10] and win.complete


def test_an_owner_never_reached_fails_after_first_contact_whatever_the_timeout():
    policy = Policy(timeout=60.0, retry_delay=0.1, first_contact=2.0, grace=5.0)
    call = Call(Liveness(policy, 0.0), 0.0)
    now = 0.0
    while call.failure is None:
        if call.due(now):
            call.handle(Undeliverable(0, "Cannot deliver to 'x': 'x' is not connected."), now)
        now += 0.05
        assert now < 3
    assert now >= 2.0 and call.failure.message == "Cannot deliver to 'x': 'x' is not connected"


def test_an_owner_lost_mid_transfer_gets_a_grace_then_fails():
    policy = Policy(timeout=60.0, retry_delay=0.1, first_contact=2.0, grace=5.0)
    liveness = Liveness(policy, 0.0)
    win = PullWindow(30, 0, 10, 3, liveness)
    win.due(0)
    assert win.handle(Replied(0, 10), 1.0) == [0]
    win.handle(Undeliverable(10, "gone"), 2.0)
    assert win.due(2.05) == [] and win.due(2.1) == [ChunkRequest(10, 10)]  # the retry
    win.handle(Undeliverable(10, "gone"), 2.2)
    assert win.due(6.9) == [ChunkRequest(10, 10)] and win.failure is None  # still within the grace
    win.handle(Undeliverable(10, "gone"), 6.95)
    assert win.due(7.0) == [] and win.failure == Failure("gone")


def test_an_owner_back_within_the_grace_goes_on():
    policy = Policy(timeout=60.0, retry_delay=0.1, grace=5.0)
    win = make_window(20, chunk=10, window=2, policy=policy)
    win.due(0)
    win.handle(Replied(0, 10), 0.5)
    win.handle(Undeliverable(10, "gone"), 1.0)
    assert win.due(4.0) == [ChunkRequest(10, 10)]
    assert win.handle(Replied(10, 10), 4.5) == [10] and win.complete
    assert win.failure is None


def test_requests_delivered_to_an_owner_that_vanished_are_noticed_by_probes():
    policy = Policy(timeout=60.0, probe_interval=1.0, grace=5.0)
    liveness = Liveness(policy, 0.0)
    win = PullWindow(30, 0, 10, 3, liveness)
    win.due(0)
    assert win.handle(Replied(0, 10), 0.5) == [0]  # then the owner vanishes with 10 and 20 in flight
    assert not win.probe_due(1.4) and win.probe_due(1.5)
    liveness.handle_probe(Undeliverable(-1, "'owner' is not connected"), 1.51)
    assert win.probe_due(2.5)
    liveness.handle_probe(Undeliverable(-1, "'owner' is not connected"), 2.51)
    assert win.due(6.5) == [] and win.failure is None  # the grace counts from the first absence
    assert win.due(6.51) == [] and win.failure == Failure("'owner' is not connected")


def test_a_probe_answer_ends_an_absence_but_is_no_answer_to_the_requests():
    policy = Policy(timeout=10.0, probe_interval=1.0, grace=5.0)
    liveness = Liveness(policy, 0.0)
    win = PullWindow(20, 0, 10, 2, liveness)
    win.due(0)
    assert win.probe_due(1.0)
    liveness.handle_probe(Undeliverable(-1, "gone"), 1.0)
    assert win.probe_due(2.0)
    liveness.handle_probe(Replied(-1), 2.5)  # the owner is back (its broker link was restarted)
    assert win.failure is None and liveness.deadline() is None
    assert liveness.reached and liveness.last_heard is None
    assert [r.offset for r in win.due(2.5)] == [0, 10]  # sent before the absence: lost with it
    assert win.due(2.6) == [] and not win.probe_due(2.9) and win.probe_due(3.0)
    liveness.handle_probe(Replied(-1), 3.1)  # present all along: nothing to resend
    assert win.due(3.2) == []
    assert [r.offset for r in win.due(12.5)] == [0, 10]  # silent since 2.5: resent after the timeout


def test_an_owner_that_answered_only_a_probe_counts_as_reached():
    policy = Policy(timeout=60.0, probe_interval=1.0, first_contact=2.0, grace=5.0)
    liveness = Liveness(policy, 0.0)
    call = Call(liveness, 0.0)
    assert call.due(0.0) and call.probe_due(1.0)
    liveness.handle_probe(RetryLater(-1), 1.1)
    call.handle(Undeliverable(0, "gone"), 1.2)
    assert call.due(3.5) and call.failure is None  # past first_contact, within the grace


def test_no_probe_without_requests_waiting():
    win = make_window(10, chunk=10, window=1)
    assert not win.probe_due(100.0)
    win.due(100.0)
    assert win.handle(Replied(0, 10), 100.1) == [0]
    assert not win.probe_due(200.0)


def test_retry_later_resends_after_the_delay_and_counts_as_an_answer():
    call = Call(Liveness(Policy(timeout=1.0, retry_delay=0.1), 0.0), 0.0)
    assert call.due(0.0)
    for step in range(100):  # the owner says "pending" for 10 s: fine, it is answering
        now = step * 0.1
        call.handle(RetryLater(0), now + 0.01)
        assert call.due(now + 0.12) and call.failure is None
    assert call.handle(Replied(0), 10.5) and call.answered
    assert not call.due(11.0) and not call.handle(Replied(0), 11.0)


def test_foreign_replies_are_ignored_and_the_request_sent_again():
    win = make_window(10, chunk=10, window=1)
    win.due(0)
    assert win.handle(Foreign(0), 0.1) == []
    assert win.due(0.1) == [ChunkRequest(0, 10)]  # at once: its real answer was lost with the forgery
    assert win.failure is None and win.wants(0)
    assert win.handle(Replied(0, 10), 0.2) == [0] and win.complete


def test_rejections_are_attempts():
    call = Call(Liveness(POLICY, 0.0), 0.0)
    for _ in range(2):
        assert call.due(0.0)
        call.handle(Rejected(0, "'o' answered: no handler."), 0.0)
        assert call.failure is None
    assert call.due(0.0)
    call.handle(Rejected(0, "'o' answered: no handler."), 0.0)
    assert call.failure == Failure("'o' answered: no handler")


def test_error_codes():
    assert error_outcome(wire.ERR_PENDING, "x") is None
    assert error_outcome(wire.ERR_BUSY, "x") is None
    unknown = error_outcome(wire.ERR_UNKNOWN_REF, "whatever")
    assert unknown.remove_part and wire.UNKNOWN_REF_MESSAGE in unknown.message
    assert error_outcome(wire.ERR_CHANGED, "changed").remove_part
    io = error_outcome(wire.ERR_IO, "the owner cannot read 'f'")
    assert io == Failure("the owner answered: the owner cannot read 'f'")


# -- the owner's reply budget ---------------------------------------------------------------------
def test_reply_budget_per_requester_and_in_total():
    budget = ReplyBudget(per_requester=32, total=48, per_requester_replies=3)
    a1 = budget.reserve("a", 16)
    a2 = budget.reserve("a", 16)
    assert a1 and a2 and budget.reserve("a", 1) is None  # a's bytes are all in flight
    b1 = budget.reserve("b", 16)
    assert b1 and budget.reserve("b", 1) is None and budget.reserve("c", 1) is None  # the total is reached
    budget.release(a1)
    budget.release(a1)  # twice: no effect
    assert budget.in_flight("a") == 16 and budget.in_flight() == 32
    c = [budget.reserve("c", 1) for _ in range(4)]
    assert c[:3] == [t for t in c[:3] if t] and c[3] is None  # at most 3 replies to one requester
    for token in (a2, b1, *c[:3]):
        budget.release(token)
    assert budget.in_flight() == 0 and budget.in_flight("a") == 0


def test_the_state_modules_import_no_sockets_threads_clocks_or_files():
    import ast
    from pathlib import Path

    forbidden = {"zmq", "threading", "time", "os", "socket", "select", "subprocess", "asyncio", "concurrent",
                 "shutil", "queue"}
    for name in ("window.py", "budget.py"):
        path = Path(wire.__file__).with_name(name)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & forbidden, (name, imported & forbidden)


def test_buffer_pool_reuses_power_of_two_buffers_while_lent_and_idle_stay_within_its_limit():
    from fedstream.nodes.pull.buffers import SMALLEST, BufferPool, buffer_size

    assert [buffer_size(n) for n in (1, SMALLEST, SMALLEST + 1, 1 << 20, (1 << 20) + 1)] == \
        [SMALLEST, SMALLEST, 2 * SMALLEST, 1 << 20, 2 << 20]
    pool = BufferPool(idle_limit=3 << 20)
    first = pool.take(1000 * 1000)
    assert len(first) == 1 << 20
    pool.give(first)
    assert pool.take(1 << 20) is first and pool.idle() == 0
    kept = [pool.take(1 << 20) for _ in range(4)]
    for buffer in kept:
        pool.give(buffer)
    assert pool.idle() == 2 << 20  # `first` is still lent: two of the four were left to the allocator
    pool.give(first)
    assert pool.idle() == 3 << 20
    big = pool.take(2 << 20)  # a miss: idle buffers of other sizes make room for it
    assert len(big) == 2 << 20 and pool.idle() == 1 << 20


# -- window growth (a long link) -------------------------------------------------------------
def test_window_grows_while_each_round_is_faster():
    growth = WindowGrowth(window=4, max_window=100, chunk_size=10, written=0, now=0.0)
    assert growth.wanted(30, 1.0) == 4  # the first round (4 chunks) is not over yet
    assert growth.wanted(40, 1.0) == 6  # 40 bytes/s: half as large again
    growth.granted(6)
    assert growth.wanted(100, 2.0) == 9  # 60 bytes/s: faster, grow again
    growth.granted(9)
    assert growth.wanted(190, 2.5) == 13  # 180 bytes/s
    growth.granted(13)
    assert growth.growing


def test_window_stops_growing_when_a_round_gains_too_little():
    growth = WindowGrowth(window=4, max_window=100, chunk_size=10, written=0, now=0.0)
    assert growth.wanted(40, 1.0) == 6
    growth.granted(6)
    assert growth.wanted(100, 2.4) == 6  # 42.9 bytes/s: less than 10 % faster than 40
    assert not growth.growing
    assert growth.wanted(10_000, 2.5) == 6  # and it stays


def test_window_growth_is_bounded_by_max_window_and_by_what_is_granted():
    growth = WindowGrowth(window=8, max_window=12, chunk_size=1, written=0, now=0.0)
    assert growth.wanted(8, 1.0) == 12
    growth.granted(12)
    assert not growth.growing and growth.wanted(100, 1.1) == 12
    starved = WindowGrowth(window=4, max_window=100, chunk_size=10, written=0, now=0.0)
    assert starved.wanted(40, 1.0) == 6
    starved.granted(4)  # the cell's other downloads hold the rest of its bytes in flight
    assert not starved.growing and starved.window == 4
    fixed = WindowGrowth(window=12, max_window=12, chunk_size=1, written=0, now=0.0)
    assert not fixed.growing and fixed.wanted(1000, 1.0) == 12


# -- lost requests and replies -----------------------------------------------------------------
def test_a_request_overtaken_by_an_answered_later_one_is_resent_after_lost_after():
    win = make_window(30, chunk=10, window=2)
    assert win.due(0.0) == [ChunkRequest(0, 10), ChunkRequest(10, 10)]
    assert win.handle(Replied(0, 10), 0.1) == [0]
    assert win.due(0.1) == [ChunkRequest(20, 10)]
    assert win.handle(Replied(20, 10), 0.2) == []  # sent after offset 10 and answered: 10 may be lost
    assert win.deadline() == min(0.2 + POLICY.probe_interval, POLICY.lost_after)
    assert win.due(POLICY.lost_after - 0.01) == []
    assert win.due(POLICY.lost_after) == [ChunkRequest(10, 10)]  # not an attempt: no failure however often
    assert win.handle(Replied(10, 10), 2.1) == [10, 20] and win.complete


def test_requests_answered_in_any_order_within_lost_after_are_not_resent():
    win = make_window(30, chunk=10, window=2)
    win.due(0.0)
    win.handle(Replied(0, 10), 0.1)
    win.due(0.1)
    win.handle(Replied(20, 10), 0.2)
    assert win.due(1.5) == []
    assert win.handle(Replied(10, 10), 1.5) == [10, 20] and win.complete


def test_a_call_whose_answer_was_lost_is_resent_once_a_later_probe_is_answered():
    liveness = Liveness(POLICY, 0.0)
    call = Call(liveness, 0.0)
    assert call.due(0.0)
    assert call.probe_due(POLICY.probe_interval)
    liveness.handle_probe(Replied(-1, 0), POLICY.probe_interval + 0.05)  # the owner is there and answering
    assert not call.due(POLICY.lost_after - 0.01)
    assert call.due(POLICY.lost_after) and call.failure is None
    assert call.handle(Replied(0, 0), POLICY.lost_after + 0.1)


def test_kept_bytes_take_files_up_to_their_size_and_total_and_get_them_back():
    kept = KeptBytes(total=100, max_file=40)
    assert not kept.take(41)  # too large to keep, however much is free
    assert kept.take(40) and kept.take(40) and kept.used == 80
    assert not kept.take(21)  # would exceed the total
    assert kept.take(20) and kept.used == 100
    kept.give(40)
    assert kept.used == 60 and kept.take(40) and kept.used == 100
