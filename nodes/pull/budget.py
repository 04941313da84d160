"""How many chunk-reply bytes an owner lets wait for the network, per requester and in all.

A chunk reply holds its bytes in memory until the connection has sent them. A requester that
asks faster than it reads (or never reads) would otherwise make the owner hold any amount. The
owner reserves a reply's bytes here before it reads them from disk and releases them once the
reply left the process; a request that does not fit is answered "busy" and asked again later.
Socket-free: the owner's I/O code says when a reply left (it watches the frame's tracker).
"""

from typing import Optional

PER_REQUESTER_BYTES = 16 << 20  # the broker's per-peer bound; download_file keeps at most 12 MiB in flight
TOTAL_BYTES = 24 << 20  # every requester together: the owner stays well below 100 MiB, even with 40 recipients
PER_REQUESTER_REPLIES = 128  # replies in flight per requester, however small


class ReplyBudget:
    """Reservations of reply bytes: `reserve` before reading, `release` once the reply was sent."""

    def __init__(self, per_requester: int = PER_REQUESTER_BYTES, total: int = TOTAL_BYTES,
                 per_requester_replies: int = PER_REQUESTER_REPLIES) -> None:
        self.per_requester = per_requester
        self.total = total
        self.per_requester_replies = per_requester_replies
        self._bytes: dict[str, int] = {}
        self._replies: dict[str, int] = {}
        self._reserved: dict[int, tuple[str, int]] = {}  # token -> (requester, bytes)
        self._all = 0
        self._next_token = 1

    def reserve(self, requester: str, nbytes: int) -> Optional[int]:
        """A token for `nbytes` of reply to `requester`, or None if that would exceed a bound."""
        held = self._bytes.get(requester, 0)
        count = self._replies.get(requester, 0)
        if count >= self.per_requester_replies or held + nbytes > self.per_requester \
                or self._all + nbytes > self.total:
            return None
        token = self._next_token
        self._next_token += 1
        self._reserved[token] = (requester, nbytes)
        self._bytes[requester] = held + nbytes
        self._replies[requester] = count + 1
        self._all += nbytes
        return token

    def release(self, token: int) -> None:
        """The reply of `token` left (or was never sent): its bytes are free again."""
        entry = self._reserved.pop(token, None)
        if entry is None:
            return
        requester, nbytes = entry
        self._all -= nbytes
        self._bytes[requester] -= nbytes
        self._replies[requester] -= 1
        if not self._replies[requester]:
            del self._bytes[requester], self._replies[requester]

    def in_flight(self, requester: Optional[str] = None) -> int:
        """Bytes reserved for `requester` (or for everyone)."""
        return self._all if requester is None else self._bytes.get(requester, 0)
