"""`fedstream node`: a long-running site that accepts pushes and downloads announced files."""

import os
import threading

import click

from fedstream.common.constants import DEFAULT_CHANNEL, DEFAULT_PUSH_TOPIC
from fedstream.common.filenames import DEFAULT_STALE_PART_AGE, set_stale_part_age
from fedstream.common.rc import ReturnCode
from fedstream.nodes.cli.options import (
    EXIT_USAGE,
    broker_option,
    fail,
    kit_option,
    setup_logging,
    start_or_fail,
    verbose_option,
    wait_for_termination,
)

_print_lock = threading.Lock()


def emit(*fields: object) -> None:
    """Print one tab-separated event line on stdout (scripts and `simulate` read these)."""
    with _print_lock:
        click.echo("\t".join(str(f) for f in fields))


@click.command("node")
@click.argument("name")
@broker_option
@click.option("--recv-dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Directory received files are written to (created if missing).")
@click.option("--stale-part-age", default=DEFAULT_STALE_PART_AGE, show_default=True, type=float, metavar="S",
              help="Remove the .part files of earlier, killed receptions in --recv-dir once S seconds old.")
@kit_option
@verbose_option
def node_command(name: str, broker_url: str, recv_dir: str, stale_part_age: float, kit: "str | None",
                 verbose: int) -> None:
    """Run site NAME until Ctrl-C: accept pushes and download announced RIDs into --recv-dir.

    Prints `ready<TAB>NAME` once registered, then one line per file:
    `received<TAB>push|pull<TAB>PATH` or `failed<TAB>push|pull<TAB>NAME<TAB>REASON`.
    """
    from fedstream.nodes import Cell, FileStreamer, FLContext
    from fedstream.nodes.pull.announce import accept_announcements

    setup_logging(verbose)
    recv_dir = os.path.abspath(recv_dir)
    try:
        set_stale_part_age(stale_part_age)
        os.makedirs(recv_dir, exist_ok=True)
        cell = Cell(name, broker_url, kit=kit)
    except (OSError, ValueError) as exc:
        fail(str(exc), EXIT_USAGE)

    def pushed(stream_ctx, fl_ctx) -> None:
        if FileStreamer.get_rc(stream_ctx) == ReturnCode.OK:
            emit("received", "push", FileStreamer.get_file_location(stream_ctx))
        else:
            emit("failed", "push", FileStreamer.get_file_name(stream_ctx), FileStreamer.get_rc(stream_ctx))

    def pulled(kind: str, ok: bool, path_or_name: str, detail: str) -> None:
        if ok:
            emit("received", kind, path_or_name)
        else:
            emit("failed", kind, path_or_name, detail)

    FileStreamer.register_stream_processing(FLContext(cell), DEFAULT_CHANNEL, DEFAULT_PUSH_TOPIC,
                                            dest_dir=recv_dir, stream_done_cb=pushed)
    accept_announcements(cell, recv_dir, pulled)
    start_or_fail(cell)
    emit("ready", name)
    try:
        wait_for_termination(threading.Event())
    finally:
        cell.stop()
