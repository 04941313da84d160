"""The owner side of pull as users call it: where callbacks run, the keywords add_file takes."""

import threading

import pytest

from fedstream.broker import Broker
from fedstream.common import DownloadStatus
from fedstream.nodes import Cell, FileDownloader, download_file
from tests.procs import wait_until


@pytest.mark.timeout(60)
def test_file_downloaded_cb_runs_in_the_owner_cells_pool(tmp_path):
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 100_000)
    calls = []

    def downloaded(ref_id, to_site, status, file_name, **kwargs):
        calls.append((threading.current_thread().name, to_site, status, kwargs))

    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("owner", broker.address) as owner, \
            Cell("site-1", broker.address) as site:
        tx = FileDownloader.new_transaction(owner, 30, None)
        ref = FileDownloader.add_file(tx, str(source), downloaded, tag="t")
        (tmp_path / "out").mkdir()
        err, path = download_file("owner", ref, 10, site, str(tmp_path / "out"))
        assert err is None
        wait_until(lambda: calls, 10)
        FileDownloader.delete_transaction(tx)
    name, to_site, status, kwargs = calls[0]
    assert (to_site, status, kwargs) == ("site-1", DownloadStatus.SUCCESS, {"tag": "t"})
    assert name.startswith("cell-owner") and "io" not in name
    assert len(calls) == 1


def test_add_file_takes_nvflare_keywords_without_mixing_them_into_cb_kwargs(tmp_path):
    source = tmp_path / "f.bin"
    source.write_bytes(b"y" * 1000)
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("owner", broker.address) as owner:
        tx = FileDownloader.new_transaction(owner, 30, None)
        assert FileDownloader.add_file(tx, str(source), chunk_size=0)
        assert FileDownloader.add_file(tx, str(source), chunk_size=4096)
        with pytest.raises(ValueError, match="ref_id cannot be chosen"):
            FileDownloader.add_file(tx, str(source), ref_id="mine")
        with pytest.raises(ValueError, match="chunk_size must be"):
            FileDownloader.add_file(tx, str(source), chunk_size=-1)
        FileDownloader.delete_transaction(tx)
