"""PushService: the push feature of one Cell, started on first use and stopped with the Cell.

`FileStreamer`'s static methods and `send_file` find a cell's service with
`PushService.for_cell(cell)`. The service holds one object per side it was used for, made
on first use: the owner side (sender.OwnerSide: acks, events and repairs of the streams
this cell sends) and the receiver side (receiver.ReceiverSide: registrations and the
streams this cell receives). Each side registers its own handlers on the cell. The service
registers `stop` as a stop hook of the cell, so a stopping cell first ends every stream,
telling the peers while it still can.
"""

import logging
import threading
import time
import weakref
from typing import Protocol, TypeVar

from fedstream.common.errors import CellError
from fedstream.common.peerlog import PeerErrors
from fedstream.nodes.cell import Cell

log = logging.getLogger(__name__)


class Side(Protocol):
    """One side of push on a cell (owner or receiver)."""

    def __init__(self, service: "PushService") -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Side)


class IgnoredSenders:
    """Messages about a stream from a node with no say in it: counted, and logged once a minute per node."""

    def __init__(self, role: str, interval: float = 60.0) -> None:
        self._role = role  # who may send them: "target" or "owner"
        self._errors = PeerErrors(interval)
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._errors.total

    def add(self, source: str, what: str, sid: object) -> None:
        """Count a `what` about stream `sid` from `source`, which is not the stream's `role`."""
        with self._lock:
            loud = self._errors.record(source, time.monotonic())
        log.log(logging.WARNING if loud else logging.DEBUG,
                "stream %s: ignored a %s from '%s', which is not its %s", sid, what, source, self._role)

# Each Cell's service; weak keys, so a service lives exactly as long as its cell.
_services: "weakref.WeakKeyDictionary[Cell, PushService]" = weakref.WeakKeyDictionary()
_services_lock = threading.Lock()


class PushService:
    """Push on one cell: its owner side and receiver side, stopped with the cell."""

    def __init__(self, cell: Cell) -> None:
        self._cell_ref = weakref.ref(cell)  # weak: the map of services must not keep cells alive
        self.fqcn = cell.fqcn
        self._lock = threading.Lock()
        self._sides: dict[type, Side] = {}
        cell.add_stop_hook(self.stop)

    @property
    def cell(self) -> Cell:
        """The cell of this service."""
        cell = self._cell_ref()
        if cell is None:
            raise CellError(f"the cell '{self.fqcn}' of this push service is gone")
        return cell

    @classmethod
    def for_cell(cls, cell: Cell) -> "PushService":
        """The service of `cell`, started now if the cell has none yet."""
        with _services_lock:
            service = _services.get(cell)
            if service is None:
                service = _services[cell] = cls(cell)
            return service

    def side(self, kind: "type[S]") -> S:
        """This service's `kind` side, made on first use."""
        with self._lock:
            side = self._sides.get(kind)
            if side is None:
                side = self._sides[kind] = kind(self)
            return side  # type: ignore[return-value]

    def stop(self) -> None:
        """End every running stream of this cell (a stop hook of the cell)."""
        with self._lock:
            sides = list(self._sides.values())
        for side in sides:
            try:
                side.stop()
            except Exception:
                log.exception("stopping push on cell '%s' failed", self.fqcn)
