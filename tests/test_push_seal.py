"""Sealed fan-out: the chunk cipher alone, an eavesdropper on the fan-out, and a tampered chunk re-published."""

import os
import threading
import time

import pytest
import zmq

from fedstream.broker import Broker
from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileStreamer, FLContext
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.push import wire
from fedstream.nodes.push.receiver import ReceiverTuning, set_receiver_tuning
from fedstream.nodes.push.seal import KEY_BYTES, PREFIX_BYTES, TAG_BYTES, Sealer, StreamKey, sealed_length
from fedstream.nodes.push.sender import send_file
from tests.fanout import FanoutTap, shares_a_window
from tests.procs import wait_until
from tests.push_support import CHANNEL, TOPIC, make_file, sha256_of

KIB = 1024
MIB = 1024 * KIB


# -- the cipher -------------------------------------------------------------------------------
def header(seq: int, chunk: int = 100) -> bytes:
    return wire.encode_header(wire.KIND_CHUNK, seq, seq * chunk)


def test_seal_round_trip_and_size():
    sealer = Sealer(StreamKey.new())
    data = os.urandom(100)
    sealed = sealer.seal(7, header(7), memoryview(data))
    assert len(sealed) == sealed_length(100) == 100 + TAG_BYTES
    assert sealer.open(7, header(7), memoryview(sealed)) == data
    assert data not in sealed


def test_every_change_fails_authentication():
    key = StreamKey.new()
    sealer = Sealer(key)
    sealed = sealer.seal(3, header(3), b"x" * 100)
    flipped = bytearray(sealed)
    flipped[10] ^= 0x01
    assert sealer.open(3, header(3), bytes(flipped)) is None  # one bit of the data
    flipped = bytearray(sealed)
    flipped[-1] ^= 0x80
    assert sealer.open(3, header(3), bytes(flipped)) is None  # one bit of the tag
    assert sealer.open(4, header(3), sealed) is None  # another seq (nonce)
    assert sealer.open(3, header(3, chunk=50), sealed) is None  # another header (associated data)
    assert Sealer(StreamKey.new()).open(3, header(3), sealed) is None  # another stream's key
    assert Sealer(StreamKey(key.key, bytes(PREFIX_BYTES))).open(3, header(3), sealed) is None  # another prefix


def test_each_seq_has_its_own_nonce():
    sealer = Sealer(StreamKey.new())
    same = b"\0" * 64
    assert sealer.seal(0, header(0), same)[:64] != sealer.seal(1, header(0), same)[:64]


def test_stream_keys_are_fresh_and_survive_the_wire():
    a, b = StreamKey.new(), StreamKey.new()
    assert a != b and len(a.key) == KEY_BYTES and len(a.prefix) == PREFIX_BYTES
    assert StreamKey.from_wire(a.to_wire()) == a


@pytest.mark.parametrize("bad", [
    None, "key", {}, {"alg": "aes-128-gcm"}, {"alg": "aes-256-gcm", "key": "%%%", "prefix": "AAAAAA=="},
    {"alg": "aes-256-gcm", "key": "AAAA", "prefix": "AAAAAA=="}, {"alg": "aes-256-gcm", "key": 5, "prefix": 5},
])
def test_malformed_stream_keys_are_refused(bad):
    with pytest.raises(ValueError):
        StreamKey.from_wire(bad)


# -- on a federation ----------------------------------------------------------------------------
KNOWN_SID = "eavesdroppedsid0"


@pytest.fixture
def known_stream_id(monkeypatch):
    """Streams of this process get a stream id the eavesdropper knows (the worst case: ids are random)."""
    monkeypatch.setattr(wire, "new_stream_id", lambda: KNOWN_SID)
    return KNOWN_SID.encode()


def test_an_eavesdropper_on_the_fan_out_learns_nothing_of_the_file(tmp_path, known_stream_id):
    src = tmp_path / "secret.bin"
    sha = make_file(str(src), MIB)
    dest = tmp_path / "site-1"
    dest.mkdir()
    done = []
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("server", broker.address) as server, \
            Cell("site-1", broker.address) as site:
        FileStreamer.register_stream_processing(FLContext(site), CHANNEL, TOPIC, dest_dir=str(dest),
                                                stream_done_cb=lambda ctx, fl_ctx: done.append(dict(ctx)))
        tap = FanoutTap(server.context, server.fanout_endpoints[1], known_stream_id)
        everything = FanoutTap(server.context, server.fanout_endpoints[1])
        try:
            time.sleep(0.3)  # let the tap's subscription reach the broker (it is a slow joiner too)
            assert send_file(server, CHANNEL, TOPIC, {}, ["site-1"], str(src), chunk_size=64 * KIB).ok
        finally:
            tap.close()
            everything.close()
        wait_until(lambda: done, 10)
    assert everything.frames == []  # the fan-out never applies a subscription to every stream
    assert sha256_of(FileStreamer.get_file_location(done[0])) == sha
    captured = [frames[2] for frames in tap.chunks()]
    plain = src.read_bytes()
    assert sum(len(c) for c in captured) >= len(plain)  # it saw every chunk go by...
    assert not shares_a_window(plain, captured)  # ...and none of the file in them
    assert shares_a_window(plain, [b"junk" + plain[1000:1100] + b"junk"])  # the check itself finds plaintext


def test_a_tampered_chunk_on_the_fan_out_is_rejected_and_repaired(tmp_path, known_stream_id):
    src = str(tmp_path / "f.bin")
    sha = make_file(src, 2 * MIB)
    dest = tmp_path / "late"
    dest.mkdir()
    done = []
    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("server", broker.address) as server, \
            Cell("late", broker.address) as late:
        # a late subscriber (it joins after the 1 s grace): what it sees first for chunk 0 is the tampered copy
        set_receiver_tuning(late, ReceiverTuning(subscribe_delay=2.0))
        FileStreamer.register_stream_processing(FLContext(late), CHANNEL, TOPIC, dest_dir=str(dest),
                                                stream_done_cb=lambda ctx, fl_ctx: done.append(dict(ctx)))
        xsub_address, xpub_address = server.fanout_endpoints
        tap = FanoutTap(server.context, xpub_address, known_stream_id)
        publisher = server.context.socket(zmq.PUB)
        publisher.linger = 0
        publisher.connect(xsub_address)
        box: dict = {}
        try:
            time.sleep(0.3)
            thread = threading.Thread(target=lambda: box.update(result=send_file(
                server, CHANNEL, TOPIC, {}, ["late"], src, chunk_size=256 * KIB, chunk_timeout=5.0)), daemon=True)
            thread.start()
            first = wait_until(lambda: tap.chunks() and tap.chunks()[0], 10)
            assert wire.decode_header(first[1])[1] == 0
            tampered = bytearray(first[2])
            tampered[100] ^= 0x04  # one bit
            while thread.is_alive():
                publisher.send_multipart([first[0], first[1], bytes(tampered)])
                time.sleep(0.005)
            thread.join(30)
        finally:
            publisher.close(linger=0)
            tap.close()
        wait_until(lambda: done, 10)
    result = box["result"]
    assert (result.rc, result.ok) == (ReturnCode.OK, True), result.error
    ctx = done[0]
    assert FileStreamer.get_rc(ctx) == ReturnCode.OK and sha256_of(FileStreamer.get_file_location(ctx)) == sha
    assert ctx[keys.KEY_REJECTED_CHUNKS] >= 1 and ctx[keys.KEY_REPAIRED_CHUNKS] >= 1
    assert os.listdir(dest) == ["f.bin"]
