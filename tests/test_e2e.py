"""End-to-end keys without sockets: certificates, pairwise keys, key wrapping, sealed notes and chunks."""

import json

import pytest

from fedstream.common import e2e
from fedstream.common.kits import load_kit, provision
from fedstream.nodes.pull import wire as pull_wire
from fedstream.nodes.pull.secure import SecureSessions
from fedstream.nodes.push import wire as push_wire
from fedstream.nodes.push.seal import Sealer, StreamKey, sealed_length

NAMES = ["server", "site-1", "site-2"]


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    """Kits of one project, plus 'site-1' of another project (a certificate this project never signed)."""
    base = tmp_path_factory.mktemp("kits")
    found = {p.name: load_kit(p) for p in provision(base / "proj", NAMES)}
    found["stranger"] = load_kit(provision(base / "other", ["site-1"])[0])
    return found


def peer_of(kits, holder: str, name: str) -> e2e.Peer:
    """`name`'s certificate as `holder` verifies it."""
    return e2e.verify_peer(kits[name].certificate_bytes, kits[holder], name)


def key_between(kits, owner: str, recipient: str, salts, side: str = "owner") -> bytes:
    if side == "owner":
        return e2e.pairwise_key(kits[owner], peer_of(kits, owner, recipient), salts, owner, recipient)
    return e2e.pairwise_key(kits[recipient], peer_of(kits, recipient, owner), salts, owner, recipient)


# -- certificates ------------------------------------------------------------------------------
def test_a_certificate_verifies_for_its_own_name_only(kits):
    peer = e2e.verify_peer(kits["site-1"].certificate_bytes, kits["server"], "site-1")
    assert peer.name == "site-1" and len(peer.curve_key) == 32
    assert e2e.verify_peer(kits["site-1"].certificate_bytes.decode(), kits["server"], "site-1") == peer
    with pytest.raises(e2e.E2EError, match="for 'site-1', but the message came from 'site-2'"):
        e2e.verify_peer(kits["site-1"].certificate_bytes, kits["server"], "site-2")


def test_certificates_of_another_project_or_altered_are_refused(kits):
    with pytest.raises(e2e.E2EError, match="not signed by this project"):
        e2e.verify_peer(kits["stranger"].certificate_bytes, kits["server"], "site-1")
    altered = kits["site-1"].certificate_bytes.replace(b'"site-1"', b'"site-2"')
    with pytest.raises(e2e.E2EError, match="not valid"):
        e2e.verify_peer(altered, kits["server"], "site-2")
    for nothing in (None, 5, {}):
        with pytest.raises(e2e.E2EError, match="no certificate"):
            e2e.verify_peer(nothing, kits["server"], "site-1")


def test_offers_carry_certificate_and_salt(kits):
    salt = e2e.new_salt()
    peer, got = e2e.accept_offer(e2e.offer(kits["site-1"], salt), kits["server"], "site-1")
    assert got == salt and peer == peer_of(kits, "server", "site-1")
    assert e2e.new_salt() != salt and len(salt) == e2e.SALT_BYTES
    good = e2e.offer(kits["site-1"], salt)
    for bad in (None, "x", {**good, "salt": "%%%"}, {**good, "salt": e2e.encode_b64(b"short")}, {"salt": good["salt"]}):
        with pytest.raises(e2e.E2EError):
            e2e.accept_offer(bad, kits["server"], "site-1")


def test_require_kit_names_what_is_missing(kits):
    with pytest.raises(ValueError, match=r"secure=True needs a kit: .*fedstream provision.*Cell\(\.\.\., kit=\.\.\.\)"):
        e2e.require_kit(None)
    assert e2e.require_kit(kits["server"]) is kits["server"]


# -- the pairwise key --------------------------------------------------------------------------
def test_both_sides_derive_the_same_key_and_nobody_else_does(kits):
    salts = (e2e.new_salt(), e2e.new_salt())
    key = key_between(kits, "server", "site-1", salts)
    assert key == key_between(kits, "server", "site-1", salts, side="recipient") and len(key) == e2e.KEY_BYTES
    assert key_between(kits, "server", "site-2", salts) != key  # another certified node
    assert key_between(kits, "server", "site-1", (salts[0], e2e.new_salt())) != key  # every transfer its own key
    with pytest.raises(e2e.E2EError, match="salts"):
        key_between(kits, "server", "site-1", (b"short", salts[1]))


def test_a_wrapped_key_opens_only_for_its_recipient_and_context(kits):
    salts = (e2e.new_salt(), e2e.new_salt())
    data_key = StreamKey.new()
    for_site1 = key_between(kits, "server", "site-1", salts)
    wrapped = e2e.wrap_key(for_site1, data_key.to_bytes(), b"start")
    assert data_key.to_bytes() not in wrapped
    assert StreamKey.from_bytes(e2e.unwrap_key(key_between(kits, "server", "site-1", salts, "recipient"),
                                               wrapped, b"start")) == data_key
    # site-2 is certified too, and even given the same salts its own pairwise key opens nothing
    site2 = key_between(kits, "server", "site-2", salts, side="recipient")
    with pytest.raises(e2e.E2EError, match="not sealed for this node"):
        e2e.unwrap_key(site2, wrapped, b"start")
    with pytest.raises(e2e.E2EError):  # the start request it is bound to was altered
        e2e.unwrap_key(for_site1, wrapped, b"altered start")
    flipped = bytearray(wrapped)
    flipped[3] ^= 1
    with pytest.raises(e2e.E2EError):
        e2e.unwrap_key(for_site1, bytes(flipped), b"start")


def test_sealed_notes_authenticate_their_purpose(kits):
    key = key_between(kits, "server", "site-1", (e2e.new_salt(), e2e.new_salt()))
    note = e2e.seal_note(key, "pull digest", b"abc123")
    assert e2e.open_note(key, "pull digest", note) == b"abc123"
    assert e2e.seal_note(key, "pull digest", b"abc123") != note  # a fresh nonce each time
    with pytest.raises(e2e.E2EError):
        e2e.open_note(key, "pull verdict", note)  # moved to another purpose
    with pytest.raises(e2e.E2EError):
        e2e.open_note(key_between(kits, "server", "site-2", (e2e.new_salt(), e2e.new_salt())), "pull digest", note)
    raw = bytearray(e2e.decode_b64(note, "note"))
    raw[-1] ^= 0x80
    for bad in (e2e.encode_b64(bytes(raw)), "%%%", None, e2e.encode_b64(b"tiny")):
        with pytest.raises(e2e.E2EError):
            e2e.open_note(key, "pull digest", bad)


# -- pull chunks -------------------------------------------------------------------------------
def test_pull_chunks_round_trip_and_any_change_is_rejected(kits):
    key = key_between(kits, "server", "site-1", (e2e.new_salt(), e2e.new_salt()))
    sealer = e2e.PullSealer(key)
    data = bytes(range(256)) * 40
    sealed = sealer.seal(4096, memoryview(data))
    assert len(sealed) == len(data) + e2e.TAG_BYTES and data[:64] not in sealed
    assert sealer.seal(4096, data) == sealed  # a retried request gets the very same reply
    assert e2e.PullSealer(key).open(4096, memoryview(sealed)) == data
    tampered = bytearray(sealed)
    tampered[1000] ^= 0x01
    with pytest.raises(e2e.E2EError, match="offset 4096 does not authenticate"):
        sealer.open(4096, bytes(tampered))
    with pytest.raises(e2e.E2EError):
        sealer.open(0, sealed)  # moved to another offset
    with pytest.raises(e2e.E2EError):
        sealer.open(4096, sealed[:-1])  # cut short
    with pytest.raises(e2e.E2EError):
        sealer.open(4096, b"short")
    with pytest.raises(e2e.E2EError):  # another certified node's key
        e2e.PullSealer(key_between(kits, "server", "site-2", (e2e.new_salt(), e2e.new_salt()))).open(4096, sealed)
    assert sealer.open(50, sealer.seal(50, b"")) == b""  # the end of the file


def test_the_owner_table_keeps_one_session_per_download(kits):
    table = SecureSessions(limit=2)
    meta = {"name": "m.bin", "size": 10, "alg": "sha256"}
    salt = e2e.new_salt()
    offer = e2e.offer(kits["site-1"], salt)
    first = table.open(kits["server"], "server", "site-1", "ref-1", offer, meta)
    assert table.open(kits["server"], "server", "site-1", "ref-1", offer, meta) is first  # a retried open
    sid = e2e.encode_b64(salt)
    assert table.find("site-1", sid, "ref-1") is first
    assert table.find("site-2", sid, "ref-1") is None and table.find("site-1", sid, "ref-2") is None
    # the recipient derives the same key from the owner's answer and reads the sealed name and size
    peer, owner_salt = e2e.accept_offer(first.answer["e2e"], kits["site-1"], "server")
    key = e2e.pairwise_key(kits["site-1"], peer, (owner_salt, salt), "server", "site-1")
    assert json.loads(e2e.open_note(key, pull_wire.NOTE_META, first.answer["meta"])) == meta
    with pytest.raises(e2e.E2EError, match="has no kit"):
        table.open(None, "server", "site-1", "ref-1", offer, meta)
    with pytest.raises(e2e.E2EError, match="came from 'site-2'"):  # an offer relayed in another's name
        table.open(kits["server"], "server", "site-2", "ref-1", offer, meta)
    for n in range(2):
        table.open(kits["server"], "server", "site-2", f"ref-{n}", e2e.offer(kits["site-2"], e2e.new_salt()), meta)
    assert table.find("site-1", sid, "ref-1") is None  # bounded: the oldest went first
    table.forget(["ref-0", "ref-1"])
    assert all(table.find("site-2", s, r) is None for s in ("x",) for r in ("ref-0", "ref-1"))


# -- push: repairs and the digest of a secure stream ----------------------------------------------
def test_secure_repairs_and_digest_are_sealed_in_their_own_nonce_space():
    sealer = Sealer(StreamKey.new())
    header = push_wire.encode_header(push_wire.KIND_CHUNK, 3, 300)
    data = b"r" * 100
    on_fanout = sealer.seal(3, header, data)
    repaired = sealer.seal_repair(0, header, data)
    assert repaired != on_fanout and len(repaired) == sealed_length(100)
    assert sealer.open_repair(0, header, repaired) == data
    assert sealer.open_repair(1, header, repaired) is None  # another repair nonce
    assert sealer.open_repair(0, push_wire.encode_header(push_wire.KIND_CHUNK, 4, 400), repaired) is None
    assert sealer.open(3, header, repaired) is None  # a repair is not a fan-out chunk
    assert sealer.open_repair(-1, header, repaired) is None
    assert sealer.open_digest(sealer.seal_digest("ab" * 32)) == "ab" * 32
    assert Sealer(StreamKey.new()).open_digest(sealer.seal_digest("ab" * 32)) is None


def test_the_start_binding_survives_json_and_sees_any_change():
    info = {"v": 1, "sid": "s" * 16, "name": "m.bin", "size": 10, "chunk_timeout": 0.1, "ctx": {"round": 3, "x": [1]}}
    assert push_wire.start_binding(json.loads(json.dumps(info))) == push_wire.start_binding(info)
    assert push_wire.start_binding({**info, "size": 11}) != push_wire.start_binding(info)
