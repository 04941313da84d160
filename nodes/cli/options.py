"""Helpers and options shared by the `fedstream` commands (never imports a command or the group)."""

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, NoReturn

import click

if TYPE_CHECKING:
    from fedstream.nodes.cell import Cell

log = logging.getLogger(__name__)

BROKER_ENV = "FEDSTREAM_BROKER"
KIT_ENV = "FEDSTREAM_KIT"

# Exit statuses of every command (README, "Command line"); 3 belongs to `simulate` (a site missed a round).
EXIT_FAILURE = 1  # anything else: a transfer failed, a file is missing, the disk is full
EXIT_USAGE = 2  # bad arguments (click uses 2 for its own usage errors)
EXIT_TIMEOUT = 4  # a peer or the broker did not answer in time
EXIT_UNREACHABLE = 5  # no broker listens at the address, or a peer is not connected
EXIT_REFUSED = 6  # the broker refused this node (registration, kit / authentication)
EXIT_STATUS_HELP = ("Exit status: 0 success, 1 failure, 2 bad usage, 4 timeout, 5 broker or peer "
                    "unreachable, 6 refused by the broker.")
CONNECT_TIMEOUT = 2.0  # seconds to find a listening broker before a command gives up


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
    from fedstream.common.fqcn import validate_fqcn

    names = [validate_fqcn(name.strip()) for name in (text or "").split(",") if name.strip()]
    return list(dict.fromkeys(names))


def cli_name(name: "str | None", kind: str, kit: "str | None") -> str:
    """The cell name of a command: --as, else the kit's certificate name, else `<kind>-<pid>`."""
    if name:
        return name
    if kit:
        from fedstream.common.kits import load_kit

        try:
            return load_kit(kit).name
        except ValueError as exc:
            fail(str(exc))
    return default_cli_name(kind)


def exit_status(error: BaseException) -> int:
    """The exit status for an error that ends a command."""
    from fedstream.common import errors

    if isinstance(error, (errors.NoBrokerError, errors.UnreachableError, errors.BrokerUnreachableError)):
        return EXIT_UNREACHABLE
    if isinstance(error, TimeoutError):
        return EXIT_TIMEOUT
    if isinstance(error, errors.RegistrationError):
        return EXIT_REFUSED
    return EXIT_FAILURE


def status_of_failure(rc: object, message: str) -> int:
    """The exit status of a failed transfer, from its ReturnCode (push) or its sentence (get)."""
    if str(rc) == "TIMEOUT" or "no reply from" in message or "no answer" in message:
        return EXIT_TIMEOUT
    if str(rc) == "COMMUNICATION_ERROR" or "not connected" in message:
        return EXIT_UNREACHABLE
    return EXIT_FAILURE


def start_cell(name: str, broker_url: str, kit: "str | None" = None) -> "Cell":
    """Create, start and return a Cell; exit with a one-line error if that fails."""
    from fedstream.nodes.cell import Cell

    try:
        cell = Cell(name, broker_url, kit=kit)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    return start_or_fail(cell)


def start_or_fail(cell: "Cell") -> "Cell":
    """Start `cell`, failing fast (exit 5) when no broker listens at its address."""
    from fedstream.common.errors import FedstreamError

    try:
        return cell.start(connect_timeout=CONNECT_TIMEOUT)
    except FedstreamError as exc:
        fail(str(exc), exit_status(exc))


verbose_option = click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
broker_option = click.option("--broker", "broker_url", envvar=BROKER_ENV, required=True, metavar="URL",
                             help=f"Broker address, e.g. tcp://127.0.0.1:5550 (or ${BROKER_ENV}).")
kit_option = click.option("--kit", envvar=KIT_ENV, default=None, metavar="DIR",
                          help=f"This node's kit from `fedstream provision`, for a secure broker (or ${KIT_ENV}).")


def package_version() -> str:
    """The installed fedstream version ("unknown" when running from an uninstalled tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedstream")
    except PackageNotFoundError:
        return "unknown"
