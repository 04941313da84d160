"""The owner's table of secure download sessions (secure=True), socket-free.

1. A recipient's secure `open` carries its offer (certificate and salt). `SecureSessions.open`
   verifies the certificate against the owner's kit (it must name the broker-stamped
   source), draws the owner's salt and derives the pairwise key (common/e2e.py). The session
   is keyed by (recipient, session id = the recipient's salt): the recipient's retries of
   the same `open` find the same session, so both sides always hold the same key.
2. Later requests name the session id; `find` returns the session only for the same
   recipient and RID.
3. The table is bounded (MAX_SESSIONS, oldest first out) and sessions of ended RIDs are dropped.
"""

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

from fedstream.common import e2e
from fedstream.common.kits import Kit
from fedstream.nodes.pull import wire

MAX_SESSIONS = 4096


@dataclass(frozen=True)
class Session:
    """One secure download: its recipient, RID, pairwise key, and what the owner answers its `open`."""

    recipient: str
    ref: str
    pairwise: bytes
    sealer: e2e.PullSealer
    answer: dict  # headers of the `open` reply: {"e2e": owner's offer, "meta": sealed name/size/alg}


class SecureSessions:
    """Secure sessions of one owner (thread-safe)."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._sessions: "OrderedDict[tuple[str, str], Session]" = OrderedDict()

    def open(self, kit: Optional[Kit], owner: str, recipient: str, ref: str, offer: object,
             meta: dict) -> Session:
        """The session of a secure `open` (new, or the one a retry names); E2EError with the reason."""
        if kit is None:
            raise e2e.E2EError(f"'{owner}' has no kit, so it cannot serve secure downloads.")
        peer, salt = e2e.accept_offer(offer, kit, recipient)
        sid = e2e.encode_b64(salt)
        with self._lock:
            known = self._sessions.get((recipient, sid))
        if known is not None and known.ref == ref:
            return known
        own_salt = e2e.new_salt()
        pairwise = e2e.pairwise_key(kit, peer, (own_salt, salt), owner, recipient)
        answer = {"e2e": e2e.offer(kit, own_salt),
                  "meta": e2e.seal_note(pairwise, wire.NOTE_META, json.dumps(meta).encode())}
        session = Session(recipient, ref, pairwise, e2e.PullSealer(pairwise), answer)
        with self._lock:
            self._sessions[(recipient, sid)] = session
            while len(self._sessions) > self._limit:
                self._sessions.popitem(last=False)
        return session

    def find(self, recipient: str, sid: object, ref: object) -> Optional[Session]:
        """The session `sid` of `recipient` for `ref`, or None."""
        if not isinstance(sid, str):
            return None
        with self._lock:
            session = self._sessions.get((recipient, sid))
        return session if session is not None and session.ref == ref else None

    def forget(self, refs: Iterable[str]) -> None:
        """Drop the sessions of RIDs that ended."""
        gone = set(refs)
        with self._lock:
            for key in [k for k, s in self._sessions.items() if s.ref in gone]:
                del self._sessions[key]
