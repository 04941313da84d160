"""The `fedstream` command line."""

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from nodes.cell import Cell

log = logging.getLogger(__name__)

BROKER_ENV = "FEDSTREAM_BROKER"


def setup_logging(verbose: int) -> None:
    """Send log records to stderr; -v shows progress details, -vv everything."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def fail(message: str, code: int = 1) -> NoReturn:
    """Print a one-line error on stderr and exit."""
    click.echo(f"fedstream: error: {message}", err=True)
    sys.exit(code)


def wait_for_termination(stop: threading.Event) -> None:
    """Block until SIGINT/SIGTERM (or `stop` is set by someone else)."""
    def _on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    while not stop.wait(0.5):
        pass


def default_cli_name(kind: str) -> str:
    """A cell name unlikely to clash with another command running on the broker."""
    return f"{kind}-{os.getpid()}"


def split_names(text: "str | None") -> list[str]:
    """Comma-separated FQCNs, validated and without duplicates; ValueError for a bad one."""
    from common.fqcn import validate_fqcn

    names = [validate_fqcn(name.strip()) for name in (text or "").split(",") if name.strip()]
    return list(dict.fromkeys(names))


def start_cell(name: str, broker_url: str) -> "Cell":
    """Create, start and return a Cell; exit with a one-line error if that fails."""
    from common.errors import FedstreamError
    from nodes.cell import Cell

    try:
        return Cell(name, broker_url).start()
    except (ValueError, FedstreamError) as exc:
        fail(str(exc))


verbose_option = click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
broker_option = click.option("--broker", "broker_url", envvar=BROKER_ENV, required=True, metavar="URL",
                             help=f"Broker address, e.g. tcp://127.0.0.1:5550 (or ${BROKER_ENV}).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """fedstream: stream large files between federation sites through one ZeroMQ broker."""


@main.command("broker")
@click.option("--bind", default="tcp://127.0.0.1:5550", show_default=True, metavar="URL",
              help="Address to listen on; port 0 picks free ports. Fan-out uses the next two ports.")
@click.option("--node-timeout", default=5.0, show_default=True, type=float,
              help="Seconds without a heartbeat before a node is dropped.")
@verbose_option
def broker_command(bind: str, node_timeout: float, verbose: int) -> None:
    """Run the broker in the foreground until Ctrl-C / SIGTERM."""
    from broker import Broker

    setup_logging(max(verbose, 1))
    try:
        broker = Broker(bind=bind, node_timeout=node_timeout).start()
    except (ValueError, OSError) as exc:
        fail(str(exc))
    click.echo(broker.address)
    sys.stdout.flush()
    try:
        wait_for_termination(threading.Event())
    finally:
        broker.stop()


from nodes import (  # noqa: E402,F401  (registers their commands)
    cli_node,
    cli_pull,  # noqa: E402,F401
    cli_push,  # noqa: E402,F401
    cli_simulate,
)
