"""How many bytes the broker has queued for each peer and not yet written to its connection.

ZeroMQ bounds a peer's queue in messages (SNDHWM), and messages range from a few bytes to
tens of MiB, so a count alone cannot keep a peer that never reads from holding the broker's
memory. The broker therefore sends every message of `TRACK_MIN` bytes or more with a
tracker (a `done` flag that libzmq sets once it has written the message and released it)
and asks `admit` before each such send: a peer may hold at most `peer_limit` bytes of them
in flight, or one message of any size when it holds nothing. Small messages are bounded
by the socket's SNDHWM instead (SNDHWM x TRACK_MIN bytes). `stuck` names the peers whose
oldest tracked message has waited longer than a limit: they stopped reading.

Socket-free: the trackers are any objects with a boolean `done` attribute; the clock is an
argument.
"""

from collections import deque
from typing import Protocol

TRACK_MIN = 8 * 1024


class Tracker(Protocol):
    done: bool


class OutFlow:
    """Per-peer bytes in flight, from trackers that complete in send order."""

    def __init__(self, peer_limit: int) -> None:
        self.peer_limit = peer_limit
        self._flights: dict[bytes, deque[tuple[Tracker, int, float]]] = {}
        self._bytes: dict[bytes, int] = {}

    def in_flight(self, peer: bytes) -> int:
        """Bytes sent to `peer` that its connection has not taken yet."""
        flights = self._flights.get(peer)
        if not flights:
            return 0
        while flights and flights[0][0].done:
            self._bytes[peer] -= flights.popleft()[1]
        if not flights:
            del self._flights[peer], self._bytes[peer]
            return 0
        return self._bytes[peer]

    def admit(self, peer: bytes, size: int) -> bool:
        """Tell whether a tracked message of `size` bytes may be queued for `peer` now."""
        held = self.in_flight(peer)
        return held == 0 or held + size <= self.peer_limit

    def sent(self, peer: bytes, size: int, tracker: Tracker, now: float) -> None:
        """Record a tracked message queued for `peer` at time `now`."""
        self._flights.setdefault(peer, deque()).append((tracker, size, now))
        self._bytes[peer] = self._bytes.get(peer, 0) + size

    def sweep(self, now: float, limit: float) -> list[bytes]:
        """Forget peers whose messages are all written; return those whose oldest waited over `limit` s."""
        stuck = []
        for peer in list(self._flights):
            if self.in_flight(peer) and now - self._flights[peer][0][2] > limit:
                stuck.append(peer)
        return stuck

    def __len__(self) -> int:
        return len(self._flights)
