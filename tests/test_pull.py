"""Pull (FileDownloader / download_file) between real processes: sizes, pacing, callbacks, timeouts."""

import os
import re
import signal
import threading

import pytest

from fedstream.common import digest as digests
from fedstream.common.constants import DEFAULT_CHUNK_SIZE
from fedstream.nodes import Cell, FileDownloader, download_file
from fedstream.nodes.message import Message, Reply
from fedstream.nodes.pull import kept, wire
from tests.procs import wait_until
from tests.pull_support import make_file, part_files, sha256_of, start_owner, start_receiver

MiB = 1 << 20


def test_sizes_round_trip_with_callbacks(procs, broker_address, tmp_path):
    chunk = DEFAULT_CHUNK_SIZE
    sizes = [0, 1, chunk - 1, chunk, chunk + 1, 5 * chunk + 17, 64 * MiB]
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for size in sizes:
        path = str(src / f"file-{size}.bin")
        expected[path] = make_file(path, size)
    owner, refs = start_owner(procs, broker_address, list(expected), tx_kwargs={"job": "j1"})
    out = tmp_path / "out"
    out.mkdir()
    receiver = start_receiver(procs, broker_address, "site-1", str(out), [refs[p] for p in expected])
    results = receiver.wait("result", timeout=90, count=len(sizes))
    for path, result in zip(expected, results):
        assert result["error"] is None, result
        assert result["path"] == str(out / os.path.basename(path))
        assert sha256_of(result["path"]) == expected[path]
    assert part_files(str(out)) == []

    downloaded = owner.wait("downloaded", count=len(sizes))
    by_file = {d["file"]: d for d in downloaded}
    for index, path in enumerate(expected):
        assert by_file[path] == {"ref": refs[path], "site": "site-1", "status": "success", "is_status": True,
                                 "file": path, "kwargs": {"index": index}}


def test_chunk_size_and_window_are_tunable(procs, broker_address, tmp_path):
    source = str(tmp_path / "data.bin")
    digest = make_file(source, 100 * 1024 + 5)
    _owner, refs = start_owner(procs, broker_address, [source])
    for window in (1, 3):
        out = tmp_path / f"w{window}"
        out.mkdir()
        receiver = start_receiver(procs, broker_address, f"site-w{window}", str(out), [refs[source]],
                                  chunk_size=4096, window=window)
        result = receiver.one("result")
        assert result["error"] is None
        assert sha256_of(result["path"]) == digest


def test_two_recipients_at_different_paces(procs, broker_address, tmp_path):
    source = str(tmp_path / "model.pt")
    digest = make_file(source, 2 * MiB)
    owner, refs = start_owner(procs, broker_address, [source])
    slow_dir, fast_dir = tmp_path / "slow", tmp_path / "fast"
    slow_dir.mkdir()
    fast_dir.mkdir()
    slow = start_receiver(procs, broker_address, "site-slow", str(slow_dir), [refs[source]],
                          chunk_size=32 * 1024, delay=0.05, report=256 * 1024)
    slow.one("progress")  # the slow one is under way before the fast one starts
    fast = start_receiver(procs, broker_address, "site-fast", str(fast_dir), [refs[source]])
    fast_result = fast.one("result")
    assert fast_result["error"] is None
    assert not slow.of("result"), "the fast recipient should not wait for the slow one"
    slow_result = slow.one("result", timeout=60)
    assert slow_result["error"] is None
    assert sha256_of(fast_result["path"]) == sha256_of(slow_result["path"]) == digest
    sites = [d["site"] for d in owner.wait("downloaded", count=2)]
    assert sites == ["site-fast", "site-slow"]


def test_timeout_fires_once_with_file_names_and_activity_keeps_it_alive(procs, broker_address, tmp_path):
    files = [str(tmp_path / "a.bin"), str(tmp_path / "b.bin")]
    for path in files:
        make_file(path, MiB)
    timeout = 1.0
    owner, refs = start_owner(procs, broker_address, files, timeout=timeout, tx_kwargs={"round": 3})
    out = tmp_path / "out"
    out.mkdir()
    # ~2.5 s of steady activity on one file, longer than the transaction timeout
    receiver = start_receiver(procs, broker_address, "site-1", str(out), [refs[files[0]]],
                              chunk_size=32 * 1024, window=2, delay=0.08)
    result = receiver.one("result", timeout=60)
    assert result["error"] is None and result["seconds"] > 2 * timeout

    fired = owner.one("timeout", timeout=timeout + 5)
    assert fired["files"] == files and fired["kwargs"] == {"round": 3}
    # not while the recipient was active; about `timeout` after its last request
    assert timeout - 0.2 <= fired["at"] - result["at"] <= timeout + 2.0
    # its RIDs are gone now
    late = start_receiver(procs, broker_address, "site-2", str(out), [refs[files[1]]])
    assert "unknown or expired reference" in late.one("result")["error"]
    assert len(owner.of("timeout")) == 1


def test_retry_after_finishing_gets_clean_eof_and_no_second_callback(procs, broker_address, tmp_path):
    source = str(tmp_path / "w.bin")
    size = MiB + 3
    digest = make_file(source, size)
    owner, refs = start_owner(procs, broker_address, [source])
    ref = refs[source]
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    receiver = start_receiver(procs, broker_address, "site-1", str(first), [ref])
    assert receiver.one("result")["error"] is None
    owner.one("downloaded")
    with Cell("site-1", broker_address) as cell:  # the same recipient, retrying
        for offset in (size, size + 10 * MiB):
            eof = cell.request(wire.CHANNEL, wire.TOPIC_CHUNK, "owner",
                               headers={"ref": ref, "off": offset, "len": MiB}, timeout=10)
            assert eof.headers == {} and eof.payload == b""
        error, path = download_file("owner", ref, 10, cell, str(second))
        assert error is None and sha256_of(path) == digest
    other = start_receiver(procs, broker_address, "site-2", str(second), [ref])
    assert other.one("result")["error"] is None
    downloaded = owner.wait("downloaded", count=2)
    assert [d["site"] for d in downloaded] == ["site-1", "site-2"]
    assert len(owner.of("downloaded")) == 2


def test_shutdown_ends_transactions_and_reports_unfinished_recipients(procs, broker_address, tmp_path):
    source = str(tmp_path / "big.bin")
    make_file(source, 16 * MiB)  # 256 chunks at 0.05 s each: still downloading when the owner shuts down
    owner, refs = start_owner(procs, broker_address, [source], tx_kwargs={"k": "v"})
    out = tmp_path / "out"
    out.mkdir()
    receiver = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]],
                              chunk_size=64 * 1024, delay=0.05, report=128 * 1024)
    receiver.one("progress")
    owner.proc.signal(signal.SIGUSR1)  # the owner calls FileDownloader.shutdown()
    failed = owner.one("downloaded")
    assert (failed["site"], failed["status"], failed["file"]) == ("site-1", "failed", source)
    fired = owner.one("timeout")
    assert (fired["tx"], fired["files"], fired["kwargs"]) == (owner.of("ref")[0]["tx"], [source], {"k": "v"})
    result = receiver.one("result", timeout=30)
    assert "unknown or expired reference" in result["error"] and result["path"] is None
    assert part_files(str(out)) == []
    assert len(owner.of("downloaded")) == 1


def test_rids_are_random_and_only_serve_their_own_file(broker_address, tmp_path):
    shared = tmp_path / "shared.bin"
    secret = tmp_path / "secret.bin"
    shared.write_bytes(b"shared data")
    secret.write_bytes(b"secret data")
    with Cell("owner-a", broker_address) as a, Cell("owner-b", broker_address) as b, \
            Cell("asker", broker_address) as asker:
        tx_a = FileDownloader.new_transaction(a, 30, None)
        tx_b = FileDownloader.new_transaction(b, 30, None)
        refs = {FileDownloader.add_file(tx_a, str(shared)) for _ in range(50)}
        ref_b = FileDownloader.add_file(tx_b, str(secret))
        try:
            assert len(refs) == 50
            assert all(re.fullmatch(r"[0-9a-f]{32}", r) for r in refs)  # 128 random bits each

            def chunk(target, headers):
                return asker.request(wire.CHANNEL, wire.TOPIC_CHUNK, target, headers=headers, timeout=10)

            ref_a = next(iter(refs))
            assert chunk("owner-a", {"ref": ref_a, "off": 0, "len": 100}).payload == b"shared data"
            # a RID of another cell's transaction, paths and junk are all unknown here
            for bad in (ref_b, str(secret), "../secret.bin", "", None, 7, ref_a.upper()):
                reply = chunk("owner-a", {"ref": bad, "off": 0, "len": 100, "path": str(secret)})
                assert reply.payload is None and reply.headers["err"] == wire.ERR_UNKNOWN_REF
            for off, length in ((-1, 10), (0, 0), (0, 1 << 40), ("0", 10), (0.5, 10)):
                reply = chunk("owner-a", {"ref": ref_a, "off": off, "len": length})
                assert reply.headers["err"] == wire.ERR_BAD_REQUEST
        finally:
            FileDownloader.delete_transaction(tx_a)
            FileDownloader.delete_transaction(tx_b)
        reply = asker.request(wire.CHANNEL, wire.TOPIC_OPEN, "owner-a", headers={"ref": ref_a}, timeout=10)
        assert reply.headers["err"] == wire.ERR_UNKNOWN_REF


@pytest.mark.parametrize("call_cb", [False, True])
def test_delete_transaction_calls_timeout_cb_only_when_asked(broker_address, tmp_path, call_cb):
    path = tmp_path / "f.txt"
    path.write_text("x")
    calls = []
    with Cell("owner", broker_address) as cell:
        tx = FileDownloader.new_transaction(cell, 30, lambda tx_id, names, **kw: calls.append((tx_id, names, kw)),
                                            a=1)
        FileDownloader.add_file(tx, str(path))
        FileDownloader.delete_transaction(tx, call_cb=call_cb)
        FileDownloader.delete_transaction(tx, call_cb=True)  # already ended: nothing happens
    assert calls == ([(tx, [str(path)], {"a": 1})] if call_cb else [])


def test_stopping_the_owner_cell_ends_its_transactions(broker_address, tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("x")
    (tmp_path / "out").mkdir()
    calls = []
    cell = Cell("owner", broker_address).start()
    tx = FileDownloader.new_transaction(cell, 30, lambda tx_id, names: calls.append((tx_id, names)))
    ref = FileDownloader.add_file(tx, str(path))
    with Cell("site-1", broker_address) as site:
        error, received = download_file("owner", ref, 10, site, str(tmp_path / "out"))
        assert error is None and open(received).read() == "x"
        cell.stop()
        assert calls == [(tx, [str(path)])]
        error, _ = download_file("owner", ref, 1, site, str(tmp_path / "out"))
        assert "'owner' is not connected" in error
    with pytest.raises(ValueError, match="Unknown transaction"):
        FileDownloader.add_file(tx, str(path))


class _HandMadeOwner:
    """An owner cell that answers `open` with the whole file and the given digest, and records `done`."""

    def __init__(self, cell: Cell, data: bytes, digest: str, verdict: dict) -> None:
        self.done: list[dict] = []
        self.released = threading.Event()
        self.verdict = verdict
        answer = {"name": "small.bin", "size": len(data), "alg": digests.ALGORITHM, "digest": digest}
        cell.register_request_cb(wire.CHANNEL, wire.TOPIC_OPEN, lambda message: Reply(data, answer))
        cell.register_request_cb(wire.CHANNEL, wire.TOPIC_DONE, self._on_done)

    def _on_done(self, message):
        self.done.append(dict(message.headers))
        if not self.verdict:  # a `done` request would wait here until the test ends
            self.released.wait(30)
        return Reply(None, self.verdict)


def _digest_of(data: bytes) -> str:
    hasher = digests.new_hasher()
    hasher.update(data)
    return hasher.hexdigest()


def test_a_file_that_comes_whole_with_open_needs_one_round_trip(broker_address, tmp_path):
    """The owner's digest in the `open` answer verifies the file; `done` goes one-way, unanswered."""
    data = os.urandom(3000)
    ref = wire.new_id()
    (tmp_path / "out").mkdir()
    with Cell("owner", broker_address) as owner_cell, Cell("site-1", broker_address) as cell:
        owner = _HandMadeOwner(owner_cell, data, _digest_of(data), verdict={})
        try:
            error, path = download_file("owner", ref, 1, cell, str(tmp_path / "out"))
            assert error is None and path == str(tmp_path / "out" / "small.bin")
            wait_until(lambda: owner.done, 10)
        finally:
            owner.released.set()
    with open(path, "rb") as copy:
        assert copy.read() == data
    assert owner.done == [{"ref": ref, "digest": _digest_of(data), "alg": digests.ALGORITHM}]
    assert part_files(str(tmp_path / "out")) == []


def test_a_whole_file_that_does_not_match_the_digest_of_open_is_judged_by_done(broker_address, tmp_path):
    data = os.urandom(3000)
    (tmp_path / "out").mkdir()
    with Cell("owner", broker_address) as owner_cell, Cell("site-1", broker_address) as cell:
        wrong = _digest_of(data + b"!")
        owner = _HandMadeOwner(owner_cell, data, wrong, verdict={"ok": False, "digest": wrong,
                                                                 "alg": digests.ALGORITHM})
        error, path = download_file("owner", wire.new_id(), 5, cell, str(tmp_path / "out"))
    assert path is None and "does not match the owner's digest" in error
    assert len(owner.done) == 1 and owner.done[0]["digest"] == _digest_of(data)  # asked, and waited for it
    assert os.listdir(tmp_path / "out") == []


def test_the_owner_sends_its_digest_with_open_only_when_the_answer_is_the_whole_file(procs, broker_address,
                                                                                      tmp_path):
    small, large = str(tmp_path / "small.bin"), str(tmp_path / "large.bin")
    make_file(small, 3000)
    make_file(large, 100_000)
    owner, refs = start_owner(procs, broker_address, [small, large])
    with Cell("site-1", broker_address) as cell:
        def answer(path: str, first: "int | None") -> Message:
            headers = {"ref": refs[path]} if first is None else {"ref": refs[path], "first": first}
            return cell.request(wire.CHANNEL, wire.TOPIC_OPEN, "owner", headers=headers, timeout=10)

        wait_until(lambda: "digest" in answer(small, 65536).headers, 10)  # once the owner computed it
        whole = answer(small, 65536)
        with open(small, "rb") as source:
            assert bytes(whole.buffer) == source.read()
        assert whole.headers["digest"] == _digest_of(bytes(whole.buffer))
        part = answer(large, 65536)
        assert len(part.buffer) == 65536 and "digest" not in part.headers  # only a part of the file
        assert "digest" not in answer(small, None).headers  # no bytes asked for, no digest


def _wait_for_digest(cell: Cell, ref: str) -> None:
    """Wait until the owner has the digest of `ref` (its answer to an `open` of the whole file carries it)."""
    wait_until(lambda: "digest" in cell.request(wire.CHANNEL, wire.TOPIC_OPEN, "owner", timeout=10,
                                                headers={"ref": ref, "first": kept.MAX_FILE}).headers, 10)


def test_small_files_are_served_as_shared_from_memory_within_a_bound_and_the_rest_from_disk(procs, broker_address,
                                                                                          tmp_path):
    """Up to kept.TOTAL bytes of files of at most kept.MAX_FILE are read once, when hashed: changing them
    on disk afterwards changes nothing for their downloads. Files beyond the bound are read per request,
    so a change to them fails their downloads, as it does for a large file."""
    kept_count = kept.TOTAL // kept.MAX_FILE
    (tmp_path / "src").mkdir()
    files = [str(tmp_path / "src" / f"f{index:03d}.bin") for index in range(kept_count + 4)]
    originals = {path: make_file(path, kept.MAX_FILE) for path in files}
    owner, refs = start_owner(procs, broker_address, files)
    out = tmp_path / "out"
    out.mkdir()
    with Cell("site-1", broker_address) as cell:
        for path in files:
            _wait_for_digest(cell, refs[path])
        for path in files:  # rewritten in place, same size
            stamp = os.stat(path).st_mtime_ns
            with open(path, "r+b") as source:
                source.write(os.urandom(kept.MAX_FILE))
            os.utime(path, ns=(stamp, stamp + 10**9))
        results = [download_file("owner", refs[path], 10, cell, str(out)) for path in files]
    for path, (error, received) in zip(files[:kept_count], results):
        assert error is None and sha256_of(received) == originals[path]
    for error, received in results[kept_count:]:
        assert received is None and "changed on the owner" in error
    assert sorted(os.listdir(out)) == sorted(os.path.basename(path) for path in files[:kept_count])
    wait_until(lambda: len(owner.of("downloaded")) == kept_count, 10)
    assert {e["status"] for e in owner.of("downloaded")} == {"success"}


def test_kept_bytes_go_back_when_the_transaction_ends(broker_address, tmp_path):
    paths = []
    for index in range(3):
        paths.append(tmp_path / f"f{index}.bin")
        paths[-1].write_bytes(os.urandom(1000 + index))
    before = kept.kept_bytes.used
    with Cell("owner", broker_address) as cell, Cell("site-1", broker_address) as site:
        tx = FileDownloader.new_transaction(cell, 30, None)
        refs = [FileDownloader.add_file(tx, str(path)) for path in paths]
        assert kept.kept_bytes.used == before + 3003  # reserved when shared, filled when hashed
        (tmp_path / "out").mkdir()
        error, received = download_file("owner", refs[2], 10, site, str(tmp_path / "out"))
        assert error is None and open(received, "rb").read() == paths[2].read_bytes()
        FileDownloader.delete_transaction(tx)
        assert kept.kept_bytes.used == before


def test_a_kept_small_file_is_served_while_every_worker_of_its_owner_is_busy(broker_address, tmp_path):
    """An `open` of a file kept in memory is answered on the owner's I/O thread: its download goes through
    while the owner's only worker is held by another request. A file read from disk waits for the worker."""
    small, large = tmp_path / "small.bin", tmp_path / "large.bin"
    small.write_bytes(os.urandom(5000))
    large.write_bytes(os.urandom(kept.MAX_FILE + 1))
    out = tmp_path / "out"
    out.mkdir()
    held, release = threading.Event(), threading.Event()

    def hold(message):
        held.set()
        release.wait(30)

    with Cell("owner", broker_address, workers=1) as owner, Cell("site-1", broker_address) as site:
        owner.register_request_cb("test", "hold", hold)
        tx = FileDownloader.new_transaction(owner, 60, None)
        refs = {path: FileDownloader.add_file(tx, str(path)) for path in (small, large)}
        _wait_for_digest(site, refs[small])
        site.fire_and_forget("test", "hold", "owner", None)
        assert held.wait(10)
        try:
            results: dict = {}
            waiting = threading.Thread(target=lambda: results.update(
                large=download_file("owner", refs[large], 10, site, str(out))))
            waiting.start()
            results["small"] = download_file("owner", refs[small], 10, site, str(out))
            assert waiting.is_alive()  # its `open` waits in the pool behind `hold`
        finally:
            release.set()
        waiting.join(30)
    for path in (small, large):
        error, received = results[path.stem]
        assert error is None and open(received, "rb").read() == path.read_bytes()
