"""fedstream.nodes.nvflare: NVFlare-style code (tests/helpers/nvflare_sample.py) on a real federation."""

import threading
import time

import pytest

from fedstream.common import ReturnCode as OurReturnCode
from fedstream.nodes import LocalFederation
from fedstream.nodes import nvflare
from fedstream.nodes.nvflare import (
    FileStreamer,
    FLContext,
    ObjectDownloader,
    ReturnCode,
    StreamContextKey,
    TransactionDoneStatus,
    add_file,
    download_object,
)
from fedstream.nodes.simulate.files import make_file, sha256_of
from tests.helpers.nvflare_sample import ModelReceiver, ModelSharer, download_succeeded
from tests.test_aio import run_readme_example

pytestmark = pytest.mark.timeout(60)
SITES = ["site-1", "site-2"]


@pytest.fixture
def fed():
    with LocalFederation(sites=SITES) as federation:
        yield federation


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_an_nvflare_style_download_to_every_site(fed, tmp_path):
    model = tmp_path / "model.bin"
    digest = make_file(str(model), 3 << 20)
    sharer = ModelSharer()
    (rid,) = sharer.share(FLContext(fed.server), [str(model)], SITES)
    for site in SITES:
        out = tmp_path / site
        out.mkdir()
        err, path = ModelReceiver().download(FLContext(fed.sites[site]), "server", rid, str(out))
        assert err is None and sha256_of(path) == digest
    assert sharer.all_done.wait(10)
    assert _wait_for(lambda: len(sharer.downloaded) == 3)
    assert sorted(sharer.downloaded) == sorted([("site-1", "success", str(model), 3),
                                                ("site-2", "success", str(model), 3),
                                                ("", "", str(model), 3)])
    assert all(download_succeeded(status) for _, status, _, _ in sharer.downloaded if status)
    assert sharer.tx_done == [(sharer.downloader.tx_id, TransactionDoneStatus.FINISHED, [str(model)], "model")]
    assert sharer.downloader.status == TransactionDoneStatus.FINISHED
    sharer.downloader.delete()  # after the end: no second transaction_done_cb
    assert len(sharer.tx_done) == 1


def test_an_nvflare_style_push_with_the_three_argument_chunk_callback(fed, tmp_path):
    source = tmp_path / "weights.bin"
    digest = make_file(str(source), (1 << 20) + 1000)
    dest = tmp_path / "dest"
    dest.mkdir()
    receiver = ModelReceiver()
    receiver.start(FLContext(fed.sites["site-1"]), str(dest))
    assert ModelSharer().push(FLContext(fed.server), str(source), ["site-1"])
    assert receiver.stream_done.wait(10)
    (location, rc, round_, channel, topic), = receiver.received
    assert sha256_of(location) == digest
    assert (rc, round_, channel, topic) == (ReturnCode.OK, 3, "model_sharing", "global_model")
    assert len(receiver.chunks) == 5  # 1 MiB + 1000 bytes in 256 KiB chunks
    assert set(receiver.chunks) == {(ReturnCode.OK, "model_sharing", "global_model", "site")}


def test_fedstreams_own_two_argument_chunk_callback_still_works(fed, tmp_path):
    source = tmp_path / "w.bin"
    make_file(str(source), 600 << 10)
    seen, done = [], threading.Event()
    FileStreamer.register_stream_processing(FLContext(fed.sites["site-1"]), "app", "f", dest_dir=str(tmp_path),
                                            stream_done_cb=lambda ctx, fl_ctx, tag: done.set(),
                                            chunk_consumed_cb=lambda ctx, fl_ctx, tag: seen.append(tag), tag="t")
    rc, ok = FileStreamer.stream_file("app", "f", None, ["site-1"], str(source), FLContext(fed.server),
                                      chunk_size=0)  # 0: the default chunk size, as in NVFlare
    assert (rc, ok) == (ReturnCode.OK, True)
    assert done.wait(10) and seen == ["t"]


def test_timeout_and_delete_end_a_transaction_once(fed, tmp_path):
    model = tmp_path / "m.bin"
    make_file(str(model), 1000)
    events = []
    downloader = ObjectDownloader(fed.server, 0.5, 2,
                                  timeout_cb=lambda tx_id, names, tag: events.append(("timeout", names, tag)),
                                  transaction_done_cb=lambda tx_id, status, objs, tag: events.append(
                                      ("done", status, objs, tag)), tag="x")
    add_file(downloader, str(model))
    assert _wait_for(lambda: len(events) == 2)
    assert events == [("timeout", [str(model)], "x"), ("done", TransactionDoneStatus.TIMEOUT, [str(model)], "x")]
    downloader.delete()
    assert len(events) == 2

    deleted = []
    other = ObjectDownloader(FLContext(fed.server), 10, 1, transaction_done_cb=lambda *args: deleted.append(args))
    rid = other.add_object({"w": [1, 2]})
    other.delete_transaction()
    other.delete()
    assert deleted == [(other.tx_id, TransactionDoneStatus.DELETED, [{"w": [1, 2]}])]
    err, obj = download_object("server", rid, 2, fed.sites["site-1"])
    assert obj is None and err


def test_objects_by_download_report_like_files(fed):
    reports, done = [], threading.Event()
    downloader = ObjectDownloader(fed.server, 10, 1, transaction_done_cb=lambda *args: done.set())
    rid = downloader.add_object({"w": [1.0, 2.0]}, lambda to, status, name: reports.append((to, status, name)))
    assert download_object("server", rid, 5, fed.sites["site-1"]) == (None, {"w": [1.0, 2.0]})
    assert done.wait(10)
    assert reports == [("site-1", "success", f"object {rid}"), ("", "", f"object {rid}")]


def test_seed_style_arguments_fail_clearly_or_mean_the_default(fed, tmp_path):
    model = tmp_path / "m.bin"
    make_file(str(model), 1000)
    downloader = ObjectDownloader(fed.server, 10, 1)
    with pytest.raises(ValueError, match="ref_id cannot be chosen"):
        add_file(downloader, str(model), ref_id="mine")
    assert add_file(downloader, str(model), chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        add_file(downloader, str(model), chunk_size=-1)
    with pytest.raises(ValueError, match="num_receivers"):
        ObjectDownloader(fed.server, 10, -1)
    downloader.delete()


def test_fl_context_properties_and_abort_signal(fed):
    fl_ctx = FLContext(fed.server)
    assert fl_ctx.get_prop("k", 5) == 5
    fl_ctx.set_prop("k", {"a": 1}, private=True, sticky=False)
    assert fl_ctx.get_prop("k") == {"a": 1}
    assert fl_ctx.get_run_abort_signal() is not None and not fl_ctx.get_run_abort_signal().triggered
    assert fl_ctx.get_engine().get_cell() is fed.server and fl_ctx.get_identity_name() == "server"


def test_return_codes_and_keys():
    names = [n for n in vars(ReturnCode) if n.isupper()]
    assert len(names) == 25 and all(getattr(ReturnCode, n) == n for n in names)
    assert [m.name for m in OurReturnCode] == ["OK", "ERROR", "TIMEOUT", "TASK_ABORTED", "EXECUTION_EXCEPTION",
                                               "BAD_REQUEST_DATA", "COMMUNICATION_ERROR"]
    assert all(getattr(ReturnCode, m.name) == m for m in OurReturnCode)
    assert StreamContextKey.RC == "__fedstream_rc__" and StreamContextKey.CHANNEL == "__fedstream_channel__"
    assert set(nvflare.__all__) <= set(dir(nvflare))


def test_readme_nvflare_example_runs(tmp_path):
    out = run_readme_example("nvflare", tmp_path)
    assert "downloaded: every receiver" in out and "finished" in out
