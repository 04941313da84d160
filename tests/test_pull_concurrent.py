"""Several downloads into one cell at once share what may wait for it at the broker."""

import os
import threading

import pytest

from fedstream.nodes import FileDownloader, LocalFederation, download_file
from fedstream.nodes.simulate.files import make_file, sha256_of

OWNERS = ["owner-1", "owner-2", "owner-3", "owner-4"]


# Each download alone keeps up to 12 MiB in flight; four at once would be 48 MiB queued for one
# cell at the broker, over its 16 MiB bound, and the broker would drop replies: each dropped
# reply then costs the whole per_request_timeout (60 s here), far past this test's limit.
@pytest.mark.timeout(50)
def test_four_downloads_into_one_cell_at_once_lose_no_replies(tmp_path):
    with LocalFederation(sites=OWNERS) as fed:
        refs, digests = {}, {}
        for name in OWNERS:
            source = tmp_path / f"{name}.bin"
            digests[name] = make_file(str(source), 24 << 20)
            tx = FileDownloader.new_transaction(fed.sites[name], 60, None)
            refs[name] = FileDownloader.add_file(tx, str(source))
        results = {}

        def fetch(name: str) -> None:
            out = tmp_path / f"from-{name}"
            out.mkdir()
            results[name] = download_file(name, refs[name], 60, fed.server, location=str(out), window=12)

        threads = [threading.Thread(target=fetch, args=(name,)) for name in OWNERS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(45)
    for name in OWNERS:
        error, path = results[name]
        assert error is None, error
        assert sha256_of(path) == digests[name] and os.path.basename(path) == f"{name}.bin"
