"""How many bytes the broker has queued for each peer and not yet written to its connection.

ZeroMQ bounds a peer's queue in messages (SNDHWM), and messages range from a few bytes to
tens of MiB, so a count alone cannot keep a peer that never reads from holding the broker's
memory. The broker therefore counts the bytes of every message of `TRACK_MIN` bytes or more
and asks `admit` before sending one: a peer may hold at most `peer_limit` bytes of them in
flight, or one message of any size when no tracked message of it is in flight.

Some of these messages go with a tracker (a `done` flag that libzmq sets once it has written
the message and released it); a tracked zero-copy frame costs pyzmq about 60 µs of CPU (its
garbage-collector thread frees it), so not every one does. A message goes untracked while the
untracked bytes sent to its peer since its last tracked message stay within `untracked_limit`;
they count until the peer's next tracked message is written, since a peer's messages are
written in order. Messages under `TRACK_MIN` are bounded by the socket's SNDHWM instead
(SNDHWM x TRACK_MIN bytes). `stuck` names the peers whose oldest tracked message has waited
longer than a limit: they stopped reading.

Socket-free: the trackers are any objects with a boolean `done` attribute; the clock is an
argument.
"""

from collections import deque
from typing import Optional, Protocol

TRACK_MIN = 8 * 1024
UNTRACKED_LIMIT = 1 << 20  # bytes a peer may be sent untracked before its next message goes tracked


class Tracker(Protocol):
    done: bool


class OutFlow:
    """Per-peer bytes in flight, from trackers that complete in send order."""

    def __init__(self, peer_limit: int, untracked_limit: int = UNTRACKED_LIMIT) -> None:
        self.peer_limit = peer_limit
        self.untracked_limit = untracked_limit
        self._flights: dict[bytes, deque[tuple[Tracker, int, float]]] = {}
        self._bytes: dict[bytes, int] = {}
        self._untracked: dict[bytes, tuple[int, float]] = {}  # peer -> (bytes sent untracked since, last send)

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

    def in_flight(self, peer: bytes) -> int:
        """Bytes sent to `peer` that may not have left yet (untracked ones count until a later tracked one left)."""
        untracked = self._untracked.get(peer)
        return self.tracked(peer) + (untracked[0] if untracked else 0)

    def admit(self, peer: bytes, size: int) -> bool:
        """Tell whether a message of `size` bytes may be queued for `peer` now."""
        held = self.tracked(peer)
        if held == 0:
            return True
        untracked = self._untracked.get(peer)
        return held + (untracked[0] if untracked else 0) + size <= self.peer_limit

    def needs_tracker(self, peer: bytes, size: int) -> bool:
        """Whether a message of `size` bytes (TRACK_MIN or more) must be sent with a tracker."""
        untracked = self._untracked.get(peer)
        return (untracked[0] if untracked else 0) + size > self.untracked_limit

    def sent(self, peer: bytes, size: int, tracker: Optional[Tracker], now: float) -> None:
        """Record a message queued for `peer` at time `now`, with its tracker or None."""
        if tracker is None:
            untracked = self._untracked.get(peer)
            self._untracked[peer] = ((untracked[0] if untracked else 0) + size, now)
            return
        untracked = self._untracked.pop(peer, None)
        if untracked:  # written before this one: done when it is
            size += untracked[0]
        self._flights.setdefault(peer, deque()).append((tracker, size, now))
        self._bytes[peer] = self._bytes.get(peer, 0) + size

    def sweep(self, now: float, limit: float) -> list[bytes]:
        """Forget what is written; return the peers whose oldest tracked message waited over `limit` s.

        Untracked bytes of a peer with no tracked message in flight are forgotten `limit` s after
        its last one was sent: by then they were written, or the peer is stuck and SNDHWM bounds them.
        """
        stuck = []
        for peer in list(self._flights):
            if self.tracked(peer) and now - self._flights[peer][0][2] > limit:
                stuck.append(peer)
        for peer, (_, last) in list(self._untracked.items()):
            if peer not in self._flights and now - last > limit:
                del self._untracked[peer]
        return stuck

    def __len__(self) -> int:
        """Peers with bytes counted in flight."""
        return len(self._flights.keys() | self._untracked.keys())
