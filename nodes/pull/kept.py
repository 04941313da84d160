"""How many bytes of small shared files the pull owners of one process keep in memory.

A file of at most MAX_FILE bytes is read once, by the digest worker that hashes it, and kept
with its digest: an `open` that asks for the whole file is then answered on the Cell's I/O
thread, with no hand-off to the worker pool and no read. The bytes served are the bytes hashed,
so a later change to the file on disk is not seen by its downloads. All owners of a process
share TOTAL bytes; a file that does not fit is read from disk per request, as a large one is.
Socket-free.
"""

import threading

MAX_FILE = 64 << 10  # largest file kept (configurations, metrics, small shards)
TOTAL = 16 << 20  # every owner of the process together: the owner stays well below 100 MiB


class KeptBytes:
    """An allowance of bytes for small files kept in memory: `take` before keeping one, `give` after."""

    def __init__(self, total: int = TOTAL, max_file: int = MAX_FILE) -> None:
        self.total = total
        self.max_file = max_file
        self._lock = threading.Lock()
        self._used = 0

    def take(self, nbytes: int) -> bool:
        """Reserve `nbytes` for one file; False if it is too large or does not fit."""
        if nbytes > self.max_file:
            return False
        with self._lock:
            if self._used + nbytes > self.total:
                return False
            self._used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        """The bytes of a file taken earlier are no longer kept."""
        with self._lock:
            self._used = max(0, self._used - nbytes)

    @property
    def used(self) -> int:
        """Bytes reserved now."""
        with self._lock:
            return self._used


kept_bytes = KeptBytes()  # shared by every PullOwner of the process
