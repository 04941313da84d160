"""Objects over pull and push with real processes: round trips, pickle consent, memory bound, damage.

The pull owner and recipients and the push receivers are helper programs
(tests/helpers/objects_*.py) that print what they got; the push sender is this process.
"""

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileDownloader, FileStreamer, FLContext, download_object
from fedstream.nodes.objects import UnsupportedValueError, spool
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.push.sender import send_file
from tests.helpers import objects_payloads as payloads
from tests.procs import Proc, Procs, wait_until

SITES = ["site-1", "site-2", "site-3"]
MIB = 1 << 20


def helper(procs: Procs, tmp_path: Path, module: str, *args: str, tmpdir: Path) -> Proc:
    """Run tests.helpers.<module> with cwd tmp_path and its own temp dir."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    return procs.start([sys.executable, "-m", f"tests.helpers.{module}", *args], cwd=str(tmp_path),
                       env={"TMPDIR": str(tmpdir)})


def value(proc: Proc, prefix: str, timeout: float = 60.0):
    """The JSON value of the next `<prefix> <json>` line."""
    return json.loads(proc.expect(prefix + " ", timeout)[len(prefix) + 1:])


# -- pull ------------------------------------------------------------------------------------------
@dataclass
class PullOwner:
    proc: Proc
    tmpdir: Path
    fingerprint: object
    refs: list[str]


def start_owner(procs: Procs, tmp_path: Path, broker: str, kind: str, expected: int, serializer: str = "container",
                mode: str = "object", files: int = 1) -> PullOwner:
    tmpdir = tmp_path / "owner-tmp"
    proc = helper(procs, tmp_path, "objects_owner", broker, "server", kind, serializer, str(expected), mode,
                  str(tmp_path / "canary"), tmpdir=tmpdir)
    fingerprint = value(proc, "FINGERPRINT")
    refs = [proc.expect("REF ", 60).split()[1] for _ in range(files)]
    return PullOwner(proc, tmpdir, fingerprint, refs)


def start_recipient(procs: Procs, tmp_path: Path, broker: str, name: str, refs: list[str],
                    allow_pickle: bool = False) -> Proc:
    return helper(procs, tmp_path, "objects_recipient", broker, name, "server", str(allow_pickle).lower(), *refs,
                  tmpdir=tmp_path / f"{name}-tmp")


def test_pull_round_trip_to_two_recipients(procs, tmp_path, broker_address):
    owner = start_owner(procs, tmp_path, broker_address, "nested", expected=2)
    spooled = os.listdir(owner.tmpdir)
    assert len(spooled) == 1 and spooled[0].endswith(spool.SPOOL_SUFFIX)  # serialized once, owned by the tx
    recipients = [start_recipient(procs, tmp_path, broker_address, site, owner.refs) for site in SITES[:2]]
    for recipient in recipients:
        result = value(recipient, "RESULT")
        assert result["error"] is None, result
        assert result["fingerprint"] == owner.fingerprint
        assert value(recipient, "TEMP_LEFT") == []  # the downloaded file is gone
        assert recipient.wait(30) == 0
    reports = [value(owner.proc, "DOWNLOADED") for _ in SITES[:2]]
    assert sorted(r["site"] for r in reports) == SITES[:2]
    assert all(r["status"] == "success" and r["kwargs"] == {"tag": "t"} for r in reports)
    assert value(owner.proc, "SPOOL_LEFT") == []  # the transaction ended: its spool file is removed


def test_pull_pickle_needs_consent(procs, tmp_path, broker_address):
    owner = start_owner(procs, tmp_path, broker_address, "pickled", expected=2, serializer="cloudpickle")
    canary = tmp_path / "canary"
    refusing = start_recipient(procs, tmp_path, broker_address, "site-1", owner.refs)
    result = value(refusing, "RESULT")
    assert result["is_none"] and "cloudpickle" in result["error"] and "allow_pickle=True" in result["error"]
    assert value(refusing, "TEMP_LEFT") == []
    assert not canary.exists()  # nothing was unpickled
    consenting = start_recipient(procs, tmp_path, broker_address, "site-2", owner.refs, allow_pickle=True)
    result = value(consenting, "RESULT")
    assert result["error"] is None, result
    entries = dict(result["fingerprint"]["dict"])
    assert entries["set"] == {"set": [1, 2, 3]} and entries["inc"] == {"callable": 2}
    assert canary.exists()


@pytest.mark.timeout(240)
def test_pull_memory_stays_within_the_object_size(procs, tmp_path, broker_address):
    size_mib = 256
    owner = start_owner(procs, tmp_path, broker_address, f"weights:{size_mib}", expected=2)
    base = next(int(line.split()[1]) for line in owner.proc.seen if line.startswith("BASE "))
    recipients = [start_recipient(procs, tmp_path, broker_address, site, owner.refs) for site in SITES[:2]]
    limit = (size_mib + 64) * MIB
    for recipient in recipients:
        result = value(recipient, "RESULT", 180)
        assert result["error"] is None, result
        assert result["fingerprint"] == owner.fingerprint
        peak = value(recipient, "PEAK")
        recipient_base = next(int(line.split()[1]) for line in recipient.seen if line.startswith("BASE "))
        assert peak - recipient_base < limit, f"recipient peak RSS {peak / MIB:.0f} MiB"
    peak = value(owner.proc, "PEAK", 120)
    # what the owner adds to its interpreter (about 45 MiB with numpy and pyzmq): the object, its
    # spooling and digest, and the reply buffers in flight to two recipients (2 x 8 MiB by default)
    assert peak - base < limit, f"owner peak RSS {peak / MIB:.0f} MiB over a {base / MIB:.0f} MiB interpreter"


def test_pull_damaged_spool_files_give_errors_not_objects(procs, tmp_path, broker_address):
    owner = start_owner(procs, tmp_path, broker_address, "nested", expected=1, mode="damaged", files=2)
    recipient = start_recipient(procs, tmp_path, broker_address, "site-1", owner.refs)
    flipped, truncated = value(recipient, "RESULT"), value(recipient, "RESULT")
    assert flipped["is_none"] and "cannot be loaded" in flipped["error"] and "damaged" in flipped["error"]
    assert truncated["is_none"] and "cannot be loaded" in truncated["error"] and "truncated" in truncated["error"]
    assert value(recipient, "TEMP_LEFT") == []


@pytest.fixture
def spool_dir(tmp_path, monkeypatch):
    """This process's temp dir, where add_object and stream_object spool."""
    directory = tmp_path / "spool"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_pull_spool_file_is_removed_when_the_transaction_times_out(broker_address, spool_dir):
    with Cell("server", broker_address) as cell:
        tx = FileDownloader.new_transaction(cell, 0.3, None)
        FileDownloader.add_object(tx, {"w": np.zeros(10)})
        assert len(os.listdir(spool_dir)) == 1
        wait_until(lambda: not os.listdir(spool_dir), 10)
        with pytest.raises(ValueError, match="Unknown transaction"):
            FileDownloader.add_object(tx, {"w": 1})
    assert os.listdir(spool_dir) == []  # nothing serialized for a transaction that is gone


def test_pull_object_arguments_are_checked_before_serializing(spool_dir):
    with pytest.raises(ValueError, match="Unknown transaction 'nope'"):
        FileDownloader.add_object("nope", {"w": 1})
    with pytest.raises(ValueError, match="serializer must be"):
        FileDownloader.add_object("nope", {"w": 1}, serializer="json")
    with pytest.raises(ValueError, match="file_downloaded_cb must be callable"):
        FileDownloader.add_object("nope", {"w": 1}, file_downloaded_cb=3)
    with pytest.raises(ValueError, match="allow_pickle must be True or False"):
        download_object("server", "0" * 32, 5, None, allow_pickle=1)
    with pytest.raises(ValueError, match="keep_partial is not supported"):
        download_object("server", "0" * 32, 5, None, keep_partial=True)
    with pytest.raises(ValueError, match="needs a Cell"):
        download_object("server", "0" * 32, 5, None)
    assert os.listdir(spool_dir) == []


# -- push ------------------------------------------------------------------------------------------
@dataclass
class PushFederation:
    receivers: dict[str, Proc]
    dests: dict[str, Path]
    fl_ctx: FLContext

    def reports(self, tag: str) -> list[dict]:
        """Each site's DONE report of the stream tagged `tag`."""
        found = []
        for site in SITES:
            report = value(self.receivers[site], "DONE", 60)
            assert report["tag"] == tag and report["site"] == site, report
            found.append(report)
        return found

    def wait_empty(self) -> None:
        wait_until(lambda: not any(os.listdir(dest) for dest in self.dests.values()), 10)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    root = tmp_path_factory.mktemp("objects-push")
    procs = Procs(root)
    cell = None
    try:
        _, address = procs.broker()
        dests = {site: root / site for site in SITES}
        receivers = {}
        for site in SITES:
            dests[site].mkdir()
            receivers[site] = helper(procs, root, "objects_receiver", site, address, str(dests[site]),
                                     tmpdir=root / f"{site}-tmp")
        for proc in receivers.values():
            proc.expect("READY", 30)
        cell = Cell("server", address).start()
        yield PushFederation(receivers, dests, FLContext(cell))
    finally:
        if cell is not None:
            cell.stop()
        procs.cleanup()


def test_push_round_trip_to_three_targets(fed, spool_dir):
    obj = payloads.nested()
    rc, ok = FileStreamer.stream_object("objects", "plain", {"tag": "nested"}, SITES, obj, fed.fl_ctx)
    assert (rc, ok) == (ReturnCode.OK, True)
    for report in fed.reports("nested"):
        assert report["rc"] == "OK" and report["error"] is None, report
        assert report["file_existed"]
        assert report["fingerprint"] == payloads.fingerprint(obj)
    fed.wait_empty()  # the received files are removed after stream_done_cb
    assert os.listdir(spool_dir) == []  # and the sender's spool file after the stream


def test_push_pickle_needs_consent(fed, spool_dir, tmp_path):
    canary = tmp_path / "canary"
    obj = payloads.pickled(str(canary))
    rc, ok = FileStreamer.stream_object("objects", "plain", {"tag": "refused"}, SITES, obj, fed.fl_ctx,
                                        serializer="cloudpickle")
    assert (rc, ok) == (ReturnCode.OK, True)
    for report in fed.reports("refused"):
        assert report["error"].startswith("PickleRefusedError: The object from 'server' cannot be loaded"), report
        assert "allow_pickle=True" in report["error"]
    assert not canary.exists()
    fed.wait_empty()
    rc, ok = FileStreamer.stream_object("objects", "trusted", {"tag": "trusted"}, SITES, obj, fed.fl_ctx,
                                        serializer="cloudpickle")
    assert (rc, ok) == (ReturnCode.OK, True)
    for report in fed.reports("trusted"):
        assert report["error"] is None, report
        entries = dict(report["fingerprint"]["dict"])
        assert entries["set"] == {"set": [1, 2, 3]} and entries["inc"] == {"callable": 2}
    assert canary.exists()
    fed.wait_empty()
    assert os.listdir(spool_dir) == []


def test_push_damaged_object_file_gives_an_error(fed, spool_dir):
    path = spool.spool_object(payloads.nested())
    with open(path, "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    result = send_file(fed.fl_ctx.get_engine().get_cell(), "objects", "plain",
                       {"tag": "damaged", keys.KEY_OBJECT: "container"}, SITES, path)
    assert result.ok
    for report in fed.reports("damaged"):
        assert report["error"].startswith("ObjectFormatError: ") and "damaged" in report["error"], report
        assert "fingerprint" not in report
    fed.wait_empty()


def test_get_object_on_a_file_stream_is_an_error_and_keeps_the_file(fed, tmp_path):
    path = tmp_path / "plain.bin"
    path.write_bytes(b"not an object")
    rc, ok = FileStreamer.stream_file("objects", "plain", {"tag": "file"}, SITES, str(path), fed.fl_ctx)
    assert (rc, ok) == (ReturnCode.OK, True)
    for report in fed.reports("file"):
        assert "carries a file, not an object" in report["error"]
    for dest in fed.dests.values():
        assert os.listdir(dest) == ["plain.bin"]
        os.unlink(dest / "plain.bin")


def test_stream_object_refuses_bad_arguments_before_sending(fed, spool_dir):
    with pytest.raises(UnsupportedValueError, match=r"^weights\['layer3'\]\[2\]: set is not supported$"):
        FileStreamer.stream_object("objects", "plain", None, SITES, {"weights": {"layer3": [1, 2, {3}]}},
                                   fed.fl_ctx)
    with pytest.raises(ValueError, match="serializer must be"):
        FileStreamer.stream_object("objects", "plain", None, SITES, 1, fed.fl_ctx, serializer="pickle")
    with pytest.raises(ValueError, match="targets is empty"):
        FileStreamer.stream_object("objects", "plain", None, [], 1, fed.fl_ctx)
    with pytest.raises(ValueError, match="fl_ctx must be an FLContext"):
        FileStreamer.stream_object("objects", "plain", None, SITES, 1, None)
    assert os.listdir(spool_dir) == []
