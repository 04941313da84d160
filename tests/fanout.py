"""What an eavesdropper on the broker's fan-out sees: a raw SUB socket, and a check for plaintext."""

import threading
from typing import Callable, Optional

import zmq

from fedstream.nodes.push import wire


class FanoutTap:
    """A SUB on the broker's fan-out XPUB, never registered, subscribed to `topic` (default: everything).

    `secure_socket` (e.g. an insider cell's `Cell.secure_socket`) gives it a CURVE key first.
    """

    def __init__(self, context: zmq.Context, address: str, topic: bytes = b"",
                 secure_socket: Optional[Callable[[zmq.Socket], zmq.Socket]] = None) -> None:
        self.frames: list[list[bytes]] = []
        self.sock = context.socket(zmq.SUB)
        if secure_socket is not None:
            secure_socket(self.sock)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SUBSCRIBE, topic)
        self.sock.connect(address)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(20):
                self.frames.append(self.sock.recv_multipart())

    def chunks(self) -> list[list[bytes]]:
        """The captured push chunks (3 frames: stream id, header, payload)."""
        return [f for f in self.frames if len(f) == 3 and wire.decode_header(f[1]) is not None
                and wire.decode_header(f[1])[0] == wire.KIND_CHUNK]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close(linger=0)


def shares_a_window(file_bytes: bytes, captured: list, window: int = 64) -> bool:
    """Whether any `window`-byte run of the file appears in the captured data.

    Any such run contains a whole block of window/2 bytes aligned in the file, so it is enough
    to look for those blocks at every offset of the captured data.
    """
    half = window // 2
    blocks = {file_bytes[i:i + half] for i in range(0, len(file_bytes) - half + 1, half)}
    return any(bytes(data[i:i + half]) in blocks for data in captured for i in range(len(data) - half + 1))
