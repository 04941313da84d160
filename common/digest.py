"""Whole-file digests used to verify transfers.

xxh3-128 (from `xxhash`) runs at about 17 GB/s here against 1.1 GB/s for sha256, so hashing
never competes with the transfer for the CPU; the algorithm name travels on the wire.
"""

import os
from typing import Callable, Optional, Protocol

import xxhash

ALGORITHM = "xxh3_128"
_READ_SIZE = 1 << 20


class Hasher(Protocol):
    def update(self, data: "bytes | memoryview") -> None: ...
    def hexdigest(self) -> str: ...


def new_hasher() -> Hasher:
    """A fresh incremental hasher of the transfer digest algorithm."""
    return xxhash.xxh3_128()


def hash_range(fd: int, hasher: Hasher, start: int, end: int,
               should_stop: Optional[Callable[[], bool]] = None) -> None:
    """Feed bytes [start, end) of an open file into `hasher`, reading in bounded pieces."""
    offset = start
    while offset < end:
        if should_stop is not None and should_stop():
            return
        data = os.pread(fd, min(_READ_SIZE, end - offset), offset)
        if not data:
            raise OSError(f"file ended at {offset} bytes, expected {end}")
        hasher.update(data)
        offset += len(data)


def file_digest(path: str) -> str:
    """Digest of a whole file, read in 1 MiB pieces."""
    hasher = new_hasher()
    fd = os.open(path, os.O_RDONLY)
    try:
        hash_range(fd, hasher, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return hasher.hexdigest()
