"""A registered node that speaks the broker protocol by hand: the hostile peers of the pull tests.

`RawPeer(broker, name)` registers over a plain DEALER socket, then only sends: it never reads a
reply (its heartbeats keep it registered). Used by pull_flood and pull_forger.
"""

import json

import zmq

from fedstream.common import protocol as proto

_REGISTER_WAIT_MS = 10_000


class RawPeer:
    """A DEALER registered with the broker under `name`; `request`/`reply` send Cell messages by hand."""

    def __init__(self, broker: str, name: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(broker)
        self.socket.send_multipart([proto.REGISTER, name.encode(), proto.encode_json({"v": proto.VERSION})])
        if not self.socket.poll(_REGISTER_WAIT_MS):
            raise SystemExit(f"the broker at {broker} did not answer the registration of '{name}'")
        answer = self.socket.recv_multipart()
        if answer[:2] != [proto.REGISTERED, proto.REG_OK]:
            raise SystemExit(f"the broker refused '{name}': {answer}")

    def heartbeat(self) -> None:
        self.socket.send(proto.HEARTBEAT)

    def send(self, target: str, kind: str, request_id: int, channel: str, topic: str,
             headers: dict, payload: "bytes | None" = None) -> None:
        meta = {"k": kind, "id": request_id, "ch": channel, "tp": topic, "pt": "n" if payload is None else "b"}
        if headers:
            meta["h"] = headers
        frames = [proto.SEND, target.encode(), json.dumps(meta).encode()]
        self.socket.send_multipart(frames + ([payload] if payload is not None else []), copy=False)
