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
@verbose_option
def broker_command(bind: str, node_timeout: float, verbose: int) -> None:
    """Run the broker in the foreground until Ctrl-C / SIGTERM."""
    from fedstream.broker import Broker

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
