"""Owner and recipient processes for the pull tests, and a reader of their event lines.

The programs are modules under tests/helpers/, run with `python -m` in the test's tmp_path. They
print one event per line: `<kind> <json>`; "at" fields are time.monotonic() values, which
processes on one machine share.
"""

import json
import os
import queue
import sys
import time
from typing import Callable, Optional

from fedstream.nodes.simulate.files import make_file, sha256_of  # noqa: F401  (re-exported for the tests)
from tests.procs import Proc, Procs


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


def run_helper(procs: Procs, module: str, *args: str) -> Proc:
    """Run `python -m tests.helpers.<module> ARGS...` in the test's tmp_path."""
    return procs.start([sys.executable, "-m", f"tests.helpers.{module}", *args], cwd=str(procs.tmp_path))


def start_owner(procs: Procs, broker: str, files: list[str], timeout: float = 60.0, name: str = "owner",
                tx_kwargs: Optional[dict] = None) -> tuple[Events, dict[str, str]]:
    """An owner process sharing `files` in one transaction; returns its events and {file: ref}."""
    events = Events(run_helper(procs, "pull_owner", broker, name, str(timeout), json.dumps(tx_kwargs or {}),
                                *files))
    events.one("ready")
    return events, {e["file"]: e["ref"] for e in events.of("ref")}


def start_receiver(procs: Procs, broker: str, name: str, location: str, refs: list[str], owner: str = "owner",
                   **options: object) -> Events:
    """A recipient process downloading `refs` one after the other into `location`.

    Options: timeout (per request), chunk_size, window, delay (seconds per chunk), report (print
    progress every N bytes), abort_after (trigger the abort signal after N bytes).
    """
    events = Events(run_helper(procs, "pull_recipient", broker, name, owner, location, json.dumps(options),
                                *refs))
    events.one("ready")
    return events


def part_files(location: str) -> list[str]:
    """The .part files left in `location`."""
    return sorted(name for name in os.listdir(location) if name.endswith(".part"))
