"""Helpers of the push tests: receiver processes that report on stdout, test files, digests."""


import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from fedstream.nodes import Cell
from fedstream.nodes.simulate.files import make_file, sha256_of  # noqa: F401  (re-exported for the tests)
from tests.procs import Proc, Procs

CHANNEL = "test"
TOPIC = "file"


def run_helper(procs: Procs, module: str, *args: str) -> Proc:
    """Run `python -m tests.helpers.<module> args...` with its working directory in the test's tmp dir."""
    return procs.start([sys.executable, "-m", f"tests.helpers.{module}", *args], cwd=str(procs.tmp_path))


def start_receiver(procs: Procs, name: str, broker: str, dest: str, **options: object) -> Proc:
    """Start a receiver process and wait until it is registered."""
    os.makedirs(dest, exist_ok=True)
    proc = run_helper(procs, "push_receiver", name, broker, dest, json.dumps(options))
    proc.expect("READY", 30)
    return proc


@contextmanager
def receiving_federation(root: Path, sites: list[str]) -> Iterator[tuple[str, dict[str, Proc], dict[str, str], Cell]]:
    """A broker, a receiver process per site (each with its directory under `root`) and an owner Cell here.

    Gives (broker address, receivers, destination directories, the owner's started Cell).
    """
    procs = Procs(root)
    cell = None
    try:
        _, address = procs.broker()
        dests = {site: str(root / site) for site in sites}
        receivers = {site: start_receiver(procs, site, address, dests[site]) for site in sites}
        cell = Cell("server", address).start()
        yield address, receivers, dests, cell
    finally:
        if cell is not None:
            cell.stop()
        procs.cleanup()


def next_done(proc: Proc, timeout: float = 30.0) -> dict:
    """The next stream_done_cb report of a receiver process."""
    return json.loads(proc.expect("DONE ", timeout)[5:])


def listing(directory: str) -> list[str]:
    """Names in a directory, hidden ones (.part files) included."""
    return sorted(os.listdir(directory))


def check_received(report: dict, dest: str, expected_sha: str, name: Optional[str] = None) -> None:
    """Assert a DONE report describes a verified file inside `dest`."""
    assert report["rc"] == "OK", report
    path = report["path"]
    assert os.path.dirname(path) == dest, report
    if name is not None:
        assert report["name"] == name and os.path.basename(path) == name, report
    assert os.path.getsize(path) == report["size"]
    assert sha256_of(path) == expected_sha
