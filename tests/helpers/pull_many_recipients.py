"""Several recipient cells in one process, downloading the same RID at once.

Run as `python -m tests.helpers.pull_many_recipients BROKER OWNER REF LOCATION PREFIX COUNT`: starts
COUNT cells named PREFIX-<n>, each downloading REF into LOCATION/PREFIX-<n>/ in its own thread,
and prints `result {"site", "error", "path"}` per cell, then `finished`.
"""

import json
import os
import sys
import threading

from fedstream.nodes import Cell, download_file

_lock = threading.Lock()


def emit(kind: str, **data: object) -> None:
    with _lock:
        print(kind, json.dumps(data), flush=True)


def fetch(broker: str, owner: str, ref: str, location: str, site: str) -> None:
    destination = os.path.join(location, site)
    os.makedirs(destination, exist_ok=True)
    with Cell(site, broker) as cell:
        error, path = download_file(owner, ref, 30, cell, destination)
    emit("result", site=site, error=error, path=path)


def main() -> None:
    broker, owner, ref, location, prefix, count = sys.argv[1:7]
    threads = [threading.Thread(target=fetch, args=(broker, owner, ref, location, f"{prefix}-{n}"))
               for n in range(int(count))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    emit("finished")


if __name__ == "__main__":
    main()
