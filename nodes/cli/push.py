"""`fedstream push`: stream a file to one or more sites and wait until all hold it, verified."""

import os
import sys
from typing import Optional

import click

from fedstream.common.constants import DEFAULT_CHANNEL, DEFAULT_CHUNK_TIMEOUT, DEFAULT_PUSH_TOPIC
from fedstream.common.sizes import format_size, parse_size
from fedstream.nodes.cli.options import (
    EXIT_USAGE,
    broker_option,
    cli_name,
    fail,
    kit_option,
    setup_logging,
    split_names,
    start_cell,
    status_of_failure,
    verbose_option,
)


@click.command("push")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--to", "targets", required=True, metavar="SITE[,SITE...]", help="Comma-separated target sites.")
@broker_option
@click.option("--as", "name", default=None, metavar="NAME",
              help="This sender's cell name (default: the kit's name, else push-<pid>).")
@click.option("--chunk-size", default="1M", show_default=True, metavar="SIZE",
              help="Chunk size; K, M, G suffixes allowed.")
@click.option("--chunk-timeout", default=DEFAULT_CHUNK_TIMEOUT, show_default=True, type=float, metavar="S",
              help="Seconds without progress from a target before the push fails.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@kit_option
@verbose_option
def push_command(file: str, targets: str, broker_url: str, name: Optional[str], chunk_size: str,
                 chunk_timeout: float, quiet: bool, kit: Optional[str], verbose: int) -> None:
    """Push FILE to every site of --to; exit 0 only when all of them hold the verified file.

    The sites must accept pushes on the default channel (e.g. `fedstream node`).

    \b
    Examples:
      fedstream push model.pt --to site-1,site-2 --broker tcp://10.0.0.5:5550
      FEDSTREAM_BROKER=tcp://10.0.0.5:5550 fedstream push data.tar --to site-3 --chunk-size 4M
    """
    from fedstream.nodes.cli.progress import Progress
    from fedstream.nodes.push.sender import check_push_args, send_file

    setup_logging(verbose)
    try:
        target_list = split_names(targets)
        size = parse_size(chunk_size)
        check_push_args(DEFAULT_CHANNEL, DEFAULT_PUSH_TOPIC, None, target_list, file, size, chunk_timeout)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    cell = start_cell(cli_name(name, "push", kit), broker_url, kit)
    try:
        total = os.path.getsize(file)
        bar = Progress(total, os.path.basename(file), enabled=not quiet and sys.stderr.isatty())
        shown = [0]

        def advance(done: int) -> None:
            bar.update(done - shown[0])
            shown[0] = done

        try:
            # optional=True: the failure is reported once, below, instead of also being logged
            result = send_file(cell, DEFAULT_CHANNEL, DEFAULT_PUSH_TOPIC, None, target_list, file, size,
                               chunk_timeout, optional=True, progress=advance)
        finally:
            bar.close()
    except ValueError as exc:
        fail(str(exc))
    finally:
        cell.stop()
    if not result.ok:
        fail(f"push of {file} failed ({result.rc}): {result.error}.", status_of_failure(result.rc, result.error))
    seconds = max(result.seconds, 1e-6)
    click.echo(f"pushed {file} to {','.join(target_list)} ({format_size(result.size)}, {result.seconds:.2f} s, "
               f"{result.size / seconds / 1e6:.0f} MB/s)")
