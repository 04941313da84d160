"""Push (FileStreamer) with real processes: sizes around the chunk size, 1 and 3 targets, names."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileStreamer, FLContext
from fedstream.nodes.push.sender import send_file
from tests.procs import Proc, Procs
from tests.push_support import (CHANNEL, TOPIC, check_received, listing, make_file, next_done, receiving_federation,
                                run_helper)

CS = 64 * 1024
SITES = ["site-1", "site-2", "site-3"]


@dataclass
class Federation:
    address: str
    receivers: dict[str, Proc]
    dests: dict[str, str]
    cell: Cell
    root: Path

    def check_all(self, targets: list[str], expected_sha: str, name: str, ctx: dict) -> None:
        """Every target reported the verified file; then clear its directory for the next test."""
        for site in targets:
            report = next_done(self.receivers[site])
            check_received(report, self.dests[site], expected_sha, name)
            assert report["ctx"] == ctx
            assert report["site"] == site  # cb_kwargs arrive
            assert listing(self.dests[site]) == [name]  # no .part left behind
            os.unlink(report["path"])


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    with receiving_federation(root, SITES) as (address, receivers, dests, cell):
        yield Federation(address, receivers, dests, cell, root)


@pytest.mark.parametrize("targets", [SITES[:1], SITES], ids=["1-target", "3-targets"])
@pytest.mark.parametrize("size", [0, 1, CS - 1, CS, CS + 1], ids=["0", "1", "chunk-1", "chunk", "chunk+1"])
def test_push_sizes_around_the_chunk_size(fed, tmp_path, size, targets):
    src = str(tmp_path / "data.bin")
    sha = make_file(src, size)
    ctx = {"tag": f"size-{size}", "round": 1, "nested": {"list": [1, 2.5, None, "é"]}}
    rc, ok = FileStreamer.stream_file(CHANNEL, TOPIC, ctx, targets, src, FLContext(fed.cell), chunk_size=CS,
                                      chunk_timeout=5.0)
    assert (rc, ok) == (ReturnCode.OK, True)
    fed.check_all(targets, sha, "data.bin", ctx)


def test_push_64_mib_to_3_targets_publishes_the_file_once(fed, tmp_path):
    size = 64 << 20
    src = str(tmp_path / "big.bin")
    sha = make_file(src, size)
    result = send_file(fed.cell, CHANNEL, TOPIC, {"tag": "big"}, SITES, src)
    assert (result.rc, result.ok, result.error) == (ReturnCode.OK, True, None)
    assert result.bytes_published == size  # one upload, whatever the number of targets
    assert result.bytes_repaired == 0
    fed.check_all(SITES, sha, "big.bin", {"tag": "big"})


def test_received_names_are_sanitized_and_never_overwrite(fed, tmp_path):
    src = str(tmp_path / "model (v2) é.pt")
    sha = make_file(src, 1000)
    cell_ctx = FLContext(fed.cell)
    for _ in range(2):
        assert FileStreamer.stream_file(CHANNEL, TOPIC, {}, ["site-1"], src, cell_ctx) == (ReturnCode.OK, True)
    first, second = next_done(fed.receivers["site-1"]), next_done(fed.receivers["site-1"])
    check_received(first, fed.dests["site-1"], sha, "model (v2) e.pt")
    assert os.path.basename(second["path"]) == "model (v2) e (1).pt"
    assert listing(fed.dests["site-1"]) == ["model (v2) e (1).pt", "model (v2) e.pt"]
    for report in (first, second):
        os.unlink(report["path"])


@pytest.mark.parametrize("hostile", ["../../x", "..\\..\\x", "/etc/x", ".x"])
def test_path_traversal_names_stay_inside_dest_dir(fed, tmp_path, hostile):
    src = str(tmp_path / "payload.bin")
    sha = make_file(src, 5000)
    result = send_file(fed.cell, CHANNEL, TOPIC, {}, ["site-1"], src, remote_name=hostile)
    assert result.ok, result.error
    report = next_done(fed.receivers["site-1"])
    check_received(report, fed.dests["site-1"], sha, "x")
    assert listing(fed.dests["site-1"]) == ["x"]
    assert sorted(os.listdir(fed.root)) == sorted(SITES)  # nothing escaped next to the dest dirs
    os.unlink(report["path"])


def test_unregistered_and_unconnected_targets_fail_at_once_naming_them(fed, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 3 * CS)
    procs = Procs(tmp_path)
    try:
        bare = run_helper(procs, "push_bare_site", "bare-site", fed.address)
        bare.expect("READY", 30)
        result = send_file(fed.cell, CHANNEL, TOPIC, {}, ["site-1", "bare-site"], src, chunk_size=CS)
        assert (result.rc, result.ok) == (ReturnCode.ERROR, False)
        assert "'bare-site'" in result.error and f"channel '{CHANNEL}' topic '{TOPIC}'" in result.error
        assert result.seconds < 3 and result.bytes_published == 0
        aborted = next_done(fed.receivers["site-1"])  # site-1 had accepted: it is aborted, no file left
        assert aborted["rc"] == "TASK_ABORTED" and aborted["path"] is None
        assert listing(fed.dests["site-1"]) == []

        result = send_file(fed.cell, CHANNEL, "no-such-topic", {}, ["site-2"], src)
        assert (result.rc, result.ok) == (ReturnCode.ERROR, False) and "'site-2'" in result.error

        result = send_file(fed.cell, CHANNEL, TOPIC, {}, ["ghost"], src)
        assert (result.rc, result.ok) == (ReturnCode.COMMUNICATION_ERROR, False)
        assert "'ghost' is not connected" in result.error and result.seconds < 3
    finally:
        procs.cleanup()
    for site in SITES:
        assert listing(fed.dests[site]) == []


def test_stream_file_on_a_stopped_cell_returns_an_error(tmp_path):
    from fedstream.broker import Broker
    from fedstream.common import ReturnCode
    from fedstream.nodes import Cell, FileStreamer, FLContext

    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    with Broker(bind="tcp://127.0.0.1:0") as broker:
        cell = Cell("server", broker.address).start()
        cell.stop()
        rc, ok = FileStreamer.stream_file("ch", "tp", {}, ["site-1"], str(src), FLContext(cell))
    assert (rc, ok) == (ReturnCode.COMMUNICATION_ERROR, False)
