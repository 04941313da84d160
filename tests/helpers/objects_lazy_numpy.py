"""Writes and loads a plain object with the container, then says whether numpy got imported.

argv: a directory for the spool file. Prints "NUMPY <true|false>" and "EQUAL <true|false>".
"""

import sys

from fedstream.nodes.objects import spool


def main() -> None:
    value = {"a": [1, 2.5, "x", b"y", None, True, (3,)], "b": {"c": 2 ** 70}}
    path = spool.spool_object(value, directory=sys.argv[1])
    loaded = spool.load_object(path)
    print("NUMPY", str("numpy" in sys.modules).lower())
    print("EQUAL", str(loaded == value).lower())


if __name__ == "__main__":
    main()
