"""Kits without a network: provisioning, file modes, the certificate format, the admission rules."""

import os
import stat
from pathlib import Path

import pytest
import zmq
from zmq.utils import z85

from fedstream.broker import Broker
from fedstream.broker.auth import FANOUT_DOMAIN, ROUTER_DOMAIN, Admission
from fedstream.common.kits import CertificateError, load_kit, provision, verify_certificate
from fedstream.nodes import Cell

pytestmark = pytest.mark.timeout(60)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_provision_creates_root_and_one_kit_per_name(tmp_path):
    paths = provision(tmp_path / "proj", ["broker", "server", "site-1"])
    assert paths == [tmp_path / "proj" / n for n in ("broker", "server", "site-1")]
    root = tmp_path / "proj" / "root"
    assert sorted(os.listdir(root)) == ["broker.key", "broker.pub", "root.key", "root.pub"]
    kits = {p.name: load_kit(p) for p in paths}
    for name, kit in kits.items():
        assert kit.name == name and sorted(os.listdir(kit.path)) == [
            "broker.pub", "certificate.json", "curve.key", "curve.pub", "root.pub"]
        assert kit.broker_key == kits["broker"].public_key == (root / "broker.pub").read_bytes().strip()
        assert kit.root_key == bytes.fromhex((root / "root.pub").read_text())
    assert kits["broker"].is_broker and not kits["site-1"].is_broker
    assert len({kit.public_key for kit in kits.values()}) == 3
    assert sorted(os.listdir(tmp_path / "proj")) == ["broker", "root", "server", "site-1"]  # no staging left


def test_secret_files_have_mode_0600(tmp_path):
    old = os.umask(0)  # even a permissive umask must not widen them
    try:
        provision(tmp_path / "proj", ["broker", "site-1"])
    finally:
        os.umask(old)
    proj = tmp_path / "proj"
    for secret in (proj / "root" / "root.key", proj / "root" / "broker.key", proj / "broker" / "curve.key",
                   proj / "site-1" / "curve.key"):
        assert mode(secret) == 0o600, secret
    assert mode(proj / "site-1") == 0o700 and mode(proj / "root") == 0o700


def test_provision_rerun_keeps_existing_kits_byte_identical(tmp_path):
    proj = tmp_path / "proj"
    provision(proj, ["broker", "site-1"])
    before = snapshot(proj)
    provision(proj, ["site-1", "site-2"])
    after = snapshot(proj)
    assert {k: v for k, v in after.items() if not k.startswith("site-2/")} == before
    assert load_kit(proj / "site-2").root_key == load_kit(proj / "site-1").root_key


def test_provision_refuses_bad_names_and_foreign_folders(tmp_path):
    proj = tmp_path / "proj"
    for names, message in [(["root"], "reserved"), (["bad name"], "not a valid FQCN"), ([], "at least one")]:
        with pytest.raises(ValueError, match=message):
            provision(proj, names)
    (proj / "site-1").mkdir(parents=True)
    with pytest.raises(ValueError, match="incomplete"):
        provision(proj, ["site-1"])
    provision(tmp_path / "other", ["site-2"])
    os.rename(tmp_path / "other" / "site-2", proj / "site-2")
    with pytest.raises(ValueError, match="not the kit of 'site-2' in this project"):
        provision(proj, ["site-2"])


def test_every_single_byte_change_of_a_certificate_is_refused(tmp_path):
    kit = load_kit(provision(tmp_path / "proj", ["site-1"])[0])
    cert = kit.certificate_bytes
    assert verify_certificate(cert, kit.root_key).name == "site-1"
    for i in range(len(cert)):
        for replacement in {cert[i] ^ 0x01, cert[i] ^ 0x20, ord("0")} - {cert[i]}:
            tampered = cert[:i] + bytes([replacement]) + cert[i + 1:]
            with pytest.raises(CertificateError):
                verify_certificate(tampered, kit.root_key)
    (kit.path / "certificate.json").write_bytes(cert.replace(b"site-1", b"site-7"))
    with pytest.raises(ValueError, match="is damaged: the certificate is not signed by this project's root key"):
        load_kit(kit.path)


def test_certificate_of_another_project_is_refused(tmp_path):
    mine = load_kit(provision(tmp_path / "a", ["site-1"])[0])
    theirs = load_kit(provision(tmp_path / "b", ["site-1"])[0])
    with pytest.raises(CertificateError, match="not signed by this project's root key"):
        verify_certificate(theirs.certificate_bytes, mine.root_key)


def test_a_secret_readable_by_others_is_warned_about(tmp_path, caplog):
    kit = provision(tmp_path / "proj", ["site-1"])[0]
    load_kit(kit)
    assert "can be read by other users" not in caplog.text
    (kit / "curve.key").chmod(0o644)
    load_kit(kit)
    assert "can be read by other users; run: chmod 600" in caplog.text


def test_kit_problems_are_one_sentence_value_errors(tmp_path):
    proj = tmp_path / "proj"
    provision(proj, ["site-1", "site-2"])
    with pytest.raises(ValueError, match="its certificate is for 'site-1'"):
        Cell("server", "tcp://127.0.0.1:5550", kit=proj / "site-1")
    with pytest.raises(ValueError, match="belongs to 'site-1', not to the broker"):
        Broker(bind="tcp://127.0.0.1:0", kit=proj / "site-1")
    with pytest.raises(ValueError, match="is not a directory"):
        load_kit(proj / "nothing")
    (proj / "site-2" / "curve.key").chmod(0o600)
    (proj / "site-2" / "curve.key").write_bytes((proj / "site-1" / "curve.key").read_bytes())
    with pytest.raises(ValueError, match="curve.key does not match curve.pub"):
        load_kit(proj / "site-2")


def test_admission_rules(tmp_path):
    kits = {p.name: load_kit(p) for p in provision(tmp_path / "proj", ["broker", "site-1", "site-2"])}
    live: set[tuple[str, bytes]] = set()
    admission = Admission(kits["broker"], lambda fqcn, identity: (fqcn, identity) in live)
    site1 = kits["site-1"]
    raw_key = z85.decode(site1.public_key)
    user_id = site1.public_key.decode()
    assert admission.handshake(ROUTER_DOMAIN, b"CURVE", raw_key) == (True, "OK", user_id)
    assert admission.handshake(ROUTER_DOMAIN, b"NULL", b"")[0] is False
    assert admission.handshake(FANOUT_DOMAIN, b"CURVE", raw_key)[0] is False  # not registered yet
    cert = site1.certificate_bytes.decode()
    assert admission.check_register("site-1", cert, user_id) is None
    assert "only as 'site-1', not as 'server'" in admission.check_register("server", cert, user_id)
    assert "another CURVE key" in admission.check_register("site-1", cert, kits["site-2"].public_key.decode())
    assert "no certificate was sent" in admission.check_register("site-1", None, user_id)
    assert "did not authenticate" in admission.check_register("site-1", cert, None)
    admission.bind(user_id, "site-1", b"conn-1")
    assert admission.owns(b"conn-1", user_id) and not admission.owns(b"conn-2", user_id)
    assert not admission.owns(b"conn-1", None)
    assert admission.handshake(FANOUT_DOMAIN, b"CURVE", raw_key)[0] is False  # registration not live
    live.add(("site-1", b"conn-1"))
    assert admission.handshake(FANOUT_DOMAIN, b"CURVE", raw_key) == (True, "OK", user_id)
    outsider = z85.decode(zmq.curve_keypair()[0])
    assert admission.handshake(FANOUT_DOMAIN, b"CURVE", outsider)[0] is False
