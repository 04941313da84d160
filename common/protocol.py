"""The wire format between nodes and the broker (see docs/PROTOCOL.md).

Every message on the ROUTER path starts with a 2-byte command frame: the protocol version
followed by one ASCII operation letter. Headers are JSON; payload frames are raw bytes and
the broker never looks at them. Nothing here is ever unpickled.

Every JSON header from a peer is decoded by `decode_json`/`decode_object`, which bound the
size, nesting depth and integer length (see `common/safejson.py`) and raise only
ProtocolError: a receive loop that catches it survives any bytes.
"""

import json
from typing import Any

from fedstream.common import safejson

VERSION = 1

# node -> broker
REGISTER = bytes([VERSION]) + b"R"  # [cmd, fqcn, hello-json]
HEARTBEAT = bytes([VERSION]) + b"H"  # [cmd]
SEND = bytes([VERSION]) + b"M"  # [cmd, destination fqcn, meta-json, payload...]
BYE = bytes([VERSION]) + b"B"  # [cmd]

# broker -> node
REGISTERED = bytes([VERSION]) + b"r"  # [cmd, b"ok", info-json] or [cmd, b"err", reason]
HEARTBEAT_ACK = bytes([VERSION]) + b"h"  # [cmd]
DELIVER = bytes([VERSION]) + b"M"  # [cmd, source fqcn, meta-json, payload...]
UNDELIVERABLE = bytes([VERSION]) + b"U"  # [cmd, destination fqcn, meta-json, reason]
NOT_REGISTERED = bytes([VERSION]) + b"N"  # [cmd]

REG_OK = b"ok"
REG_ERR = b"err"

# Largest message the broker or a Cell accepts from a peer.
MAX_MESSAGE_SIZE = 80 * 1024 * 1024
# Largest header frame (FQCN, hello, meta): the broker answers a larger one with a short
# error and never echoes it; a Cell refuses to send one.
MAX_HEADER_SIZE = 64 * 1024
# Largest hello frame of a registration (the broker decodes it on its routing thread).
MAX_HELLO_SIZE = 4 * 1024
# Largest JSON payload of a Cell message (bytes payloads may use the whole message size):
# decoding is the costly part, so it is bounded well below MAX_MESSAGE_SIZE.
MAX_JSON_PAYLOAD = 1024 * 1024
# Nesting depth and integer length allowed in any JSON from a peer.
MAX_JSON_DEPTH = 64
MAX_JSON_INT_DIGITS = 64

# Push data path: fixed-length stream ids are the PUB/SUB topics.
STREAM_ID_LENGTH = 16


class ProtocolError(ValueError):
    """A frame that does not follow the wire format."""


_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)  # json.dumps would build one per call


def encode_json(value: Any) -> bytes:
    """Encode a header as compact UTF-8 JSON."""
    return _ENCODER.encode(value).encode()


def decode_json(data: "bytes | memoryview", limit: int = MAX_HEADER_SIZE) -> Any:
    """Decode JSON from a peer; raise ProtocolError (and nothing else) unless it is within the limits."""
    try:
        return safejson.decode(data, limit, MAX_JSON_DEPTH, MAX_JSON_INT_DIGITS)
    except safejson.JsonLimitError as exc:
        raise ProtocolError(f"bad JSON header: {exc}") from None
    except Exception as exc:  # defensive: no input may raise anything but ProtocolError
        raise ProtocolError(f"bad JSON header: {type(exc).__name__}") from None


def decode_object(data: "bytes | memoryview", limit: int = MAX_HEADER_SIZE) -> dict:
    """Decode a JSON header that must be an object."""
    value = decode_json(data, limit)
    if not isinstance(value, dict):
        raise ProtocolError("header is not a JSON object")
    return value


def is_json_compatible(value: Any) -> bool:
    """Tell whether `value` survives a JSON round trip."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
