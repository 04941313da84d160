"""StreamContext: the dict that travels with a pushed file, and the keys fedstream adds to it."""

from typing import Any, Optional

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


class StreamContext(dict):
    """Context of one stream: the sender's JSON-compatible keys plus fedstream's own keys."""

    def get_file_name(self) -> Optional[str]:
        """Sanitized base name the sender gave the file."""
        return self.get(KEY_FILE_NAME)

    def get_file_location(self) -> Optional[str]:
        """Full path of the received file, or None if the stream failed (or is still running)."""
        return self.get(KEY_FILE_LOCATION)

    def get_file_size(self) -> Optional[int]:
        """Size of the file in bytes."""
        return self.get(KEY_FILE_SIZE)

    def get_rc(self) -> Optional[ReturnCode]:
        """ReturnCode of the stream on this receiver (None while it is still running)."""
        value: Any = self.get(KEY_RC)
        return ReturnCode(value) if value is not None else None
