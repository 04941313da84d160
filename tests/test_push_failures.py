"""Push under failures and stress: killed targets and senders, slow and late targets, concurrency."""

import os
import threading
import time

import pytest

from fedstream.broker import Broker
from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileStreamer, FLContext
from fedstream.nodes.message import reply_error
from fedstream.nodes.push.sender import PushResult, send_file
from fedstream.nodes.push.wire import window_for
from tests.procs import wait_until
from tests.push_support import (CHANNEL, TOPIC, check_received, listing, make_file, next_done, run_helper, sha256_of,
                                start_receiver)

KIB = 1024
MIB = 1024 * KIB


class Owner:
    """A sender Cell in the test process; pushes run in background threads."""

    def __init__(self, address: str, name: str = "server") -> None:
        self.cell = Cell(name, address).start()

    def push_async(self, *args, **kwargs) -> dict:
        box: dict = {}

        def run() -> None:
            box["result"] = send_file(self.cell, *args, **kwargs)
            box["ended"] = time.monotonic()

        box["thread"] = threading.Thread(target=run, daemon=True)
        box["thread"].start()
        return box

    @staticmethod
    def result(box: dict, timeout: float = 60.0) -> PushResult:
        box["thread"].join(timeout)
        assert "result" in box, "the push did not return in time"
        return box["result"]

    def stop(self) -> None:
        self.cell.stop()


@pytest.fixture
def owner(broker_address):
    sender = Owner(broker_address)
    yield sender
    sender.stop()


def chunk_events(proc) -> list[tuple[int, float]]:
    """(chunk count, monotonic time) of the CHUNK lines a receiver printed so far."""
    events = []
    for line in proc.seen:
        if line.startswith("CHUNK "):
            _, _tag, count, stamp = line.split()
            events.append((int(count), float(stamp)))
    return events


def test_target_killed_mid_stream_fails_all_within_bounds(procs, broker_address, owner, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 16 * MIB)
    dests = {name: str(tmp_path / name) for name in ("victim", "site-1", "site-2")}
    victim = start_receiver(procs, "victim", broker_address, dests["victim"], chunk_delay=0.02, print_chunks=True)
    others = [start_receiver(procs, name, broker_address, dests[name]) for name in ("site-1", "site-2")]
    box = owner.push_async(CHANNEL, TOPIC, {}, ["site-1", "victim", "site-2"], src, chunk_size=256 * KIB,
                           chunk_timeout=1.0)
    victim.expect("CHUNK None 5 ", 30)
    victim.kill()
    killed = time.monotonic()
    result = owner.result(box)
    assert (result.rc, result.ok) == (ReturnCode.TIMEOUT, False)
    assert "'victim'" in result.error
    assert box["ended"] - killed < 1.0 + 2.0  # chunk_timeout plus slack
    for proc, name in zip(others, ("site-1", "site-2")):
        report = next_done(proc, 10)
        assert report["rc"] == "TASK_ABORTED" and report["path"] is None
        assert listing(dests[name]) == []  # no partial file


def test_sender_killed_mid_stream_receivers_time_out_and_clean_up(procs, broker_address, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 16 * MIB)
    dests = {name: str(tmp_path / name) for name in ("site-1", "site-2")}
    slow = start_receiver(procs, "site-1", broker_address, dests["site-1"], chunk_delay=0.02, print_chunks=True)
    fast = start_receiver(procs, "site-2", broker_address, dests["site-2"])
    sender = run_helper(procs, "push_sender", broker_address, src, "site-1,site-2", str(256 * KIB), "1.0")
    sender.expect("STARTED", 30)
    slow.expect("CHUNK None 5 ", 30)
    sender.kill()
    killed = time.monotonic()
    for proc, name in ((slow, "site-1"), (fast, "site-2")):
        report = next_done(proc, 15)
        # silence (idle timeout) or the broker saying the sender left, whichever comes first
        assert report["rc"] in ("TIMEOUT", "COMMUNICATION_ERROR") and report["path"] is None
        assert listing(dests[name]) == []
    # idle timeout (2 x chunk_timeout) after the slow site worked off its queue, plus slack
    assert time.monotonic() - killed < 8.0


def test_slow_target_holds_the_others_back_without_loss(procs, broker_address, owner, tmp_path):
    chunk = MIB
    window = window_for(chunk)
    src = str(tmp_path / "f.bin")
    sha = make_file(src, 48 * MIB)
    count = 48 * MIB // chunk
    assert count >= 3 * window
    names = ("slow", "fast-1", "fast-2")
    dests = {name: str(tmp_path / name) for name in names}
    receivers = {name: start_receiver(procs, name, broker_address, dests[name], print_chunks=True,
                                      chunk_delay=0.02 if name == "slow" else 0) for name in names}
    result = owner.push_async(CHANNEL, TOPIC, {}, list(names), src, chunk_size=chunk, chunk_timeout=5.0)
    assert Owner.result(result).ok
    for name, proc in receivers.items():
        check_received(next_done(proc), dests[name], sha, "f.bin")
    slow_times = [stamp for _, stamp in chunk_events(receivers["slow"])]
    assert len(slow_times) == count
    for name in ("fast-1", "fast-2"):
        events = chunk_events(receivers[name])
        assert [n for n, _ in events] == list(range(1, count + 1))  # every chunk once, none lost
        for n, stamp in events:
            slow_done = sum(1 for t in slow_times if t <= stamp)
            assert n <= slow_done + window, f"{name} got chunk {n} when the slow target had {slow_done}"


def test_late_subscriber_gets_every_chunk_through_repair(procs, broker_address, owner, tmp_path):
    # 8 MiB chunks: the window is 2 chunks and a repair reply carries one, so the late target
    # first misses the head of the stream (idle repair), then sees a gap on its SUB (gap repair).
    src = str(tmp_path / "f.bin")
    sha = make_file(src, 32 * MIB)
    dests = {name: str(tmp_path / name) for name in ("late", "site-1")}
    late = start_receiver(procs, "late", broker_address, dests["late"], subscribe_delay=1.5)
    normal = start_receiver(procs, "site-1", broker_address, dests["site-1"])
    box = owner.push_async(CHANNEL, TOPIC, {}, ["late", "site-1"], src, chunk_size=8 * MIB, chunk_timeout=5.0)
    result = Owner.result(box)
    assert result.ok, result.error
    assert result.bytes_published == 32 * MIB and result.bytes_repaired >= 2 * 8 * MIB
    late_report = next_done(late)
    check_received(late_report, dests["late"], sha, "f.bin")
    assert late_report["repaired"] >= 2
    check_received(next_done(normal), dests["site-1"], sha, "f.bin")


def test_concurrent_streams_stay_independent(procs, broker_address, owner, tmp_path):
    topics = [[CHANNEL, TOPIC], [CHANNEL, "other"], ["other-channel", TOPIC]]
    dests = {name: str(tmp_path / name) for name in ("site-1", "site-2")}
    receivers = {name: start_receiver(procs, name, broker_address, dests[name], topics=topics) for name in dests}
    plan = {  # tag: (channel, topic, targets, size)
        "a": (CHANNEL, TOPIC, ["site-1", "site-2"], 8 * MIB),
        "b": (CHANNEL, "other", ["site-2"], 6 * MIB + 7),
        "c": ("other-channel", TOPIC, ["site-2", "site-1"], 4 * MIB),
        "d": (CHANNEL, TOPIC, ["site-1"], 3 * MIB + 1),
        "e": (CHANNEL, TOPIC, ["site-2", "ghost"], 2 * MIB),  # fails at once: 'ghost' is not connected
    }
    shas, boxes = {}, {}
    for tag, (channel, topic, targets, size) in plan.items():
        src = str(tmp_path / f"{tag}.bin")
        shas[tag] = make_file(src, size)
    for tag, (channel, topic, targets, size) in plan.items():
        boxes[tag] = owner.push_async(channel, topic, {"tag": tag}, targets, str(tmp_path / f"{tag}.bin"),
                                      chunk_size=256 * KIB, chunk_timeout=5.0)
    results = {tag: Owner.result(box) for tag, box in boxes.items()}
    for tag in "abcd":
        assert results[tag].ok, (tag, results[tag].error)
    assert results["e"].rc == ReturnCode.COMMUNICATION_ERROR and "'ghost'" in results["e"].error
    expected = {"site-1": {"a", "c", "d"}, "site-2": {"a", "b", "c", "e"}}
    for site, proc in receivers.items():
        reports = {}
        for _ in expected[site]:
            report = next_done(proc)
            reports[report["ctx"]["tag"]] = report
        assert set(reports) == expected[site]
        for tag, report in reports.items():
            if tag == "e":
                assert report["rc"] == "TASK_ABORTED" and report["path"] is None
            else:
                check_received(report, dests[site], shas[tag], f"{tag}.bin")
        assert listing(dests[site]) == sorted(f"{tag}.bin" for tag in expected[site] - {"e"})


def test_callback_errors_are_logged_not_propagated(tmp_path, caplog):
    src = str(tmp_path / "f.bin")
    sha = make_file(src, 300 * KIB)
    dest = tmp_path / "dest"
    dest.mkdir()
    calls = []

    def done(stream_ctx, fl_ctx, **kwargs):
        calls.append((FileStreamer.get_rc(stream_ctx), FileStreamer.get_file_location(stream_ctx), kwargs))
        raise RuntimeError("stream_done_cb bug")

    def consumed(stream_ctx, fl_ctx, **kwargs):
        raise RuntimeError("chunk_consumed_cb bug")

    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("site-1", broker.address) as site, \
            Cell("server", broker.address) as server:
        FileStreamer.register_stream_processing(FLContext(site), CHANNEL, TOPIC, dest_dir=str(dest),
                                                stream_done_cb=done, chunk_consumed_cb=consumed, extra=7)
        assert FileStreamer.stream_file(CHANNEL, TOPIC, {}, ["site-1"], src, FLContext(server),
                                        chunk_size=64 * KIB) == (ReturnCode.OK, True)
        wait_until(lambda: calls, 5)
    (rc, location, kwargs), = calls
    assert rc == ReturnCode.OK and kwargs == {"extra": 7} and sha256_of(location) == sha
    assert "chunk_consumed_cb" in caplog.text and "stream_done_cb" in caplog.text


def test_bad_arguments_raise_value_error(tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x")
    fl_ctx = FLContext(Cell("server", "tcp://127.0.0.1:1"))  # never started: validation comes first
    good = dict(channel=CHANNEL, topic=TOPIC, stream_ctx={}, targets=["site-1"], file_name=str(src),
                fl_ctx=fl_ctx)
    bad_cases = [
        ({"file_name": str(tmp_path / "missing.bin")}, "missing.bin"),
        ({"file_name": str(tmp_path)}, "not a regular file"),
        ({"targets": []}, "targets is empty"),
        ({"targets": "site-1"}, "list of FQCNs"),
        ({"targets": ["bad name"]}, "Invalid FQCN"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": -5}, "chunk_size"),
        ({"chunk_size": 1 << 40}, "chunk_size"),
        ({"chunk_timeout": 0}, "chunk_timeout"),
        ({"chunk_timeout": -1.0}, "chunk_timeout"),
        ({"chunk_timeout": "5"}, "chunk_timeout"),
        ({"stream_ctx": {"obj": object()}}, "not JSON-compatible"),
        ({"stream_ctx": {1: "x"}}, "keys must be strings"),
        ({"stream_ctx": ["x"]}, "must be a dict"),
        ({"channel": ""}, "channel"),
        ({"secure": True}, "secure=True"),
        ({"fl_ctx": None}, "FLContext"),
    ]
    for change, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            FileStreamer.stream_file(**{**good, **change})
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    for kwargs, message in [({"dest_dir": str(not_a_dir)}, "not a directory"),
                            ({"dest_dir": str(tmp_path / "nope")}, "not a directory"),
                            ({"stream_done_cb": 5}, "callable"), ({"channel": ""}, "channel")]:
        with pytest.raises(ValueError, match=message):
            FileStreamer.register_stream_processing(**{"fl_ctx": fl_ctx, "channel": CHANNEL, "topic": TOPIC,
                                                       **kwargs})
    assert sorted(os.listdir(tmp_path)) == ["f.bin", "file.txt"]


def test_receiver_cell_stopping_fails_the_push_at_once(tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 8 * MIB)
    dest = tmp_path / "dest"
    dest.mkdir()
    outcomes, consumed = [], []

    def on_chunk(stream_ctx, fl_ctx):
        consumed.append(1)
        time.sleep(0.01)

    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("server", broker.address) as server:
        site = Cell("site-1", broker.address).start()
        FileStreamer.register_stream_processing(
            FLContext(site), CHANNEL, TOPIC, dest_dir=str(dest), chunk_consumed_cb=on_chunk,
            stream_done_cb=lambda stream_ctx, fl_ctx: outcomes.append(FileStreamer.get_rc(stream_ctx)))
        sender = Owner.__new__(Owner)
        sender.cell = server
        box = sender.push_async(CHANNEL, TOPIC, {}, ["site-1"], src, chunk_size=64 * KIB, chunk_timeout=10.0)
        wait_until(lambda: len(consumed) >= 5, 10)
        site.stop()
        stopped = time.monotonic()
        result = Owner.result(box)
    assert (result.rc, result.ok) == (ReturnCode.ERROR, False) and "'site-1'" in result.error
    assert box["ended"] - stopped < 2.0  # told at once, not after chunk_timeout
    assert outcomes == [ReturnCode.TASK_ABORTED]
    assert os.listdir(dest) == []


def test_malformed_start_requests_are_refused_without_leaving_files(tmp_path):
    from fedstream.nodes.push import wire
    from fedstream.nodes.push.seal import StreamKey

    dest = tmp_path / "dest"
    dest.mkdir()
    good = {"v": wire.WIRE_VERSION, "sid": wire.new_stream_id(), "name": "x.bin", "size": 10, "chunk_size": 4,
            "count": 3, "window": 2, "chunk_timeout": 1.0, "algo": "xxh3_128", "ctx": {},
            "seal": StreamKey.new().to_wire()}
    bad = [
        "not an object", {**good, "v": 99}, {**good, "sid": "short"}, {**good, "sid": "../../../../etc/pass"},
        {**good, "size": -1}, {**good, "count": 2}, {**good, "chunk_size": 0}, {**good, "window": 10_000},
        {**good, "chunk_timeout": 0}, {**good, "ctx": []}, {**good, "name": None}, {**good, "algo": "md5"},
        {**good, "size": 1 << 62, "chunk_size": 1 << 20, "count": 1 << 42},  # more than the disk holds
        {**good, "seal": None}, {**good, "seal": {**good["seal"], "key": "AAAA"}},  # no usable stream key
    ]
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("site-1", broker.address) as site, \
            Cell("peer", broker.address) as peer:
        FileStreamer.register_stream_processing(FLContext(site), CHANNEL, TOPIC, dest_dir=str(dest))
        for payload in bad:
            reply = peer.request(CHANNEL, TOPIC, "site-1", payload=payload, timeout=5)
            assert reply_error(reply.headers) is not None and "sid" not in reply.headers, payload
        for topic in (wire.TOPIC_VERIFY, wire.TOPIC_COMMIT):  # nobody but a stream's owner may finish it
            reply = peer.request(wire.CONTROL_CHANNEL, topic, "site-1", headers={"sid": ["x"]}, timeout=5)
            assert reply_error(reply.headers) == (wire.ERR_UNKNOWN_STREAM, "unknown stream")
    assert os.listdir(dest) == []
