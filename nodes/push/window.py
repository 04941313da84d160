"""Owner side of a push, without sockets: the shared credit window, acks, stalls and repairs.

The sender's thread feeds a PushWindow the events its targets send (Ack, Ready, Fail) and
the ones it makes itself (Cancelled), always with the current time, and asks it:

1. `next_seq()`: the chunk it may publish now, or None (all published, or the window is
   full: the owner never runs more than `window` chunks ahead of the slowest cumulative ack);
2. `published(seq, now)` after publishing it; a target that held everything so far starts
   its stall clock with this chunk;
3. `check_stalls(now)`: a target that owes acks and made no progress for `chunk_timeout`
   fails the stream for everyone; otherwise, how long the thread may wait for events;
4. `verdict`: the first failure (a Fail from a target, a stall, a cancel), then final;
5. `all_acked`: every target holds every chunk (time to verify).

`choose_repair` answers a target's repair request: the chunks it names or the run it asks
for from a point, only among those already published, within a byte budget.
This module imports no zmq, threading, clock or OS I/O; tests/test_push_state.py drives it.
"""

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

from fedstream.common.rc import ReturnCode


@dataclass(frozen=True)
class Ack:
    """`target` holds chunks [0, n) contiguously."""

    target: str
    n: int


@dataclass(frozen=True)
class Ready:
    """`target` saw a probe: its subscription to the fan-out is live."""

    target: str


@dataclass(frozen=True)
class Fail:
    """`target` failed the stream on its side."""

    target: str
    reason: str


@dataclass(frozen=True)
class Cancelled:
    """The owner itself ends the stream (its cell is stopping, ...)."""

    reason: str


Event = Union[Ack, Ready, Fail, Cancelled]


@dataclass(frozen=True)
class Verdict:
    """Why a stream failed, as stream_file reports it."""

    rc: ReturnCode
    message: str


class PushWindow:
    """What the owner of one stream may publish, and whether its targets keep up."""

    def __init__(self, targets: Iterable[str], count: int, window: int, chunk_timeout: float, now: float) -> None:
        self.targets = tuple(dict.fromkeys(targets))
        if not self.targets or count < 0 or window < 1 or chunk_timeout <= 0:
            raise ValueError("a push window needs targets, a chunk count, a window and a timeout")
        self.count = count
        self.window = window
        self.chunk_timeout = chunk_timeout
        self.acks = dict.fromkeys(self.targets, 0)
        self.ready: set[str] = set()
        self.published_count = 0  # chunks [0, published_count) went out
        self.verdict: Optional[Verdict] = None
        self.ignored = 0  # events from peers that are not targets of this stream
        self._last_progress = dict.fromkeys(self.targets, now)

    # -- events -----------------------------------------------------------------------------
    def handle(self, event: Event, now: float) -> None:
        """Apply one event; the first failure becomes the verdict, later events change nothing."""
        if self.verdict is not None:
            return
        if isinstance(event, Cancelled):
            self.verdict = Verdict(ReturnCode.TASK_ABORTED, event.reason)
            return
        if event.target not in self.acks:
            self.ignored += 1
            return
        if isinstance(event, Ack):
            acked = min(event.n, self.published_count)  # nobody holds what was not sent yet
            if acked > self.acks[event.target]:
                self.acks[event.target] = acked
                self._last_progress[event.target] = now
        elif isinstance(event, Ready):
            self.ready.add(event.target)
        elif isinstance(event, Fail):
            self.verdict = Verdict(ReturnCode.ERROR, f"target '{event.target}' failed: {event.reason}")

    def fail(self, rc: ReturnCode, message: str) -> None:
        """Record a failure the driver found itself (I/O, a refused step), unless one came first."""
        if self.verdict is None:
            self.verdict = Verdict(rc, message)

    # -- questions --------------------------------------------------------------------------
    @property
    def slowest(self) -> int:
        """The lowest cumulative ack: every target holds chunks [0, slowest)."""
        return min(self.acks.values())

    @property
    def all_ready(self) -> bool:
        return len(self.ready) == len(self.targets)

    @property
    def all_acked(self) -> bool:
        return self.slowest >= self.count

    def not_ready(self) -> list[str]:
        """Targets that did not report their subscription yet, in order."""
        return [t for t in self.targets if t not in self.ready]

    def start_clocks(self, now: float) -> None:
        """Publishing begins: every target's stall clock starts now."""
        for target in self.targets:
            self._last_progress[target] = now

    def next_seq(self) -> Optional[int]:
        """The chunk to publish now, or None while the window is full, all is out, or it failed."""
        if self.verdict is not None:
            return None
        seq = self.published_count
        if seq < self.count and seq < self.slowest + self.window:
            return seq
        return None

    def published(self, seq: int, now: float) -> None:
        """Chunk `seq` (the one next_seq gave) went out."""
        if seq != self.published_count:
            raise ValueError(f"chunk {seq} published out of order (expected {self.published_count})")
        for target, acked in self.acks.items():
            if acked == seq:  # it had everything so far: it owes an ack from now on
                self._last_progress[target] = now
        self.published_count = seq + 1

    def check_stalls(self, now: float) -> float:
        """Fail the stream if a target owing acks was silent for chunk_timeout; else seconds to wait."""
        wait = self.chunk_timeout
        for target in self.targets:
            if self.acks[target] >= self.published_count:
                continue
            idle = now - self._last_progress[target]
            if idle >= self.chunk_timeout:
                self.fail(ReturnCode.TIMEOUT, f"target '{target}' acknowledged nothing for {self.chunk_timeout:g} s "
                                              f"(it has {self.acks[target]} of {self.count} chunks)")
                return 0.0
            wait = min(wait, self.chunk_timeout - idle)
        return max(wait, 0.001)


def choose_repair(missing: Iterable[int], start: Optional[int], published: int, length_of: Callable[[int], int],
                  budget: int, limit: int) -> list[int]:
    """Chunks to send a target that asked for `missing` and/or everything from `start`.

    Only published chunks, each once, in the order asked, at most `limit` of them and at most
    `budget` bytes (but always the first one).
    """
    wanted = [s for s in missing if 0 <= s < published][:limit]
    if start is not None and start >= 0:
        wanted.extend(range(start, min(published, start + limit)))
    chosen: list[int] = []
    for seq in dict.fromkeys(wanted):
        length = length_of(seq)
        if chosen and (length > budget or len(chosen) >= limit):
            break
        chosen.append(seq)
        budget -= length
    return chosen
