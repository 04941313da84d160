"""LocalFederation: a broker and cells in this process, for users' own tests and notebooks."""

import os
from typing import Optional

from fedstream.broker import Broker
from fedstream.nodes.cell import Cell

SERVER = "server"


class LocalFederation:
    """A broker on free loopback ports plus a `server` cell and one cell per site, all in this process.

    Use it as a context manager: everything is started on entry and stopped on exit.
    `kit_dir` is a provisioned project (`fedstream provision`): each party then runs with
    its own kit (`kit_dir/broker`, `kit_dir/server`, `kit_dir/<site>`).
    """

    def __init__(self, sites: list[str], kit_dir: Optional[str] = None, server: str = SERVER) -> None:
        if isinstance(sites, str) or not sites:
            raise ValueError("sites must be a non-empty list of site names.")
        if len(set(sites)) != len(sites) or server in sites:
            raise ValueError("site names must be unique and differ from the server's name.")
        self._site_names = list(sites)
        self._server_name = server
        self._kit_dir = kit_dir
        self.broker: Optional[Broker] = None
        self.server: Optional[Cell] = None
        self.sites: dict[str, Cell] = {}

    def _kit(self, name: str) -> dict:
        return {"kit": os.path.join(self._kit_dir, name)} if self._kit_dir else {}

    @property
    def broker_url(self) -> str:
        """The broker's message address (tcp://127.0.0.1:PORT)."""
        if self.broker is None:
            raise RuntimeError("the federation is not started.")
        return self.broker.address

    def start(self) -> "LocalFederation":
        """Start the broker, the server cell and the site cells; stop everything if one fails."""
        try:
            self.broker = Broker(bind="tcp://127.0.0.1:0", **self._kit("broker")).start()
            self.server = Cell(self._server_name, self.broker.address, **self._kit(self._server_name)).start()
            for name in self._site_names:
                self.sites[name] = Cell(name, self.broker.address, **self._kit(name)).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every cell, then the broker."""
        for cell in [*self.sites.values(), self.server]:
            if cell is not None:
                cell.stop()
        self.sites = {}
        self.server = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> "LocalFederation":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
