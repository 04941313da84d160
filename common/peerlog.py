"""Count bad input from peers and say so in the log at most once per peer per interval.

A receive loop that drops a hostile message must not let that peer flood the log either:
`PeerErrors.record(peer, now)` counts every drop and answers whether this one should be
logged (the first from a peer, then one per `interval` seconds). The clock is an argument,
so the class is tested without waiting; at most `max_peers` peers are remembered, so a
flood of new connections cannot grow it either.
"""


class PeerErrors:
    """A count of dropped messages with a per-peer log rate limit."""

    def __init__(self, interval: float = 60.0, max_peers: int = 4096) -> None:
        self.interval = interval
        self.max_peers = max_peers
        self.total = 0
        self._last_logged: dict[str, float] = {}

    def record(self, peer: str, now: float) -> bool:
        """Count one dropped message from `peer`; True if it should be logged now."""
        self.total += 1
        last = self._last_logged.get(peer)
        if last is not None and now - last < self.interval:
            return False
        if last is None and len(self._last_logged) >= self.max_peers:
            self._last_logged = {p: t for p, t in self._last_logged.items() if now - t < self.interval}
            if len(self._last_logged) >= self.max_peers:
                return False
        self._last_logged[peer] = now
        return True
