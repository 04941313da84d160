"""Push (the seed's `FileStreamer`): the owner streams a file to registered recipients in lockstep.

`sender` drives a stream, `receiver` accepts them, `wire` is what they say to each other
(docs/PROTOCOL.md), `stream_context` names the keys of a receiver's `stream_ctx`.
"""

from fedstream.nodes.push.stream_context import StreamContext
from fedstream.nodes.push.streamer import FileStreamer

__all__ = ["FileStreamer", "StreamContext"]
