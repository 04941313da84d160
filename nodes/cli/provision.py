"""`fedstream provision`: make the project root (once) and a kit per name for a secure federation."""

import os

import click

from fedstream.nodes.cli.options import fail


@click.command("provision")
@click.option("--project", "project_dir", required=True, metavar="DIR",
              help="Project folder: DIR/root/ holds the root signing key, DIR/NAME/ each kit.")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
def provision_command(project_dir: str, names: tuple[str, ...]) -> None:
    """Create a kit per NAME and print `created|kept<TAB>NAME<TAB>PATH` per kit.

    Kits that exist are kept byte for byte. Give `broker` a kit too: it holds the broker's
    key pair. Copy each kit folder to the machine that runs that name; keep DIR/root/ with
    the administrator (it is never needed at run time).
    """
    from fedstream.common.kits import provision

    existed = {name for name in names if os.path.exists(os.path.join(project_dir, name))}
    try:
        paths = provision(project_dir, names)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    for name, path in zip(dict.fromkeys(names), paths):
        click.echo(f"{'kept' if name in existed else 'created'}\t{name}\t{path.resolve()}")
