"""Failing fast where nothing can succeed, with distinct exit statuses.

The operations below are given long timeouts (60 s) and the tests a short bound: a test that
waited them out would fail on its pytest timeout, so no test measures time itself.
"""

import socket
import subprocess
import sys
import threading

import pytest

from fedstream.broker import Broker
from fedstream.common.errors import NoBrokerError, UnreachableError
from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileStreamer, FLContext
from tests.push_support import make_file

pytestmark = pytest.mark.timeout(40)

EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNREACHABLE, EXIT_REFUSED = 2, 4, 5, 6
RID = "0123456789abcdef0123456789abcdef"


def free_port_without_listener() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_cli(*args: str, cwd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedstream.nodes", *args], capture_output=True, text=True,
                          timeout=20, cwd=cwd)


def one_line(ran: subprocess.CompletedProcess) -> str:
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedstream: error: "), ran.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["push", "get", "serve", "node"])
def test_commands_without_a_broker_fail_fast_naming_the_address(command, tmp_path):
    address = f"tcp://127.0.0.1:{free_port_without_listener()}"
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    args = {
        "push": ["push", str(src), "--to", "site-1"],
        "get": ["get", RID, "--from", "server", "-o", str(tmp_path / "out")],
        "serve": ["serve", str(src)],
        "node": ["node", "site-1", "--recv-dir", str(tmp_path / "recv")],
    }[command]
    ran = run_cli(*args, "--broker", address, cwd=str(tmp_path))
    assert ran.returncode == EXIT_UNREACHABLE
    line = one_line(ran)
    assert f"No broker is listening at {address}" in line


def test_cell_start_with_connect_timeout_raises_no_broker_error():
    address = f"tcp://127.0.0.1:{free_port_without_listener()}"
    with pytest.raises(NoBrokerError, match=address):
        Cell("site-1", address).start(timeout=60, connect_timeout=1)


def test_usage_error_exits_2(tmp_path):
    ran = run_cli("push", str(tmp_path / "missing.bin"), "--to", "site-1", "--broker", "tcp://127.0.0.1:1",
                  cwd=str(tmp_path))
    assert ran.returncode == EXIT_USAGE and "missing.bin" in one_line(ran)
    ran = run_cli("node", "site-1", "--broker", "udp://nowhere:1", cwd=str(tmp_path))
    assert ran.returncode == EXIT_USAGE and "udp://nowhere:1" in one_line(ran)


def test_refused_registration_exits_6(tmp_path):
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("site-1", broker.address):
        ran = run_cli("get", RID, "--from", "server", "--as", "site-1", "--broker", broker.address,
                      "-o", str(tmp_path), cwd=str(tmp_path))
    assert ran.returncode == EXIT_REFUSED
    assert "already used by another live node" in one_line(ran)


def test_push_target_not_connected_fails_at_once(tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 300_000)
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("server", broker.address) as server:
        rc, ok = FileStreamer.stream_file("test", "file", {}, ["ghost"], src, FLContext(server), chunk_timeout=60)
        assert (rc, ok) == (ReturnCode.COMMUNICATION_ERROR, False)
        with pytest.raises(UnreachableError, match="'ghost' is not connected"):
            server.send_request("test", "ping", "ghost", b"", timeout=60)


def test_exit_statuses_are_in_the_help(tmp_path):
    ran = run_cli("get", "--help", cwd=str(tmp_path))
    text = " ".join(ran.stdout.split())
    assert ran.returncode == 0 and "4 timeout" in text and "5 broker or peer unreachable" in text


def test_peer_not_connected_exits_5(tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    with Broker(bind="tcp://127.0.0.1:0") as broker:
        got = run_cli("get", RID, "--from", "nobody", "--broker", broker.address, "--timeout", "60",
                      "-o", str(tmp_path / "out"), cwd=str(tmp_path))
        pushed = run_cli("push", str(src), "--to", "ghost", "--broker", broker.address, "--chunk-timeout", "60",
                         cwd=str(tmp_path))
    assert got.returncode == EXIT_UNREACHABLE and "'nobody' is not connected" in one_line(got)
    assert pushed.returncode == EXIT_UNREACHABLE and "'ghost' is not connected" in one_line(pushed)


def test_connected_peer_that_never_answers_exits_4(tmp_path):
    """A peer the broker reaches but that keeps every request unanswered: get and push time out."""
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    released = threading.Event()
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("mute", broker.address, workers=16) as mute:
        for channel in ("__fedstream_pull__", "__fedstream_push__", "fedstream"):  # "fedstream": push's CLI channel
            mute.register_request_cb(channel, "*", lambda message: released.wait(30))
        try:
            got = run_cli("get", RID, "--from", "mute", "--broker", broker.address, "--timeout", "1",
                          "-o", str(tmp_path / "out"), cwd=str(tmp_path))
            pushed = run_cli("push", str(src), "--to", "mute", "--broker", broker.address, "--chunk-timeout", "1",
                             cwd=str(tmp_path))
        finally:
            released.set()
    assert got.returncode == EXIT_TIMEOUT and "no reply from the owner" in one_line(got)
    assert pushed.returncode == EXIT_TIMEOUT and "'mute'" in one_line(pushed)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
