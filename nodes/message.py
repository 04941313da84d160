"""The one codec of Cell messages: the meta header, payloads, and replies with headers.

A Cell message on the wire is `[meta, payload?]` after the broker's command frames (see
docs/PROTOCOL.md, "Cell messages"). `encode_meta`/`decode_meta` are the only code that
builds or reads `meta`; `decode_meta` checks the type of every field, so a Cell only ever
sees a well-formed `Meta` or a ProtocolError. `encode_payload` and `Message.payload` are
the only code that turns payloads into frames and back; JSON payloads are bounded by
`MAX_JSON_PAYLOAD` on both sides.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import zmq

from fedstream.common import protocol as proto

# message kinds in the meta header
KIND_REQUEST = "req"
KIND_REPLY = "rep"
KIND_ERROR = "err"
KIND_ONE_WAY = "ff"
KINDS = frozenset((KIND_REQUEST, KIND_REPLY, KIND_ERROR, KIND_ONE_WAY))

# payload types in the meta header
PAYLOAD_NONE = "n"
PAYLOAD_BYTES = "b"
PAYLOAD_JSON = "j"
PAYLOAD_TYPES = frozenset((PAYLOAD_NONE, PAYLOAD_BYTES, PAYLOAD_JSON))

MAX_REQUEST_ID = 2**64 - 1


# The one error convention of replies (push, pull, applications): a failed request is
# answered with headers {"err": <code>, "msg": <sentence>}; a reply without "err" succeeded.
ERR_KEY = "err"
MSG_KEY = "msg"


@dataclass
class Reply:
    """A reply (or one-way message) with JSON `headers` next to its payload.

    A request callback may set `then`: the Cell calls it once the reply was handed to the
    connection (or could not be), on the same thread, for work that must not delay the answer.
    """

    payload: Any = None
    headers: dict = field(default_factory=dict)
    then: Optional[Callable[[], None]] = field(default=None, compare=False, repr=False)

    @classmethod
    def failure(cls, code: str, message: str) -> "Reply":
        """A reply saying the request failed: a short machine code and a sentence for people."""
        return cls(None, {ERR_KEY: code, MSG_KEY: message})


@dataclass
class InPool:
    """What an inline handler returns to finish its answer in the Cell's pool: `work()` makes the reply.

    The inline part records what must happen in arrival order; `work` does what may block
    (read the disk), under the same bound of waiting calls as any pool handler.
    """

    work: Callable[[], Any]


def reply_error(headers: dict) -> Optional[tuple[str, str]]:
    """(code, sentence) of a failed reply's headers, or None if the reply succeeded."""
    code = headers.get(ERR_KEY)
    if code is None:
        return None
    message = headers.get(MSG_KEY)
    return str(code), message if isinstance(message, str) else str(code)


@dataclass
class Meta:
    """The decoded meta header of a Cell message."""

    kind: str
    request_id: int
    channel: str
    topic: str
    ptype: str
    headers: dict = field(default_factory=dict)


def encode_meta(meta: Meta) -> bytes:
    """The meta frame of a message; ValueError if it exceeds the broker's header limit."""
    fields: dict[str, Any] = {"k": meta.kind, "id": meta.request_id, "ch": meta.channel, "tp": meta.topic,
                              "pt": meta.ptype}
    if meta.headers:
        fields["h"] = meta.headers
    try:
        frame = proto.encode_json(fields)
    except (TypeError, ValueError):
        raise ValueError("Message headers must be a JSON object of JSON-compatible values.") from None
    if len(frame) > proto.MAX_HEADER_SIZE:
        raise ValueError(f"Message headers are too large: {len(frame)} bytes encoded, "
                         f"the limit is {proto.MAX_HEADER_SIZE} bytes.")
    return frame


def _field(fields: dict, key: str, kind: type) -> Any:
    value = fields.get(key)
    if type(value) is not kind:
        raise proto.ProtocolError(f"meta field '{key}' must be a {kind.__name__}")
    return value


def decode_meta(frame: "bytes | memoryview") -> Meta:
    """Decode and type-check a meta frame from a peer; raise ProtocolError for anything else."""
    fields = proto.decode_object(frame)
    kind, request_id, channel, topic, ptype = (fields.get("k"), fields.get("id"), fields.get("ch"),
                                               fields.get("tp"), fields.get("pt"))
    headers = fields.get("h", _NO_HEADERS)
    # The common case in one expression (a message each way per request); anything else says what is wrong.
    if type(kind) is str and kind in KINDS and type(request_id) is int and type(channel) is str and channel \
            and type(topic) is str and topic and type(ptype) is str and ptype in PAYLOAD_TYPES \
            and type(headers) is dict and (1 if kind != KIND_ONE_WAY else 0) <= request_id <= MAX_REQUEST_ID:
        return Meta(kind, request_id, channel, topic, ptype, headers if headers is not _NO_HEADERS else {})
    return _refuse_meta(fields)


_NO_HEADERS: dict = {}


def _refuse_meta(fields: dict) -> Meta:
    """Raise the ProtocolError that says what is wrong with the meta `fields`."""
    kind = _field(fields, "k", str)
    if kind not in KINDS:
        raise proto.ProtocolError(f"unknown message kind {kind[:16]!r}")
    request_id = _field(fields, "id", int)
    lowest = 0 if kind == KIND_ONE_WAY else 1
    if not lowest <= request_id <= MAX_REQUEST_ID:
        raise proto.ProtocolError("meta field 'id' is out of range")
    channel, topic = _field(fields, "ch", str), _field(fields, "tp", str)
    if not channel or not topic:
        raise proto.ProtocolError("meta fields 'ch' and 'tp' must not be empty")
    ptype = _field(fields, "pt", str)
    if ptype not in PAYLOAD_TYPES:
        raise proto.ProtocolError(f"unknown payload type {ptype[:16]!r}")
    raise proto.ProtocolError("meta field 'h' must be a dict")  # the one field left that decode_meta checks


def encode_payload(payload: Any) -> tuple[str, list]:
    """Turn a payload into (payload type, frames); ValueError if it is neither bytes nor JSON, or too large."""
    if payload is None:
        return PAYLOAD_NONE, []
    if isinstance(payload, memoryview) and not payload.c_contiguous:  # ZeroMQ sends only one piece of memory
        payload = payload.tobytes()
    if isinstance(payload, (bytes, bytearray, memoryview, zmq.Frame)):
        return PAYLOAD_BYTES, [payload]
    try:
        frame = proto.encode_json(payload)
    except (TypeError, ValueError, RecursionError):
        raise ValueError(
            f"Payload of type {type(payload).__name__} cannot be sent: use bytes or a JSON-compatible value."
        ) from None
    if len(frame) > proto.MAX_JSON_PAYLOAD:
        raise ValueError(f"JSON payload is too large: {len(frame)} bytes encoded, the limit is "
                         f"{proto.MAX_JSON_PAYLOAD} bytes (send large data as bytes).")
    return PAYLOAD_JSON, [frame]


class Message:
    """A message received by a Cell: who sent it, on which channel/topic, headers and payload."""

    __slots__ = ("source", "channel", "topic", "headers", "_ptype", "_frame")

    def __init__(self, source: str, channel: str, topic: str, headers: dict, ptype: str,
                 frame: Optional[zmq.Frame]) -> None:
        self.source = source
        self.channel = channel
        self.topic = topic
        self.headers = headers
        self._ptype = ptype
        self._frame = frame

    @property
    def buffer(self) -> memoryview:
        """The raw payload bytes without a copy (empty when there is no payload)."""
        return self._frame.buffer if self._frame is not None else memoryview(b"")

    @property
    def payload(self) -> Any:
        """The payload decoded as it was sent: bytes, a JSON value, or None."""
        if self._ptype == PAYLOAD_NONE or self._frame is None:
            return None
        if self._ptype == PAYLOAD_JSON:
            return proto.decode_json(self._frame.buffer, limit=proto.MAX_JSON_PAYLOAD)
        return self._frame.bytes

    def __repr__(self) -> str:
        return f"Message(source={self.source!r}, channel={self.channel!r}, topic={self.topic!r})"
