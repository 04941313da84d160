"""Reply buffers of a pull owner, reused from chunk to chunk instead of allocated for each.

A chunk is read straight into a buffer that becomes the reply frame; the buffer is free again
once libzmq is done with the frame (its tracker says so). Buffers come in power-of-two sizes.
A returned buffer waits for reuse only while the buffers lent and waiting together stay within
`idle_limit` (by default the ReplyBudget's total, which bounds the bytes lent): steady pulls
then reuse every buffer instead of allocating (and zeroing) one per chunk, and the owner's
buffer memory never exceeds what its budget lets be in flight.
"""

import threading

from fedstream.nodes.pull.budget import TOTAL_BYTES

SMALLEST = 64 << 10
IDLE_LIMIT = TOTAL_BYTES


def buffer_size(length: int) -> int:
    """The size of the buffer that holds `length` bytes."""
    return max(SMALLEST, 1 << (length - 1).bit_length())


class BufferPool:
    """`take` a buffer of at least `length` bytes; `give` it back once nothing reads it any more."""

    def __init__(self, idle_limit: int = IDLE_LIMIT) -> None:
        self._idle_limit = idle_limit
        self._free: dict[int, list[bytearray]] = {}
        self._idle = 0
        self._lent = 0
        self._lock = threading.Lock()

    def take(self, length: int) -> bytearray:
        size = buffer_size(length)
        with self._lock:
            self._lent += size
            stack = self._free.get(size)
            if stack:
                self._idle -= size
                return stack.pop()
            self._trim()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            self._lent -= len(buffer)
            if self._idle + self._lent + len(buffer) <= self._idle_limit:
                self._free.setdefault(len(buffer), []).append(buffer)
                self._idle += len(buffer)

    def _trim(self) -> None:
        """Leave idle buffers (of other sizes) to the allocator while lent and idle exceed the limit."""
        for size in sorted(self._free, reverse=True):
            stack = self._free[size]
            while stack and self._idle + self._lent > self._idle_limit:
                stack.pop()
                self._idle -= size

    def idle(self) -> int:
        """Bytes waiting for reuse."""
        with self._lock:
            return self._idle
