"""`fedstream broker`: run the broker in the foreground."""

import sys
import threading

import click

from fedstream.nodes.cli.options import fail, setup_logging, verbose_option, wait_for_termination


@click.command("broker")
@click.option("--bind", default="tcp://127.0.0.1:5550", show_default=True, metavar="URL",
              help="Address to listen on; port 0 picks free ports. Fan-out uses the next two ports.")
@click.option("--node-timeout", default=5.0, show_default=True, type=float,
              help="Seconds without a heartbeat before a node is dropped.")
@click.option("--kit", default=None, metavar="DIR",
              help="The broker's kit (DIR/broker from `fedstream provision`): admit only this project's nodes.")
@verbose_option
def broker_command(bind: str, node_timeout: float, kit: "str | None", verbose: int) -> None:
    """Run the broker in the foreground until Ctrl-C / SIGTERM."""
    from fedstream.broker import Broker

    setup_logging(max(verbose, 1))
    try:
        broker = Broker(bind=bind, node_timeout=node_timeout, kit=kit).start()
    except (ValueError, OSError) as exc:
        fail(str(exc))
    click.echo(broker.address)
    sys.stdout.flush()
    try:
        wait_for_termination(threading.Event())
    finally:
        broker.stop()
