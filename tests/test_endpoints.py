"""Any ZeroMQ endpoint: tcp (IPv4, IPv6), ipc and inproc federations push and pull; fan-out endpoints
are chosen (a taken one names its option) and advertised apart from the bound ones (through a forward)."""

import os
import socket
import subprocess
import sys
import threading

import pytest
import zmq

from fedstream.broker import Broker
from fedstream.common.address import Endpoint, derive_fanout, parse_endpoint, reachable
from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileDownloader, FileStreamer, FLContext, download_file
from tests.procs import wait_until
from tests.push_support import make_file, sha256_of

pytestmark = pytest.mark.timeout(120)

KIB = 1 << 10
CHANNEL, TOPIC = "test", "file"


def push_and_pull(address: str, tmp_path, context=None) -> None:
    """Push a file from 'server' to 'site-1', then pull one from 'server'; both verified."""
    src = str(tmp_path / "model.bin")
    sha = make_file(src, 700 * KIB)
    pushed, pulled = tmp_path / "pushed", tmp_path / "pulled"
    pushed.mkdir()
    pulled.mkdir()
    done = []
    options = {"context": context} if context is not None else {}
    with Cell("site-1", address, **options) as site, Cell("server", address, **options) as server:
        FileStreamer.register_stream_processing(FLContext(site), CHANNEL, TOPIC, dest_dir=str(pushed),
                                                stream_done_cb=lambda stream_ctx, fl_ctx: done.append(
                                                    FileStreamer.get_file_location(stream_ctx)))
        assert FileStreamer.stream_file(CHANNEL, TOPIC, {}, ["site-1"], src, FLContext(server),
                                        chunk_size=64 * KIB) == (ReturnCode.OK, True)
        wait_until(lambda: done, 10)
        assert done[0] is not None and sha256_of(done[0]) == sha

        tx = FileDownloader.new_transaction(server, 30, lambda *args: None)
        try:
            ref = FileDownloader.add_file(tx, src)
            error, path = download_file("server", ref, 10, site, str(pulled))
        finally:
            FileDownloader.delete_transaction(tx)
    assert error is None and sha256_of(path) == sha


def test_endpoint_parsing_and_derived_fanout():
    assert parse_endpoint("tcp://[::1]:0") == Endpoint("tcp", "::1", 0)
    assert parse_endpoint("tcp://*:5550").url() == "tcp://*:5550"
    assert [e.url() for e in derive_fanout(parse_endpoint("tcp://10.0.0.5:5550"))] == \
        ["tcp://10.0.0.5:5551", "tcp://10.0.0.5:5552"]
    assert [e.url() for e in derive_fanout(parse_endpoint("ipc:///run/fed.sock"))] == \
        ["ipc:///run/fed-in.sock", "ipc:///run/fed-out.sock"]
    assert [e.url() for e in derive_fanout(parse_endpoint("inproc://fed"))] == ["inproc://fed-in", "inproc://fed-out"]
    assert reachable(parse_endpoint("tcp://*:7001"), parse_endpoint("tcp://broker.example:5550")).url() == \
        "tcp://broker.example:7001"
    for bad in ("tcp://::1:5550", "udp://x:1", "tcp://host", "inproc://", "127.0.0.1:5550"):
        with pytest.raises(ValueError, match="Invalid address"):
            parse_endpoint(bad)


def test_ipc_federation_pushes_and_pulls(tmp_path):
    with Broker(bind=f"ipc://{tmp_path}/fed.sock") as broker:
        assert broker.fanout_endpoints == (f"ipc://{tmp_path}/fed-in.sock", f"ipc://{tmp_path}/fed-out.sock")
        push_and_pull(broker.address, tmp_path)


def test_inproc_federation_inside_one_process(tmp_path):
    context = zmq.Context()
    try:
        with Broker(bind="inproc://fed-test", context=context) as broker:
            assert broker.fanout_endpoints == ("inproc://fed-test-in", "inproc://fed-test-out")
            push_and_pull("inproc://fed-test", tmp_path, context)
    finally:
        context.term()


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_loopback_federation(tmp_path):
    with Broker(bind="tcp://[::1]:0") as broker:
        assert broker.address.startswith("tcp://[::1]:")
        push_and_pull(broker.address, tmp_path)


def test_free_ports_and_explicit_fanout_endpoints(tmp_path):
    with socket.socket() as a, socket.socket() as b:  # two ports that were free a moment ago
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = a.getsockname()[1], b.getsockname()[1]
    wanted = tuple(f"tcp://127.0.0.1:{port}" for port in ports)
    with Broker(bind="tcp://127.0.0.1:0", fanout_in=wanted[0], fanout_out=wanted[1]) as broker:
        assert broker.fanout_endpoints == wanted
        with Cell("site-1", broker.address) as cell:
            assert cell.fanout_endpoints == wanted


def test_taken_fanout_port_names_the_option(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        url = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match="--fanout-out"):
            Broker(bind="tcp://127.0.0.1:0", fanout_out=url).start()
        ran = subprocess.run([sys.executable, "-m", "fedstream.nodes", "broker", "--bind", "tcp://127.0.0.1:0",
                              "--fanout-in", url], capture_output=True, text=True, timeout=30)
    lines = [line for line in ran.stderr.splitlines() if line.strip()]
    assert ran.returncode == 1 and len(lines) == 1, ran.stderr
    assert url in lines[0] and "already in use" in lines[0] and "--fanout-in" in lines[0]


def test_broker_cli_binds_ipc(procs, tmp_path):
    broker = procs.fedstream("broker", "--bind", f"ipc://{tmp_path}/b.sock")
    assert broker.expect("ipc://", 30) == f"ipc://{tmp_path}/b.sock"
    wait_until(lambda: os.path.exists(tmp_path / "b-out.sock"), 10)


class Relay:
    """A TCP forward (as `ssh -L` or a NAT would be): accepts on a free port, relays to `target`."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target: tuple[str, int] = ("127.0.0.1", 0)
        self.relayed = 0
        self.sockets: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
                self.relayed += len(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def test_push_and_pull_through_a_forward_with_advertised_fanout(tmp_path):
    relays = [Relay(), Relay(), Relay()]  # message port, fan-out in, fan-out out
    try:
        with Broker(bind="tcp://127.0.0.1:0", advertise_fanout_in=f"tcp://*:{relays[1].port}",
                    advertise_fanout_out=f"tcp://127.0.0.1:{relays[2].port}") as broker:
            bound = [parse_endpoint(url).port for url in (broker.address, *broker.fanout_endpoints)]
            for relay, port in zip(relays, bound):
                relay.target = ("127.0.0.1", port)
            address = f"tcp://127.0.0.1:{relays[0].port}"
            with Cell("probe", address) as probe:
                assert probe.fanout_endpoints == (f"tcp://127.0.0.1:{relays[1].port}",
                                                  f"tcp://127.0.0.1:{relays[2].port}")
            push_and_pull(address, tmp_path)
        assert relays[1].relayed > 700 * KIB and relays[2].relayed > 700 * KIB  # the chunks took the forward
    finally:
        for relay in relays:
            relay.close()
