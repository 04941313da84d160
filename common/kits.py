"""Provisioned kits: key files, the certificate format, loading and validation.

A project is a folder made by `provision(project_dir, names)`:

1. `DIR/root/` is created once: the project's Ed25519 root signing key (`root.key`, mode
   0600, kept by the administrator and never needed at run time), its public key
   (`root.pub`), and the broker's CURVE key pair (`broker.key` 0600, `broker.pub`).
2. `DIR/NAME/` is one kit per participant: its CURVE key pair (`curve.key` 0600,
   `curve.pub`), `certificate.json` binding NAME to `curve.pub` and signed by the root key,
   a copy of `root.pub` and of `broker.pub`. The kit named `broker` holds the broker's pair.
   A kit is built in a hidden folder and renamed into place, so a half-made kit never
   appears under its final name; existing kits are never rewritten.

The certificate is the one signed document of fedstream. Its file holds exactly the
canonical JSON (sorted keys, no spaces, ASCII) of
`{"curve": <z85 CURVE public key>, "name": <FQCN>, "project": <root fingerprint>, "sig": <hex>, "v": 1}`
followed by one newline; `sig` is the Ed25519 signature, by the root key, of
`CERT_CONTEXT` + the canonical JSON of the same object without `sig`. A verifier parses the
bytes, re-encodes them and requires the very same bytes, so a change of any byte is refused.
Signatures come from `cryptography`; CURVE keys from libzmq. Nothing here is hand-rolled.
"""

import hashlib
import json
import logging
import os
import secrets
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Union

import zmq
from zmq.utils import z85
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedstream.common.fqcn import is_valid_fqcn

CERT_VERSION = 1
CERT_CONTEXT = b"fedstream certificate v1\x00"  # signed before the body: a signature means nothing elsewhere
MAX_CERT_SIZE = 4096

ROOT_DIR = "root"
BROKER_NAME = "broker"
ROOT_KEY = "root.key"
ROOT_PUB = "root.pub"
BROKER_KEY = "broker.key"
BROKER_PUB = "broker.pub"
CURVE_KEY = "curve.key"
CURVE_PUB = "curve.pub"
CERT_FILE = "certificate.json"
KIT_FILES = (CURVE_KEY, CURVE_PUB, CERT_FILE, ROOT_PUB, BROKER_PUB)

PathLike = Union[str, "os.PathLike[str]"]

log = logging.getLogger(__name__)


class CertificateError(ValueError):
    """A certificate that is malformed or not signed by the expected root."""


@dataclass(frozen=True)
class Certificate:
    """What a verified certificate says: `name` owns the CURVE key `curve_key` in `project`."""

    name: str
    curve_key: str  # z85, 40 characters
    project: str  # fingerprint of the root public key


@dataclass(frozen=True)
class Kit:
    """A loaded, validated kit."""

    path: Path
    certificate: Certificate
    certificate_bytes: bytes
    public_key: bytes  # z85
    secret_key: bytes  # z85
    broker_key: bytes  # z85
    root_key: bytes  # raw Ed25519 public key, 32 bytes

    @property
    def name(self) -> str:
        """The FQCN this kit may register as."""
        return self.certificate.name

    @property
    def project(self) -> str:
        return self.certificate.project

    @property
    def is_broker(self) -> bool:
        """True for the broker's kit (its key pair is the one every node trusts)."""
        return self.public_key == self.broker_key

    def client_options(self) -> dict[int, bytes]:
        """Socket options that make a socket a CURVE client of this project's broker."""
        return {zmq.CURVE_SERVERKEY: self.broker_key, zmq.CURVE_PUBLICKEY: self.public_key,
                zmq.CURVE_SECRETKEY: self.secret_key}

    def server_options(self) -> dict[int, bytes | int]:
        """Socket options that make a socket this project's CURVE server (the broker kit only)."""
        return {zmq.CURVE_SERVER: 1, zmq.CURVE_SECRETKEY: self.secret_key}


# -- the certificate -------------------------------------------------------------------------
def project_fingerprint(root_key: bytes) -> str:
    """A short, stable id of a project: the start of the sha256 of its root public key."""
    return hashlib.sha256(root_key).hexdigest()[:16]


def _canonical(value: dict) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _is_z85_key(text: object) -> bool:
    if not isinstance(text, str) or len(text) != 40:
        return False
    try:
        return z85.encode(z85.decode(text)) == text.encode("ascii")
    except (ValueError, UnicodeError, KeyError, IndexError, OverflowError, struct.error):
        return False


def issue_certificate(root: Ed25519PrivateKey, name: str, curve_key: bytes) -> bytes:
    """Sign a certificate binding `name` to the z85 CURVE public key `curve_key`."""
    root_pub = root.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    body = {"curve": curve_key.decode("ascii"), "name": name, "project": project_fingerprint(root_pub),
            "v": CERT_VERSION}
    signature = root.sign(CERT_CONTEXT + _canonical(body))
    return _canonical({**body, "sig": signature.hex()}) + b"\n"


def verify_certificate(data: Union[bytes, str], root_key: bytes) -> Certificate:
    """Check a certificate against the raw root public key; raise CertificateError with the reason."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if len(raw) > MAX_CERT_SIZE:
        raise CertificateError("the certificate is too large")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CertificateError("the certificate is not valid JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"curve", "name", "project", "sig", "v"}:
        raise CertificateError("the certificate does not have the expected fields")
    if type(doc["v"]) is not int or doc["v"] != CERT_VERSION:
        raise CertificateError(f"certificate version {doc['v']!r} is not supported")
    sig = doc["sig"]
    if not (isinstance(sig, str) and len(sig) == 128 and all(c in "0123456789abcdef" for c in sig)):
        raise CertificateError("the certificate's signature is malformed")
    if _canonical(doc) + b"\n" != raw:
        raise CertificateError("the certificate is not in canonical form (it was altered)")
    body = {k: v for k, v in doc.items() if k != "sig"}
    try:
        Ed25519PublicKey.from_public_bytes(root_key).verify(bytes.fromhex(sig), CERT_CONTEXT + _canonical(body))
    except InvalidSignature:
        raise CertificateError("the certificate is not signed by this project's root key") from None
    if not isinstance(doc["name"], str) or not is_valid_fqcn(doc["name"]):
        raise CertificateError("the certificate's name is not a valid FQCN")
    if not _is_z85_key(doc["curve"]):
        raise CertificateError("the certificate's CURVE key is malformed")
    return Certificate(doc["name"], doc["curve"], doc["project"])


# -- files -------------------------------------------------------------------------------------
def _write(path: Path, data: bytes, secret: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    try:
        if secret:
            os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_line(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1024).strip()


def _read_root_key(path: Path) -> bytes:
    try:
        key = bytes.fromhex(_read_line(path).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path} does not hold an Ed25519 public key.")
    return key


def _read_curve_key(path: Path) -> bytes:
    key = _read_line(path)
    if not _is_z85_key(key.decode("ascii", "replace")):
        raise ValueError(f"{path} does not hold a CURVE key.")
    return key


def load_kit(path: PathLike) -> Kit:
    """Load and validate the kit in folder `path`; raise ValueError with one sentence if it is unusable."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"Kit {str(folder)!r} is not a directory.")
    missing = [name for name in KIT_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"Kit {str(folder)!r} is incomplete: {', '.join(missing)} missing.")
    try:
        public, secret = _read_curve_key(folder / CURVE_PUB), _read_curve_key(folder / CURVE_KEY)
        broker, root = _read_curve_key(folder / BROKER_PUB), _read_root_key(folder / ROOT_PUB)
        with open(folder / CERT_FILE, "rb") as f:
            cert_bytes = f.read(MAX_CERT_SIZE + 1)
    except OSError as exc:
        raise ValueError(f"Kit {str(folder)!r} cannot be read: {exc.strerror}.") from None
    if zmq.curve_public(secret) != public:
        raise ValueError(f"Kit {str(folder)!r} is damaged: {CURVE_KEY} does not match {CURVE_PUB}.")
    if os.stat(folder / CURVE_KEY).st_mode & 0o077:
        log.warning("%s can be read by other users; run: chmod 600 %s", folder / CURVE_KEY, folder / CURVE_KEY)
    try:
        cert = verify_certificate(cert_bytes, root)
    except CertificateError as exc:
        raise ValueError(f"Kit {str(folder)!r} is damaged: {exc}.") from None
    if cert.curve_key.encode("ascii") != public:
        raise ValueError(f"Kit {str(folder)!r} is damaged: its certificate is for another key.")
    return Kit(folder, cert, cert_bytes, public, secret, broker, root)


# -- provisioning ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Root:
    signing_key: Ed25519PrivateKey
    public_key: bytes
    broker_public: bytes
    broker_secret: bytes


def _create_root(folder: Path) -> None:
    staging = folder.parent / f".{folder.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        signing = Ed25519PrivateKey.generate()
        _write(staging / ROOT_KEY, signing.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()), secret=True)
        raw = signing.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        _write(staging / ROOT_PUB, raw.hex().encode() + b"\n")
        broker_public, broker_secret = zmq.curve_keypair()
        _write(staging / BROKER_KEY, broker_secret + b"\n", secret=True)
        _write(staging / BROKER_PUB, broker_public + b"\n")
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_root(folder: Path) -> _Root:
    try:
        with open(folder / ROOT_KEY, "rb") as f:
            signing = serialization.load_pem_private_key(f.read(), password=None)
        public = _read_root_key(folder / ROOT_PUB)
        broker_public, broker_secret = _read_curve_key(folder / BROKER_PUB), _read_curve_key(folder / BROKER_KEY)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder} is not a usable project root ({exc}).") from None
    if not isinstance(signing, Ed25519PrivateKey) or signing.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw) != public:
        raise ValueError(f"{folder} is not a usable project root: {ROOT_KEY} does not match {ROOT_PUB}.")
    if zmq.curve_public(broker_secret) != broker_public:
        raise ValueError(f"{folder} is not a usable project root: {BROKER_KEY} does not match {BROKER_PUB}.")
    return _Root(signing, public, broker_public, broker_secret)


def _create_kit(folder: Path, name: str, root: _Root) -> None:
    staging = folder.parent / f".{folder.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir(mode=0o700)
    try:
        if name == BROKER_NAME:
            public, secret = root.broker_public, root.broker_secret
        else:
            public, secret = zmq.curve_keypair()
        _write(staging / CURVE_KEY, secret + b"\n", secret=True)
        _write(staging / CURVE_PUB, public + b"\n")
        _write(staging / CERT_FILE, issue_certificate(root.signing_key, name, public))
        _write(staging / ROOT_PUB, root.public_key.hex().encode() + b"\n")
        _write(staging / BROKER_PUB, root.broker_public + b"\n")
        os.rename(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def provision(project_dir: PathLike, names: Iterable[str]) -> list[Path]:
    """Create the project root if missing and a kit per name that has none; return the kit folders.

    Existing kits are checked (they must belong to this project) and left byte-identical.
    """
    project = Path(project_dir)
    wanted = list(dict.fromkeys(names))
    if not wanted:
        raise ValueError("Give at least one name to provision.")
    for name in wanted:
        if not isinstance(name, str) or not is_valid_fqcn(name):
            raise ValueError(f"{name!r} is not a valid FQCN (dot-separated parts of letters, digits, _ ~ -).")
        if name == ROOT_DIR:
            raise ValueError(f"'{ROOT_DIR}' is reserved for the project's root key and cannot be a kit name.")
    if project.exists() and not project.is_dir():
        raise ValueError(f"Project {str(project)!r} is not a directory.")
    project.mkdir(parents=True, exist_ok=True)
    if not (project / ROOT_DIR).exists():
        _create_root(project / ROOT_DIR)
    root = _load_root(project / ROOT_DIR)
    for name in wanted:
        folder = project / name
        if folder.exists():
            kit = load_kit(folder)
            if kit.root_key != root.public_key or kit.name != name:
                raise ValueError(f"{folder} exists but is not the kit of '{name}' in this project.")
    for name in wanted:
        if not (project / name).exists():
            _create_kit(project / name, name, root)
    return [project / name for name in wanted]
