"""Push receiver for the object tests: loads each object in stream_done_cb and reports.

argv: name, broker, dest dir. Registers channel "objects", topic "plain" (pickle refused) and
topic "trusted" (allow_pickle=True). Prints READY, then per stream `DONE <json>` with the rc,
the error of get_object or the object's fingerprint, and whether the file existed during the
callback.
"""

import json
import os
import sys
import threading

from fedstream.nodes import Cell, FileStreamer, FLContext
from tests.helpers import objects_payloads as payloads

CHANNEL = "objects"


def main() -> None:
    name, broker, dest = sys.argv[1:4]
    lock = threading.Lock()

    def done(ctx, fl_ctx, site):
        location = FileStreamer.get_file_location(ctx)
        report = {"site": site, "rc": str(FileStreamer.get_rc(ctx)), "tag": ctx.get("tag"),
                  "file_existed": bool(location and os.path.exists(location)), "error": None}
        try:
            report["fingerprint"] = payloads.fingerprint(FileStreamer.get_object(ctx))
        except ValueError as exc:
            report["error"] = f"{type(exc).__name__}: {exc}"
        with lock:
            print("DONE", json.dumps(report), flush=True)

    with Cell(name, broker) as cell:
        fl_ctx = FLContext(cell)
        FileStreamer.register_stream_processing(fl_ctx, CHANNEL, "plain", dest_dir=dest, stream_done_cb=done,
                                                site=name)
        FileStreamer.register_stream_processing(fl_ctx, CHANNEL, "trusted", dest_dir=dest, stream_done_cb=done,
                                                allow_pickle=True, site=name)
        print("READY", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
