"""Multipart send and receive for the hot paths, with plain int flags.

pyzmq's `send_multipart`/`recv_multipart` and its flag constants go through Python enums on every
call (a `SocketOption` lookup per `RCVMORE` query, a new `Flag` per `|` and `&`): about 3 µs per
message each way, a tenth of a small request's cost in a Cell. These helpers do the same with ints.
A receive loop asks `readable` before its next NOBLOCK receive: a `zmq.Again` costs twice as much
(its constructor imports a module each time).
"""

from typing import Sequence

import zmq

POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)
NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
# pyzmq's Socket.send is a Python wrapper that only adds routing_id/group (unused here) to this one,
# and its Socket.get turns the option into an enum first.
_send = zmq.backend.Socket.send
_get = zmq.backend.Socket.get


def send_frames(sock: zmq.Socket, frames: Sequence, flags: int = 0) -> None:
    """Send `frames` as one message without copying (what `send_multipart(frames, flags, copy=False)` does)."""
    last = len(frames) - 1
    for index, frame in enumerate(frames):
        _send(sock, frame, flags | _SNDMORE if index < last else flags, False)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list:
    """Receive one whole message as zmq.Frames (what `recv_multipart(flags, copy=False)` does)."""
    frame = sock.recv(flags, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame)
    return frames


def events(sock: zmq.Socket) -> int:
    """The socket's ZMQ_EVENTS (POLLIN | POLLOUT bits) as a plain int."""
    return _get(sock, _EVENTS)


def readable(sock: zmq.Socket) -> bool:
    """Whether a message waits on `sock` (what a NOBLOCK receive would find), without raising zmq.Again."""
    return bool(_get(sock, _EVENTS) & POLLIN)
