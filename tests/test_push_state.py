"""The push protocol decisions without sockets: PushWindow (owner), Assembly (receiver), the one-chunk path."""

import pytest

from fedstream.common.rc import ReturnCode
from fedstream.nodes.push import wire
from fedstream.nodes.push.assembly import MAX_HOLES, Assembly, RepairAsk
from fedstream.nodes.push.window import Ack, Cancelled, Fail, PushWindow, Ready, choose_repair

T0 = 1000.0


def publish_all(window: PushWindow, now: float) -> list[int]:
    """Publish what the window allows now; return the seqs."""
    out = []
    while (seq := window.next_seq()) is not None:
        window.published(seq, now)
        out.append(seq)
    return out


# -- PushWindow -------------------------------------------------------------------------------
def test_window_runs_at_most_w_ahead_of_the_slowest_ack():
    w = PushWindow(["a", "b"], count=10, window=3, chunk_timeout=5.0, now=T0)
    assert publish_all(w, T0) == [0, 1, 2]
    w.handle(Ack("a", 3), T0 + 0.1)
    assert w.next_seq() is None  # "b" holds nothing yet
    w.handle(Ack("b", 1), T0 + 0.2)
    assert publish_all(w, T0 + 0.2) == [3]
    w.handle(Ack("b", 3), T0 + 0.3)
    assert publish_all(w, T0 + 0.3) == [4, 5]
    assert w.slowest == 3 and not w.all_acked


def test_duplicate_stale_and_early_acks_change_nothing():
    w = PushWindow(["a"], count=4, window=2, chunk_timeout=5.0, now=T0)
    publish_all(w, T0)
    w.handle(Ack("a", 2), T0)
    w.handle(Ack("a", 2), T0)  # duplicate
    w.handle(Ack("a", 1), T0)  # out of order, older
    assert w.acks["a"] == 2
    w.handle(Ack("a", 99), T0)  # beyond what was published: capped
    assert w.acks["a"] == 2
    publish_all(w, T0)
    w.handle(Ack("a", 4), T0)
    assert w.all_acked and w.verdict is None


def test_events_from_non_targets_are_ignored_and_counted():
    w = PushWindow(["a"], count=2, window=2, chunk_timeout=5.0, now=T0)
    publish_all(w, T0)
    for event in (Ack("mallory", 2), Ready("mallory"), Fail("mallory", "forged")):
        w.handle(event, T0)
    assert w.ignored == 3 and w.verdict is None and not w.all_acked and w.not_ready() == ["a"]


def test_a_failing_target_fails_all_and_the_first_verdict_wins():
    w = PushWindow(["a", "b", "c"], count=5, window=2, chunk_timeout=5.0, now=T0)
    publish_all(w, T0)
    w.handle(Fail("b", "disk full"), T0)
    assert w.verdict.rc == ReturnCode.ERROR and "'b'" in w.verdict.message and "disk full" in w.verdict.message
    assert w.next_seq() is None  # nothing more goes out
    w.handle(Cancelled("the cell is stopping"), T0)
    w.handle(Ack("a", 2), T0)
    assert "'b'" in w.verdict.message and w.acks["a"] == 0


def test_cancelled_aborts():
    w = PushWindow(["a"], count=1, window=2, chunk_timeout=5.0, now=T0)
    w.handle(Cancelled("the cell is stopping"), T0)
    assert w.verdict.rc == ReturnCode.TASK_ABORTED and w.verdict.message == "the cell is stopping"


def test_stalled_target_fails_after_chunk_timeout_not_before():
    w = PushWindow(["fast", "slow"], count=10, window=2, chunk_timeout=5.0, now=T0)
    w.start_clocks(T0)
    publish_all(w, T0)
    w.handle(Ack("fast", 2), T0 + 1)
    assert w.check_stalls(T0 + 1) == pytest.approx(4.0)  # slow owes acks since T0
    w.handle(Ack("slow", 1), T0 + 4)  # progress resets its clock
    assert w.check_stalls(T0 + 8.9) == pytest.approx(0.1) and w.verdict is None
    w.check_stalls(T0 + 9.0)
    assert w.verdict.rc == ReturnCode.TIMEOUT and "'slow'" in w.verdict.message and "1 of 10" in w.verdict.message


def test_a_target_that_holds_everything_owes_nothing_until_the_next_chunk():
    w = PushWindow(["a"], count=10, window=2, chunk_timeout=5.0, now=T0)
    publish_all(w, T0)
    w.handle(Ack("a", 2), T0 + 1)
    assert w.check_stalls(T0 + 100) == 5.0 and w.verdict is None  # nothing owed: no stall
    publish_all(w, T0 + 100)  # its clock starts with the new chunk
    assert w.check_stalls(T0 + 104) == pytest.approx(1.0)
    w.check_stalls(T0 + 105)
    assert w.verdict is not None


def test_late_joiner_is_waited_for_and_caught_up_by_repair():
    w = PushWindow(["early", "late"], count=6, window=2, chunk_timeout=5.0, now=T0)
    w.handle(Ready("early"), T0)
    assert not w.all_ready and w.not_ready() == ["late"]
    w.start_clocks(T0 + 1)
    publish_all(w, T0 + 1)
    w.handle(Ack("early", 2), T0 + 1.1)
    # the late target asks for everything from 0: only what was published is sent
    assert choose_repair([], 0, w.published_count, lambda s: 10, budget=100, limit=50) == [0, 1]
    w.handle(Ack("late", 2), T0 + 2)
    assert publish_all(w, T0 + 2) == [2, 3]


def test_choose_repair_keeps_order_dedups_and_bounds():
    length = {0: 10, 1: 10, 2: 10, 3: 10, 4: 5}.get
    assert choose_repair([3, 1, 3, 7, -1], None, published=5, length_of=length, budget=100, limit=10) == [3, 1]
    assert choose_repair([1], 3, published=5, length_of=length, budget=100, limit=10) == [1, 3, 4]
    assert choose_repair([], 0, published=5, length_of=length, budget=25, limit=10) == [0, 1]
    assert choose_repair([], 0, published=5, length_of=length, budget=1, limit=10) == [0]  # always one
    assert choose_repair([], 0, published=5, length_of=length, budget=100, limit=2) == [0, 1]
    assert choose_repair([], None, published=5, length_of=length, budget=100, limit=10) == []


def test_out_of_order_publication_is_a_bug():
    w = PushWindow(["a"], count=3, window=3, chunk_timeout=1.0, now=T0)
    with pytest.raises(ValueError):
        w.published(1, T0)


# -- Assembly ---------------------------------------------------------------------------------
def test_in_order_chunks_grow_the_prefix_and_ack_once_each():
    a = Assembly(count=3, window=2, chunk_timeout=5.0, now=T0)
    for seq in range(3):
        assert a.admit(seq)
        assert a.stored(seq, T0) == [seq]
    assert a.complete and a.take_ack() == 3 and a.take_ack() is None


def test_out_of_order_chunks_join_the_prefix_in_order_after_the_gap():
    a = Assembly(count=6, window=6, chunk_timeout=5.0, now=T0)
    assert a.stored(0, T0) == [0]
    for seq in (2, 4, 3):
        assert a.admit(seq) and a.stored(seq, T0) == []
    assert a.holes() == [1] and a.repair_request().missing == [1]
    assert a.stored(1, T0) == [1, 2, 3, 4]  # hashed in this order
    assert a.prefix == 5 and a.holes() == []


def test_duplicates_and_chunks_outside_the_window_are_not_written():
    a = Assembly(count=10, window=2, chunk_timeout=5.0, now=T0)
    a.stored(0, T0)
    assert not a.admit(0)  # below the prefix
    a.stored(2, T0)
    assert not a.admit(2)  # held beyond the prefix
    assert a.duplicates == 2
    assert not a.admit(3)  # the owner never runs this far ahead of our prefix (1 + window 2)
    assert a.admit(3, repaired=True)  # a repair may bring it
    assert not a.admit(10, repaired=True) and not a.admit(-1, repaired=True)


def test_holes_are_bounded():
    a = Assembly(count=5000, window=5000, chunk_timeout=5.0, now=T0)
    a.stored(4000, T0)
    assert len(a.holes()) == MAX_HOLES and a.holes()[0] == 0


def test_idle_repair_asks_from_the_first_chunk_not_held():
    a = Assembly(count=8, window=4, chunk_timeout=2.0, now=T0)  # nudge interval 0.5 s
    assert not a.repair_due(T0 + 0.4)
    assert a.repair_due(T0 + 0.5)
    ask = a.repair_request()
    assert (ask.ack, ask.missing, ask.start) == (0, [], 0)
    a.stored(0, T0 + 0.6)
    a.stored(1, T0 + 0.6)
    a.repair_answered(T0 + 0.6, others=0)
    assert a.repair_request().start == 2


def test_gaps_are_asked_for_at_once_then_paced_when_unanswered():
    a = Assembly(count=8, window=8, chunk_timeout=2.0, now=T0)
    a.stored(3, T0)
    assert a.repair_due(T0 + 0.5) and a.repair_request().missing == [0, 1, 2]
    a.repair_unanswered(T0 + 0.5)
    assert not a.repair_due(T0 + 0.9) and a.repair_due(T0 + 1.0)


def test_silent_owner_ends_the_stream_after_the_idle_timeout_capped():
    a = Assembly(count=8, window=4, chunk_timeout=2.0, now=T0)
    assert a.expired(T0 + 4.0) is None
    assert "nothing from the sender for 4 s" in a.expired(T0 + 4.01)
    capped = Assembly(count=8, window=4, chunk_timeout=3600.0, now=T0, max_idle=60.0)
    assert capped.idle_timeout == 60.0 and capped.expired(T0 + 60.01) is not None


def test_no_progress_ends_the_stream_even_if_the_owner_answers():
    a = Assembly(count=8, window=4, chunk_timeout=3600.0, now=T0, max_idle=60.0, max_stall=10.0)
    for t in range(1, 10):
        a.repair_answered(T0 + t, others=0)  # the owner answers, but nothing moves
    assert a.expired(T0 + 10.0) is None
    assert "no progress for 10 s" in a.expired(T0 + 10.01)


def test_answers_without_news_or_with_impossible_news_are_not_progress():
    a = Assembly(count=4, window=4, chunk_timeout=3600.0, now=T0, max_stall=10.0)
    for t, others in ((2, None), (4, 5), (6, 10 ** 9), (8, None)):
        a.repair_answered(T0 + t, others)
    assert a.expired(T0 + 10.01) is not None
    b = Assembly(count=4, window=4, chunk_timeout=3600.0, now=T0, max_stall=10.0)
    for t, others in ((5, 1), (10, 2), (14, 2)):
        b.repair_answered(T0 + t, others)
    assert b.expired(T0 + 19.9) is None and b.expired(T0 + 20.01) is not None


def test_other_targets_moving_counts_as_progress_for_a_complete_receiver():
    a = Assembly(count=1, window=2, chunk_timeout=5.0, now=T0, max_stall=10.0)
    a.stored(0, T0)
    for t, others in ((5, 0), (9, 0), (14, 1)):
        a.repair_answered(T0 + t, others)
    assert a.expired(T0 + 23.0) is None  # progress at T0 + 14
    a.progressed(T0 + 23.5)  # verify
    assert a.expired(T0 + 30.0) is None


# -- the one-chunk path ------------------------------------------------------------------------
KIB = 1024


@pytest.mark.parametrize("size,chunk_size,expected", [
    (0, 1 << 20, True), (1, 1 << 20, True), (64 * KIB, 1 << 20, True),
    (256 * KIB, 1 << 20, True), (256 * KIB + 1, 1 << 20, False),  # the 256 KiB bound
    (64 * KIB, 64 * KIB, True), (64 * KIB + 1, 64 * KIB, False),  # one chunk only
    (4 * KIB, 4 * KIB, True), (0, 1, True), (2, 1, False),
])
def test_one_chunk_path_takes_files_of_one_chunk_up_to_256_kib(size, chunk_size, expected):
    assert wire.one_chunk_path(size, chunk_size, secure=False, start_bytes=300) is expected


def test_one_chunk_path_is_for_plain_streams_with_a_small_start_description():
    assert not wire.one_chunk_path(1000, 1 << 20, secure=True, start_bytes=300)
    assert wire.one_chunk_path(1000, 1 << 20, secure=False, start_bytes=wire.ONE_CHUNK_MAX_START)
    assert not wire.one_chunk_path(1000, 1 << 20, secure=False, start_bytes=wire.ONE_CHUNK_MAX_START + 1)


def one_chunk_start(size: int, **changes: object) -> dict:
    info = {"v": wire.WIRE_VERSION, "sid": wire.new_stream_id(), "name": "x.bin", "size": size,
            "chunk_size": 1 << 20, "count": wire.chunk_count(size, 1 << 20), "window": 16, "chunk_timeout": 5.0,
            "algo": "xxh3_128", "ctx": {}, "digest": "0" * 32}
    info.update(changes)
    return info


@pytest.mark.parametrize("size", [0, 1, 256 * KIB])
def test_a_well_formed_one_chunk_start_is_accepted(size):
    info = one_chunk_start(size)
    assert wire.check_one_chunk_start(info, size) is info


@pytest.mark.parametrize("headers,length,reason", [
    (one_chunk_start(10), 9, "payload has 9 bytes"),  # the payload is not the whole file
    (one_chunk_start(10), 11, "payload has 11 bytes"),
    (one_chunk_start(256 * KIB + 1), 256 * KIB + 1, "one chunk of at most"),
    (one_chunk_start(200, chunk_size=100, count=2), 200, "one chunk of at most"),
    (one_chunk_start(200, chunk_size=100, count=1), 200, "chunk count"),  # check_start still applies
    (one_chunk_start(10, digest=None), 10, "digest"),
    (one_chunk_start(10, digest=""), 10, "digest"),
    (one_chunk_start(10, digest="f" * 129), 10, "digest"),
    (one_chunk_start(10, e2e={}), 10, "secure"),
    (one_chunk_start(10, v=99), 10, "version"),
    ({}, 0, "version"),
])
def test_malformed_one_chunk_starts_are_refused(headers, length, reason):
    with pytest.raises(ValueError, match=reason):
        wire.check_one_chunk_start(headers, length)


def test_a_one_chunk_stream_is_complete_once_stored_then_only_waits_for_its_owner():
    a = Assembly(count=1, window=16, chunk_timeout=1.0, now=T0)
    assert a.admit(0) and a.stored(0, T0) == [0] and a.complete
    a.progressed(T0)  # the start request verified it
    assert not a.repair_due(T0 + 0.1) and a.repair_due(T0 + a.nudge_interval)  # a quiet owner is asked after
    assert a.repair_request() == RepairAsk(1, [], 1)  # nothing missing: the question carries no request
    assert a.expired(T0 + a.idle_timeout) is None
    assert "nothing from the sender" in a.expired(T0 + a.idle_timeout + 0.01)
    empty = Assembly(count=0, window=16, chunk_timeout=1.0, now=T0)
    assert empty.complete and not empty.admit(0)


# -- the rule that makes this file possible ----------------------------------------------------
@pytest.mark.parametrize("name", ["window.py", "assembly.py", "wire.py"])
def test_protocol_state_imports_no_io(name):
    import ast
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "nodes" / "push" / name
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"zmq", "threading", "time", "os", "socket", "select", "shutil", "concurrent", "asyncio"}
