"""Raw ZeroMQ clients of a secure broker for the tests: CURVE or not, registering by hand.

These speak the wire protocol directly (common/protocol.py) so a test can send what a
well-behaved Cell never would: a tampered certificate, a certificate of another key, a
message without registering, or a plain connection to a CURVE port.
"""

from typing import Optional

import zmq

from fedstream.common import protocol as proto
from fedstream.common.kits import Kit


def raw_socket(ctx: zmq.Context, kind: int, address: str, kit: Optional[Kit] = None,
               keys: Optional[tuple[bytes, bytes]] = None) -> zmq.Socket:
    """A socket connected to `address`: plain, a CURVE client with a kit's keys, or with (public, secret)."""
    sock = ctx.socket(kind)
    sock.linger = 0
    if kit is not None:
        for option, value in kit.client_options().items():
            sock.setsockopt(option, value)
    if keys is not None:
        assert kit is not None, "the broker's public key comes from a kit"
        sock.curve_publickey, sock.curve_secretkey = keys
    sock.connect(address)
    return sock


def register(sock: zmq.Socket, name: str, certificate: Optional[bytes], timeout: float = 10.0) -> tuple[bytes, str]:
    """Send REGISTER on a DEALER; return (b"ok" or b"err", the reason or info); fail if unanswered."""
    hello: dict = {"v": proto.VERSION}
    if certificate is not None:
        hello["cert"] = certificate.decode("latin-1")
    sock.send_multipart([proto.REGISTER, name.encode(), proto.encode_json(hello)])
    if not sock.poll(int(timeout * 1000)):
        raise AssertionError(f"the broker did not answer REGISTER of '{name}' within {timeout} s")
    frames = sock.recv_multipart()
    assert frames[0] == proto.REGISTERED, frames
    return frames[1], frames[2].decode("utf-8", "replace")


def receives_anything(sock: zmq.Socket, seconds: float) -> bool:
    """True if anything at all arrives on `sock` within `seconds`."""
    return bool(sock.poll(int(seconds * 1000)))
