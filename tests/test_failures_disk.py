"""Disk full: a push and a pull of a file larger than the receiving file system fail with one clear
error naming the directory, leave nothing under the final name, and the next transfer succeeds."""

import os
import subprocess

import pytest

from fedstream.broker import Broker
from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileDownloader, FileStreamer, FLContext, download_file
from tests.procs import wait_until
from tests.push_support import make_file, sha256_of

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs mounted inside tmp_path (needs root); unmounted at the end."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
                                 capture_output=True, text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield str(mount_point)
    finally:
        if subprocess.run(["umount", str(mount_point)], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], timeout=30)


def test_push_and_pull_larger_than_the_disk(small_disk, tmp_path):
    big, small = str(tmp_path / "big.bin"), str(tmp_path / "small.bin")
    make_file(big, 12 * MIB)
    small_sha = make_file(small, 1 * MIB)
    done = []
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("site-1", broker.address) as site, \
            Cell("server", broker.address) as server:
        FileStreamer.register_stream_processing(FLContext(site), "test", "file", dest_dir=small_disk,
                                                stream_done_cb=lambda stream_ctx, fl_ctx: done.append(
                                                    FileStreamer.get_file_location(stream_ctx)))
        tx = FileDownloader.new_transaction(server, 60, lambda *args: None)
        try:
            big_ref = FileDownloader.add_file(tx, big)
            small_ref = FileDownloader.add_file(tx, small)

            rc, ok = FileStreamer.stream_file("test", "file", {}, ["site-1"], big, FLContext(server))
            assert (rc, ok) == (ReturnCode.ERROR, False)
            error, path = download_file("server", big_ref, 10, site, small_disk)
            assert path is None and small_disk in error and "bytes free" in error
            assert os.listdir(small_disk) == []  # nothing under the final name, no .part either

            # the owner keeps serving, and transfers that fit succeed
            error, path = download_file("server", small_ref, 10, site, small_disk)
            assert error is None and sha256_of(path) == small_sha
            assert FileStreamer.stream_file("test", "file", {}, ["site-1"], small, FLContext(server)) == \
                (ReturnCode.OK, True)
            wait_until(lambda: done, 10)
            assert sha256_of(done[-1]) == small_sha
        finally:
            FileDownloader.delete_transaction(tx)


def test_push_refusal_names_the_directory(small_disk, tmp_path, caplog):
    big = str(tmp_path / "big.bin")
    make_file(big, 9 * MIB)
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("site-1", broker.address) as site, \
            Cell("server", broker.address) as server:
        FileStreamer.register_stream_processing(FLContext(site), "test", "file", dest_dir=small_disk)
        assert FileStreamer.stream_file("test", "file", {}, ["site-1"], big, FLContext(server)) == \
            (ReturnCode.ERROR, False)
    refusals = [r.getMessage() for r in caplog.records if "bytes free" in r.getMessage()]
    assert refusals and all(small_disk in text for text in refusals)
    assert os.listdir(small_disk) == []


def test_disk_filling_up_during_the_transfer(small_disk, tmp_path):
    """The free-space check passes, then the disk fills: a clear error, and the transfer succeeds later."""
    src = str(tmp_path / "model.bin")
    sha = make_file(src, 7 * MIB)
    filler = os.path.join(small_disk, "filler")

    def fill(*args, **kwargs) -> None:  # another program takes the space after the first chunk
        if not os.path.exists(filler):
            with open(filler, "wb") as out:
                out.write(bytes(6 * MIB))

    done = []
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("site-1", broker.address) as site, \
            Cell("server", broker.address) as server:
        FileStreamer.register_stream_processing(FLContext(site), "test", "file", dest_dir=small_disk,
                                                stream_done_cb=lambda stream_ctx, fl_ctx: done.append(
                                                    FileStreamer.get_rc(stream_ctx)),
                                                chunk_consumed_cb=fill)
        assert FileStreamer.stream_file("test", "file", {}, ["site-1"], src, FLContext(server)) == \
            (ReturnCode.ERROR, False)
        wait_until(lambda: done, 10)
        assert done == [ReturnCode.ERROR] and os.listdir(small_disk) == ["filler"]
        os.unlink(filler)

        tx = FileDownloader.new_transaction(server, 60, lambda *args: None)
        try:
            ref = FileDownloader.add_file(tx, src)
            error, path = download_file("server", ref, 10, site, small_disk, progress_cb=fill)
            assert path is None and small_disk in error and "No space left" in error
            assert "model.bin" not in os.listdir(small_disk)
            os.unlink(filler)
            error, path = download_file("server", ref, 10, site, small_disk)  # resumes the kept prefix
            assert error is None and sha256_of(path) == sha
        finally:
            FileDownloader.delete_transaction(tx)
