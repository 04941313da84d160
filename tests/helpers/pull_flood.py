"""A peer that floods a pull owner with chunk requests and never reads a reply.

Run as `python -m tests.helpers.pull_flood BROKER NAME OWNER REF SIZE COUNT:LENGTH...`: for each
COUNT:LENGTH, sends COUNT chunk requests of LENGTH bytes at offsets spread over a file of SIZE
bytes, prints `sent <count>`, and then only keeps itself registered until killed.
"""

import sys
import time

from fedstream.nodes.pull import wire
from tests.helpers.pull_rawpeer import RawPeer

_HEARTBEAT = 0.5


def main() -> None:
    broker, name, owner, ref, size = sys.argv[1:6]
    peer = RawPeer(broker, name)
    request_id = 0
    for batch in sys.argv[6:]:
        count, length = (int(part) for part in batch.split(":"))
        for index in range(count):
            request_id += 1
            offset = (index * min(length, wire.MAX_CHUNK_LENGTH)) % int(size)
            peer.send(owner, "req", request_id, wire.CHANNEL, wire.TOPIC_CHUNK,
                      {"ref": ref, "off": offset, "len": length})
        print("sent", count, flush=True)
    while True:
        peer.heartbeat()
        time.sleep(_HEARTBEAT)


if __name__ == "__main__":
    main()
