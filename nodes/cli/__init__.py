"""The `fedstream` command line: the click group and the commands it is made of.

Each command lives in its own module and imports only `options`; this module is the only
one that knows them all, so the CLI has no import circle.
"""

import click

from fedstream.nodes.cli import broker, node, provision, pull, push, simulate
from fedstream.nodes.cli.options import EXIT_STATUS_HELP, package_version


_SIMULATE_STATUS = " `simulate` exits 3 when everything verified except the site --kill-site killed."


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_STATUS_HELP + _SIMULATE_STATUS)
@click.version_option(package_version(), "--version", prog_name="fedstream", message="%(prog)s %(version)s")
def main() -> None:
    """fedstream: stream large files between federation sites through one ZeroMQ broker."""


for _command in (broker.broker_command, node.node_command, pull.serve_command, pull.get_command,
                 push.push_command, simulate.simulate_command, provision.provision_command):
    _status = EXIT_STATUS_HELP + (_SIMULATE_STATUS if _command is simulate.simulate_command else "")
    _command.epilog = _command.epilog or _status
    main.add_command(_command)
