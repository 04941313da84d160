"""`fedstream serve` shares files by reference id; `fedstream get` downloads one."""

import os
import sys
import threading
from typing import Optional

import click

from fedstream.common.constants import DEFAULT_CHUNK_TIMEOUT
from fedstream.common.fqcn import validate_fqcn
from fedstream.common.rc import DownloadStatus
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
    wait_for_termination,
)

DEFAULT_SERVE_TIMEOUT = 300.0


@click.command("serve")
@click.argument("files", nargs=-1, required=True, metavar="FILE...")
@broker_option
@click.option("--as", "name", default=None, metavar="NAME",
              help="This owner's cell name (default: the kit's name, else serve-<pid>).")
@click.option("--timeout", default=DEFAULT_SERVE_TIMEOUT, show_default=True, type=float, metavar="S",
              help="Stop after S seconds without download activity.")
@click.option("--announce-to", "announce_to", default=None, metavar="SITE[,SITE...]",
              help="Send the reference ids to these sites (e.g. `fedstream node`) and stop when all of "
                   "them downloaded every file.")
@kit_option
@verbose_option
def serve_command(files: tuple[str, ...], broker_url: str, name: Optional[str], timeout: float,
                  announce_to: Optional[str], kit: Optional[str], verbose: int) -> None:
    """Share files for download: print `<ref_id><TAB><absolute path>` per FILE, then serve them.

    Serves until --timeout seconds pass without download activity, every --announce-to site
    downloaded every file, or Ctrl-C. Exits non-zero if an announced site did not get every file.

    \b
    Examples:
      fedstream serve model.pt --broker tcp://10.0.0.5:5550 --as server
      fedstream serve shard-*.bin --announce-to site-1,site-2 --timeout 600
    """
    from fedstream.nodes import FileDownloader
    from fedstream.nodes.pull.announce import announce

    setup_logging(verbose)
    try:
        targets = split_names(announce_to)
        if timeout <= 0:
            raise ValueError(f"--timeout must be positive, got {timeout:g}.")
        for file in files:
            if not os.path.isfile(file):
                raise ValueError(f"File {file!r} does not exist or is not a regular file.")
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    cell = start_cell(cli_name(name, "serve", kit), broker_url, kit)

    stop = threading.Event()
    lock = threading.Lock()
    waiting: set[tuple[str, str]] = set()  # (ref_id, site) still expected
    failed: list[str] = []
    timed_out = threading.Event()

    def downloaded(ref_id: str, to_site: str, status: DownloadStatus, file_name: str) -> None:
        with lock:
            if (ref_id, to_site) not in waiting:
                return
            waiting.discard((ref_id, to_site))
            if status != DownloadStatus.SUCCESS:
                failed.append(f"'{to_site}' did not get {file_name}")
            if not waiting:
                stop.set()

    def on_timeout(tx_id: str, file_names: list[str]) -> None:
        timed_out.set()
        stop.set()

    tx = FileDownloader.new_transaction(cell, timeout, on_timeout)
    try:
        refs: list[str] = []
        shared: list[dict] = []
        for file in files:
            ref_id = FileDownloader.add_file(tx, file, file_downloaded_cb=downloaded)
            path = os.path.abspath(file)
            refs.append(ref_id)
            shared.append({"ref": ref_id, "name": os.path.basename(path), "size": os.path.getsize(path)})
            click.echo(f"{ref_id}\t{path}")
        sys.stdout.flush()
        if targets:
            with lock:
                waiting.update((ref_id, site) for ref_id in refs for site in targets)
            for site, error in announce(cell, targets, shared).items():
                if error is None:
                    continue
                with lock:
                    failed.append(f"announcement to '{site}' failed: {error}")
                    waiting.difference_update({(ref_id, site) for ref_id in refs})
                    if not waiting:
                        stop.set()
        wait_for_termination(stop)
    except (ValueError, OSError) as exc:
        FileDownloader.delete_transaction(tx)
        cell.stop()
        fail(str(exc))
    FileDownloader.delete_transaction(tx)
    cell.stop()
    with lock:
        problems = list(failed)
        if waiting:
            why = f"no download activity for {timeout:g} s" if timed_out.is_set() else "interrupted"
            problems.append(f"{why} before {len(waiting)} announced download(s) finished")
    if problems:
        fail("; ".join(problems) + ".")


@click.command("get")
@click.argument("ref_id")
@click.option("--from", "owner", required=True, metavar="NAME", help="The cell that serves the file.")
@broker_option
@click.option("--as", "name", default=None, metavar="NAME",
              help="This cell's name (default: the kit's name, else get-<pid>).")
@click.option("-o", "--output-dir", "out_dir", default=".", show_default=True, metavar="DIR",
              help="Directory for the downloaded file (created if missing).")
@click.option("--timeout", default=DEFAULT_CHUNK_TIMEOUT, show_default=True, type=float, metavar="S",
              help="Seconds the owner may stay silent before the download fails.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@kit_option
@verbose_option
def get_command(ref_id: str, owner: str, broker_url: str, name: Optional[str], out_dir: str, timeout: float,
                quiet: bool, kit: Optional[str], verbose: int) -> None:
    """Download the file REF_ID from --from and print its path.

    An interrupted download resumes when the same command is run again with the same -o.

    \b
    Examples:
      fedstream get 3f2a...e9 --from server --broker tcp://10.0.0.5:5550 -o /data/incoming
      path=$(fedstream get "$RID" --from server --quiet | tail -n 1)
    """
    from fedstream.nodes import download_file
    from fedstream.nodes.cli.progress import Progress
    from fedstream.nodes.pull.wire import is_valid_ref

    setup_logging(verbose)
    try:
        validate_fqcn(owner)
        if not is_valid_ref(ref_id):
            raise ValueError(f"{ref_id!r} is not a valid reference id.")
        if timeout <= 0:
            raise ValueError(f"--timeout must be positive, got {timeout:g}.")
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise ValueError(f"Output directory {out_dir!r} is not a directory.")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"Cannot create the output directory {out_dir!r}: {exc.strerror}.") from None
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    cell = start_cell(cli_name(name, "get", kit), broker_url, kit)

    bars: list[Progress] = []
    show = not quiet and sys.stderr.isatty()

    def progress(received: int, total: int) -> None:
        if not bars:
            bars.append(Progress(total, f"{ref_id[:8]} from {owner}", enabled=show))
        bars[0].update(received - bars[0].done)

    interrupted = False
    try:
        # optional=True: the error is reported once, below, instead of also being logged
        error, path = download_file(owner, ref_id, timeout, cell, os.path.abspath(out_dir), optional=True,
                                    progress_cb=progress)
    except KeyboardInterrupt:
        interrupted = True
        error, path = "Interrupted; run the same command again to resume the download.", None
    except ValueError as exc:
        error, path = str(exc), None
    finally:
        if bars:
            bars[0].close()
        cell.stop()
    if error is not None:
        fail(error, 130 if interrupted else status_of_failure(None, error))
    click.echo(path)
