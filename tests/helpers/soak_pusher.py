"""A long-lived push owner for the push soak: pushes every file of a directory to one target, one after
the other, from the same Cell.

    python -m tests.helpers.soak_pusher BROKER SOURCE_DIR TARGET WARM_UP GO_FILE

Flow: register as "owner", print STARTED; push the first WARM_UP files (sorted by name), printing
"PUSHED <name> <rc>" after each; print WARM and wait (bounded) until GO_FILE exists, so the test can
measure both processes while they are idle; push the rest the same way; print FINISHED and stay alive
(idle) until the test kills it.
"""

import os
import sys
import threading
import time

from fedstream.nodes import Cell
from fedstream.nodes.push.sender import send_file

_GO_TIMEOUT = 60.0


def _push(cell: Cell, source_dir: str, names: list[str], target: str) -> None:
    for name in names:
        result = send_file(cell, "test", "file", {}, [target], os.path.join(source_dir, name),
                           chunk_size=256 * 1024, chunk_timeout=10.0)
        print("PUSHED", name, result.rc, flush=True)


def main() -> None:
    broker, source_dir, target, warm_up, go_file = sys.argv[1:6]
    names = sorted(os.listdir(source_dir))
    cell = Cell("owner", broker).start()
    print("STARTED", flush=True)
    _push(cell, source_dir, names[:int(warm_up)], target)
    print("WARM", flush=True)
    deadline = time.monotonic() + _GO_TIMEOUT
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            sys.exit("the test never said go")
        time.sleep(0.05)
    _push(cell, source_dir, names[int(warm_up):], target)
    print("FINISHED", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
