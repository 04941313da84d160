"""A push owner in its own process (a sender the tests can kill mid-stream).

    python -m tests.helpers.push_sender BROKER FILE TARGETS CHUNK_SIZE CHUNK_TIMEOUT

Prints STARTED once registered, then "RESULT <rc>" when the push returns.
"""

import sys

from fedstream.nodes import Cell
from fedstream.nodes.push.sender import send_file


def main() -> None:
    broker, path, targets, chunk_size, chunk_timeout = sys.argv[1:6]
    cell = Cell("server", broker).start()
    print("STARTED", flush=True)
    result = send_file(cell, "test", "file", {}, targets.split(","), path, chunk_size=int(chunk_size),
                       chunk_timeout=float(chunk_timeout))
    print("RESULT", result.rc, flush=True)


if __name__ == "__main__":
    main()
