"""An owner process for the pull tests: shares files in one transaction and prints its events.

Run as `python -m tests.helpers.pull_owner BROKER NAME TIMEOUT TX_KWARGS_JSON FILE...`.
Prints one event per line, `<kind> <json>`: `ref` per file, `ready`, then `downloaded` per
file_downloaded_cb and `timeout` for timeout_cb ("at" is time.monotonic()). SIGUSR1 calls
FileDownloader.shutdown(). Runs until killed.

The main thread wakes twice a second: Python runs a signal handler in the main thread only,
and a main thread blocked in an untimed wait never runs it when the kernel hands the signal to
another thread.
"""

import json
import signal
import sys
import threading
import time

from fedstream.common import DownloadStatus
from fedstream.nodes import Cell, FileDownloader


_lock = threading.Lock()  # callbacks run in threads of their own: one whole line at a time


def emit(kind: str, **data: object) -> None:
    with _lock:
        print(f"{kind} {json.dumps(data)}", flush=True)


def on_timeout(tx_id: str, file_names: list, **kwargs: object) -> None:
    emit("timeout", tx=tx_id, files=file_names, kwargs=kwargs, at=time.monotonic())


def on_downloaded(ref_id: str, to_site: str, status: DownloadStatus, file_name: str, **kwargs: object) -> None:
    emit("downloaded", ref=ref_id, site=to_site, status=str(status),
         is_status=isinstance(status, DownloadStatus), file=file_name, kwargs=kwargs)


def main() -> None:
    broker, name, timeout, tx_kwargs = sys.argv[1:5]
    files = sys.argv[5:]
    cell = Cell(name, broker).start()
    tx = FileDownloader.new_transaction(cell, float(timeout), on_timeout, **json.loads(tx_kwargs))
    for index, path in enumerate(files):
        emit("ref", ref=FileDownloader.add_file(tx, path, on_downloaded, index=index), file=path, tx=tx)
    signal.signal(signal.SIGUSR1, lambda *_: FileDownloader.shutdown())
    emit("ready")
    while True:  # serve until killed
        time.sleep(0.5)


if __name__ == "__main__":
    main()
