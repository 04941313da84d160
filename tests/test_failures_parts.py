"""Nothing left behind: receivers remove the stale .part files of earlier, killed receptions."""

import fcntl
import os
import time

import pytest

from fedstream.broker import Broker
from fedstream.common.filenames import remove_stale_parts
from fedstream.nodes import Cell, FileStreamer, FLContext, download_file

pytestmark = pytest.mark.timeout(60)

HOUR = 3600
RID = "0123456789abcdef0123456789abcdef"
PUSH_PART = ".fedstream-Ab3_dE5-fG7hI9jK1lM-0a1b2c3d.part"
PULL_PART = f".fedstream-{RID}.part"


def part(directory, name: str, age: float) -> str:
    """A .part file last written `age` seconds ago."""
    path = os.path.join(directory, name)
    with open(path, "wb") as out:
        out.write(b"partial data")
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def test_only_old_unlocked_fedstream_parts_are_removed(tmp_path):
    old_push = part(tmp_path, PUSH_PART, 2 * HOUR)
    old_pull = part(tmp_path, PULL_PART, 2 * HOUR)
    young = part(tmp_path, ".fedstream-fedcba9876543210.part", 60)
    foreign = part(tmp_path, "model.part", 2 * HOUR)
    locked = part(tmp_path, ".fedstream-lockedlockedlocked.part", 2 * HOUR)
    os.symlink(foreign, tmp_path / ".fedstream-symlinksymlink.part")
    fd = os.open(locked, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a download in progress holds its .part locked
        assert sorted(remove_stale_parts(str(tmp_path))) == sorted([old_push, old_pull])
    finally:
        os.close(fd)
    assert all(os.path.exists(path) for path in (young, foreign, locked))
    assert os.path.islink(tmp_path / ".fedstream-symlinksymlink.part")


def test_push_receiver_and_pull_recipient_sweep_when_they_start(tmp_path):
    pushed, pulled = tmp_path / "pushed", tmp_path / "pulled"
    pushed.mkdir()
    pulled.mkdir()
    stale_push, stale_pull = part(pushed, PUSH_PART, 2 * HOUR), part(pulled, PULL_PART, 2 * HOUR)
    keep = part(pushed, ".fedstream-fedcba9876543210-00000000.part", 10)
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("site-1", broker.address) as site:
        FileStreamer.register_stream_processing(FLContext(site), "test", "file", dest_dir=str(pushed))
        assert not os.path.exists(stale_push) and os.path.exists(keep)
        error, path = download_file("nobody", "fedcba9876543210fedcba9876543210", 30, site, str(pulled))
        assert path is None and "'nobody'" in error
    assert not os.path.exists(stale_pull)


def test_node_stale_part_age_option(procs, broker_address, tmp_path):
    recv = tmp_path / "recv"
    recv.mkdir()
    old = part(recv, PUSH_PART, 120)
    young = part(recv, PULL_PART, 5)
    node = procs.fedstream("node", "site-1", "--broker", broker_address, "--recv-dir", str(recv),
                           "--stale-part-age", "60")
    node.expect("ready\tsite-1", 30)
    assert not os.path.exists(old) and os.path.exists(young)
