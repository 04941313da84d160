"""Which FQCN is connected on which ROUTER identity, and when it was last heard from."""

from dataclasses import dataclass
from typing import Container


@dataclass
class NodeEntry:
    fqcn: str
    identity: bytes
    last_seen: float


class Registry:
    """Two-way map between FQCNs and connection identities with liveness."""

    def __init__(self, node_timeout: float) -> None:
        self.node_timeout = node_timeout
        self._by_fqcn: dict[str, NodeEntry] = {}
        self._by_identity: dict[bytes, NodeEntry] = {}

    def __len__(self) -> int:
        return len(self._by_fqcn)

    def register(self, fqcn: str, identity: bytes, now: float) -> "str | None":
        """Bind `fqcn` to `identity`; return a refusal reason, or None when accepted."""
        holder = self._by_fqcn.get(fqcn)
        if holder is not None and holder.identity != identity:
            if now - holder.last_seen <= self.node_timeout:
                return f"the name '{fqcn}' is already used by another live node"
            self.release_name(fqcn)
        self.remove_identity(identity)
        entry = NodeEntry(fqcn, identity, now)
        self._by_fqcn[fqcn] = entry
        self._by_identity[identity] = entry
        return None

    def touch(self, identity: bytes, now: float) -> "NodeEntry | None":
        """Record activity from `identity`; return its entry if it is registered."""
        entry = self._by_identity.get(identity)
        if entry is not None:
            entry.last_seen = now
        return entry

    def lookup(self, fqcn: str) -> "NodeEntry | None":
        return self._by_fqcn.get(fqcn)

    def entry_of(self, identity: bytes) -> "NodeEntry | None":
        """The node registered on `identity`, without counting it as activity."""
        return self._by_identity.get(identity)

    def remove_identity(self, identity: bytes) -> "NodeEntry | None":
        entry = self._by_identity.pop(identity, None)
        if entry is not None and self._by_fqcn.get(entry.fqcn) is entry:
            del self._by_fqcn[entry.fqcn]
        return entry

    def release_name(self, fqcn: str) -> None:
        """Free `fqcn` for a new connection; messages still queued from the old one keep their name."""
        self._by_fqcn.pop(fqcn, None)

    def expire(self, now: float) -> list[NodeEntry]:
        """Drop the connections not heard from within the node timeout; return the names that lost their node."""
        dead = [e for e in self._by_identity.values() if now - e.last_seen > self.node_timeout]
        named = [e for e in dead if self._by_fqcn.get(e.fqcn) is e]
        for entry in dead:
            self.remove_identity(entry.identity)
        return named

    def identities(self) -> "Container[bytes]":
        """The connection identities registered now (a live view)."""
        return self._by_identity.keys()

    def names(self) -> list[str]:
        return sorted(self._by_fqcn)
