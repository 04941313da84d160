"""How many bytes the broker has queued for each peer and not yet written to its connection.

ZeroMQ bounds a peer's queue in messages (SNDHWM), and messages range from a few bytes to
tens of MiB, so a count alone cannot keep a peer that never reads from holding the broker's
memory. The broker therefore counts the bytes of every message of `TRACK_MIN` bytes or more
and asks `admit` before sending one: a peer may hold at most `peer_limit` bytes of them in
flight, or one message of any size when no tracked message of it is in flight.

Some of these messages go with a tracker (a `done` flag that libzmq sets once it has written
the message and released it); a tracked zero-copy frame costs pyzmq about 60 µs of CPU (its
garbage-collector thread frees it), so not every one does. A message goes untracked while the
untracked bytes sent to its peer since its last tracked message stay within `untracked_limit`
and the oldest of them is younger than `untracked_age`; they count until the peer's next
tracked message is written, since a peer's messages are written in order. So a peer holds at
most `peer_limit` bytes plus one message, and whatever it was sent goes tracked within
`untracked_age`, where `sweep` sees it if it stays unread. Messages under `TRACK_MIN` are
bounded by the socket's SNDHWM instead (SNDHWM x TRACK_MIN bytes). `sweep` names the peers
whose oldest tracked message has waited longer than a limit: they stopped reading.

Socket-free: the trackers are any objects with a boolean `done` attribute; the clock is an
argument.
"""

from collections import deque
from typing import Container, Optional, Protocol

TRACK_MIN = 8 * 1024
UNTRACKED_LIMIT = 1 << 20  # bytes a peer may be sent untracked before its next message goes tracked
UNTRACKED_AGE = 1.0  # seconds after which a peer's next message goes tracked, whatever its untracked bytes


class Tracker(Protocol):
    done: bool


class OutFlow:
    """Per-peer bytes in flight, from trackers that complete in send order."""

    def __init__(self, peer_limit: int, untracked_limit: int = UNTRACKED_LIMIT,
                 untracked_age: float = UNTRACKED_AGE) -> None:
        self.peer_limit = peer_limit
        self.untracked_limit = untracked_limit
        self.untracked_age = untracked_age
        self._flights: dict[bytes, deque[tuple[Tracker, int, float]]] = {}
        self._bytes: dict[bytes, int] = {}
        self._untracked: dict[bytes, tuple[int, float]] = {}  # peer -> (untracked bytes, when the first was sent)

    def tracked(self, peer: bytes) -> int:
        """Bytes of `peer`'s tracked messages (with the untracked ones before them) not written yet."""
        flights = self._flights.get(peer)
        if not flights:
            return 0
        while flights and flights[0][0].done:
            self._bytes[peer] -= flights.popleft()[1]
        if not flights:
            del self._flights[peer], self._bytes[peer]
            return 0
        return self._bytes[peer]

    def untracked(self, peer: bytes) -> int:
        """Bytes sent to `peer` untracked since its last tracked message."""
        entry = self._untracked.get(peer)
        return entry[0] if entry else 0

    def in_flight(self, peer: bytes) -> int:
        """Bytes sent to `peer` that may not have left yet (untracked ones count until a later tracked one left)."""
        return self.tracked(peer) + self.untracked(peer)

    def admit(self, peer: bytes, size: int) -> bool:
        """Tell whether a message of `size` bytes may be queued for `peer` now."""
        held = self.tracked(peer)
        return held == 0 or held + self.untracked(peer) + size <= self.peer_limit

    def needs_tracker(self, peer: bytes, size: int, now: float) -> bool:
        """Whether a message of `size` bytes (TRACK_MIN or more) must be sent with a tracker at time `now`."""
        entry = self._untracked.get(peer)
        if entry is not None and now - entry[1] >= self.untracked_age:
            return True
        return self.untracked(peer) + size > self.untracked_limit

    def sent(self, peer: bytes, size: int, tracker: Optional[Tracker], now: float) -> None:
        """Record a message queued for `peer` at time `now`, with its tracker or None."""
        if tracker is None:
            first = self._untracked.get(peer, (0, now))[1]
            self._untracked[peer] = (self.untracked(peer) + size, first)
            return
        size += self.untracked(peer)  # sent before this one: written when it is
        self._untracked.pop(peer, None)
        self._flights.setdefault(peer, deque()).append((tracker, size, now))
        self._bytes[peer] = self._bytes.get(peer, 0) + size

    def sweep(self, now: float, limit: float) -> list[bytes]:
        """Forget what is written; return the peers whose oldest tracked message waited over `limit` s."""
        stuck = []
        for peer in list(self._flights):
            if self.tracked(peer) and now - self._flights[peer][0][2] > limit:
                stuck.append(peer)
        return stuck

    def retain(self, peers: Container[bytes]) -> None:
        """Forget the untracked bytes of every peer not in `peers` (it left: nothing more is sent to it)."""
        for peer in [peer for peer in self._untracked if peer not in peers]:
            del self._untracked[peer]

    def __len__(self) -> int:
        """Peers with bytes counted in flight."""
        return len(self._flights.keys() | self._untracked.keys())
