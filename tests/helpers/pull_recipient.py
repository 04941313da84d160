"""A recipient process for the pull tests: downloads RIDs one after the other and prints events.

Run as `python -m tests.helpers.pull_recipient BROKER NAME OWNER LOCATION OPTIONS_JSON REF...`.
Options: timeout (per request), chunk_size, window, delay (seconds slept per progress call),
report (print `progress` every N bytes), abort_after (trigger the abort signal after N bytes).
Prints `ready`, then per RID `start` (first progress call) and `result` (with this process's
peak RSS so far), then `finished`.
"""

import json
import sys
import time

from fedstream.common import Signal
from fedstream.nodes import Cell, download_file
from fedstream.nodes.simulate.procstats import peak_rss


def emit(kind: str, **data: object) -> None:
    print(kind, json.dumps(data), flush=True)


def main() -> None:
    broker, name, owner, location, options_json = sys.argv[1:6]
    refs = sys.argv[6:]
    options = json.loads(options_json)
    delay = options.pop("delay", 0)
    abort_after = options.pop("abort_after", None)
    report = options.pop("report", None)
    timeout = options.pop("timeout", 10)
    with Cell(name, broker) as cell:
        emit("ready")
        for ref in refs:
            abort = Signal()
            state = {"first": True, "reported": 0}

            def progress(received: int, total: int, ref: str = ref, abort: Signal = abort,
                         state: dict = state) -> None:
                if state["first"]:
                    state["first"] = False
                    emit("start", ref=ref, received=received, total=total)
                if report and received - state["reported"] >= report:
                    state["reported"] = received
                    emit("progress", ref=ref, received=received, total=total)
                if abort_after is not None and received >= abort_after:
                    abort.trigger()
                if delay:
                    time.sleep(delay)  # a slow recipient

            started = time.monotonic()
            error, path = download_file(owner, ref, timeout, cell, location, abort_signal=abort,
                                        progress_cb=progress, **options)
            emit("result", ref=ref, error=error, path=path, seconds=time.monotonic() - started,
                 at=time.monotonic(), peak_rss=peak_rss())
    emit("finished")


if __name__ == "__main__":
    main()
