"""secure=True end to end on a secure federation (broker and cells with kits, in this process).

What travels through the broker is captured on the way (a tap on the fan-out subscribed to
the stream's id, and the replies the receiving cells got over the ROUTER path) and searched
for any 64-byte window of the file. Impostors are cells whose kit was swapped, after they
connected, for the kit of another name: they answer with a certificate that does not name
them, as a compromised broker relaying another node's certificate would.
"""

import os
import time

import pytest

from fedstream.broker import Broker
from fedstream.common.kits import load_kit, provision
from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileStreamer, FLContext
from fedstream.nodes.pull.objects import download_object
from fedstream.nodes.pull.owner import FileDownloader
from fedstream.nodes.pull.recipient import download_file
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.push import wire
from fedstream.nodes.push.receiver import ReceiverTuning, set_receiver_tuning
from fedstream.nodes.push.sender import send_file
from fedstream.nodes.push.stream_context import StreamContext
from tests.fanout import FanoutTap, shares_a_window
from tests.procs import wait_until
from tests.push_support import CHANNEL, TOPIC, make_file, sha256_of

pytestmark = pytest.mark.timeout(120)

KIB = 1024
MIB = 1024 * KIB
NAMES = ["broker", "server", "site-1", "site-2", "site-3"]
KNOWN_SID = "eavesdroppedsid1"
NO_KIT = r"secure=True needs a kit: .*fedstream provision.*Cell\(\.\.\., kit=\.\.\.\)"


@pytest.fixture
def project(tmp_path):
    """{name: kit folder} of a freshly provisioned project."""
    return {path.name: str(path) for path in provision(tmp_path / "proj", NAMES)}


@pytest.fixture
def fed(project):
    """A secure broker and cells server, site-1, site-2 with their kits (all in this process)."""
    with Broker(bind="tcp://127.0.0.1:0", kit=project["broker"]) as broker, \
            Cell("server", broker.address, kit=project["server"]) as server, \
            Cell("site-1", broker.address, kit=project["site-1"]) as site1, \
            Cell("site-2", broker.address, kit=project["site-2"]) as site2:
        yield {"server": server, "site-1": site1, "site-2": site2}


@pytest.fixture
def known_stream_id(monkeypatch):
    """Streams of this process get a stream id the eavesdropper knows (the worst case: ids are random)."""
    monkeypatch.setattr(wire, "new_stream_id", lambda: KNOWN_SID)
    return KNOWN_SID.encode()


def record_replies(cell: Cell, monkeypatch) -> list:
    """Record the payload of every reply `cell` gets to its requests (what came over the ROUTER path)."""
    seen: list = []
    original = cell.request_async

    def recording(*args, **kwargs):
        pending = original(*args, **kwargs)
        pending.future.add_done_callback(
            lambda f: seen.append(bytes(f.result().buffer)) if f.exception() is None else None)
        return pending

    monkeypatch.setattr(cell, "request_async", recording)
    return seen


def register(cell: Cell, dest) -> list:
    os.makedirs(dest, exist_ok=True)
    done: list = []
    FileStreamer.register_stream_processing(FLContext(cell), CHANNEL, TOPIC, dest_dir=str(dest),
                                            stream_done_cb=lambda ctx, fl_ctx: done.append(ctx))
    return done


# -- push ----------------------------------------------------------------------------------------
def test_secure_push_to_two_targets_leaves_nothing_readable_on_the_wire(fed, tmp_path, known_stream_id,
                                                                        monkeypatch):
    src = tmp_path / "model.bin"
    sha = make_file(str(src), 2 * MIB + 5)
    done = {name: register(fed[name], tmp_path / name) for name in ("site-1", "site-2")}
    set_receiver_tuning(fed["site-2"], ReceiverTuning(subscribe_delay=1.5))  # site-2 gets chunks by repair
    routed = record_replies(fed["site-2"], monkeypatch)
    insider = fed["site-1"]  # an insider with a valid CURVE key, listening to the stream
    tap = FanoutTap(insider.context, insider.fanout_endpoints[1], known_stream_id, insider.secure_socket)
    try:
        time.sleep(0.3)  # the tap's subscription reaches the broker
        rc, ok = FileStreamer.stream_file(CHANNEL, TOPIC, {"round": 7}, ["site-1", "site-2"], str(src),
                                          FLContext(fed["server"]), chunk_size=128 * KIB, secure=True)
    finally:
        tap.close()
    assert (rc, ok) == (ReturnCode.OK, True)
    for name in ("site-1", "site-2"):
        ctx = wait_until(lambda: done[name], 10)[0]
        assert isinstance(ctx, StreamContext) and ctx["round"] == 7
        assert FileStreamer.get_rc(ctx) == ReturnCode.OK and sha256_of(FileStreamer.get_file_location(ctx)) == sha
        assert FileStreamer.is_secure(ctx) and ctx.is_secure() and ctx[keys.KEY_SECURE] is True
    assert done["site-2"][0][keys.KEY_REPAIRED_CHUNKS] >= 1  # the sealed repair path was taken
    plain = src.read_bytes()
    captured = [frames[2] for frames in tap.frames if len(frames) == 3]
    assert sum(len(c) for c in captured) >= len(plain)  # the tap saw the whole stream go by...
    assert not shares_a_window(plain, captured)  # ...and none of the file in it
    repaired = [data for data in routed if len(data) >= 128 * KIB]
    assert repaired and not shares_a_window(plain, repaired)  # nor in the repairs over the ROUTER path


def test_a_plain_push_on_the_same_federation_is_not_secure(fed, tmp_path):
    src = tmp_path / "plain.bin"
    sha = make_file(str(src), 300 * KIB)
    done = register(fed["site-1"], tmp_path / "site-1")
    assert send_file(fed["server"], CHANNEL, TOPIC, {}, ["site-1"], str(src), chunk_size=64 * KIB).ok
    ctx = wait_until(lambda: done, 10)[0]
    assert sha256_of(FileStreamer.get_file_location(ctx)) == sha and not FileStreamer.is_secure(ctx)


def test_secure_objects_by_push_and_by_pull(fed, tmp_path):
    obj = {"weights": [0.5] * 1000, "round": 3, "blob": os.urandom(70 * KIB)}
    loaded: list = []
    FileStreamer.register_stream_processing(
        FLContext(fed["site-1"]), CHANNEL, "obj", dest_dir=str(tmp_path),
        stream_done_cb=lambda ctx, fl_ctx: loaded.append((FileStreamer.is_secure(ctx), FileStreamer.get_object(ctx))))
    assert FileStreamer.stream_object(CHANNEL, "obj", None, ["site-1"], obj, FLContext(fed["server"]),
                                      chunk_size=16 * KIB, secure=True) == (ReturnCode.OK, True)
    assert wait_until(lambda: loaded, 10) == [(True, obj)]

    tx = FileDownloader.new_transaction(fed["server"], 30, None)
    ref = FileDownloader.add_object(tx, obj)
    assert download_object("server", ref, 5, fed["site-2"], secure=True, location=str(tmp_path)) == (None, obj)
    FileDownloader.delete_transaction(tx)


def test_an_impostor_target_fails_the_whole_push(fed, project, tmp_path):
    src = tmp_path / "f.bin"
    make_file(str(src), 200 * KIB)
    done = {name: register(fed[name], tmp_path / name) for name in ("site-1", "site-2")}
    fed["site-2"].kit = load_kit(project["site-3"])  # site-2 answers with site-3's (valid) certificate
    result = send_file(fed["server"], CHANNEL, TOPIC, {}, ["site-1", "site-2"], str(src), secure=True,
                       chunk_timeout=10)
    assert not result.ok and result.rc == ReturnCode.ERROR
    assert "target 'site-2' cannot take a secure stream" in result.error
    assert "for 'site-3', but the message came from 'site-2'" in result.error
    ctx = wait_until(lambda: done["site-1"], 10)[0]  # the other target's stream was aborted
    assert FileStreamer.get_rc(ctx) == ReturnCode.TASK_ABORTED and os.listdir(tmp_path / "site-1") == []


def test_a_target_without_a_kit_refuses_a_secure_stream(fed, tmp_path):
    src = tmp_path / "f.bin"
    make_file(str(src), 10 * KIB)
    register(fed["site-1"], tmp_path / "site-1")
    fed["site-1"].kit = None
    result = send_file(fed["server"], CHANNEL, TOPIC, {}, ["site-1"], str(src), secure=True, chunk_timeout=10)
    assert not result.ok and "'site-1' has no kit, so it cannot take a secure stream" in result.error
    assert os.listdir(tmp_path / "site-1") == []


# -- pull ----------------------------------------------------------------------------------------
def test_secure_pull_verifies_and_leaves_nothing_readable_on_the_wire(fed, tmp_path, monkeypatch):
    src = tmp_path / "shared.bin"
    sha = make_file(str(src), 3 * MIB + 11)
    tx = FileDownloader.new_transaction(fed["server"], 30, None)
    ref = FileDownloader.add_file(tx, str(src))
    routed = record_replies(fed["site-1"], monkeypatch)
    os.makedirs(tmp_path / "secure")
    err, path = download_file("server", ref, 5, fed["site-1"], location=str(tmp_path / "secure"), secure=True,
                              chunk_size=256 * KIB)
    assert err is None and sha256_of(path) == sha and os.path.basename(path) == "shared.bin"
    plain = src.read_bytes()
    assert sum(len(r) for r in routed) >= len(plain) and not shares_a_window(plain, routed)
    # the same RID serves plain requests as before
    os.makedirs(tmp_path / "plain")
    err, path = download_file("server", ref, 5, fed["site-2"], location=str(tmp_path / "plain"))
    assert err is None and sha256_of(path) == sha
    FileDownloader.delete_transaction(tx)


def test_a_file_shared_for_secure_downloads_only_is_refused_to_plain_requests(fed, tmp_path):
    src = tmp_path / "shared.bin"
    sha = make_file(str(src), 200 * KIB)
    tx = FileDownloader.new_transaction(fed["server"], 30, None)
    ref = FileDownloader.add_file(tx, str(src), secure=True)
    out = tmp_path / "out"
    os.makedirs(out)
    # what a compromised broker posing as a recipient would try: a plain request for a RID it saw
    err, path = download_file("server", ref, 5, fed["site-2"], location=str(out))
    assert path is None and "secure downloads only" in err
    assert os.listdir(out) == []
    err, path = download_file("server", ref, 5, fed["site-1"], location=str(out), secure=True)
    assert err is None and sha256_of(path) == sha
    FileDownloader.delete_transaction(tx)


def test_secure_pull_refuses_impostors_and_owners_without_kits(fed, project, tmp_path):
    src = tmp_path / "shared.bin"
    make_file(str(src), 100 * KIB)
    tx = FileDownloader.new_transaction(fed["server"], 30, None)
    ref = FileDownloader.add_file(tx, str(src))
    out = tmp_path / "out"
    os.makedirs(out)
    fed["site-1"].kit = load_kit(project["site-3"])  # a recipient offering another node's certificate
    err, path = download_file("server", ref, 5, fed["site-1"], location=str(out), secure=True)
    assert path is None and "for 'site-3', but the message came from 'site-1'" in err
    fed["server"].kit = None
    err, path = download_file("server", ref, 5, fed["site-2"], location=str(out), secure=True)
    assert path is None and "'server' has no kit, so it cannot serve secure downloads" in err
    assert os.listdir(out) == []  # nothing is created before the owner's answer verified
    fed["server"].kit = load_kit(project["site-3"])  # an owner offering another node's certificate
    err, path = download_file("server", ref, 5, fed["site-2"], location=str(out), secure=True)
    assert path is None and "the owner's answer does not verify" in err and "came from 'server'" in err
    assert os.listdir(out) == []
    FileDownloader.delete_transaction(tx)


# -- without kits ----------------------------------------------------------------------------------
def test_secure_without_a_kit_raises_value_error(tmp_path):
    src = tmp_path / "f.bin"
    make_file(str(src), 1000)
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("server", broker.address) as server:
        ctx = FLContext(server)
        with pytest.raises(ValueError, match=NO_KIT):
            FileStreamer.stream_file(CHANNEL, TOPIC, {}, ["site-1"], str(src), ctx, secure=True)
        with pytest.raises(ValueError, match=NO_KIT):
            FileStreamer.stream_object(CHANNEL, TOPIC, {}, ["site-1"], {"a": 1}, ctx, secure=True)
        with pytest.raises(ValueError, match=NO_KIT):
            download_file("site-1", "0" * 32, 1, server, location=str(tmp_path), secure=True)
        with pytest.raises(ValueError, match=NO_KIT):
            download_object("site-1", "0" * 32, 1, server, secure=True, location=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]
