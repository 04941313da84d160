"""The one-chunk path of push with real processes: the whole file inside start, verified there, then commit."""

import hashlib
import os
import shutil
import threading
import time

import pytest

from fedstream.common.digest import new_hasher
from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileStreamer, FLContext
from fedstream.nodes.message import reply_error
from fedstream.nodes.push import wire
from fedstream.nodes.push.sender import send_file
from tests.procs import wait_until
from tests.push_support import (CHANNEL, TOPIC, check_received, listing, make_file, next_done, receiving_federation,
                                start_receiver)

KIB = 1024
MIB = 1024 * KIB
SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """A broker, two receiver processes and an owner Cell in the test process."""
    with receiving_federation(tmp_path_factory.mktemp("one-chunk"), SITES) as (_, receivers, dests, cell):
        yield cell, receivers, dests


def check_all(fed, targets: list[str], sha: str, name: str, ctx: dict, chunk_size: int = MIB) -> None:
    """Every target called stream_done_cb with the verified file, and left nothing else behind."""
    _, receivers, dests = fed
    for site in targets:
        report = next_done(receivers[site])
        check_received(report, dests[site], sha, name)
        assert report["ctx"] == ctx and report["chunks"] == wire.chunk_count(report["size"], chunk_size)
        assert listing(dests[site]) == [name]  # no .part left
        os.unlink(report["path"])


@pytest.mark.parametrize("targets", [SITES[:1], SITES], ids=["1-target", "2-targets"])
@pytest.mark.parametrize("size", [0, 1, 64 * KIB, 256 * KIB], ids=["empty", "1", "64K", "256K-threshold"])
def test_a_small_file_travels_inside_start_and_is_verified(fed, tmp_path, size, targets):
    cell = fed[0]
    src = str(tmp_path / "small.bin")
    sha = make_file(src, size)
    progress = []
    result = send_file(cell, CHANNEL, TOPIC, {"tag": "small"}, targets, src, progress=progress.append)
    assert (result.rc, result.ok, result.error) == (ReturnCode.OK, True, None)
    assert result.bytes_published == 0 and result.bytes_repaired == 0  # nothing on the fan-out
    assert result.bytes_in_start == size * len(targets)
    assert progress == [size]
    check_all(fed, targets, sha, "small.bin", {"tag": "small"})


@pytest.mark.parametrize("size,chunk_size", [(64 * KIB, 64 * KIB), (64 * KIB + 1, 64 * KIB),
                                             (256 * KIB + 1, MIB)], ids=["chunk", "chunk+1", "256K+1"])
def test_the_threshold_is_one_chunk_and_256_kib(fed, tmp_path, size, chunk_size):
    cell = fed[0]
    src = str(tmp_path / "edge.bin")
    sha = make_file(src, size)
    result = send_file(cell, CHANNEL, TOPIC, {}, SITES, src, chunk_size=chunk_size)
    assert result.ok, result.error
    if wire.one_chunk_path(size, chunk_size, secure=False, start_bytes=0):
        assert (result.bytes_in_start, result.bytes_published) == (2 * size, 0)
    else:  # one byte over: the normal path, published once on the fan-out
        assert size > min(chunk_size, wire.ONE_CHUNK_MAX)
        assert (result.bytes_in_start, result.bytes_published) == (0, size)
    check_all(fed, SITES, sha, "edge.bin", {}, chunk_size)


def test_a_refusing_target_fails_the_push_and_the_others_are_aborted(procs, broker_address, tmp_path):
    dests = {site: str(tmp_path / site) for site in SITES}
    receivers = {site: start_receiver(procs, site, broker_address, dests[site]) for site in SITES}
    shutil.rmtree(dests["site-2"])  # site-2 refuses: its destination directory is gone
    src = str(tmp_path / "f.bin")
    make_file(src, 10 * KIB)
    with Cell("server", broker_address) as cell:
        result = send_file(cell, CHANNEL, TOPIC, {}, SITES, src, chunk_timeout=5.0)
    assert (result.rc, result.ok) == (ReturnCode.ERROR, False)
    assert "'site-2'" in result.error and "destination directory" in result.error
    report = next_done(receivers["site-1"])
    assert report["rc"] == "TASK_ABORTED" and report["path"] is None
    assert listing(dests["site-1"]) == []
    assert not os.path.exists(dests["site-2"])


def test_a_killed_target_fails_the_push_and_the_others_are_aborted(procs, broker_address, tmp_path):
    dests = {site: str(tmp_path / site) for site in SITES}
    receivers = {site: start_receiver(procs, site, broker_address, dests[site]) for site in SITES}
    receivers["site-2"].kill()
    src = str(tmp_path / "f.bin")
    make_file(src, 10 * KIB)
    with Cell("server", broker_address) as cell:
        result = send_file(cell, CHANNEL, TOPIC, {}, SITES, src, chunk_timeout=1.0)
    # the broker says it is gone, or it does not answer within chunk_timeout
    assert result.rc in (ReturnCode.COMMUNICATION_ERROR, ReturnCode.TIMEOUT) and not result.ok
    assert "'site-2'" in result.error
    report = next_done(receivers["site-1"])
    assert report["rc"] == "TASK_ABORTED" and report["path"] is None
    assert listing(dests["site-1"]) == [] and listing(dests["site-2"]) == []


def start_headers(data: bytes, **changes: object) -> dict:
    """The headers of a one-chunk start for `data`, as an owner sends them."""
    hasher = new_hasher()
    hasher.update(data)
    headers = {"v": wire.WIRE_VERSION, "sid": wire.new_stream_id(), "name": "x.bin", "size": len(data),
               "chunk_size": MIB, "count": wire.chunk_count(len(data), MIB), "window": 16, "chunk_timeout": 0.5,
               "algo": "xxh3_128", "ctx": {}, "digest": hasher.hexdigest()}
    headers.update(changes)
    return headers


def test_a_digest_mismatch_is_refused_and_leaves_nothing(procs, broker_address, tmp_path):
    dest = str(tmp_path / "site-1")
    receiver = start_receiver(procs, "site-1", broker_address, dest)
    data = os.urandom(1000)
    with Cell("peer", broker_address) as peer:
        reply = peer.request(CHANNEL, TOPIC, "site-1", payload=data, timeout=5,
                             headers=start_headers(data, digest=start_headers(b"other")["digest"]))
    assert reply_error(reply.headers)[0] == wire.ERR_DIGEST and "verified" not in reply.headers
    report = next_done(receiver)
    assert report["rc"] == "ERROR" and report["path"] is None
    assert listing(dest) == []


def test_malformed_one_chunk_starts_are_refused_without_leaving_files(procs, broker_address, tmp_path):
    dest = str(tmp_path / "site-1")
    start_receiver(procs, "site-1", broker_address, dest)
    data = os.urandom(1000)
    big = bytes(wire.ONE_CHUNK_MAX + 1)
    bad = [
        (data[:-1], start_headers(data)),  # the payload is not the whole file
        (data, start_headers(data, digest=None)),
        (data, start_headers(data, e2e={"cert": "x"})),
        (big, start_headers(big)),  # over the bound of the path
        (data, {}),
        (data, start_headers(data, commit="yes")),
    ]
    with Cell("peer", broker_address) as peer:
        for payload, headers in bad:
            reply = peer.request(CHANNEL, TOPIC, "site-1", payload=payload, headers=headers, timeout=5)
            assert reply_error(reply.headers)[0] == wire.ERR_BAD_REQUEST and "sid" not in reply.headers, headers
        reply = peer.request(CHANNEL, TOPIC, "site-1", payload=bytes(2 << 20), headers=start_headers(data), timeout=5)
        assert reply_error(reply.headers) == (wire.ERR_BAD_REQUEST, "bad start request: a payload of 2097152 bytes "
                                                                    "is too large")  # refused before it is copied
    assert listing(dest) == []


def test_only_the_owner_commits_and_asking_again_is_harmless(procs, broker_address, tmp_path):
    dest = str(tmp_path / "site-1")
    receiver = start_receiver(procs, "site-1", broker_address, dest)
    data = os.urandom(5000)
    headers = start_headers(data, chunk_timeout=5.0)
    sid = headers["sid"]
    with Cell("peer", broker_address) as peer, Cell("mallory", broker_address) as mallory:
        for _ in range(2):  # start is idempotent for its owner
            reply = peer.request(CHANNEL, TOPIC, "site-1", payload=data, headers=headers, timeout=5)
            assert reply.headers == {"sid": sid, "verified": True}
        reply = mallory.request(CHANNEL, TOPIC, "site-1", payload=data, headers=headers, timeout=5)
        assert reply_error(reply.headers)[0] == wire.ERR_REFUSED  # not its stream
        for topic in (wire.TOPIC_COMMIT, wire.TOPIC_ABORT):
            reply = mallory.request(wire.CONTROL_CHANNEL, topic, "site-1", headers={"sid": sid}, timeout=5)
            assert reply_error(reply.headers)[0] == wire.ERR_UNKNOWN_STREAM
        assert [n for n in listing(dest) if not n.startswith(".")] == []
        for _ in range(2):  # commit is idempotent for its owner
            reply = peer.request(wire.CONTROL_CHANNEL, wire.TOPIC_COMMIT, "site-1", headers={"sid": sid}, timeout=5)
            assert reply.headers == {"sid": sid}
    report = next_done(receiver)
    assert report["rc"] == "OK" and report["size"] == len(data)
    assert listing(dest) == ["x.bin"]


def test_a_single_target_asked_to_commit_keeps_the_file_in_one_round_trip(procs, broker_address, tmp_path):
    dest = str(tmp_path / "site-1")
    receiver = start_receiver(procs, "site-1", broker_address, dest)
    data = os.urandom(5000)
    headers = start_headers(data, commit=True)
    with Cell("peer", broker_address) as peer:
        reply = peer.request(CHANNEL, TOPIC, "site-1", payload=data, headers=headers, timeout=5)
        assert reply.headers == {"sid": headers["sid"], "verified": True, "committed": True}
        report = next_done(receiver)  # no commit request was sent
    assert report["rc"] == "OK"
    check_received(report, dest, hashlib.sha256(data).hexdigest(), "x.bin")


def test_an_abort_during_a_single_targets_start_wins_over_its_commit(procs, broker_address, tmp_path):
    """The abort is answered while the start is still storing the file: the start must not commit it then."""
    dest = str(tmp_path / "site-1")
    receiver = start_receiver(procs, "site-1", broker_address, dest, chunk_delay=1.0)  # a slow chunk_consumed_cb
    data = os.urandom(5000)
    headers = start_headers(data, commit=True, chunk_timeout=5.0)
    with Cell("peer", broker_address) as peer:
        start = peer.request_async(CHANNEL, TOPIC, "site-1", payload=data, headers=headers)
        wait_until(lambda: any(n.endswith(".part") for n in listing(dest)), 10)  # the start is storing it
        abort = peer.request(wire.CONTROL_CHANNEL, wire.TOPIC_ABORT, "site-1", headers={"sid": headers["sid"]},
                             timeout=5)
        assert abort.headers == {"sid": headers["sid"]}
        answer = start.result(10)
    assert answer.headers.get("committed") is not True
    report = next_done(receiver)
    assert report["rc"] == "TASK_ABORTED"
    assert listing(dest) == []


def test_a_single_targets_start_asked_again_after_its_commit_is_answered_committed(procs, broker_address,
                                                                                    tmp_path):
    dest = str(tmp_path / "site-1")
    receiver = start_receiver(procs, "site-1", broker_address, dest)
    data = os.urandom(5000)
    headers = start_headers(data, commit=True)
    committed = {"sid": headers["sid"], "verified": True, "committed": True}
    with Cell("peer", broker_address) as peer:
        assert peer.request(CHANNEL, TOPIC, "site-1", payload=data, headers=headers, timeout=5).headers == committed
        next_done(receiver)  # the stream ended here
        assert peer.request(CHANNEL, TOPIC, "site-1", payload=data, headers=headers, timeout=5).headers == committed
        reply = peer.request(wire.CONTROL_CHANNEL, wire.TOPIC_ABORT, "site-1", headers={"sid": headers["sid"]},
                             timeout=5)  # an abort that comes too late changes nothing
        assert peer.request(CHANNEL, TOPIC, "site-1", payload=data, headers=headers, timeout=5).headers == committed
    assert reply.headers == {"sid": headers["sid"]}
    assert listing(dest) == ["x.bin"]


def test_an_owner_that_leaves_before_commit_leaves_no_file(procs, broker_address, tmp_path):
    dest = str(tmp_path / "site-1")
    receiver = start_receiver(procs, "site-1", broker_address, dest)
    data = os.urandom(5000)
    with Cell("peer", broker_address) as peer:
        reply = peer.request(CHANNEL, TOPIC, "site-1", payload=data, headers=start_headers(data), timeout=5)
        assert reply.headers.get("verified") is True
    report = next_done(receiver, 15)  # the broker says the owner is gone, or it stays silent
    assert report["rc"] in ("COMMUNICATION_ERROR", "TIMEOUT", "TASK_ABORTED") and report["path"] is None
    assert listing(dest) == []


def test_a_receiver_that_stops_its_cell_in_stream_done_cb_does_not_fail_the_push(broker_address, tmp_path):
    """A single target commits inside its start handler, so stream_done_cb can run before that handler's reply
    went out. A receiver that stops when its last file arrived must still let that reply go: stop() lets the
    callbacks already running return first."""
    src = str(tmp_path / "last.bin")
    sha = make_file(src, 10 * KIB)
    dest = tmp_path / "dest"
    dest.mkdir()
    receiver = Cell("site-1", broker_address).start()
    received: list = []
    stopped = threading.Event()

    def done(stream_ctx, fl_ctx):
        received.append(FileStreamer.get_file_location(stream_ctx))
        receiver.stop()  # the last file is here: this site is done
        stopped.set()

    FileStreamer.register_stream_processing(FLContext(receiver), CHANNEL, TOPIC, dest_dir=str(dest),
                                            stream_done_cb=done)
    start_handler, inline = receiver._handlers[(CHANNEL, TOPIC)]

    def slow_to_return(message):  # widens the race: stream_done_cb always overtakes the reply
        reply = start_handler(message)
        time.sleep(0.5)
        return reply

    receiver.register_request_cb(CHANNEL, TOPIC, slow_to_return, inline=inline)
    try:
        with Cell("server", broker_address) as cell:
            result = send_file(cell, CHANNEL, TOPIC, {}, ["site-1"], src, chunk_timeout=5.0)
        assert (result.rc, result.ok, result.error) == (ReturnCode.OK, True, None)
        assert stopped.wait(10)
        with open(received[0], "rb") as kept:
            assert hashlib.sha256(kept.read()).hexdigest() == sha
    finally:
        receiver.stop()


def test_a_stream_committed_by_a_start_handler_still_running_at_stop_ends(broker_address, tmp_path):
    """The stop hooks run while a start handler is still storing its file; stop() then lets that handler
    finish and answer, with a request queued in the pool behind it. The stream it committed must still end:
    stream_done_cb fires once, and no descriptor or stream state is left behind."""
    src = str(tmp_path / "f.bin")
    sha = make_file(src, 10 * KIB)
    dest = tmp_path / "dest"
    dest.mkdir()
    receiver = Cell("site-1", broker_address, workers=1).start()
    done: list = []
    FileStreamer.register_stream_processing(FLContext(receiver), CHANNEL, TOPIC, dest_dir=str(dest),
                                            stream_done_cb=lambda ctx, fl_ctx: done.append(FileStreamer.get_rc(ctx)))
    start_handler, inline = receiver._handlers[(CHANNEL, TOPIC)]
    entered, hooks_ran = threading.Event(), threading.Event()
    receiver.add_stop_hook(hooks_ran.set)  # after the push side's own hook looked at its streams

    def start_once_the_cell_stops(message):
        entered.set()
        hooks_ran.wait(10)
        return start_handler(message)

    receiver.register_request_cb(CHANNEL, TOPIC, start_once_the_cell_stops, inline=inline)
    receiver.register_request_cb("other", "slow", lambda message: time.sleep(1) or "ok")
    results: list = []
    try:
        with Cell("server", broker_address) as cell:
            pusher = threading.Thread(target=lambda: results.append(
                send_file(cell, CHANNEL, TOPIC, {}, ["site-1"], src, chunk_timeout=5.0)))
            pusher.start()
            assert entered.wait(10)
            cell.fire_and_forget("other", "slow", "site-1", None)  # waits in the pool behind the start handler
            time.sleep(0.3)  # for it to arrive: the stop then finds the pool busy and a call queued
            receiver.stop()
            pusher.join(20)
        assert results and results[0].ok, results
        wait_until(lambda: done, 10)
        assert done == [ReturnCode.OK]
        with open(dest / "f.bin", "rb") as kept:
            assert hashlib.sha256(kept.read()).hexdigest() == sha
        wait_until(lambda: not [fd for fd in os.listdir("/proc/self/fd")
                                if str(dest) in os.path.realpath(f"/proc/self/fd/{fd}")], 10)
    finally:
        receiver.stop()
