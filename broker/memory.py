"""Hand the memory a burst of traffic leaves behind back to the operating system once it is over.

libzmq allocates every received message with malloc in its I/O thread, and the routing thread frees it.
glibc keeps such freed pages in its arenas (fragmented heaps above its mmap threshold, which grows on
its own after the first large free), so a broker that took a flood of large garbage messages stayed at
twice its resting size although it held none of them any more; `malloc_trim(0)` returns those pages.

`IdleTrim` decides when (socket-free, the clock an argument): after at least `min_bytes` were received
and then no window of traffic bigger than a few heartbeats for `quiet` seconds, so it never runs during a transfer;
then again every `quiet` seconds for `follow` seconds, because the peers of a flood free more memory
when they disconnect. `release_free_memory()` calls
glibc's `malloc_trim` where it exists (Linux with glibc) and does nothing elsewhere.
"""

import ctypes
import functools
import sys
from typing import Callable, Optional


class IdleTrim:
    """Says when a burst of received bytes is over, so that its memory should be released."""

    def __init__(self, min_bytes: int, quiet: float, follow: float, small: int = 4096) -> None:
        self.min_bytes = min_bytes  # bytes a burst must bring before it is worth a release
        self.quiet = quiet  # seconds without a busy window that end a burst; also the interval of the follow-ups
        self.follow = follow  # seconds after a burst during which releases go on (closing peers free more)
        self.small = small  # a window of traffic under this many bytes (heartbeats) is not traffic
        self._pending = 0
        self._last_busy = float("-inf")
        self._follow_until = float("-inf")
        self._next = float("-inf")

    def received(self, nbytes: int, now: float) -> None:
        """Count `nbytes` that arrived in the window of traffic ending at time `now`."""
        self._pending += nbytes
        if nbytes >= self.small:
            self._last_busy = now

    def due(self, now: float) -> bool:
        """True when a release should run now: once a burst is over, then every `quiet` s for `follow` s."""
        if now - self._last_busy < self.quiet:
            return False
        if self._pending >= self.min_bytes:
            self._pending = 0
            self._follow_until = now + self.follow
        elif now > self._follow_until or now < self._next:
            return False
        self._next = now + self.quiet
        return True


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library already loaded into this process
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system; False where that is not possible."""
    trim = _malloc_trim()
    return trim is not None and bool(trim(0))
