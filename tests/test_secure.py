"""Secure federations end to end: a broker with a kit in its own process, nodes with and without kits."""

import os
import time

import pytest
import zmq

from fedstream.common import protocol as proto
from fedstream.common.kits import load_kit, provision
from fedstream.nodes import Cell
from tests.helpers.secure_client import raw_socket, receives_anything, register
from tests.pull_support import make_file, sha256_of

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
NAMES = ["broker", "server", "site-1", "site-2", "site-3"]
REFUSAL_BOUND = 8.0  # seconds a refused node may take to exit (generous: the machine is shared)


@pytest.fixture
def project(tmp_path):
    """A provisioned project: {name: kit folder}."""
    return {path.name: str(path) for path in provision(tmp_path / "proj", NAMES)}


@pytest.fixture
def secure_broker(procs, project):
    """Address of a broker running with the project's broker kit in its own process."""
    _proc, address = procs.broker("--kit", project["broker"])
    return address


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)  # also closes the sockets a failed test left open


def start_node(procs, name, broker, recv_dir, kit=None):
    env = {"FEDSTREAM_KIT": kit} if kit else None  # the environment variable, as a site would set it
    node = procs.fedstream("node", name, "--broker", broker, "--recv-dir", str(recv_dir), env=env)
    node.expect(f"ready\t{name}", 30)
    return node


def one_line_error(proc) -> str:
    assert proc.wait(REFUSAL_BOUND + 10) != 0
    lines = [line for line in proc.stderr_lines if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedstream: error: "), proc.stderr
    return lines[0]


def test_provisioned_sites_push_and_pull_verified(procs, project, secure_broker, tmp_path):
    nodes = {name: start_node(procs, name, secure_broker, tmp_path / name, project[name])
             for name in ("site-1", "site-2")}
    src = str(tmp_path / "model.pt")
    digest = make_file(src, 5 * MiB + 3)
    push = procs.fedstream("push", src, "--to", "site-1,site-2", "--broker", secure_broker,
                           "--kit", project["server"], "--chunk-size", "256K", "--quiet")
    assert push.wait(60) == 0, push.stderr
    for name, node in nodes.items():
        path = node.expect("received\tpush\t", 30).split("\t")[2]
        assert path == str(tmp_path / name / "model.pt") and sha256_of(path) == digest

    serve = procs.fedstream("serve", src, "--broker", secure_broker, "--kit", project["server"], "--timeout", "3")
    ref_id = serve.expect("", 20).split("\t")[0]
    get = procs.fedstream("get", ref_id, "--from", "server", "--broker", secure_broker,
                          "-o", str(tmp_path / "got"), env={"FEDSTREAM_KIT": project["site-3"]})
    assert get.wait(60) == 0, get.stderr
    assert sha256_of(get.remaining_stdout()[-1]) == digest
    assert serve.wait(30) == 0, serve.stderr

    serve = procs.fedstream("serve", src, "--broker", secure_broker, "--kit", project["server"],
                            "--announce-to", "site-1,site-2", "--timeout", "60")
    assert serve.wait(60) == 0, serve.stderr
    for name, node in nodes.items():
        path = node.expect("received\tpull\t", 30).split("\t")[2]
        assert path == str(tmp_path / name / "model (1).pt") and sha256_of(path) == digest


def test_a_site_kit_cannot_register_as_server(procs, project, secure_broker, zctx):
    push = procs.fedstream("push", __file__, "--to", "site-2", "--broker", secure_broker,
                           "--kit", project["site-1"], "--as", "server")
    assert "certificate is for 'site-1'" in one_line_error(push)
    # A client that skips the local check is refused by the broker itself.
    kit = load_kit(project["site-1"])
    dealer = raw_socket(zctx, zmq.DEALER, secure_broker, kit)
    status, reason = register(dealer, "server", kit.certificate_bytes)
    assert status == proto.REG_ERR and "only as 'site-1', not as 'server'" in reason
    status, _ = register(dealer, "site-1", kit.certificate_bytes)
    assert status == proto.REG_OK
    dealer.close()


def test_nodes_without_kit_or_from_another_project_are_refused(procs, project, secure_broker, tmp_path):
    other = provision(tmp_path / "other", ["site-1"])[0]
    cases = [([], "needs a kit of its project"), (["--kit", str(other)], "refused the secure connection")]
    for extra, message in cases:
        started = time.monotonic()
        node = procs.fedstream("node", "site-1", "--broker", secure_broker, "--recv-dir", str(tmp_path / "r"),
                               *extra)
        assert message in one_line_error(node)
        assert time.monotonic() - started < REFUSAL_BOUND + 10
        assert "Traceback" not in node.stderr
    with pytest.raises(Exception, match="needs a kit of its project"):
        Cell("site-2", secure_broker).start(timeout=REFUSAL_BOUND)
    # The broker keeps serving its own project.
    start_node(procs, "site-1", secure_broker, tmp_path / "site-1", project["site-1"])


def test_raw_sockets_without_curve_receive_nothing(procs, project, secure_broker, tmp_path, zctx):
    node = start_node(procs, "site-1", secure_broker, tmp_path / "site-1", project["site-1"])
    with Cell("site-2", secure_broker, kit=project["site-2"]) as probe:
        xsub_address, xpub_address = probe.fanout_endpoints
    broker_kit = load_kit(project["broker"])
    outsider_keys = zmq.curve_keypair()
    dealer = raw_socket(zctx, zmq.DEALER, secure_broker)
    dealer.send_multipart([proto.REGISTER, b"site-9", proto.encode_json({"v": proto.VERSION})])
    subscribers = [raw_socket(zctx, zmq.SUB, xpub_address),
                   raw_socket(zctx, zmq.SUB, xpub_address, broker_kit, outsider_keys)]  # self-made CURVE key
    for sub in subscribers:
        sub.setsockopt(zmq.SUBSCRIBE, b"")
    publisher = raw_socket(zctx, zmq.XPUB, xsub_address)  # an admitted one gets the broker's subscription
    src = str(tmp_path / "w.bin")
    digest = make_file(src, 3 * MiB)
    push = procs.fedstream("push", src, "--to", "site-1", "--broker", secure_broker, "--kit", project["server"],
                           "--chunk-size", "64K", "--quiet")
    assert push.wait(60) == 0, push.stderr
    assert sha256_of(node.expect("received\tpush\t", 30).split("\t")[2]) == digest
    for sock in (dealer, *subscribers, publisher):
        assert not receives_anything(sock, 0.5)
        sock.close()


def test_forged_certificates_are_refused_by_the_broker(project, secure_broker, tmp_path, zctx):
    site1, site2 = load_kit(project["site-1"]), load_kit(project["site-2"])
    cert = site1.certificate_bytes
    i = cert.index(b'"sig":"') + 20
    tampered = cert[:i] + (b"1" if cert[i:i + 1] == b"0" else b"0") + cert[i + 1:]  # still a hex digit
    foreign = load_kit(provision(tmp_path / "other", ["site-1"])[0])
    cases = [
        (site1, tampered, "not signed by this project's root key"),
        (site1, site2.certificate_bytes, "belongs to another CURVE key"),  # a copied certificate
        (site1, None, "no certificate was sent"),
    ]
    for kit, certificate, message in cases:
        dealer = raw_socket(zctx, zmq.DEALER, secure_broker, kit)
        status, reason = register(dealer, "site-1", certificate)
        assert status == proto.REG_ERR and message in reason, reason
        # Unregistered, it may not send anything either.
        dealer.send_multipart([proto.SEND, b"site-2", proto.encode_json({"k": "ff"})])
        assert receives_anything(dealer, 10) and dealer.recv_multipart() == [proto.NOT_REGISTERED]
        dealer.close()
    # Another project's certificate with the broker's public key: a self-made root gets nowhere.
    dealer = raw_socket(zctx, zmq.DEALER, secure_broker, site1, (foreign.public_key, foreign.secret_key))
    status, reason = register(dealer, "site-1", foreign.certificate_bytes)
    assert status == proto.REG_ERR and "not signed by this project's root key" in reason
    dealer.close()
    assert os.path.isdir(project["site-1"])


def test_provision_command_creates_then_keeps_kits(procs, tmp_path):
    proj = tmp_path / "proj"
    first = procs.fedstream("provision", "--project", str(proj), "broker", "site-1")
    assert first.wait(30) == 0, first.stderr
    assert first.remaining_stdout() == [f"created\tbroker\t{proj / 'broker'}", f"created\tsite-1\t{proj / 'site-1'}"]
    before = (proj / "site-1" / "curve.key").read_bytes()
    again = procs.fedstream("provision", "--project", str(proj), "site-1", "site-2")
    assert again.wait(30) == 0, again.stderr
    assert again.remaining_stdout() == [f"kept\tsite-1\t{proj / 'site-1'}", f"created\tsite-2\t{proj / 'site-2'}"]
    assert (proj / "site-1" / "curve.key").read_bytes() == before
    bad = procs.fedstream("provision", "--project", str(proj), "root")
    assert "reserved" in one_line_error(bad)


@pytest.mark.timeout(240)
def test_simulate_files_secure_verifies_every_site(procs, tmp_path):
    sim = procs.fedstream("simulate", "--files", "--sites", "2", "--size", "4M", "--secure", "--workdir",
                          str(tmp_path))
    assert sim.wait(200) == 0, sim.stderr
    out = "\n".join(sim.remaining_stdout())
    for mode in ("push", "pull"):
        assert f"{mode} (secure): 2 sites x 4.0 MiB" in out, out
    assert "all 2 sites verified in push, pull" in out
    assert os.listdir(tmp_path) == []  # kits, files and logs removed


@pytest.mark.timeout(240)
def test_simulate_fedavg_secure_verifies_bit_for_bit(procs, tmp_path):
    sim = procs.fedstream("simulate", "--sites", "2", "--rounds", "2", "--model-size", "4M", "--down", "push",
                          "--secure", "--workdir", str(tmp_path))
    assert sim.wait(200) == 0, sim.stderr
    out = "\n".join(sim.remaining_stdout())
    assert "down by push, secure" in out, out
    assert "final model verified bit for bit: all 2 sites in all 2 rounds" in out, out
    assert os.listdir(tmp_path) == []


def test_a_kit_node_facing_a_plain_broker_fails_with_one_sentence(procs, project, broker_address, tmp_path):
    node = procs.fedstream("node", "site-1", "--broker", broker_address, "--recv-dir", str(tmp_path / "r"),
                           "--kit", project["site-1"])
    assert "runs without a kit" in one_line_error(node)
    start_node(procs, "site-1", broker_address, tmp_path / "site-1")  # plain nodes still work there
