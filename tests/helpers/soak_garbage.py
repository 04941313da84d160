"""Garbage for the broker flood soak: a pure generator of hostile multipart messages, no sockets.

Each message is one of: random bytes (small frames), a wrong two-byte command (now and then with one
large random frame of up to 1 MiB, the kind libzmq must buffer whole), a SEND whose meta is malformed
JSON (now and then with a large payload), a REGISTER with a malformed hello, or a SEND to a random
FQCN from an unregistered peer.
"""

import os
import random
from typing import Iterator

from fedstream.common import protocol as proto

_BIG = 1 << 20


def garbage_messages(seed: int, count: int) -> Iterator[list[bytes]]:
    """`count` hostile messages for the broker, reproducible from `seed` (their random bytes are not)."""
    rng = random.Random(seed)
    big = os.urandom(_BIG)
    for i in range(count):
        roll = i % 6
        if roll == 0:
            yield [os.urandom(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 6))]
        elif roll == 1:
            yield [os.urandom(2), big[: rng.randrange(1, _BIG)] if i % 48 == 1 else os.urandom(40)]
        elif roll == 2:
            yield [proto.SEND, b"site-1", b'{"k": "req", "id": ' + os.urandom(rng.randrange(0, 200)),
                   big[: rng.randrange(1, _BIG)] if i % 24 == 2 else os.urandom(rng.randrange(0, 8000))]
        elif roll == 3:
            yield [proto.REGISTER, b"g%d" % i, b"{not json" + os.urandom(rng.randrange(0, 64))]
        elif roll == 4:
            yield [proto.SEND, b"[" * rng.randrange(1, 300), b"[" * 200 + os.urandom(rng.randrange(0, 200))]
        else:
            yield [proto.SEND, os.urandom(rng.randrange(1, 40)), b'{"k": 1}', os.urandom(rng.randrange(0, 8000))]
