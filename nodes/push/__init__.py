"""Push (the seed's `FileStreamer`): the owner streams a file to registered recipients in lockstep.

`sender` drives a stream and `receiver` accepts them (the I/O); `window` (owner) and
`assembly` (receiver) make the protocol decisions without sockets; `seal` seals chunks on
the fan-out; `wire` is what the sides say to each other (docs/PROTOCOL.md); `service` is
the per-cell PushService both sides live in; `stream_context` names the keys of a
receiver's `stream_ctx`.
"""

from fedstream.nodes.push.stream_context import StreamContext
from fedstream.nodes.push.streamer import FileStreamer

__all__ = ["FileStreamer", "StreamContext"]
