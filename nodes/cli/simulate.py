"""`fedstream simulate`: a federation on this machine, FedAvg rounds (default) or test files (--files)."""

import json
import re
import shutil
import sys
import tempfile
from typing import Callable, Optional, TypeVar

import click

from fedstream.common.constants import DEFAULT_CHUNK_SIZE
from fedstream.common.sizes import format_size, parse_size
from fedstream.nodes.cli.options import fail, setup_logging, verbose_option
from fedstream.nodes.simulate.federation import FedAvgConfig, FedAvgResult, FedAvgSimulation, format_report
from fedstream.nodes.simulate.files import Simulation, format_table
from fedstream.nodes.simulate.process import SimulationError

T = TypeVar("T")


def _size(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return size


def _kill_site(_ctx: click.Context, _param: click.Parameter, value: Optional[str]) -> Optional[tuple[str, int]]:
    if value is None:
        return None
    match = re.fullmatch(r"([A-Za-z0-9_~-]+)@([1-9][0-9]*)", value)
    if not match:
        raise click.BadParameter("expected NAME@ROUND, e.g. site-2@2")
    return match.group(1), int(match.group(2))


@click.command("simulate")
@click.option("--sites", default=4, show_default=True, type=click.IntRange(1, 64), help="Number of site nodes.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1, 1000), help="FedAvg rounds.")
@click.option("--model-size", default="64M", show_default=True, callback=_size, help="Size of the global model.")
@click.option("--layers", default=8, show_default=True, type=click.IntRange(1, 4096), help="Arrays in the model.")
@click.option("--down", type=click.Choice(["pull", "push"]), default="pull", show_default=True,
              help="How the global model reaches the sites (updates always come back by pull).")
@click.option("--kill-site", callback=_kill_site, metavar="NAME@ROUND",
              help="Kill that site's process when that round starts (exit status 3 if the rest verifies).")
@click.option("--secure", is_flag=True, help="Provision a throwaway project and run every process with its kit.")
@click.option("--round-timeout", default=120.0, show_default=True, type=float,
              help="Seconds a round may take before missing sites are left out.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@click.option("--files", "files_mode", is_flag=True, help="Move test files instead (push and/or pull), as before.")
@click.option("--size", default="256M", show_default=True, callback=_size, help="--files: size of each test file.")
@click.option("--mode", type=click.Choice(["push", "pull", "both"]), default="both", show_default=True,
              help="--files: which transfers to run.")
@click.option("--chunk-size", default=str(DEFAULT_CHUNK_SIZE), callback=_size, help="--files: chunk size (default 1M).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Where files and logs go (default: a temp dir).")
@click.option("--keep", is_flag=True, help="Keep the files and logs afterwards.")
@verbose_option
def simulate_command(sites: int, rounds: int, model_size: int, layers: int, down: str,
                     kill_site: Optional[tuple[str, int]], secure: bool, round_timeout: float, as_json: bool,
                     files_mode: bool, size: int, mode: str, chunk_size: int, workdir: "str | None", keep: bool,
                     verbose: int) -> None:
    """Run a federation on this machine: a broker, a server and N sites, each its own process.

    By default: rounds of FedAvg over the object path; the server checks the final model
    against FedAvg computed without transport, bit for bit. Exit 0 when every site took
    part and the check holds, 3 when it holds but a site went missing, 1 otherwise.

    \b
    Examples:
      fedstream simulate
      fedstream simulate --sites 3 --rounds 2 --model-size 8M --down push
      fedstream simulate --kill-site site-2@2 --json
      fedstream simulate --files --size 64M
    """
    setup_logging(verbose)
    if files_mode:
        run_files(sites, size, mode, chunk_size, workdir, keep, secure)
        return
    if kill_site is not None and kill_site[0] not in {f"site-{i + 1}" for i in range(sites)}:
        fail(f"--kill-site names {kill_site[0]}, which is not one of site-1..site-{sites}.")
    if kill_site is not None and kill_site[1] > rounds:
        fail(f"--kill-site round {kill_site[1]} is after the last round ({rounds}).")
    if model_size <= 0:
        fail("--model-size must be positive.")
    root = tempfile.mkdtemp(prefix="fedstream-sim-", dir=workdir)
    live = sys.stderr.isatty() and not as_json
    say, progress = _printers(live, quiet=as_json)
    config = FedAvgConfig(sites=sites, rounds=rounds, model_size=model_size, layers=layers, down=down,
                          kill_site=kill_site, round_timeout=round_timeout)
    sim = FedAvgSimulation(config, root, say, progress)

    def run() -> FedAvgResult:
        if secure:
            config.kit_dir = _provision(root, sim.sites)
        say(f"simulating FedAvg: {sites} sites, {rounds} rounds, model {format_size(model_size)}, "
            f"down by {down}{', secure' if secure else ''}, in {root}")
        return sim.run()

    result, error = _run_and_clean(run, sim.stop_all, root, keep, live, say)
    if result is not None and error is None:
        error = result.error
    if as_json:
        document = result.as_dict() if result is not None else {"verified": False}
        document["error"] = error
        click.echo(json.dumps(document, indent=2))
    elif result is not None:
        click.echo()
        click.echo(format_report(result, config))
    if error or result is None:
        fail(f"simulation failed: {error}")
    if result.missing:
        if not as_json:
            click.echo(f"\nfinal model verified; missing: {', '.join(result.missing)}")
        sys.exit(3)
    if not as_json:
        click.echo(f"\nfinal model verified bit for bit: all {sites} sites in all {rounds} rounds")


def _provision(root: str, sites: list[str]) -> str:
    """A throwaway project with kits for the broker, the server and every site."""
    from fedstream.common.kits import provision

    project = f"{root}/project"
    provision(project, ["broker", "server", *sites])
    return project


def _run_and_clean(run: Callable[[], T], stop_all: Callable[[], None], root: str, keep: bool, live: bool,
                   say: Callable[[str], None]) -> tuple[Optional[T], Optional[str]]:
    """(what `run()` returned, None) or (None, why it failed); processes stopped, files removed unless kept."""
    try:
        return run(), None
    except SimulationError as exc:
        return None, str(exc)
    except KeyboardInterrupt:
        return None, "interrupted"
    finally:
        stop_all()
        if live:
            click.echo("", err=True)
        if keep:
            say(f"files and logs kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _printers(live: bool, quiet: bool = False):
    """(say, progress): a line to keep, and a status line that is overwritten on a terminal."""
    def progress(text: str) -> None:
        if quiet:
            return
        if live:
            click.echo(f"\r{text}\033[K", nl=False, err=True)
        else:
            click.echo(text)

    def say(text: str) -> None:
        if quiet:
            return
        if live:
            click.echo("\r\033[K", nl=False, err=True)
        click.echo(text)

    return say, progress


def run_files(sites: int, size: int, mode: str, chunk_size: int, workdir: "str | None", keep: bool,
              secure: bool) -> None:
    """--files: push a test file to every site, then serve one by RID; verify every byte."""
    if chunk_size <= 0:
        fail("--chunk-size must be positive.")
    root = tempfile.mkdtemp(prefix="fedstream-sim-", dir=workdir)
    live = sys.stderr.isatty()
    say, progress = _printers(live)

    modes = ["push", "pull"] if mode == "both" else [mode]
    sim = Simulation(sites, size, modes, chunk_size, root, say, progress, secure=secure)
    say(f"simulating {sites} sites, {format_size(size)} per file, mode {mode}{', secure' if secure else ''}, "
        f"in {root}")
    results, error = _run_and_clean(sim.run, sim.stop_all, root, keep, live, say)
    results = results or []
    for result in results:
        click.echo()
        click.echo(format_table(result, sim.sites))
    failed = error or next((f"{r.mode}: {r.error}" for r in results if not r.ok), None)
    if failed is None and len(results) < len(modes):
        failed = "not every mode ran"
    if failed:
        fail(f"simulation failed: {failed}")
    click.echo(f"\nall {len(sim.sites)} sites verified in {', '.join(modes)}")
