"""Socket-free: the bounded JSON decoder, the Cell message codec, the broker's byte accounting
and the per-peer log rate limit."""

import json
import os
import random

import pytest

from fedstream.broker.outflow import OutFlow
from fedstream.common import protocol as proto
from fedstream.common.peerlog import PeerErrors
from fedstream.common.safejson import nests_deeper_than
from fedstream.nodes import message as msg

MiB = 1 << 20


@pytest.mark.parametrize("data", [
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b"[" * 200_000,
    b"1" * 5000,
    b'{"id": ' + b"9" * 5000 + b"}",
    b"-" + b"7" * 65,
    b"1" + b"0" * 500 + b".5",
    b"1e999999",
    b"NaN", b"[Infinity]", b"-Infinity",
    b"\xff\xfe{}", b'{"a": "\xc3"}', b"\xed\xa0\x80",
    b'"\\ud800"', b'{"\\udfff": 1}', b'["\\ud83d x"]',
    b"", b"{", b'{"a"}', b"[1,]", b"\x00", b'"\\', b'"' + b'\\"' * 20000,
    b" " * (64 * 1024 + 1),
])
def test_hostile_json_raises_only_protocol_error(data):
    with pytest.raises(proto.ProtocolError):
        proto.decode_json(data)


def test_limits_are_inclusive_and_values_survive():
    deep = "[" * proto.MAX_JSON_DEPTH + "]" * proto.MAX_JSON_DEPTH
    assert proto.decode_json(deep.encode()) is not None
    big = int("9" * proto.MAX_JSON_INT_DIGITS)
    assert proto.decode_json(str(-big).encode()) == -big
    value = {"s": "br[ac{kets\" in \\ strings" * 100, "emoji": "\U0001F600", "f": 1.5e300, "n": None}
    assert proto.decode_json(json.dumps(value).encode()) == value
    assert proto.decode_json(json.dumps(value, ensure_ascii=False).encode()) == value
    exact = b" " * (proto.MAX_HEADER_SIZE - 2) + b"{}"
    assert proto.decode_object(exact) == {}
    assert proto.decode_object(memoryview(b'{"a": [1, 2]}')) == {"a": [1, 2]}


def test_brackets_inside_strings_do_not_count_as_depth():
    text = json.dumps({"x": "[" * 10_000, "y": "{\\\"[" * 1000})
    assert not nests_deeper_than(text, 4)
    assert nests_deeper_than("[" * 5 + "]" * 5, 4)


def test_decode_object_refuses_other_types():
    for data in (b"[]", b"1", b'"x"', b"null", b"true"):
        with pytest.raises(proto.ProtocolError, match="not a JSON object"):
            proto.decode_object(data)


def test_random_bytes_never_raise_anything_else():
    rng = random.Random(16)
    alphabet = b'[]{}",:\\0123456789.eE-+tfnul \xff\x00'
    for _ in range(3000):
        size = rng.randrange(0, 200)
        data = bytes(rng.choice(alphabet) for _ in range(size)) if rng.random() < 0.8 else os.urandom(size)
        try:
            proto.decode_json(data)
        except proto.ProtocolError:
            pass


# -- the Cell message codec ---------------------------------------------------------------

def test_meta_round_trip():
    frame = msg.encode_meta(msg.Meta(msg.KIND_REQUEST, 2**63 + 5, "ch", "tp", msg.PAYLOAD_JSON, {"a": [1]}))
    meta = msg.decode_meta(frame)
    assert (meta.kind, meta.request_id, meta.channel, meta.topic, meta.ptype, meta.headers) == (
        "req", 2**63 + 5, "ch", "tp", "j", {"a": [1]})
    assert msg.decode_meta(msg.encode_meta(msg.Meta(msg.KIND_ONE_WAY, 0, "c", "t", msg.PAYLOAD_NONE))).headers == {}


VALID_META = {"k": "req", "id": 7, "ch": "c", "tp": "t", "pt": "n", "h": {}}
WRONG_VALUES = [None, True, -1, 2**64, 1.5, "x", "", [], {}, [1], {"a": 1}, "z" * 300]


@pytest.mark.parametrize("key", sorted(VALID_META))
def test_every_meta_field_with_every_wrong_type_is_a_protocol_error(key):
    refused = 0
    for wrong in WRONG_VALUES:
        meta = dict(VALID_META, **{key: wrong})
        try:
            decoded = msg.decode_meta(proto.encode_json(meta))
        except proto.ProtocolError:
            refused += 1
            continue
        # whatever is accepted is well-typed
        assert decoded.kind in msg.KINDS and isinstance(decoded.request_id, int)
        assert isinstance(decoded.channel, str) and isinstance(decoded.topic, str)
        assert decoded.ptype in msg.PAYLOAD_TYPES and isinstance(decoded.headers, dict)
    assert refused >= len(WRONG_VALUES) - 3
    missing = dict(VALID_META)
    del missing[key]
    if key != "h":
        with pytest.raises(proto.ProtocolError):
            msg.decode_meta(proto.encode_json(missing))


def test_oversize_json_payload_is_refused_when_sending():
    with pytest.raises(ValueError, match="too large"):
        msg.encode_payload(["x" * 1000] * 2000)
    assert msg.encode_payload(b"x" * (2 * proto.MAX_JSON_PAYLOAD))[0] == msg.PAYLOAD_BYTES


def test_a_strided_memoryview_payload_goes_as_its_bytes():
    """ZeroMQ sends one piece of memory: a view with gaps would fail after the first frames went out."""
    ptype, frames = msg.encode_payload(memoryview(b"abcdef")[::2])
    assert ptype == msg.PAYLOAD_BYTES and bytes(frames[0]) == b"ace"
    view = memoryview(b"abcdef")
    assert msg.encode_payload(view)[1][0] is view  # a contiguous view goes as it is, without a copy


# -- the broker's byte accounting and the log rate limit ----------------------------------

class FakeTracker:
    def __init__(self):
        self.done = False


def test_outflow_bounds_bytes_per_peer_and_always_lets_one_message_through():
    flow = OutFlow(peer_limit=10 * MiB)
    assert flow.admit(b"a", 64 * MiB)  # nothing in flight: one message of any size
    first = FakeTracker()
    flow.sent(b"a", 64 * MiB, first, 0.0)
    assert not flow.admit(b"a", 1)
    assert flow.admit(b"b", MiB)  # other peers are not affected
    first.done = True
    trackers = []
    for _ in range(10):
        assert flow.admit(b"a", MiB)
        trackers.append(FakeTracker())
        flow.sent(b"a", MiB, trackers[-1], 1.0)
    assert flow.in_flight(b"a") == 10 * MiB and not flow.admit(b"a", 1)
    trackers[0].done = True
    assert flow.admit(b"a", MiB) and not flow.admit(b"a", MiB + 1)
    assert flow.sweep(now=10.0, limit=15.0) == [] and flow.sweep(now=16.5, limit=15.0) == [b"a"]
    for tracker in trackers:
        tracker.done = True
    assert flow.sweep(now=17.0, limit=15.0) == []
    assert len(flow) == 0 and flow.in_flight(b"a") == 0


def test_outflow_counts_untracked_messages_until_a_later_tracked_one_is_written():
    flow = OutFlow(peer_limit=10 * MiB, untracked_limit=MiB, untracked_age=1.0)
    medium = 32 * 1024
    assert not flow.needs_tracker(b"a", MiB, 0.0) and flow.needs_tracker(b"a", MiB + 1, 0.0)
    for _ in range(MiB // medium):
        flow.sent(b"a", medium, None, 0.0)
    assert flow.in_flight(b"a") == MiB and flow.needs_tracker(b"a", medium, 0.5)  # the limit is reached: track
    assert flow.admit(b"a", 64 * MiB)  # nothing tracked in flight: one message of any size, as before
    tracker = FakeTracker()
    flow.sent(b"a", medium, tracker, 0.5)
    assert flow.in_flight(b"a") == MiB + medium and not flow.needs_tracker(b"a", medium, 0.5)
    flow.sent(b"a", medium, None, 0.5)  # after the tracked one: counted until the next tracked one is written
    assert not flow.admit(b"a", 9 * MiB) and flow.admit(b"a", 8 * MiB)
    tracker.done = True
    assert flow.in_flight(b"a") == medium and flow.admit(b"a", 64 * MiB)
    assert flow.sweep(now=100.0, limit=15.0) == [] and flow.in_flight(b"a") == medium  # never forgotten by time
    flow.retain({b"b"})  # the peer left
    assert flow.in_flight(b"a") == 0 and len(flow) == 0


def test_outflow_tracks_sparse_messages_to_a_peer_that_never_reads():
    flow = OutFlow(peer_limit=16 * MiB, untracked_limit=MiB, untracked_age=1.0)
    trackers = []
    now = 0.0
    for _ in range(100):  # one 64 KiB message every 16 s: never near the byte limit
        if flow.needs_tracker(b"a", 64 * 1024, now):
            trackers.append(FakeTracker())
            flow.sent(b"a", 64 * 1024, trackers[-1], now)
        else:
            flow.sent(b"a", 64 * 1024, None, now)
        if flow.sweep(now, limit=15.0):
            break
        now += 16.0
    assert trackers and flow.sweep(now, limit=15.0) == [b"a"]  # found stuck, so the broker drops it
    assert flow.in_flight(b"a") <= 3 * 64 * 1024


def test_peer_errors_log_once_per_peer_per_interval():
    errors = PeerErrors(interval=60, max_peers=2)
    assert errors.record("a", 0.0) and not errors.record("a", 1.0) and errors.record("b", 1.0)
    assert not errors.record("c", 2.0)  # too many peers remembered: counted, not logged
    assert errors.record("a", 61.0) and errors.record("c", 62.0)
    assert errors.total == 6


def test_hello_frames_have_their_own_small_limit():
    hello = proto.encode_json({"v": 1, "pad": "x" * proto.MAX_HELLO_SIZE})
    assert proto.decode_object(hello)["v"] == 1
    with pytest.raises(proto.ProtocolError, match="limit"):
        proto.decode_object(hello, limit=proto.MAX_HELLO_SIZE)
