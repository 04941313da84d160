"""Admission to a secure broker: the ZAP handler and the registration check.

Flow (see docs/PROTOCOL.md, "Certificates"):

1. Every broker socket is a CURVE server. libzmq runs the CURVE handshake, which proves the
   client holds the secret of the public key it presents, then asks the ZAP handler
   (`ZapAuthenticator`, one thread) whether to admit that key. The answer comes from
   `Admission.handshake`, which sets the ZAP User-Id to the key in z85, so the broker sees on
   every received frame which key sent it.
2. On the ROUTER (domain `ROUTER_DOMAIN`) any key passes the handshake: nothing is routed
   for it yet. Its REGISTER must carry a certificate; `Admission.check_register` accepts it
   only if the project root signed it, its key is the connection's key and its name is the
   requested FQCN. `bind` then records key <-> connection; `owns` lets the broker refuse
   every other message whose connection is not the one its key registered on.
3. On the fan-out sockets (domain `FANOUT_DOMAIN`) there is no registration, so only keys
   with a live registration pass: an outsider, or a node whose registration lapsed, gets nothing.

`Admission` is socket-free; the broker gives it `is_live(fqcn, identity)` to ask the registry.
"""

import logging
import threading
from typing import Callable, Optional

import zmq
from zmq.utils import z85

from fedstream.common.kits import CertificateError, Kit, verify_certificate

log = logging.getLogger(__name__)

ROUTER_DOMAIN = b"fedstream"
FANOUT_DOMAIN = b"fedstream-fanout"
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_ZAP_VERSION = b"1.0"
_POLL_MS = 200
_LOGGED_LIMIT = 1024  # refusals remembered so a retrying client is logged once, not at every reconnect


class Admission:
    """Decides which CURVE keys pass the handshake and which registrations are genuine."""

    def __init__(self, kit: Kit, is_live: Callable[[str, bytes], bool]) -> None:
        self._root_key = kit.root_key
        self._is_live = is_live
        self._lock = threading.Lock()
        self._by_key: dict[str, tuple[str, bytes]] = {}  # z85 key -> (fqcn, connection identity)

    def handshake(self, domain: bytes, mechanism: bytes, key: bytes) -> tuple[bool, str, str]:
        """(admitted, reason, user id) for a client that proved it holds `key` (raw, 32 bytes)."""
        if mechanism != b"CURVE" or len(key) != 32:
            return False, "only CURVE clients are admitted", ""
        user_id = z85.encode(key).decode("ascii")
        if domain == ROUTER_DOMAIN:
            return True, "OK", user_id
        if domain == FANOUT_DOMAIN:
            with self._lock:
                holder = self._by_key.get(user_id)
            if holder is not None and self._is_live(*holder):
                return True, "OK", user_id
            return False, "this key has no live registration", ""
        return False, "unknown domain", ""

    def check_register(self, fqcn: str, certificate: object, user_id: Optional[str]) -> Optional[str]:
        """Why a REGISTER must be refused, or None when its certificate allows it."""
        if not user_id:
            return "the connection did not authenticate with a CURVE key"
        if not isinstance(certificate, str):
            return "this broker admits only nodes with a kit of its project, and no certificate was sent"
        try:
            cert = verify_certificate(certificate, self._root_key)
        except CertificateError as exc:
            return str(exc)
        if cert.curve_key != user_id:
            return "the certificate belongs to another CURVE key than the one this connection uses"
        if cert.name != fqcn:
            return f"the certificate allows registering only as '{cert.name}', not as '{fqcn}'"
        return None

    def bind(self, user_id: str, fqcn: str, identity: bytes) -> None:
        """Record that the connection `identity` registered `fqcn` with key `user_id`."""
        with self._lock:
            self._by_key[user_id] = (fqcn, identity)

    def owns(self, identity: bytes, user_id: Optional[str]) -> bool:
        """True when `identity` is the connection on which key `user_id` registered."""
        with self._lock:
            holder = self._by_key.get(user_id or "")
        return holder is not None and holder[1] == identity


class ZapAuthenticator:
    """The context's ZAP handler: one thread answering libzmq's requests with `Admission`."""

    def __init__(self, context: zmq.Context, admission: Admission) -> None:
        self._admission = admission
        self._stop = threading.Event()
        self._logged: set[tuple[bytes, bytes, bytes]] = set()
        self._socket = context.socket(zmq.REP)
        self._socket.linger = 0
        try:
            self._socket.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            self._socket.close()
            raise OSError("Another authenticator already runs on this ZeroMQ context; "
                          "give the secure broker a context of its own.") from None
        self._thread = threading.Thread(target=self._serve, name="fedstream-zap", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop answering and release the ZAP endpoint."""
        self._stop.set()
        self._thread.join(timeout)

    def _serve(self) -> None:
        sock = self._socket
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS):
                    continue
                request = sock.recv_multipart()
                sock.send_multipart(self._answer(request))
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                log.error("ZAP handler stopped: %s", exc)
        finally:
            sock.close(linger=0)

    def _answer(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6 or request[0] != _ZAP_VERSION:
            request_id = request[1] if len(request) > 1 else b""
            return [_ZAP_VERSION, request_id, b"400", b"malformed ZAP request", b"", b""]
        _version, request_id, domain, address, _identity, mechanism, *credentials = request
        key = credentials[0] if credentials else b""
        admitted, reason, user_id = self._admission.handshake(domain, mechanism, key)
        if not admitted:
            self._log_refusal(address, domain, key, reason)
            return [_ZAP_VERSION, request_id, b"400", reason.encode(), b"", b""]
        return [_ZAP_VERSION, request_id, b"200", b"OK", user_id.encode("ascii"), b""]

    def _log_refusal(self, address: bytes, domain: bytes, key: bytes, reason: str) -> None:
        seen = (address, domain, key)
        if seen in self._logged:
            return
        if len(self._logged) >= _LOGGED_LIMIT:
            self._logged.clear()
        self._logged.add(seen)
        log.warning("refused a connection from %s to the %s socket: %s", address.decode("ascii", "replace"),
                    "fan-out" if domain == FANOUT_DOMAIN else domain.decode("ascii", "replace"), reason)
