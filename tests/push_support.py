"""Helpers of the push tests: receiver processes that report on stdout, test files, digests."""


import json
import os
from typing import Optional

from fedstream.nodes.simulate.files import make_file, sha256_of  # noqa: F401  (re-exported for the tests)
from tests.procs import Proc, Procs

CHANNEL = "test"
TOPIC = "file"

# A receiver site in its own process. argv: name, broker, dest dir, options (JSON):
#   topics: [[channel, topic], ...] to register (default [[CHANNEL, TOPIC]])
#   chunk_delay: seconds chunk_consumed_cb sleeps (a slow target)
#   print_chunks: print "CHUNK <stream tag> <count> <monotonic time>" after each chunk
#   subscribe_delay: ReceiverTuning.subscribe_delay (a late subscriber)
# Prints READY once registered, then "DONE <json>" from stream_done_cb.
RECEIVER = """
import json, sys, threading, time
from fedstream.nodes import Cell, FLContext, FileStreamer
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.push.receiver import ReceiverTuning, set_receiver_tuning

name, broker, dest, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
cell = Cell(name, broker).start()
if opts.get("subscribe_delay"):
    set_receiver_tuning(cell, ReceiverTuning(subscribe_delay=opts["subscribe_delay"]))
counts = {}
lock = threading.Lock()  # streams run in threads of their own: one line at a time

def say(line):
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
              "repaired": ctx[keys.KEY_REPAIRED_CHUNKS], "chunks": counts.get(ctx[keys.KEY_STREAM_ID], 0),
              "ctx": {k: v for k, v in ctx.items() if not k.startswith("__fedstream")}}
    say("DONE " + json.dumps(report))

for channel, topic in opts.get("topics", [["test", "file"]]):
    FileStreamer.register_stream_processing(FLContext(cell), channel, topic, dest_dir=dest,
                                            stream_done_cb=done, chunk_consumed_cb=consumed, site=name)
print("READY", flush=True)
threading.Event().wait()
"""


def start_receiver(procs: Procs, name: str, broker: str, dest: str, **options: object) -> Proc:
    """Start a receiver process and wait until it is registered."""
    os.makedirs(dest, exist_ok=True)
    proc = procs.python(RECEIVER, name, broker, dest, json.dumps(options))
    proc.expect("READY", 30)
    return proc


def next_done(proc: Proc, timeout: float = 30.0) -> dict:
    """The next stream_done_cb report of a receiver process."""
    return json.loads(proc.expect("DONE ", timeout)[5:])






def listing(directory: str) -> list[str]:
    """Names in a directory, hidden ones (.part files) included."""
    return sorted(os.listdir(directory))


def check_received(report: dict, dest: str, expected_sha: str, name: Optional[str] = None) -> None:
    """Assert a DONE report describes a verified file inside `dest`."""
    assert report["rc"] == "OK", report
    path = report["path"]
    assert os.path.dirname(path) == dest, report
    if name is not None:
        assert report["name"] == name and os.path.basename(path) == name, report
    assert os.path.getsize(path) == report["size"]
    assert sha256_of(path) == expected_sha
