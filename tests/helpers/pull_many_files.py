"""An owner sharing many small files in one transaction under a low open-file limit.

Run as `python -m tests.helpers.pull_many_files BROKER NAME COUNT DIR`: lowers RLIMIT_NOFILE to
1,024, writes COUNT files of 16 bytes (`file <n>`) into DIR, shares them all in one transaction,
prints `refs <json list of RIDs in file order>` and `ready`, then serves until killed.
"""

import json
import os
import resource
import sys
import threading

from fedstream.nodes import Cell, FileDownloader

OPEN_FILE_LIMIT = 1024


def main() -> None:
    broker, name, count, directory = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(OPEN_FILE_LIMIT, hard), hard))
    cell = Cell(name, broker).start()
    tx = FileDownloader.new_transaction(cell, 600, None)
    refs = []
    for index in range(count):
        path = os.path.join(directory, f"f{index:05d}.txt")
        with open(path, "w") as out:
            out.write(f"file {index:09d}\n")
        refs.append(FileDownloader.add_file(tx, path))
    print("refs", json.dumps(refs), flush=True)
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
