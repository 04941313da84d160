"""Pull owner for the object tests: shares one object (or damaged spool files) and reports.

argv: broker, name, payload kind (see objects_payloads.build), serializer ("container" or
"cloudpickle"), number of recipients to wait for, mode ("object", or "damaged": share two
damaged spool files, one with a flipped byte and one truncated, with add_file), canary path.
Prints `FINGERPRINT <json>`, `REF <ref_id>` per shared file, `DOWNLOADED <json>` per
file_downloaded_cb, then, once every expected callback came (or after 60 s), ends the
transaction and prints `SPOOL_LEFT <json list of the temp dir>` and `PEAK <VmHWM bytes>`.
"""

import json
import os
import sys
import tempfile
import threading

from fedstream.nodes import Cell, FileDownloader
from fedstream.nodes.objects import spool
from tests.helpers import objects_payloads as payloads

_WAIT = 60.0


def damaged_spool_files(obj) -> list[str]:
    """Two spool files of `obj`: one with a byte flipped in the middle, one cut short."""
    flipped, truncated = spool.spool_object(obj), spool.spool_object(obj)
    size = os.path.getsize(flipped)
    with open(flipped, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    os.truncate(truncated, size - 100)
    return [flipped, truncated]


def main() -> None:
    broker, name, kind, serializer, expected, mode, canary = sys.argv[1:8]
    print("BASE", payloads.peak_rss_bytes(), flush=True)  # the interpreter with numpy and pyzmq loaded
    obj = payloads.build(kind, canary)
    print("FINGERPRINT", json.dumps(payloads.fingerprint(obj)), flush=True)
    lock = threading.Lock()
    reports: list[dict] = []
    everyone = threading.Event()
    files = 2 if mode == "damaged" else 1

    def downloaded(ref_id, to_site, status, file_name, **kwargs):
        with lock:
            reports.append({"ref": ref_id, "site": to_site, "status": str(status), "kwargs": kwargs})
            print("DOWNLOADED", json.dumps(reports[-1]), flush=True)
            if len(reports) >= int(expected) * files:
                everyone.set()

    with Cell(name, broker) as cell:
        tx = FileDownloader.new_transaction(cell, 60, None)
        if mode == "damaged":
            for path in damaged_spool_files(obj):
                print("REF", FileDownloader.add_file(tx, path, downloaded), flush=True)
        else:
            print("REF", FileDownloader.add_object(tx, obj, downloaded, serializer=serializer, tag="t"), flush=True)
        everyone.wait(_WAIT)
        FileDownloader.delete_transaction(tx)
        if mode != "damaged":
            print("SPOOL_LEFT", json.dumps(os.listdir(tempfile.gettempdir())), flush=True)
        print("PEAK", payloads.peak_rss_bytes(), flush=True)


if __name__ == "__main__":
    main()
