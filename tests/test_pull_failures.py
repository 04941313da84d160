"""Pull failures: bad and expired RIDs, killed or frozen peers, resume, abort, bad input."""

import logging
import os
import shutil
import signal
import threading
import time

import pytest

from fedstream.common import Signal
from fedstream.nodes import Cell, FileDownloader, download_file
from fedstream.common.filenames import part_path
from tests.procs import wait_until
from tests.pull_support import make_file, part_files, sha256_of, start_owner, start_receiver

MiB = 1 << 20
UNKNOWN_RID = "0123456789abcdef0123456789abcdef"


def test_unknown_rid_fails_at_once_and_removes_its_part(procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    make_file(source, 1000)
    start_owner(procs, broker_address, [source])
    stale = part_path(str(tmp_path), UNKNOWN_RID)
    with open(stale, "wb") as part:
        part.write(b"left over")
    with Cell("site-1", broker_address) as cell:
        started = time.monotonic()
        error, path = download_file("owner", UNKNOWN_RID, 60, cell, str(tmp_path))
        assert time.monotonic() - started < 5
    assert path is None and "unknown or expired reference" in error and UNKNOWN_RID in error
    assert not os.path.exists(stale)


def test_expired_rid_is_refused(procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    make_file(source, 1000)
    owner, refs = start_owner(procs, broker_address, [source], timeout=0.5)
    owner.one("timeout", timeout=10)
    receiver = start_receiver(procs, broker_address, "site-1", str(tmp_path), [refs[source]], timeout=60)
    result = receiver.one("result", timeout=10)
    assert "unknown or expired reference" in result["error"] and result["seconds"] < 5
    assert os.path.exists(source), "the owner must never delete the shared file"


def test_recipient_killed_mid_download_resumes_to_the_same_file(procs, broker_address, tmp_path):
    source = str(tmp_path / "weights.bin")
    size = 8 * MiB + 123
    digest = make_file(source, size)
    owner, refs = start_owner(procs, broker_address, [source])
    out = tmp_path / "out"
    out.mkdir()
    first = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]],
                           chunk_size=128 * 1024, delay=0.05, report=MiB)
    first.wait("progress", where=lambda e: e["received"] >= 2 * MiB)
    first.proc.kill()
    parts = part_files(str(out))
    assert len(parts) == 1
    kept = os.path.getsize(out / parts[0])
    assert 2 * MiB <= kept < size

    second = start_receiver(procs, broker_address, "site-1b", str(out), [refs[source]])
    start = second.one("start")
    assert start["received"] == kept and start["total"] == size  # resumed, not restarted
    result = second.one("result")
    assert result["error"] is None and sha256_of(result["path"]) == digest
    assert part_files(str(out)) == []
    done = owner.one("downloaded")
    assert (done["site"], done["status"]) == ("site-1b", "success")


def test_owner_killed_mid_download_fails_after_a_grace_whatever_the_timeout_and_keeps_the_part(
        procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    make_file(source, 4 * MiB)
    owner, refs = start_owner(procs, broker_address, [source])
    receiver = start_receiver(procs, broker_address, "site-1", str(tmp_path), [refs[source]], timeout=120,
                              chunk_size=64 * 1024, delay=0.04, report=256 * 1024)
    receiver.one("progress")
    owner.proc.kill()
    killed_at = time.monotonic()
    result = receiver.one("result", timeout=60)
    assert result["path"] is None and "'owner' is not connected" in result["error"]
    # a probe finds the owner gone, then it has its grace (5 s) to come back: far less than 120 s
    assert time.monotonic() - killed_at < 40
    assert len(part_files(str(tmp_path))) == 1  # kept for a later resume


def test_an_owner_never_reached_fails_within_seconds_whatever_the_timeout(broker_address, tmp_path):
    with Cell("site-1", broker_address) as cell:
        started = time.monotonic()
        error, path = download_file("nobody", UNKNOWN_RID, 120, cell, str(tmp_path))
        assert time.monotonic() - started < 40  # 2 s, and a loaded machine's worth of slack
    assert path is None and "'nobody' is not connected" in error
    assert os.listdir(tmp_path) == []


def test_an_owner_absent_for_less_than_the_grace_is_waited_for(procs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fedstream.nodes.pull.recipient")
    _broker, address = procs.broker("--node-timeout", "1")  # a frozen owner is soon "not connected"
    source = str(tmp_path / "f.bin")
    digest = make_file(source, 4 * MiB)
    owner, refs = start_owner(procs, address, [source])
    out = tmp_path / "out"
    out.mkdir()
    frozen = threading.Event()

    def progress(received, total):
        if received >= MiB and not frozen.is_set():
            owner.proc.signal(signal.SIGSTOP)  # mid-transfer the owner drops off the broker
            frozen.set()

    outcome = {}
    with Cell("site-1", address) as cell:
        worker = threading.Thread(target=lambda: outcome.update(result=download_file(
            "owner", refs[source], 120, cell, str(out), chunk_size=64 * 1024, progress_cb=progress)))
        try:
            worker.start()
            assert frozen.wait(30)
            wait_until(lambda: any("'owner' is not reachable" in r.getMessage() for r in caplog.records), 30)
        finally:
            owner.proc.signal(signal.SIGCONT)  # back within the grace: it registers again by itself
        worker.join(60)
        assert not worker.is_alive()
    error, path = outcome["result"]
    assert error is None, error
    assert sha256_of(path) == digest


def test_frozen_owner_gives_an_error_after_the_timeout_not_a_hang(procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    make_file(source, 4 * MiB)
    owner, refs = start_owner(procs, broker_address, [source])
    receiver = start_receiver(procs, broker_address, "site-1", str(tmp_path), [refs[source]], timeout=1,
                              chunk_size=64 * 1024, delay=0.04, report=256 * 1024)
    receiver.one("progress")
    owner.proc.signal(signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        result = receiver.one("result", timeout=30)
        assert result["path"] is None and "owner" in result["error"]
        assert time.monotonic() - frozen_at < 3 * 1 + 5  # three attempts of one timeout each, plus slack
    finally:
        owner.proc.signal(signal.SIGCONT)


def test_abort_signal_stops_the_download_and_removes_the_part_and_a_retry_succeeds(procs, broker_address,
                                                                                   tmp_path):
    source = str(tmp_path / "f.bin")
    digest = make_file(source, 4 * MiB)
    owner, refs = start_owner(procs, broker_address, [source])
    out = tmp_path / "out"
    out.mkdir()
    receiver = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]],
                              chunk_size=64 * 1024, delay=0.01, abort_after=MiB)
    result = receiver.one("result")
    assert result["path"] is None and "aborted" in result["error"]
    assert os.listdir(out) == []
    gave_up = owner.one("downloaded")  # the recipient told the owner it gave up
    assert (gave_up["site"], gave_up["status"]) == ("site-1", "failed")
    receiver.one("finished")
    # a new attempt by the same recipient is not poisoned by the abort: a fresh outcome, a success
    retry = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]])
    result = retry.one("result")
    assert result["error"] is None and sha256_of(result["path"]) == digest
    done = owner.wait("downloaded", count=2)[1]
    assert (done["site"], done["status"]) == ("site-1", "success")


def test_source_changed_during_the_transfer_is_an_error(procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    make_file(source, 4 * MiB)
    _owner, refs = start_owner(procs, broker_address, [source])
    out = tmp_path / "out"
    out.mkdir()
    receiver = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]],
                              chunk_size=64 * 1024, delay=0.04, report=256 * 1024)
    receiver.one("progress")
    with open(source, "ab") as grow:
        grow.write(b"more")
    result = receiver.one("result")
    assert result["path"] is None and "changed" in result["error"]
    assert os.listdir(out) == []


def test_concurrent_downloads_of_one_rid_into_one_dir_do_not_collide(procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    digest = make_file(source, 2 * MiB)
    _owner, refs = start_owner(procs, broker_address, [source])
    out = tmp_path / "out"
    out.mkdir()
    first = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]],
                           chunk_size=32 * 1024, delay=0.05, report=32 * 1024)
    first.one("progress")
    second = start_receiver(procs, broker_address, "site-2", str(out), [refs[source]])
    assert "in progress" in second.one("result")["error"]
    result = first.one("result")
    assert result["error"] is None and sha256_of(result["path"]) == digest
    assert os.listdir(out) == ["f.bin"]


def test_bad_input_raises_value_error(broker_address, tmp_path):
    some_file = tmp_path / "f.bin"
    some_file.write_bytes(b"x")
    with Cell("site-1", broker_address) as cell:
        for timeout in (0, -1, float("nan"), "5", True):
            with pytest.raises(ValueError, match="timeout must be a positive number"):
                FileDownloader.new_transaction(cell, timeout, None)
        with pytest.raises(ValueError, match="needs a Cell"):
            FileDownloader.new_transaction("site-1", 10, None)
        with pytest.raises(ValueError, match="Unknown transaction"):
            FileDownloader.add_file("no-such-tx", str(some_file))
        tx = FileDownloader.new_transaction(cell, 10, None)
        try:
            with pytest.raises(ValueError, match="does not exist"):
                FileDownloader.add_file(tx, str(tmp_path / "missing.bin"))
            with pytest.raises(ValueError, match="does not exist or is not a regular file"):
                FileDownloader.add_file(tx, str(tmp_path))
            with pytest.raises(ValueError, match="callable"):
                FileDownloader.add_file(tx, str(some_file), file_downloaded_cb="nope")
        finally:
            FileDownloader.delete_transaction(tx)
        with pytest.raises(ValueError, match="Unknown transaction"):
            FileDownloader.add_file(tx, str(some_file))

        good = ("owner", UNKNOWN_RID, 5, cell, str(tmp_path))
        for args, message in [
            (("owner", UNKNOWN_RID, 5, cell, str(some_file)), "is not a directory"),
            (("owner", UNKNOWN_RID, 5, cell, str(tmp_path / "nowhere")), "is not a directory"),
            (("owner", "../../etc/passwd", 5, cell, str(tmp_path)), "not a valid reference id"),
            (("owner", None, 5, cell, str(tmp_path)), "not a valid reference id"),
            (("owner", UNKNOWN_RID, 0, cell, str(tmp_path)), "per_request_timeout must be a positive"),
            (("owner", UNKNOWN_RID, -3, cell, str(tmp_path)), "per_request_timeout must be a positive"),
            (("bad name", UNKNOWN_RID, 5, cell, str(tmp_path)), "Invalid FQCN"),
            (("owner", UNKNOWN_RID, 5, "cell", str(tmp_path)), "needs a Cell"),
        ]:
            with pytest.raises(ValueError, match=message):
                download_file(*args)
        with pytest.raises(ValueError, match="chunk_size"):
            download_file(*good, chunk_size=0)
        with pytest.raises(ValueError, match="window"):
            download_file(*good, window=0)
        with pytest.raises(ValueError, match="secure=True needs a kit"):
            download_file(*good, secure=True)
    assert os.listdir(tmp_path) == ["f.bin"]


class _WatchedSignal(Signal):
    """A Signal that tells (`polled`) once the download has looked at it `polls` times."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self._polls = polls
        self.polled = threading.Event()

    @property
    def triggered(self) -> bool:
        self._polls -= 1
        if self._polls <= 0:
            self.polled.set()
        return super().triggered


def test_abort_signal_also_interrupts_a_wait_for_a_silent_owner(procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    make_file(source, 4 * MiB)
    owner, refs = start_owner(procs, broker_address, [source])
    owner.proc.signal(signal.SIGSTOP)
    abort = _WatchedSignal(polls=5)
    outcome = {}
    try:
        with Cell("site-1", broker_address) as cell:
            worker = threading.Thread(target=lambda: outcome.update(
                result=download_file("owner", refs[source], 60, cell, str(tmp_path), abort_signal=abort)))
            worker.start()
            assert abort.polled.wait(10)  # the download is waiting for the silent owner, watching the signal
            abort.trigger()
            worker.join(5)
            assert not worker.is_alive()
    finally:
        owner.proc.signal(signal.SIGCONT)
    error, path = outcome["result"]
    assert path is None and "aborted" in error
    assert part_files(str(tmp_path)) == []


def test_a_file_larger_than_the_free_space_is_refused_before_data_flows(broker_address, tmp_path):
    src = tmp_path / "sparse.bin"
    with open(src, "wb") as f:  # a sparse file claiming more bytes than the disk has free
        f.truncate(shutil.disk_usage(tmp_path).free + (1 << 30))
    dest = tmp_path / "dest"
    dest.mkdir()
    with Cell("owner", broker_address) as owner, Cell("site-1", broker_address) as site:
        tx = FileDownloader.new_transaction(owner, 30, lambda *a, **k: None)
        ref = FileDownloader.add_file(tx, str(src))
        err, path = download_file("owner", ref, 10, site, str(dest))
        FileDownloader.delete_transaction(tx)
    assert path is None and "bytes free" in err
    assert os.listdir(dest) == []  # an empty .part is not worth keeping


def test_an_owner_that_never_answers_open_leaves_no_part_file(procs, broker_address, tmp_path):
    source = str(tmp_path / "src" / "f.bin")
    os.mkdir(os.path.dirname(source))
    make_file(source, 1000)
    owner, refs = start_owner(procs, broker_address, [source])
    out = tmp_path / "out"
    out.mkdir()
    with Cell("site-1", broker_address) as cell:
        error, path = download_file("nobody", refs[source], 1, cell, str(out))  # not connected
        assert path is None and "'nobody' is not connected" in error
        owner.proc.signal(signal.SIGSTOP)  # connected, but silent
        try:
            error, path = download_file("owner", refs[source], 0.5, cell, str(out))
        finally:
            owner.proc.signal(signal.SIGCONT)
        assert path is None and "no reply from the owner" in error
    assert os.listdir(out) == []


def test_get_without_output_dir_leaves_nothing_in_the_current_directory(procs, broker_address, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    get = procs.fedstream("get", UNKNOWN_RID, "--from", "nobody", "--broker", broker_address, "--timeout", "30",
                          cwd=str(cwd))
    started = time.monotonic()
    assert get.wait(30) != 0
    assert time.monotonic() - started < 20  # an owner never reached fails fast, whatever --timeout says
    assert "'nobody' is not connected" in get.stderr
    assert os.listdir(cwd) == []
