"""End-to-end keys between two certified parties (`secure=True`): the broker sees only ciphertext.

The flow, the same for push and pull:

1. Each party holds its kit: a CURVE key pair (Curve25519, the same curve X25519 uses) and
   the project root's public key. During the transfer's first exchange each side sends its
   certificate (`kit.certificate_bytes`) and a fresh random salt.
2. `verify_peer` checks the peer's certificate against the project root of one's own kit and
   that it names the broker-stamped source of the message it came in: a broker that swaps
   certificates or names is caught here, since it cannot sign for the root.
3. `pairwise_key` runs X25519 between one's own CURVE secret key and the certified CURVE
   public key of the peer, then HKDF-SHA256 with both salts and both names, so each
   transfer gets its own key and both sides derive the same one.
4. Each use of the pairwise key gets its own subkey (HKDF with a label), so the nonce spaces of
   the uses never meet: `wrap_key`/`unwrap_key` carry a transfer's data key (a push stream's
   fan-out key) bound to a context (e.g. the stream's start request); `seal_note`/`open_note`
   carry small control values (a digest, a verdict, a file's name and size) with a random
   nonce; `PullSealer` seals pull chunk replies with nonce = (offset, length).

`offer`/`accept_offer` are the wire form of step 1 and the checks of steps 2 and 3 in one
place: {"cert": <certificate text>, "salt": <base64>}.

Only `cryptography` primitives are used (X25519, HKDF, AES-256-GCM); nothing is hand-rolled.
"""

import base64
import secrets
import struct
from dataclasses import dataclass
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from zmq.utils import z85

from fedstream.common.kits import Certificate, CertificateError, Kit, verify_certificate

KEY_BYTES = 32
SALT_BYTES = 16
TAG_BYTES = 16
NONCE_BYTES = 12
_INFO = b"fedstream e2e v1\x00"
_WRAP_NONCE = bytes(NONCE_BYTES)  # each pairwise key wraps exactly one data key, so one fixed nonce is safe
_PULL_NONCE = struct.Struct("!QI")  # (offset, length): unique per request within one download's key


class E2EError(ValueError):
    """An end-to-end check failed: a bad certificate, a wrong name, or data that does not authenticate."""


@dataclass(frozen=True)
class Peer:
    """A verified peer: its certified name and CURVE public key."""

    name: str
    curve_key: bytes  # raw 32 bytes


def verify_peer(certificate: object, kit: Kit, expected_name: str) -> Peer:
    """The peer of `certificate` if the project root of `kit` signed it for `expected_name`."""
    if isinstance(certificate, str):
        certificate = certificate.encode()
    if not isinstance(certificate, (bytes, bytearray)):
        raise E2EError("the peer sent no certificate.")
    try:
        cert: Certificate = verify_certificate(bytes(certificate), kit.root_key)
    except CertificateError as exc:
        raise E2EError(f"the peer's certificate is not valid: {exc}") from None
    if cert.name != expected_name:
        raise E2EError(f"the certificate is for '{cert.name}', but the message came from '{expected_name}'.")
    return Peer(cert.name, z85.decode(cert.curve_key))


def pairwise_key(kit: Kit, peer: Peer, salts: tuple[bytes, bytes], owner: str, recipient: str) -> bytes:
    """The key shared by `kit`'s owner and `peer` for one transfer (same result on both sides).

    `salts` is (owner's salt, recipient's salt); `owner` and `recipient` are the two names.
    """
    if any(len(s) != SALT_BYTES for s in salts):
        raise E2EError(f"salts must be {SALT_BYTES} bytes each.")
    own = X25519PrivateKey.from_private_bytes(z85.decode(kit.secret_key))
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer.curve_key))
    info = _INFO + owner.encode() + b"\x00" + recipient.encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salts[0] + salts[1], info=info).derive(shared)


def require_kit(kit: Optional[Kit]) -> Kit:
    """The calling cell's kit; ValueError with one sentence if it has none (secure=True needs one)."""
    if kit is None:
        raise ValueError("secure=True needs a kit: make one with `fedstream provision` and give it to the cell "
                         "with Cell(..., kit=...) (or --kit).")
    return kit


def new_salt() -> bytes:
    """A fresh random salt for one side of one transfer."""
    return secrets.token_bytes(SALT_BYTES)


def offer(kit: Kit, salt: bytes) -> dict:
    """What one side sends in the transfer's first exchange: its certificate and its salt."""
    return {"cert": kit.certificate_bytes.decode("ascii"), "salt": encode_b64(salt)}


def accept_offer(value: object, kit: Kit, expected_name: str) -> tuple[Peer, bytes]:
    """(verified peer, its salt) from the peer's offer; E2EError if it is malformed or does not verify."""
    if not isinstance(value, dict):
        raise E2EError(f"'{expected_name}' sent no certificate and salt.")
    peer = verify_peer(value.get("cert"), kit, expected_name)
    return peer, decode_b64(value.get("salt"), "salt", SALT_BYTES)


def encode_b64(raw: bytes) -> str:
    """Bytes as base64 text (the form of salts and sealed values on the wire)."""
    return base64.b64encode(raw).decode("ascii")


def decode_b64(value: object, what: str, length: Optional[int] = None) -> bytes:
    """The bytes of a base64 field from the network; E2EError if malformed (or not `length` long)."""
    try:
        raw = base64.b64decode(value, validate=True) if isinstance(value, str) else None
    except ValueError:
        raw = None
    if raw is None or (length is not None and len(raw) != length):
        raise E2EError(f"the {what} is malformed.")
    return raw


def _subkey(pairwise: bytes, label: bytes) -> bytes:
    kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_INFO + b"use\x00" + label)
    return kdf.derive(pairwise)


def wrap_key(pairwise: bytes, data_key: bytes, context: bytes = b"") -> bytes:
    """`data_key` sealed under a pairwise key and bound to `context` (only the certified peer can unwrap it)."""
    return AESGCM(_subkey(pairwise, b"wrap")).encrypt(_WRAP_NONCE, data_key, b"wrap\x00" + context)


def unwrap_key(pairwise: bytes, wrapped: bytes, context: bytes = b"") -> bytes:
    """The data key inside `wrapped`; E2EError if it was not sealed under this pairwise key and context."""
    try:
        return AESGCM(_subkey(pairwise, b"wrap")).decrypt(_WRAP_NONCE, wrapped, b"wrap\x00" + context)
    except InvalidTag:
        raise E2EError("the transfer key does not authenticate: it was not sealed for this node "
                       "(or the stream's parameters were altered).") from None


def seal_note(pairwise: bytes, label: str, data: bytes) -> str:
    """A small control value sealed under a pairwise key for one purpose, as base64 text."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    sealed = AESGCM(_subkey(pairwise, b"note")).encrypt(nonce, data, b"note\x00" + label.encode())
    return encode_b64(nonce + sealed)


def open_note(pairwise: bytes, label: str, value: object) -> bytes:
    """The value of `seal_note(pairwise, label, ...)`; E2EError if it is malformed, altered or for another purpose."""
    raw = decode_b64(value, f"sealed {label}")
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise E2EError(f"the sealed {label} is too short.")
    try:
        return AESGCM(_subkey(pairwise, b"note")).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:],
                                                          b"note\x00" + label.encode())
    except InvalidTag:
        raise E2EError(f"the sealed {label} does not authenticate.") from None


class PullSealer:
    """Seals and opens pull chunk replies under one download's pairwise key.

    The nonce is (offset, length) of the request: a retry of the same request seals the same
    bytes under the same nonce (identical output), and no two different requests share one.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(_subkey(key, b"pull"))

    def seal(self, offset: int, data: "bytes | memoryview") -> bytes:
        """`data` (the bytes at `offset`) encrypted and tagged."""
        return self._aead.encrypt(_PULL_NONCE.pack(offset, len(data)), data, b"pull")

    def open(self, offset: int, sealed: "bytes | memoryview") -> bytes:
        """The plaintext of a sealed reply; E2EError if it was altered or sealed for another request."""
        if len(sealed) < TAG_BYTES:
            raise E2EError("a sealed chunk is shorter than its tag.")
        try:
            return self._aead.decrypt(_PULL_NONCE.pack(offset, len(sealed) - TAG_BYTES), sealed, b"pull")
        except InvalidTag:
            raise E2EError(f"the chunk at offset {offset} does not authenticate.") from None
