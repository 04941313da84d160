"""What the owner and the recipients of a pull (FileDownloader / download_file) say to each other.

Requests travel on CHANNEL; every request names the RID in its headers ("ref"):

- TOPIC_OPEN  {ref, first?}         -> {name, size, alg, digest?}, and as payload the file's bytes
  [0, first) clipped to its size when the request asked for `first` (at most MAX_CHUNK_LENGTH)
  and the owner had room for them in its budget; otherwise no payload. `digest` (plain downloads
  only) comes when the payload is the whole file and the owner's digest is ready
- TOPIC_CHUNK {ref, off, len}       -> raw bytes [off, off+len) clipped to the file size (empty at EOF)
- TOPIC_DONE  {ref, digest, alg}       -> {ok, digest, alg}; the owner compares the recipient's digest
  with its own and reports the recipient's success (ERR_PENDING while its digest is not ready).
  {ref, gave_up: true} (one-way) reports a recipient that gave up. {ref, digest, alg} one-way:
  the recipient verified the whole file that `open` brought against its digest and kept it.

A secure download (secure=True) adds "e2e" to every request. In its `open` it is the
recipient's offer {cert, salt}; the owner verifies it and answers {e2e: its offer, meta:
sealed {name, size, alg}}. Afterwards "e2e" is the session id (the recipient's salt, base64)
naming the pairwise key both derived (common/e2e.py): `chunk` replies are sealed with
PullSealer (so are the first bytes of `open`, sealed as the chunk at offset 0), `done` carries
{sealed: the digest} and is answered {sealed: {ok, digest}}.

A failed request is answered with `Reply.failure(code, sentence)` from nodes/message.py: headers
{err: <code>, msg: <sentence>} and no payload. A chunk request asks for at most MAX_CHUNK_LENGTH
bytes; an owner refuses requests beyond its budget of reply bytes in flight with ERR_BUSY.
"""

import re
import secrets

CHANNEL = "__fedstream_pull__"
TOPIC_OPEN = "open"
TOPIC_CHUNK = "chunk"
TOPIC_DONE = "done"

# error codes in the "err" reply header
ERR_UNKNOWN_REF = "unknown_ref"  # no live transaction on this owner has that RID
ERR_CHANGED = "changed"  # the source file changed since it was added
ERR_BAD_REQUEST = "bad_request"  # malformed request headers
ERR_IO = "io"  # the owner could not read its file
ERR_PENDING = "pending"  # the owner's digest is not ready yet: ask again
ERR_BUSY = "busy"  # too many reply bytes to this requester are in flight: ask again
ERR_SECURE = "secure"  # a secure request the owner cannot serve (no kit, bad certificate, unknown session)

UNKNOWN_REF_MESSAGE = "unknown or expired reference"

NOTE_META = "pull open"  # labels of the values sealed with e2e.seal_note
NOTE_DIGEST = "pull digest"
NOTE_VERDICT = "pull verdict"

DEFAULT_WINDOW = 8  # chunk requests a recipient keeps in flight
MAX_CHUNK_LENGTH = 8 << 20  # largest chunk request an owner serves (8 MiB)
# Reply bytes a recipient keeps in flight, whatever its window: what waits for it at the broker
# must stay below the broker's per-peer queue bound (16 MiB), or replies are dropped there.
MAX_IN_FLIGHT_BYTES = 12 << 20

_ID_BYTES = 16  # 128 random bits
_REF_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,128}")


def new_id() -> str:
    """A fresh, unguessable id (128 random bits, 32 hex digits)."""
    return secrets.token_hex(_ID_BYTES)


def is_valid_ref(ref: object) -> bool:
    """Tell whether `ref` looks like a RID (and is therefore safe inside a file name)."""
    return isinstance(ref, str) and _REF_PATTERN.fullmatch(ref) is not None

