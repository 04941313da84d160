"""Owner and recipient processes for the pull tests, and a reader of their event lines.

Both print one event per line: `<kind> <json>`; "at" fields are time.monotonic() values, which
processes on one machine share.
"""


import json
import os
import queue
import time
from typing import Callable, Optional

from fedstream.nodes.simulate.files import make_file, sha256_of  # noqa: F401  (re-exported for the tests)
from tests.procs import Proc, Procs

OWNER = r"""
import json, signal, sys, time
from fedstream.common import DownloadStatus
from fedstream.nodes import Cell, FileDownloader

broker, name, timeout, tx_kwargs = sys.argv[1:5]
files = sys.argv[5:]

def emit(kind, **data):
    print(kind, json.dumps(data), flush=True)

def on_timeout(tx_id, file_names, **kwargs):
    emit("timeout", tx=tx_id, files=file_names, kwargs=kwargs, at=time.monotonic())

def on_downloaded(ref_id, to_site, status, file_name, **kwargs):
    emit("downloaded", ref=ref_id, site=to_site, status=str(status),
         is_status=isinstance(status, DownloadStatus), file=file_name, kwargs=kwargs)

cell = Cell(name, broker).start()
tx = FileDownloader.new_transaction(cell, float(timeout), on_timeout, **json.loads(tx_kwargs))
for index, path in enumerate(files):
    emit("ref", ref=FileDownloader.add_file(tx, path, on_downloaded, index=index), file=path, tx=tx)
signal.signal(signal.SIGUSR1, lambda *_: FileDownloader.shutdown())
emit("ready")
while True:
    time.sleep(0.1)
"""

RECEIVER = r"""
import json, sys, time
from fedstream.common import Signal
from fedstream.nodes import Cell, download_file

broker, name, owner, location, options = sys.argv[1:6]
refs = sys.argv[6:]
options = json.loads(options)
delay = options.pop("delay", 0)
abort_after = options.pop("abort_after", None)
report = options.pop("report", None)
timeout = options.pop("timeout", 10)

def emit(kind, **data):
    print(kind, json.dumps(data), flush=True)

with Cell(name, broker) as cell:
    emit("ready")
    for ref in refs:
        abort = Signal()
        state = {"first": True, "reported": 0}

        def progress(received, total):
            if state["first"]:
                state["first"] = False
                emit("start", ref=ref, received=received, total=total)
            if report and received - state["reported"] >= report:
                state["reported"] = received
                emit("progress", ref=ref, received=received, total=total)
            if abort_after is not None and received >= abort_after:
                abort.trigger()
            if delay:
                time.sleep(delay)

        started = time.monotonic()
        error, path = download_file(owner, ref, timeout, cell, location, abort_signal=abort,
                                    progress_cb=progress, **options)
        emit("result", ref=ref, error=error, path=path, seconds=time.monotonic() - started, at=time.monotonic())
emit("finished")
"""


class Events:
    """Reads `<kind> <json>` lines of a process; every line stays available for later checks."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.all: list[tuple[str, object]] = []

    def _pull(self, timeout: float) -> bool:
        try:
            line = self.proc.lines.get(timeout=timeout)
        except queue.Empty:
            return False
        self.proc.seen.append(line)
        kind, _, rest = line.partition(" ")
        try:
            data = json.loads(rest) if rest else None
        except ValueError:
            data = rest
        self.all.append((kind, data))
        return True

    def of(self, kind: str) -> list:
        """Every `kind` event printed so far."""
        while self._pull(0):
            pass
        return [data for k, data in self.all if k == kind]

    def wait(self, kind: str, timeout: float = 30.0, where: Callable[[dict], bool] = lambda d: True,
             count: int = 1) -> list:
        """Wait until `count` events of `kind` matching `where` were printed; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = [data for k, data in self.all if k == kind and where(data)]
            if len(found) >= count:
                return found[:count]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {count} '{kind}' events within {timeout} s; events: {self.all[-10:]}; "
                                     f"stderr: {self.proc.stderr[-3000:]}")
            if not self._pull(min(remaining, 0.2)) and self.proc.popen.poll() is not None and self.proc.lines.empty():
                raise AssertionError(f"process exited with {self.proc.popen.returncode} before {count} '{kind}' "
                                     f"events; events: {self.all[-10:]}; stderr: {self.proc.stderr[-3000:]}")

    def one(self, kind: str, timeout: float = 30.0, where: Callable[[dict], bool] = lambda d: True) -> dict:
        return self.wait(kind, timeout, where)[0]


def start_owner(procs: Procs, broker: str, files: list[str], timeout: float = 60.0, name: str = "owner",
                tx_kwargs: Optional[dict] = None) -> tuple[Events, dict[str, str]]:
    """An owner process sharing `files` in one transaction; returns its events and {file: ref}."""
    events = Events(procs.python(OWNER, broker, name, str(timeout), json.dumps(tx_kwargs or {}), *files))
    events.one("ready")
    return events, {e["file"]: e["ref"] for e in events.of("ref")}


def start_receiver(procs: Procs, broker: str, name: str, location: str, refs: list[str], owner: str = "owner",
                   **options: object) -> Events:
    """A recipient process downloading `refs` one after the other into `location`.

    Options: timeout (per request), chunk_size, window, delay (seconds per chunk), report (print
    progress every N bytes), abort_after (trigger the abort signal after N bytes).
    """
    events = Events(procs.python(RECEIVER, broker, name, owner, location, json.dumps(options), *refs))
    events.one("ready")
    return events






def part_files(location: str) -> list[str]:
    """The .part files left in `location`."""
    return sorted(name for name in os.listdir(location) if name.endswith(".part"))
