"""The owner's open files: a bounded set of descriptors, reopened on demand, and its digest workers.

A transaction may share thousands of files; keeping each one open would exhaust the process's
descriptor limit (often 1,024). `OpenFiles` keeps at most `limit` idle descriptors, the most
recently used, and opens a file again when a request needs it; a reader holds its descriptor
until its block ends. Whether the file reopened is still the one shared is the caller's check
(SharedFile compares device, inode, size and mtime). `DigestWorkers` hashes new files a few at a
time in daemon threads instead of one thread per file.
"""

import os
import queue
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

OPEN_FILES_LIMIT = 64  # idle descriptors kept open per owner
DIGEST_WORKERS = 2


class _Open:
    __slots__ = ("fd", "readers", "dropped")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.readers = 1
        self.dropped = False


class OpenFiles:
    """Descriptors of shared files by key; at most `limit` stay open while nobody reads them."""

    def __init__(self, limit: int = OPEN_FILES_LIMIT) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._open: "OrderedDict[str, _Open]" = OrderedDict()

    @contextmanager
    def reading(self, key: str, path: str) -> Iterator[int]:
        """An open descriptor of `path` (opened again if it was closed), valid until the block ends."""
        entry = self._take(key, path)
        try:
            yield entry.fd
        finally:
            with self._lock:
                entry.readers -= 1
                if entry.dropped and entry.readers == 0:
                    os.close(entry.fd)
                else:
                    self._close_idle()

    def discard(self, key: str) -> None:
        """The file is not served any more: close its descriptor once nobody reads it."""
        with self._lock:
            entry = self._open.pop(key, None)
            if entry is None:
                return
            if entry.readers == 0:
                os.close(entry.fd)
            else:
                entry.dropped = True

    def count(self) -> int:
        """Descriptors open now."""
        with self._lock:
            return len(self._open)

    def _take(self, key: str, path: str) -> _Open:
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:
                entry.readers += 1
                self._open.move_to_end(key)
                return entry
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # outside the lock: it may be slow
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:  # another reader opened it meanwhile
                os.close(fd)
                entry.readers += 1
                self._open.move_to_end(key)
                return entry
            entry = self._open[key] = _Open(fd)
            self._close_idle()
            return entry

    def _close_idle(self) -> None:
        """Close the least recently used idle descriptors beyond the limit (lock held)."""
        while len(self._open) > self._limit:
            victim: Optional[str] = next((k for k, e in self._open.items() if e.readers == 0), None)
            if victim is None:
                return  # every one is being read: the excess closes when its readers finish
            os.close(self._open.pop(victim).fd)


class DigestWorkers:
    """Runs digest jobs in a few daemon threads, started on first use and ended by `stop()`."""

    def __init__(self, workers: int = DIGEST_WORKERS, name: str = "fedstream-digest") -> None:
        self._workers = workers
        self._name = name
        self._jobs: "queue.SimpleQueue[Optional[Callable[[], None]]]" = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if not self._threads:
                self._threads = [threading.Thread(target=self._run, name=f"{self._name}-{n}", daemon=True)
                                 for n in range(self._workers)]
                for thread in self._threads:
                    thread.start()
            self._jobs.put(job)

    def stop(self) -> None:
        """Let the threads end once the jobs queued before are done (jobs check their file's state)."""
        with self._lock:
            for _ in self._threads:
                self._jobs.put(None)
            self._threads = []

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            job()
