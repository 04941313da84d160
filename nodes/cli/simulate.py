"""`fedstream simulate`: run a whole federation on this machine and verify every byte."""

import shutil
import sys
import tempfile

import click

from fedstream.common.constants import DEFAULT_CHUNK_SIZE
from fedstream.common.sizes import format_size, parse_size
from fedstream.nodes.cli.options import fail, setup_logging, verbose_option
from fedstream.nodes.simulate.files import Simulation, SimulationError, format_table


def _size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return size


@click.command("simulate")
@click.option("--sites", default=4, show_default=True, type=click.IntRange(1, 64), help="Number of site nodes.")
@click.option("--size", default="256M", show_default=True, callback=_size, help="Size of each test file.")
@click.option("--mode", type=click.Choice(["push", "pull", "both"]), default="both", show_default=True)
@click.option("--chunk-size", default=str(DEFAULT_CHUNK_SIZE), callback=_size, help="Chunk size (default 1M).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where files and logs go (default: a temp dir).")
@click.option("--keep", is_flag=True, help="Keep the files and logs afterwards.")
@click.option("--secure", is_flag=True, help="Provision a throwaway project and run every process with its kit.")
@verbose_option
def simulate_command(sites: int, size: int, mode: str, chunk_size: int, workdir: "str | None", keep: bool,
                     secure: bool, verbose: int) -> None:
    """Start a broker, a server and N sites as processes; push a file, then serve one by RID.

    Exits 0 only if every site received every byte, verified by sha256.
    """
    setup_logging(verbose)
    if chunk_size <= 0:
        fail("--chunk-size must be positive.")
    root = tempfile.mkdtemp(prefix="fedstream-sim-", dir=workdir)
    live = sys.stderr.isatty()

    def progress(text: str) -> None:
        if live:
            click.echo(f"\r{text}\033[K", nl=False, err=True)
        else:
            click.echo(text)

    def say(text: str) -> None:
        if live:
            click.echo("\r\033[K", nl=False, err=True)
        click.echo(text)

    modes = ["push", "pull"] if mode == "both" else [mode]
    sim = Simulation(sites, size, modes, chunk_size, root, say, progress, secure=secure)
    say(f"simulating {sites} sites, {format_size(size)} per file, mode {mode}{', secure' if secure else ''}, "
        f"in {root}")
    results = []
    error = None
    try:
        results = sim.run()
    except SimulationError as exc:
        error = str(exc)
    except KeyboardInterrupt:
        error = "interrupted"
    finally:
        sim.stop_all()
        if live:
            click.echo("", err=True)
        if keep:
            say(f"files and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    for result in results:
        click.echo()
        click.echo(format_table(result, sim.sites))
    failed = error or next((f"{r.mode}: {r.error}" for r in results if not r.ok), None)
    if failed is None and len(results) < len(modes):
        failed = "not every mode ran"
    if failed:
        fail(f"simulation failed: {failed}")
    click.echo(f"\nall {len(sim.sites)} sites verified in {', '.join(modes)}")
