"""A third node that forges pull replies to a recipient: open answers, chunk data, verdicts, errors.

Run as `python -m tests.helpers.pull_forger BROKER NAME VICTIM MAX_ID SIZE CHUNK`. It cannot see
the victim's request ids, so it answers every id from 1 to MAX_ID, over and over: each id gets one
forged reply per sweep, the kind rotating between sweeps (an `open` answer naming another file of
SIZE bytes, CHUNK bytes of its own data, a `done` verdict "ok" with the digest of its own data,
an `unknown_ref` error). Prints `sweep <n>` after each sweep; runs until killed.
"""

import sys
import time

from fedstream.common import digest as digests
from fedstream.nodes.pull import wire
from tests.helpers.pull_rawpeer import RawPeer

_PAUSE = 0.05  # seconds between sweeps, to leave the CPU to the others (the suite must pass on a busy machine)
_FORGED_BYTE = b"E"


def main() -> None:
    broker, name, victim, max_id, size, chunk = sys.argv[1:7]
    max_id, size, chunk = int(max_id), int(size), int(chunk)
    peer = RawPeer(broker, name)
    hasher = digests.new_hasher()
    hasher.update(_FORGED_BYTE * size)
    forged = [
        (wire.TOPIC_OPEN, {"name": "evil.bin", "size": size, "alg": digests.ALGORITHM}, None),
        (wire.TOPIC_CHUNK, {}, _FORGED_BYTE * chunk),
        (wire.TOPIC_DONE, {"ok": True, "digest": hasher.hexdigest(), "alg": digests.ALGORITHM}, None),
        (wire.TOPIC_CHUNK, {"err": wire.ERR_UNKNOWN_REF, "msg": wire.UNKNOWN_REF_MESSAGE}, None),
    ]
    sweep = 0
    while True:
        sweep += 1
        for request_id in range(1, max_id + 1):
            topic, headers, payload = forged[(request_id + sweep) % len(forged)]
            peer.send(victim, "rep", request_id, wire.CHANNEL, topic, headers, payload)
        peer.heartbeat()
        print("sweep", sweep, flush=True)
        time.sleep(_PAUSE)


if __name__ == "__main__":
    main()
