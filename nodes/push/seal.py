"""Sealing of push chunks on the shared fan-out: AES-256-GCM with a fresh key per stream.

Every subscriber of the broker's fan-out can receive every message on it, so the owner of
a stream seals each chunk it publishes there:

1. the owner draws a random 256-bit key and a random 4-byte nonce prefix per stream
   (`StreamKey.new()`) and gives both to each target inside its "start" request, which
   travels over the ROUTER path and reaches that target only;
2. chunk `seq` is sealed with nonce = prefix (4 bytes) + seq (8 bytes, big-endian) and the
   fan-out header frame (version, kind, seq, offset) as associated data. Each seq is
   published once per stream, so a nonce is never used twice under one key. Chunks repaired
   by unicast travel over the ROUTER path, which reaches the target only; they are not sealed
   in a plain stream, and sealed in a secure one (`secure=True`, where the broker is not
   trusted either) with nonce = prefix + (REPAIR_BIT | n), n counting the owner's repair
   seals: a file that changed under the owner can then never make it seal two different
   plaintexts under one nonce. The whole-file digest of a secure stream is sealed once, under
   the last nonce of that space (DIGEST_SEQ);
3. a receiver opens each chunk before writing it; one that fails authentication (altered,
   forged, or moved to another seq/offset) is dropped and counted, and arrives later by repair.

Ciphertexts are the plaintext plus a 16-byte tag. Crypto comes from `cryptography`.
"""

import base64
import secrets
import struct
from dataclasses import dataclass
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ALGORITHM = "aes-256-gcm"
KEY_BYTES = 32
PREFIX_BYTES = 4
TAG_BYTES = 16
_SEQ = struct.Struct("!Q")
REPAIR_BIT = 1 << 63  # chunk seqs stay far below it
DIGEST_SEQ = (1 << 64) - 1  # above any repair counter
_DIGEST_AD = b"fedstream push digest"


@dataclass(frozen=True)
class StreamKey:
    """The secret of one stream: key and nonce prefix."""

    key: bytes
    prefix: bytes

    @classmethod
    def new(cls) -> "StreamKey":
        """A fresh random key and nonce prefix."""
        return cls(secrets.token_bytes(KEY_BYTES), secrets.token_bytes(PREFIX_BYTES))

    def to_bytes(self) -> bytes:
        """Key and prefix as one string of bytes (what a secure stream wraps for each target)."""
        return self.key + self.prefix

    @classmethod
    def from_bytes(cls, raw: bytes) -> "StreamKey":
        """The inverse of to_bytes; ValueError for the wrong length."""
        if len(raw) != KEY_BYTES + PREFIX_BYTES:
            raise ValueError("the stream key has the wrong length")
        return cls(raw[:KEY_BYTES], raw[KEY_BYTES:])

    def to_wire(self) -> dict:
        """The JSON form sent in a "start" request."""
        return {"alg": ALGORITHM, "key": base64.b64encode(self.key).decode(),
                "prefix": base64.b64encode(self.prefix).decode()}

    @classmethod
    def from_wire(cls, value: object) -> "StreamKey":
        """Parse the JSON form; raise ValueError if it is not a well-formed key of ours."""
        if not isinstance(value, dict) or value.get("alg") != ALGORITHM:
            raise ValueError(f"the stream key is missing or not {ALGORITHM}")
        try:
            key = base64.b64decode(value["key"], validate=True)
            prefix = base64.b64decode(value["prefix"], validate=True)
        except (KeyError, TypeError, ValueError):
            raise ValueError("the stream key is malformed") from None
        if len(key) != KEY_BYTES or len(prefix) != PREFIX_BYTES:
            raise ValueError("the stream key has the wrong length")
        return cls(key, prefix)


class Sealer:
    """Seals and opens the chunks of one stream."""

    def __init__(self, stream_key: StreamKey) -> None:
        self._aead = AESGCM(stream_key.key)
        self._prefix = stream_key.prefix

    def _nonce(self, seq: int) -> bytes:
        return self._prefix + _SEQ.pack(seq)

    def seal(self, seq: int, header: bytes, data: "bytes | memoryview") -> bytes:
        """Ciphertext and tag of chunk `seq`, bound to its header frame."""
        return self._aead.encrypt(self._nonce(seq), data, header)

    def open(self, seq: int, header: "bytes | memoryview", sealed: "bytes | memoryview") -> Optional[bytes]:
        """The plaintext of a sealed chunk, or None if it fails authentication."""
        try:
            return self._aead.decrypt(self._nonce(seq), sealed, bytes(header))
        except InvalidTag:
            return None

    def seal_repair(self, n: int, header: bytes, data: "bytes | memoryview") -> bytes:
        """Chunk data sent again by repair, as the owner's n-th repair seal (n unique per stream)."""
        return self._aead.encrypt(self._nonce(REPAIR_BIT | n), data, header)

    def open_repair(self, n: int, header: bytes, sealed: "bytes | memoryview") -> Optional[bytes]:
        """The plaintext of a repaired chunk, or None if it fails authentication."""
        if not 0 <= n < REPAIR_BIT - 1:
            return None
        try:
            return self._aead.decrypt(self._nonce(REPAIR_BIT | n), sealed, header)
        except InvalidTag:
            return None

    def seal_digest(self, digest: str) -> bytes:
        """The stream's whole-file digest, sealed (done once per stream)."""
        return self._aead.encrypt(self._nonce(DIGEST_SEQ), digest.encode("ascii"), _DIGEST_AD)

    def open_digest(self, sealed: bytes) -> Optional[str]:
        """The digest sealed by seal_digest, or None if it fails authentication."""
        try:
            return self._aead.decrypt(self._nonce(DIGEST_SEQ), sealed, _DIGEST_AD).decode("ascii")
        except (InvalidTag, UnicodeDecodeError):
            return None


def sealed_length(length: int) -> int:
    """Size on the fan-out of a chunk of `length` bytes."""
    return length + TAG_BYTES
