"""Reply buffers of a pull owner, reused from chunk to chunk instead of allocated for each.

A chunk is read straight into a buffer that becomes the reply frame; the buffer is free again
once libzmq is done with the frame (its tracker says so). Buffers come in power-of-two sizes and
at most `idle_limit` bytes of them wait for reuse, so the owner's memory follows the bytes in
flight (bounded by the ReplyBudget) instead of what the allocator happens to keep.
"""

import threading

SMALLEST = 64 << 10
IDLE_LIMIT = 4 << 20


def buffer_size(length: int) -> int:
    """The size of the buffer that holds `length` bytes."""
    return max(SMALLEST, 1 << (length - 1).bit_length())


class BufferPool:
    """`take` a buffer of at least `length` bytes; `give` it back once nothing reads it any more."""

    def __init__(self, idle_limit: int = IDLE_LIMIT) -> None:
        self._idle_limit = idle_limit
        self._free: dict[int, list[bytearray]] = {}
        self._idle = 0
        self._lock = threading.Lock()

    def take(self, length: int) -> bytearray:
        size = buffer_size(length)
        with self._lock:
            stack = self._free.get(size)
            if stack:
                self._idle -= size
                return stack.pop()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        with self._lock:
            if self._idle + len(buffer) <= self._idle_limit:
                self._free.setdefault(len(buffer), []).append(buffer)
                self._idle += len(buffer)

    def idle(self) -> int:
        """Bytes waiting for reuse."""
        with self._lock:
            return self._idle
