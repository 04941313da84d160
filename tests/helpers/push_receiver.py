"""A push receiver site in its own process, reporting on stdout (tests/push_support.py starts it).

    python -m tests.helpers.push_receiver NAME BROKER DEST_DIR OPTIONS_JSON

OPTIONS_JSON keys:
  topics: [[channel, topic], ...] to register (default [["test", "file"]])
  chunk_delay: seconds chunk_consumed_cb sleeps (a slow target)
  print_chunks: print "CHUNK <stream tag> <count> <monotonic time>" after each chunk
  subscribe_delay, max_idle, max_stall: ReceiverTuning fields
Prints READY once registered, then "DONE <json>" from each stream_done_cb.
"""

import json
import sys
import threading
import time

from fedstream.nodes import Cell, FileStreamer, FLContext
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.push.receiver import ReceiverTuning, set_receiver_tuning

_TUNING = ("subscribe_delay", "max_idle", "max_stall")


def main() -> None:
    name, broker, dest, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    cell = Cell(name, broker).start()
    tuning = {key: opts[key] for key in _TUNING if key in opts}
    if tuning:
        set_receiver_tuning(cell, ReceiverTuning(**tuning))
    counts: dict = {}
    lock = threading.Lock()  # streams run in threads of their own: one line at a time

    def say(line: str) -> None:
        with lock:
            print(line, flush=True)

    def consumed(ctx, fl_ctx, site):
        sid = ctx[keys.KEY_STREAM_ID]
        counts[sid] = counts.get(sid, 0) + 1
        if opts.get("print_chunks"):
            say(f"CHUNK {ctx.get('tag')} {counts[sid]} {time.monotonic():.6f}")
        if opts.get("chunk_delay"):
            time.sleep(opts["chunk_delay"])

    def done(ctx, fl_ctx, site):
        assert fl_ctx.get_identity_name() == site
        report = {"site": site, "rc": str(FileStreamer.get_rc(ctx)), "path": FileStreamer.get_file_location(ctx),
                  "name": FileStreamer.get_file_name(ctx), "size": FileStreamer.get_file_size(ctx),
                  "repaired": ctx[keys.KEY_REPAIRED_CHUNKS], "rejected": ctx[keys.KEY_REJECTED_CHUNKS],
                  "chunks": counts.get(ctx[keys.KEY_STREAM_ID], 0),
                  "ctx": {k: v for k, v in ctx.items() if not k.startswith("__fedstream")}}
        say("DONE " + json.dumps(report))

    for channel, topic in opts.get("topics", [["test", "file"]]):
        FileStreamer.register_stream_processing(FLContext(cell), channel, topic, dest_dir=dest,
                                                stream_done_cb=done, chunk_consumed_cb=consumed, site=name)
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
