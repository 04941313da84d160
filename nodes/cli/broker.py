"""`fedstream broker`: run the broker in the foreground."""

import sys
import threading
from typing import Optional

import click

from fedstream.broker.broker import DEFAULT_NODE_TIMEOUT
from fedstream.nodes.cli.options import EXIT_USAGE, fail, setup_logging, verbose_option, wait_for_termination


@click.command("broker")
@click.option("--bind", default="tcp://127.0.0.1:5550", show_default=True, metavar="URL",
              help="Message endpoint: tcp://HOST:PORT (port 0 picks free ports; IPv6 as tcp://[::1]:PORT), "
                   "ipc://PATH or inproc://NAME.")
@click.option("--fanout-in", default=None, metavar="URL",
              help="Endpoint push senders publish chunks to (default: port+1, or PATH-in for ipc).")
@click.option("--fanout-out", default=None, metavar="URL",
              help="Endpoint push receivers subscribe to (default: port+2, or PATH-out for ipc).")
@click.option("--advertise-fanout-in", default=None, metavar="URL",
              help="What nodes are told to connect to for --fanout-in (behind NAT or a forward); "
                   "host * = the broker host the node uses.")
@click.option("--advertise-fanout-out", default=None, metavar="URL",
              help="What nodes are told to connect to for --fanout-out.")
@click.option("--node-timeout", default=DEFAULT_NODE_TIMEOUT, show_default=True, type=float,
              help="Seconds without a heartbeat before a node is dropped.")
@click.option("--kit", default=None, metavar="DIR",
              help="The broker's kit (DIR/broker from `fedstream provision`): admit only this project's nodes.")
@verbose_option
def broker_command(bind: str, fanout_in: Optional[str], fanout_out: Optional[str],
                   advertise_fanout_in: Optional[str], advertise_fanout_out: Optional[str],
                   node_timeout: float, kit: Optional[str], verbose: int) -> None:
    """Run the broker in the foreground until Ctrl-C / SIGTERM; print its address once listening.

    \b
    Examples:
      fedstream broker --bind tcp://0.0.0.0:5550
      fedstream broker --bind tcp://127.0.0.1:0 --fanout-in tcp://127.0.0.1:7001 --fanout-out tcp://127.0.0.1:7002
      fedstream broker --bind ipc:///run/fed/broker.sock
    """
    from fedstream.broker import Broker

    setup_logging(max(verbose, 1))
    try:
        broker = Broker(bind=bind, node_timeout=node_timeout, kit=kit, fanout_in=fanout_in, fanout_out=fanout_out,
                        advertise_fanout_in=advertise_fanout_in, advertise_fanout_out=advertise_fanout_out)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        broker.start()
    except OSError as exc:
        fail(str(exc))
    click.echo(broker.address)
    sys.stdout.flush()
    try:
        wait_for_termination(threading.Event())
    finally:
        broker.stop()
