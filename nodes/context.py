"""FLContext: the handle FLARE-style code uses to reach its Cell."""

from fedstream.nodes.cell import Cell


class _Engine:
    def __init__(self, cell: Cell) -> None:
        self._cell = cell

    def get_cell(self) -> Cell:
        """The Cell this engine talks through."""
        return self._cell


class FLContext:
    """Context object passed to file-streaming calls and callbacks."""

    def __init__(self, cell: Cell) -> None:
        if not isinstance(cell, Cell):
            raise ValueError(f"FLContext needs a Cell, got {type(cell).__name__}.")
        self._engine = _Engine(cell)

    def get_engine(self) -> _Engine:
        """The engine, whose get_cell() returns the Cell."""
        return self._engine

    def get_identity_name(self) -> str:
        """The FQCN of this site."""
        return self._engine.get_cell().fqcn
