"""Messages as a Cell hands them to callbacks, and replies with headers."""

from dataclasses import dataclass, field
from typing import Any, Optional

import zmq

from fedstream.common import protocol as proto

# payload types in the meta header
PAYLOAD_NONE = "n"
PAYLOAD_BYTES = "b"
PAYLOAD_JSON = "j"


# The one error convention of replies (push, pull, applications): a failed request is
# answered with headers {"err": <code>, "msg": <sentence>}; a reply without "err" succeeded.
ERR_KEY = "err"
MSG_KEY = "msg"


@dataclass
class Reply:
    """A reply (or one-way message) with JSON `headers` next to its payload."""

    payload: Any = None
    headers: dict = field(default_factory=dict)

    @classmethod
    def failure(cls, code: str, message: str) -> "Reply":
        """A reply saying the request failed: a short machine code and a sentence for people."""
        return cls(None, {ERR_KEY: code, MSG_KEY: message})


def reply_error(headers: dict) -> Optional[tuple[str, str]]:
    """(code, sentence) of a failed reply's headers, or None if the reply succeeded."""
    code = headers.get(ERR_KEY)
    if code is None:
        return None
    message = headers.get(MSG_KEY)
    return str(code), message if isinstance(message, str) else str(code)


def encode_payload(payload: Any) -> tuple[str, list]:
    """Turn a payload into (payload type, frames); raise ValueError if it is neither bytes nor JSON."""
    if payload is None:
        return PAYLOAD_NONE, []
    if isinstance(payload, (bytes, bytearray, memoryview, zmq.Frame)):
        return PAYLOAD_BYTES, [payload]
    try:
        return PAYLOAD_JSON, [proto.encode_json(payload)]
    except (TypeError, ValueError):
        raise ValueError(
            f"Payload of type {type(payload).__name__} cannot be sent: use bytes or a JSON-compatible value."
        ) from None


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
            return proto.decode_json(self._frame.buffer, limit=proto.MAX_MESSAGE_SIZE)
        return self._frame.bytes

    def __repr__(self) -> str:
        return f"Message(source={self.source!r}, channel={self.channel!r}, topic={self.topic!r})"
