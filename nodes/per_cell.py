"""One helper object per Cell, created on first use."""

import threading
import weakref
from typing import Callable, Generic, Protocol, TypeVar

from fedstream.nodes.cell import Cell


class _CellBound(Protocol):
    cell_ref: "weakref.ref[Cell]"


T = TypeVar("T", bound=_CellBound)


class PerCell(Generic[T]):
    """Maps each Cell to one object made by `factory(cell)`.

    The map holds its objects weakly: an object lives as long as the handlers it registered
    on its cell refer to it, and a new cell that reuses an old one's id gets a fresh object.
    """

    def __init__(self, factory: Callable[[Cell], T]) -> None:
        self._factory = factory
        self._objects: "weakref.WeakValueDictionary[int, T]" = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def get(self, cell: Cell) -> T:
        """The object of `cell`, made now if it has none."""
        with self._lock:
            obj = self._objects.get(id(cell))
            if obj is None or obj.cell_ref() is not cell:
                obj = self._objects[id(cell)] = self._factory(cell)
            return obj
