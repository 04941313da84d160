"""StreamContext: the dict that travels with a pushed file, and the keys fedstream adds to it.

The getters are module functions so that `FileStreamer.get_*` (the seed's face) and the
`StreamContext.get_*` methods are the same code.
"""

from typing import Any, Mapping, Optional

from fedstream.common.rc import ReturnCode

# Keys fedstream sets in a receiver's stream context (next to the sender's own keys).
KEY_FILE_NAME = "__fedstream_file_name__"
KEY_FILE_LOCATION = "__fedstream_file_location__"
KEY_FILE_SIZE = "__fedstream_file_size__"
KEY_RC = "__fedstream_rc__"
KEY_STREAM_ID = "__fedstream_stream_id__"
KEY_SENDER = "__fedstream_sender__"
KEY_CHANNEL = "__fedstream_channel__"
KEY_TOPIC = "__fedstream_topic__"
KEY_REPAIRED_CHUNKS = "__fedstream_repaired_chunks__"
KEY_OBJECT = "__fedstream_object__"  # set by stream_object: the serializer of an object stream
KEY_ALLOW_PICKLE = "__fedstream_allow_pickle__"  # set by the receiver from its registration
KEY_REJECTED_CHUNKS = "__fedstream_rejected_chunks__"  # fan-out chunks that failed authentication
KEY_SECURE = "__fedstream_secure__"  # True if the stream was end-to-end encrypted (secure=True)


def get_file_name(stream_ctx: Mapping[str, Any]) -> Optional[str]:
    """The sender's base name of the file (sanitized)."""
    return stream_ctx.get(KEY_FILE_NAME)


def get_file_location(stream_ctx: Mapping[str, Any]) -> Optional[str]:
    """Full path of the received file, or None if the stream failed (or is still running)."""
    return stream_ctx.get(KEY_FILE_LOCATION)


def get_file_size(stream_ctx: Mapping[str, Any]) -> Optional[int]:
    """Size of the file in bytes."""
    return stream_ctx.get(KEY_FILE_SIZE)


def get_rc(stream_ctx: Mapping[str, Any]) -> Optional[ReturnCode]:
    """ReturnCode of the stream on this receiver (None while it is still running)."""
    value: Any = stream_ctx.get(KEY_RC)
    return ReturnCode(value) if value is not None else None


def is_secure(stream_ctx: Mapping[str, Any]) -> bool:
    """True if the stream was sent with secure=True (its key agreed end to end between certified peers)."""
    return stream_ctx.get(KEY_SECURE) is True


class StreamContext(dict):
    """Context of one stream: the sender's JSON-compatible keys plus fedstream's own keys."""

    get_file_name = get_file_name
    get_file_location = get_file_location
    get_file_size = get_file_size
    get_rc = get_rc
    is_secure = is_secure
