"""Receiver side of a push, without sockets: which chunks are held, what to ask for, when to give up.

The receiving thread asks an Assembly before and after each chunk it writes:

1. `admit(seq, repaired)`: write this chunk? No for duplicates, for chunks past the end and,
   on the fan-out, for chunks beyond the window (the owner never runs that far ahead);
2. `stored(seq)` after writing it: the chunks that just joined the contiguous prefix, in
   order (the thread hashes them in that order: the digest covers the prefix only);
3. `take_ack()`: a new cumulative ack to send, if the prefix grew;
4. `repair_due(now)` / `repair_request()`: holes to name (missing chunks below the highest
   one seen) or, when the fan-out went quiet while incomplete, the point to resend from;
5. `expired(now)`: a reason to end the stream when the owner stayed silent for the idle
   timeout, or nothing moved for `max_stall` seconds, whatever chunk_timeout the owner asked.

The thread reports what it hears with `heard(now)` (an authentic chunk), `progressed(now)`
(the owner's verify/commit) and `repair_answered(now, others)` (a repair reply; progress
only if it says the other targets moved on, at most `count` times).
This module imports no zmq, threading, clock or OS I/O; tests/test_push_state.py drives it.
"""

from dataclasses import dataclass
from typing import Optional

MAX_HOLES = 1024  # missing chunks named in one repair request
MAX_IDLE = 60.0  # longest silence from the owner, whatever chunk_timeout it asked for
MAX_STALL = 60.0  # longest time without any progress before a stream frees its slot


@dataclass(frozen=True)
class RepairAsk:
    """A repair request: the chunks known missing, or (none known) everything from `start`."""

    ack: int
    missing: list[int]
    start: Optional[int]


class Assembly:
    """Progress of one incoming stream of `count` chunks."""

    def __init__(self, count: int, window: int, chunk_timeout: float, now: float,
                 max_idle: float = MAX_IDLE, max_stall: float = MAX_STALL) -> None:
        self.count = count
        self.window = window
        self.prefix = 0  # chunks [0, prefix) are written and hashed
        self.have: set[int] = set()  # chunks beyond the prefix already written
        self.highest = -1
        self.acked = 0
        self.duplicates = 0
        self.nudge_interval = min(1.0, max(0.1, chunk_timeout / 4))
        self.idle_timeout = min(max(1.0, 2 * chunk_timeout), max_idle)
        self.stall_timeout = max_stall
        self._last_heard = now
        self._last_progress = now
        self._next_repair = now + self.nudge_interval
        self._others = 0  # lowest ack of all targets, as the owner last said

    @property
    def complete(self) -> bool:
        return self.prefix >= self.count

    # -- chunks -----------------------------------------------------------------------------
    def admit(self, seq: int, repaired: bool = False) -> bool:
        """Whether chunk `seq` should be written now."""
        limit = self.count if repaired else min(self.count, self.prefix + self.window)
        if not 0 <= seq < limit:
            return False
        if seq < self.prefix or seq in self.have:
            self.duplicates += 1
            return False
        return True

    def stored(self, seq: int, now: float) -> list[int]:
        """Chunk `seq` is written; return the chunks that joined the prefix, in order."""
        self._last_progress = now
        if seq != self.prefix:
            self.have.add(seq)
            self.highest = max(self.highest, seq)
            return []
        joined = [seq]
        self.prefix += 1
        while self.prefix in self.have:
            self.have.discard(self.prefix)
            joined.append(self.prefix)
            self.prefix += 1
        return joined

    def holes(self) -> list[int]:
        """Missing chunks below the highest one held (at most MAX_HOLES)."""
        holes: list[int] = []
        for seq in range(self.prefix, self.highest + 1):
            if seq not in self.have:
                holes.append(seq)
                if len(holes) >= MAX_HOLES:
                    break
        return holes

    def take_ack(self) -> Optional[int]:
        """The cumulative ack to send now, if the prefix grew since the last one."""
        if self.prefix > self.acked:
            self.acked = self.prefix
            return self.acked
        return None

    # -- the owner --------------------------------------------------------------------------
    def heard(self, now: float) -> None:
        """Something came from the owner."""
        self._last_heard = now

    def progressed(self, now: float) -> None:
        """The stream moved on the owner's side (it verifies or commits)."""
        self._last_heard = self._last_progress = now

    def repair_answered(self, now: float, others: Optional[int]) -> None:
        """The owner answered a repair request, saying all targets hold `others` chunks (if it said)."""
        self._last_heard = now
        self._next_repair = now
        if others is not None and self._others < others <= self.count:  # other targets moved on
            self._others = others
            self._last_progress = now

    def repair_due(self, now: float) -> bool:
        """Time to ask: there are holes, or the owner has been quiet for a nudge interval."""
        if now < self._next_repair:
            return False
        return bool(self.holes()) or now - self._last_heard >= self.nudge_interval

    def repair_request(self) -> RepairAsk:
        holes = self.holes()
        start = None if holes else max(self.prefix, self.highest + 1)
        return RepairAsk(self.prefix, holes, start)

    def repair_unanswered(self, now: float) -> None:
        self._next_repair = now + self.nudge_interval

    def repair_timeout(self, now: float) -> float:
        """How long a repair request may wait for its answer."""
        return max(0.05, min(self.idle_timeout, self.idle_timeout - (now - self._last_heard)))

    def expired(self, now: float) -> Optional[str]:
        """Why the stream should end now on this side, or None."""
        if now - self._last_heard > self.idle_timeout:
            return f"nothing from the sender for {self.idle_timeout:g} s"
        if now - self._last_progress > self.stall_timeout:
            return f"no progress for {self.stall_timeout:g} s"
        return None
