"""Hostile frames for the fuzz tests: random bytes and crafted variants of every command,
meta field and header of docs/PROTOCOL.md. Pure functions of a random.Random; no sockets.
"""

import json
import os
import random
from typing import Any, Iterator

from fedstream.common import protocol as proto

DEEP = b"[" * 5000 + b"]" * 5000
DEEP_OBJECT = b'{"a":' * 5000 + b"0" + b"}" * 5000
HUGE_INT = b"9" * 5000
NOT_UTF8 = b'{"k": "\xff\xfe"}'

# Values of the wrong type (or out of range) for any field.
WRONG = [None, True, False, -1, 0, 2**64, 10**60, 1.5, -0.0, "", "x", "\u0000", "z" * 2000, [], {}, [1, 2],
         {"a": {"b": None}}, [[[[[[[[]]]]]]]]]


def raw_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def hostile_json(rng: random.Random) -> bytes:
    """Bytes that look like JSON to a parser and are not what it wants."""
    choice = rng.randrange(10)
    if choice == 0:
        return DEEP
    if choice == 1:
        return DEEP_OBJECT
    if choice == 2:
        return b'{"id": ' + HUGE_INT + b"}"
    if choice == 3:
        return NOT_UTF8
    if choice == 4:
        return os.urandom(rng.randrange(0, 64))
    if choice == 5:
        return b'{"h": "\\ud800", "k": "req"}'
    if choice == 6:
        return b"[" * rng.randrange(60, 200)
    if choice == 7:
        return b"NaN"
    if choice == 8:
        return raw_json(rng.choice(WRONG))
    return b'{"k": "req", "id": 1e999}'


# Every meta field and a valid base; every Cell-level header of push and pull.
BASE_META = {"k": "req", "id": 1, "ch": "test", "tp": "t", "pt": "n"}

PUSH_CONTROL = "__fedstream_push__"
PULL_CHANNEL = "__fedstream_pull__"
PUSH_HEADERS = {
    "event": {"sid": "A" * 16, "ev": "ack", "n": 1, "error": "e"},
    "repair": {"sid": "A" * 16, "ack": 0, "missing": [1, 2], "from": 0},
    "verify": {"sid": "A" * 16, "algo": "xxh3_128", "digest": "00"},
    "commit": {"sid": "A" * 16},
    "abort": {"sid": "A" * 16, "reason": "r"},
}
PULL_HEADERS = {
    "open": {"ref": "0" * 32},
    "chunk": {"ref": "0" * 32, "off": 0, "len": 1024},
    "done": {"ref": "0" * 32, "digest": "00", "alg": "xxh3_128", "gave_up": True},
}
PUSH_START = {"v": 1, "sid": "A" * 16, "name": "x.bin", "size": 10, "chunk_size": 1024, "count": 1, "window": 2,
              "chunk_timeout": 1.0, "ctx": {}, "algo": "xxh3_128"}
# start fields whose wrong values are all refused (so the fuzzer opens no stream)
PUSH_START_CHECKED = ["v", "sid", "size", "chunk_size", "count", "window", "chunk_timeout", "algo"]


def mutate(base: dict, rng: random.Random) -> dict:
    """`base` with one field set to a wrong value, or deleted, or an extra field."""
    out = dict(base)
    key = rng.choice(sorted(base))
    roll = rng.random()
    if roll < 0.1:
        del out[key]
    elif roll < 0.15:
        out["extra"] = rng.choice(WRONG)
    else:
        out[key] = rng.choice(WRONG)
    return out


def cell_message(rng: random.Random, real_ref: str) -> tuple[bytes, "bytes | None"]:
    """(meta, payload) of one hostile Cell message."""
    roll = rng.randrange(8)
    if roll == 0:  # a meta with one field wrong
        return proto.encode_json(mutate(BASE_META, rng)), None
    if roll == 1:  # a hostile meta
        return hostile_json(rng), None
    if roll == 2:  # push control with one header wrong
        topic = rng.choice(sorted(PUSH_HEADERS))
        meta = dict(BASE_META, ch=PUSH_CONTROL, tp=topic, h=mutate(PUSH_HEADERS[topic], rng),
                    k=rng.choice(["req", "ff"]))
        return proto.encode_json(meta), None
    if roll == 3:  # pull request with one header wrong (the real RID, so the owner looks deeper)
        topic = rng.choice(["open", "chunk"])
        headers = dict(PULL_HEADERS[topic], ref=real_ref)
        meta = dict(BASE_META, ch=PULL_CHANNEL, tp=topic, h=mutate(headers, rng))
        return proto.encode_json(meta), None
    if roll == 4:  # pull done with wrong headers (a random RID: the real transaction is left alone)
        meta = dict(BASE_META, ch=PULL_CHANNEL, tp="done", h=mutate(PULL_HEADERS["done"], rng))
        return proto.encode_json(meta), None
    if roll == 5:  # push start with one checked field wrong, or a hostile JSON payload
        payload = dict(PUSH_START)
        payload[rng.choice(PUSH_START_CHECKED)] = rng.choice([w for w in WRONG if w not in (0, 1.5)] + ["bad"])
        body = proto.encode_json(payload) if rng.random() < 0.7 else hostile_json(rng)
        meta = dict(BASE_META, ch="fedstream", tp="file", pt="j")
        return proto.encode_json(meta), body
    if roll == 6:  # announcement with a wrong payload
        body = raw_json({"kind": rng.choice(WRONG), "files": rng.choice(WRONG)})
        meta = dict(BASE_META, ch="fedstream", tp="announce", pt="j")
        return proto.encode_json(meta), body
    # a forged reply or error to a request the target never made
    meta = dict(BASE_META, k=rng.choice(["rep", "err"]), id=rng.randrange(1, 2**64), pt="j")
    return proto.encode_json(meta), hostile_json(rng)


def broker_frames(rng: random.Random) -> list[bytes]:
    """One hostile message for the broker itself (after the DEALER's identity)."""
    roll = rng.randrange(9)
    if roll == 0:
        return [os.urandom(rng.randrange(0, 8)) for _ in range(rng.randrange(1, 6))]
    if roll == 1:
        return [proto.REGISTER, rng.choice([b"", b"x" * 300, b"bad name", b"\xff", b"site-1", b"owner"]),
                hostile_json(rng)]
    if roll == 2:
        return [proto.REGISTER, b"fuzz-x", raw_json(mutate({"v": 1}, rng)), b"extra"][: rng.randrange(1, 5)]
    if roll == 3:
        return [proto.SEND, rng.choice([b"", b"\xff" * 10, b"x" * 1000, b"site-1"])]
    if roll == 4:
        return [proto.SEND, b"site-1", hostile_json(rng), b"p", b"extra", b"frames"]
    if roll == 5:
        return [rng.choice([proto.HEARTBEAT, proto.BYE]), os.urandom(4)]
    if roll == 6:
        return [bytes([rng.randrange(256)]) + bytes([rng.randrange(256)]), b"x"]
    if roll == 7:
        return [proto.SEND, b"nobody", b"{" + b" " * (proto.MAX_HEADER_SIZE + 10) + b"}"]
    return [proto.SEND, b"site-1", b"{}", b""]


def fuzz_messages(seed: int, count: int, targets: list[str], real_ref: str) -> Iterator[list[bytes]]:
    """`count` hostile messages: two thirds Cell messages to `targets`, one third for the broker."""
    rng = random.Random(seed)
    for _ in range(count):
        if rng.random() < 0.33:
            yield broker_frames(rng)
            continue
        meta, payload = cell_message(rng, real_ref)
        frames = [proto.SEND, rng.choice(targets).encode(), meta]
        if payload is not None:
            frames.append(payload)
        yield frames
