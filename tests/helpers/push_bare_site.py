"""A site that is connected but has no stream processing registered.

    python -m tests.helpers.push_bare_site NAME BROKER

Prints READY once registered, then waits until killed.
"""

import sys
import threading

from fedstream.nodes import Cell


def main() -> None:
    Cell(sys.argv[1], sys.argv[2]).start()
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
