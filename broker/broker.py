"""Broker: a ROUTER that routes FQCN-addressed messages, plus the XSUB/XPUB fan-out pair.

The routing thread reads every message from the ROUTER, dispatches it by command
(register, heartbeat, send, bye), sweeps expired nodes, and never blocks: sends use
NOBLOCK and a full or vanished peer gets its message dropped with an `undeliverable`
answer to the sender. Hostile input cannot stop it:

- every header frame is bounded before it is looked at (FQCN 255 bytes, hello
  `MAX_HELLO_SIZE`, meta `MAX_HEADER_SIZE`); an oversize meta is answered with a short error and never echoed;
- JSON is decoded only by the bounded decoder in `common/protocol.py`;
- any exception while handling one message is counted (`stats["errors"]`), logged at most
  once per peer per minute, and the loop goes on with the next message;
- queues are bounded in bytes: on the ROUTER, a peer holds at most `_PEER_BYTES` of large
  messages (counted until libzmq has written them, see `broker/outflow.py`) plus
  `_ROUTER_HWM` small ones; on the XPUB a subscriber holds at most `_FANOUT_HWM` chunks of
  the streams it follows: the fan-out applies only subscriptions to a whole stream id,
  so nobody receives every stream (or streams whose random id it was not told); a node
  that leaves a large message unread for `_STUCK_PEER` seconds is dropped from the registry
  (it is told "not registered" on its next message and may register again);
- after a burst of traffic (a flood of garbage included) the heap pages it freed go back to
  the operating system, so the broker returns to its resting size (`broker/memory.py`).
"""

import logging
import threading
from time import monotonic
from collections import Counter
from typing import Optional

import zmq
import zmq.asyncio

from fedstream.broker.auth import FANOUT_DOMAIN, ROUTER_DOMAIN, Admission, ZapAuthenticator
from fedstream.broker.memory import IdleTrim, release_free_memory
from fedstream.broker.outflow import TRACK_MIN, OutFlow
from fedstream.broker.registry import Registry
from fedstream.common import protocol as proto
from fedstream.common.address import Endpoint, derive_fanout, parse_endpoint, reachable
from fedstream.common.fqcn import MAX_FQCN_LENGTH, is_valid_fqcn
from fedstream.common.frames import NOBLOCK, recv_frames, send_frames
from fedstream.common.kits import Kit, PathLike, load_kit
from fedstream.common.peerlog import PeerErrors

log = logging.getLogger(__name__)

DEFAULT_BIND = "tcp://127.0.0.1:5550"
DEFAULT_NODE_TIMEOUT = 10.0
_POLL_MS = 200
# ZMTP pings only find dead TCP connections (node liveness is the registry's heartbeats): one every 10 s
# per connection (each node pings the broker too), not every second, which cost 1-2% of a core per 1000 idle nodes.
_ZMTP_HEARTBEAT_IVL = 10_000  # ms
_ZMTP_HEARTBEAT_TIMEOUT = 10_000  # ms without traffic after a ping before the connection is dropped
_SWEEP_INTERVAL = 0.5
_DRAIN_BATCH = 256
_FANOUT_HWM = 32  # chunks queued per subscriber (twice the push window at 1 MiB chunks); beyond: dropped, repaired
_ROUTER_HWM = 1000  # messages queued per peer (only small ones: large ones are bounded in bytes)
_ROUTER_RCVHWM = 32  # messages read ahead from one peer; TCP holds the rest back at the sender
_PEER_BYTES = 16 << 20  # bytes of large messages queued per peer (or one message of any size)
_STUCK_PEER = 15.0  # seconds a node may leave a large message unread before the broker drops it
_ERROR_LOG_INTERVAL = 60.0  # seconds between two log lines about the same misbehaving peer
_TRIM_AFTER = 16 << 20  # bytes received after which an idle broker hands freed heap pages back
_TRIM_QUIET = 1.0  # seconds without traffic before that happens (never during a transfer); then again each second
_TRIM_FOLLOW = 10.0  # ... for this long (peers that disconnect after a burst free more)
_TRIM_WINDOW = 0.1  # seconds of traffic IdleTrim judges at once (a few heartbeats in one are not traffic)


# (label in messages, CLI option, keyword) of the three bound endpoints
_ROLES = {
    "message": ("message endpoint", "--bind", "bind"),
    "in": ("fan-out input", "--fanout-in", "fanout_in"),
    "out": ("fan-out output", "--fanout-out", "fanout_out"),
}


def _optional_endpoint(url: Optional[str]) -> Optional[Endpoint]:
    return parse_endpoint(url) if url is not None else None


class Broker:
    """Central message router of a fedstream federation; runs in a background thread."""

    def __init__(
        self,
        bind: str = DEFAULT_BIND,
        context: Optional[zmq.Context] = None,
        node_timeout: float = DEFAULT_NODE_TIMEOUT,
        kit: Optional[PathLike] = None,
        *,
        fanout_in: Optional[str] = None,
        fanout_out: Optional[str] = None,
        advertise_fanout_in: Optional[str] = None,
        advertise_fanout_out: Optional[str] = None,
    ) -> None:
        """Bind `bind` for messages and `fanout_in`/`fanout_out` for push chunks (derived when None).

        `advertise_fanout_in`/`advertise_fanout_out` are what nodes are told to connect to, for a
        broker behind a forward (NAT, ssh -L); a tcp host `*` there means "the broker's host as the
        node knows it". Any ZeroMQ endpoint works: tcp:// (IPv4, [IPv6], *), ipc://, inproc://
        (inproc needs the nodes to share `context`).
        """
        self._bind_endpoint = parse_endpoint(bind)
        derived_in, derived_out = derive_fanout(self._bind_endpoint)
        self._fanout_binds = {"in": _optional_endpoint(fanout_in) or derived_in,
                              "out": _optional_endpoint(fanout_out) or derived_out}
        self._advertised = {"in": _optional_endpoint(advertise_fanout_in),
                            "out": _optional_endpoint(advertise_fanout_out)}
        if node_timeout <= 0:
            raise ValueError(f"node_timeout must be positive, got {node_timeout!r}.")
        self.kit: Optional[Kit] = load_kit(kit) if kit is not None else None
        if self.kit is not None and not self.kit.is_broker:
            raise ValueError(f"Kit {str(kit)!r} belongs to '{self.kit.name}', not to the broker.")
        self._admission: Optional[Admission] = None
        self._zap: Optional[ZapAuthenticator] = None
        if context is not None and not isinstance(context, zmq.Context):
            raise ValueError(f"context must be a zmq.Context, got {type(context).__name__}.")
        if isinstance(context, zmq.asyncio.Context):  # its sockets need an event loop; the broker threads have none
            context = zmq.Context.shadow(context.underlying)
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self.registry = Registry(node_timeout)
        self.stats: Counter = Counter()
        self._peer_errors = PeerErrors(_ERROR_LOG_INTERVAL)
        self._outflow = OutFlow(_PEER_BYTES)
        self._trim = IdleTrim(_TRIM_AFTER, _TRIM_QUIET, _TRIM_FOLLOW)
        self._router: Optional[zmq.Socket] = None
        self._xsub: Optional[zmq.Socket] = None
        self._xpub: Optional[zmq.Socket] = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._fanout_info: dict = {}
        self._bound: dict[str, Endpoint] = {}
        self.address = ""

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "Broker":
        """Bind the sockets (raises if a port is taken) and start serving in the background."""
        if self._threads:
            raise RuntimeError("Broker is already started.")
        try:
            self._bind_sockets()
        except BaseException:
            self._close_sockets()
            raise
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._route_loop, name="fedstream-broker", daemon=True),
            threading.Thread(target=self._fanout_loop, name="fedstream-fanout", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("broker listening on %s (fan-out in %s, out %s)", self.address, *self.fanout_endpoints)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and release the ports."""
        if not self._threads:
            return
        self._stop.set()
        ctrl = self._ctx.socket(zmq.PAIR)
        ctrl.linger = 0
        ctrl.connect(self._ctrl_endpoint)
        ctrl.send(b"TERMINATE")
        for thread in self._threads:
            thread.join(timeout)
        ctrl.close()
        self._threads = []
        self._close_sockets()
        if self._own_context:
            self._ctx.term()
        log.info("broker on %s stopped", self.address)

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def fanout_endpoints(self) -> tuple[str, str]:
        """(bound endpoint publishers connect to, bound endpoint subscribers connect to), once started."""
        return reachable(self._bound["in"]).url(), reachable(self._bound["out"]).url()

    # -- setup -----------------------------------------------------------------------------
    def _bind(self, sock: zmq.Socket, role: str, endpoint: Endpoint) -> Endpoint:
        """Bind `sock` on `endpoint` (port 0: a free port); return the endpoint actually bound."""
        if endpoint.is_ipv6:
            sock.setsockopt(zmq.IPV6, 1)
        url = endpoint.url()
        if endpoint.scheme == "tcp":  # ZeroMQ spells "every interface" and "a free port" with `*`
            host = "*" if endpoint.host in ("0.0.0.0", "*") else url[len("tcp://"):url.rindex(":")]
            url = f"tcp://{host}:{endpoint.port or '*'}"
        try:
            sock.bind(url)
        except zmq.ZMQError as exc:
            label, option, keyword = _ROLES[role]
            raise OSError(f"Broker cannot bind its {label} on {endpoint.url()}: {zmq.strerror(exc.errno)}; "
                          f"choose another with {option} (Broker({keyword}=...)).") from None
        if endpoint.scheme != "tcp":
            return endpoint
        bound = parse_endpoint(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        return endpoint.with_port(bound.port)

    def _secure(self, sock: zmq.Socket, domain: bytes) -> None:
        """With a kit: make `sock` a CURVE server whose clients the ZAP handler admits."""
        if self.kit is None:
            return
        for option, value in self.kit.server_options().items():
            sock.setsockopt(option, value)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain)

    def _is_live(self, fqcn: str, identity: bytes) -> bool:
        entry = self.registry.lookup(fqcn)
        return entry is not None and entry.identity == identity

    def _bind_sockets(self) -> None:
        if self.kit is not None:  # the ZAP handler must listen before the first CURVE server binds
            self._admission = Admission(self.kit, self._is_live)
            self._zap = ZapAuthenticator(self._ctx, self._admission)
        router = self._router = self._ctx.socket(zmq.ROUTER)
        self._secure(router, ROUTER_DOMAIN)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_SIZE)
        router.setsockopt(zmq.SNDHWM, _ROUTER_HWM)
        router.setsockopt(zmq.RCVHWM, _ROUTER_RCVHWM)
        router.setsockopt(zmq.RCVTIMEO, _POLL_MS)  # the routing loop's longest wait
        router.setsockopt(zmq.HEARTBEAT_IVL, _ZMTP_HEARTBEAT_IVL)
        router.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMTP_HEARTBEAT_TIMEOUT)
        router.linger = 0
        self._bound["message"] = self._bind(router, "message", self._bind_endpoint)
        self.address = reachable(self._bound["message"]).url()

        xsub = self._xsub = self._ctx.socket(zmq.XSUB)
        self._secure(xsub, FANOUT_DOMAIN)
        xsub.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_SIZE)
        xsub.setsockopt(zmq.RCVHWM, _FANOUT_HWM)
        xsub.linger = 0
        xpub = self._xpub = self._ctx.socket(zmq.XPUB)
        self._secure(xpub, FANOUT_DOMAIN)
        xpub.setsockopt(zmq.SNDHWM, _FANOUT_HWM)
        xpub.setsockopt(zmq.XPUB_MANUAL, 1)  # subscriptions pass through _apply_subscriptions
        xpub.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        xpub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        xpub.linger = 0
        self._bound["in"] = self._bind(xsub, "in", self._fanout_binds["in"])
        self._bound["out"] = self._bind(xpub, "out", self._fanout_binds["out"])
        self._fanout_info = self._registration_info()
        # Subscribe to everything upstream: every publisher learns at once that its pipe is live.
        xsub.send(b"\x01")
        self._ctrl_endpoint = f"inproc://fedstream-broker-ctrl-{id(self)}"
        self._ctrl = self._ctx.socket(zmq.PAIR)
        self._ctrl.bind(self._ctrl_endpoint)

    def _registration_info(self) -> dict:
        """What a node learns at registration: where to publish and subscribe to push chunks."""
        info: dict = {"node_timeout": self.registry.node_timeout}
        for role, key in (("in", "fanout_in"), ("out", "fanout_out")):
            bound = self._bound[role]
            advertised = self._advertised[role]
            if advertised is None:  # tcp: the node uses the host it reached the broker on, as it always did
                tcp_broker = bound.scheme == "tcp" and self._bind_endpoint.scheme == "tcp"
                advertised = bound.with_host("*") if tcp_broker else reachable(bound)
            info[key] = advertised.url()
            if advertised.scheme == "tcp":
                info["xsub_port" if role == "in" else "xpub_port"] = advertised.port
        return info

    def _close_sockets(self) -> None:
        for name in ("_router", "_xsub", "_xpub", "_ctrl"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)
                setattr(self, name, None)
        if self._zap is not None:
            self._zap.stop()
            self._zap = None

    # -- fan-out ---------------------------------------------------------------------------
    def _fanout_loop(self) -> None:
        """Forward chunks XSUB -> XPUB; apply only subscriptions to one whole stream id."""
        xsub, xpub, ctrl = self._xsub, self._xpub, self._ctrl
        assert xsub is not None and xpub is not None
        poller = zmq.Poller()
        for sock in (xsub, xpub, ctrl):
            poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                events = dict(poller.poll(_POLL_MS))
                if ctrl in events:
                    return
                if xpub in events:
                    self._apply_subscriptions(xpub)
                if xsub in events:
                    for _ in range(_DRAIN_BATCH):
                        try:
                            frames = recv_frames(xsub, NOBLOCK)
                        except zmq.Again:
                            break
                        send_frames(xpub, frames, NOBLOCK)  # a full subscriber drops
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    return
                self.stats["fanout_errors"] += 1
                log.error("fan-out: %s", exc)
            except Exception as exc:  # one message must never stop the fan-out
                self.stats["fanout_errors"] += 1
                log.error("fan-out dropped a message: %s: %s", type(exc).__name__, exc)

    def _apply_subscriptions(self, xpub: zmq.Socket) -> None:
        """Apply subscriptions to whole stream ids only: never a prefix, so never every stream."""
        for _ in range(_DRAIN_BATCH):
            try:
                message = xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(message) != 1 + proto.STREAM_ID_LENGTH or message[0] not in (0, 1):
                self.stats["refused_subscriptions"] += 1
                continue
            xpub.setsockopt(zmq.SUBSCRIBE if message[0] else zmq.UNSUBSCRIBE, message[1:])

    # -- routing ---------------------------------------------------------------------------
    def _route_loop(self) -> None:
        """Route until stop(): a receive waits at most _POLL_MS (RCVTIMEO), so a busy loop never polls."""
        router = self._router
        assert router is not None
        next_sweep = monotonic() + _SWEEP_INTERVAL
        window_end = monotonic() + _TRIM_WINDOW
        received = 0  # bytes received in the current trim window
        while not self._stop.is_set():
            try:
                frames = recv_frames(router)
            except zmq.Again:  # nothing within _POLL_MS
                frames = None
            now = monotonic()
            if frames is not None:
                received += sum(map(len, frames))
                try:
                    self._handle(frames, now)
                except Exception as exc:  # one message must never stop the routing
                    self._failed(frames, exc)
            if now >= window_end:
                self._trim.received(received, now)
                received, window_end = 0, now + _TRIM_WINDOW
            if now >= next_sweep:
                next_sweep = now + _SWEEP_INTERVAL
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Release memory after a burst, drop peers that stopped reading, expire silent nodes."""
        if self._trim.due(now) and release_free_memory():
            self.stats["memory_released"] += 1
        for identity in self._outflow.sweep(now, _STUCK_PEER):
            entry = self.registry.remove_identity(identity)
            if entry is not None:
                log.warning("node '%s' dropped: it read nothing for %g s", entry.fqcn, _STUCK_PEER)
        for entry in self.registry.expire(now):
            log.warning("node '%s' expired: no heartbeat for %.1f s", entry.fqcn, self.registry.node_timeout)
        self._outflow.retain(self.registry.identities())

    def _failed(self, frames: list, exc: Exception) -> None:
        """Count a message whose handling raised; log it at most once per peer per minute."""
        self.stats["errors"] += 1
        identity = frames[0].bytes if frames else b""
        entry = self.registry.entry_of(identity)
        peer = entry.fqcn if entry is not None else identity.hex()
        if self._peer_errors.record(peer, monotonic()):
            log.warning("dropped a message from %s that could not be handled: %s: %s "
                        "(further ones from this peer are logged once a minute)",
                        peer, type(exc).__name__, str(exc)[:200])

    def _send(self, frames: list) -> "str | None":
        """Send without ever blocking; return why it failed, or None."""
        router = self._router
        assert router is not None
        identity = frames[0]
        size = sum(map(len, frames)) - len(identity)
        try:
            if size < TRACK_MIN:
                send_frames(router, frames, NOBLOCK)
                return None
            if not self._outflow.admit(identity, size):
                self.stats["dropped_full"] += 1
                return "busy"
            now = monotonic()
            if not self._outflow.needs_tracker(identity, size, now):
                send_frames(router, frames, NOBLOCK)
                self._outflow.sent(identity, size, None, now)
                return None
            for frame in frames[:-1]:
                router.send(frame, zmq.NOBLOCK | zmq.SNDMORE, copy=False)
            last = frames[-1]
            tracked = zmq.Frame(last.buffer if isinstance(last, zmq.Frame) else last, track=True, copy=False)
            tracker = router.send(tracked, zmq.NOBLOCK, copy=False, track=True)
            self._outflow.sent(identity, size, tracker, now)
            return None
        except zmq.Again:
            self.stats["dropped_busy"] += 1
            return "busy"
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.stats["dropped_gone"] += 1
                return "gone"
            raise

    def _malformed(self, identity: bytes, why: str) -> None:
        self.stats["malformed"] += 1
        if self._peer_errors.record(identity.hex(), monotonic()):
            log.warning("dropped a malformed message from connection %s: %s "
                        "(further ones from this connection are logged once a minute)", identity.hex(), why)

    def _handle(self, frames: list, now: float) -> None:
        identity = frames[0].bytes
        if len(frames) < 2 or len(frames[1]) != 2:
            return self._malformed(identity, "no command frame")
        cmd = frames[1].bytes
        if self._admission is not None and cmd != proto.REGISTER and \
                not self._admission.owns(identity, frames[1].get("User-Id")):
            self._send([identity, proto.NOT_REGISTERED])  # secure mode: this connection registered no key
            return None
        if cmd == proto.SEND:
            return self._handle_send(identity, frames, now)
        if cmd == proto.HEARTBEAT:
            known = self.registry.touch(identity, now) is not None
            self._send([identity, proto.HEARTBEAT_ACK if known else proto.NOT_REGISTERED])
            return None
        if cmd == proto.REGISTER:
            return self._handle_register(identity, frames, now)
        if cmd == proto.BYE:
            entry = self.registry.remove_identity(identity)
            if entry is not None:
                log.info("node '%s' left", entry.fqcn)
            return None
        return self._malformed(identity, f"unknown command {cmd!r}")

    def _handle_register(self, identity: bytes, frames: list, now: float) -> None:
        if len(frames) != 4:
            return self._malformed(identity, "register needs a name and a hello frame")
        if len(frames[2]) > MAX_FQCN_LENGTH:
            return self._malformed(identity, f"a name of {len(frames[2])} bytes is too long")
        try:
            fqcn = frames[2].bytes.decode("ascii")
            hello = proto.decode_object(frames[3].buffer, limit=proto.MAX_HELLO_SIZE)
        except (UnicodeDecodeError, proto.ProtocolError) as exc:
            return self._malformed(identity, f"bad register frames: {exc}")
        version = hello.get("v")
        if type(version) is not int or version != proto.VERSION:
            reason = f"protocol version {repr(version)[:20]} is not supported (broker speaks {proto.VERSION})"
        elif not is_valid_fqcn(fqcn):
            reason = f"'{fqcn}' is not a valid FQCN"
        elif refusal := self._kit_refusal(fqcn, hello, frames[1]):
            reason = refusal
        else:
            self._forget_if_disconnected(fqcn, identity)
            reason = self.registry.register(fqcn, identity, now)
        if reason:
            if self._peer_errors.record(identity.hex(), now):
                log.warning("refused registration of '%s': %s", fqcn[:64], reason)
            self._send([identity, proto.REGISTERED, proto.REG_ERR, reason.encode()])
            return None
        if self._admission is not None:
            self._admission.bind(frames[1].get("User-Id"), fqcn, identity)
        log.info("node '%s' registered (%d connected)", fqcn, len(self.registry))
        self._send([identity, proto.REGISTERED, proto.REG_OK, proto.encode_json(self._fanout_info)])
        return None

    def _kit_refusal(self, fqcn: str, hello: dict, command: zmq.Frame) -> "str | None":
        """Secure mode: why this REGISTER's certificate does not allow it, or None."""
        if self._admission is None:
            return None
        return self._admission.check_register(fqcn, hello.get("cert"), command.get("User-Id"))

    def _forget_if_disconnected(self, fqcn: str, identity: bytes) -> None:
        """Free a name whose holder's connection is gone (e.g. its process was killed)."""
        holder = self.registry.lookup(fqcn)
        if holder is not None and holder.identity != identity:
            if self._send([holder.identity, proto.HEARTBEAT_ACK]) == "gone":
                log.info("node '%s' is gone; its name is free", fqcn)
                self.registry.release_name(fqcn)

    def _handle_send(self, identity: bytes, frames: list, now: float) -> None:
        if len(frames) not in (4, 5):
            return self._malformed(identity, "message needs a destination, a meta frame and at most one payload")
        destination, meta = frames[2], frames[3]
        if len(destination) > MAX_FQCN_LENGTH or len(meta) > proto.MAX_HEADER_SIZE:
            # Answer with a short error; never echo (and so never queue) a large frame.
            self.stats["oversize"] += 1
            self._malformed(identity, "oversize destination or meta frame")
            self._send([identity, proto.UNDELIVERABLE, bytes(destination.buffer[:MAX_FQCN_LENGTH]), b"{}",
                        f"a header frame exceeds the {proto.MAX_HEADER_SIZE}-byte limit".encode()])
            return None
        source = self.registry.touch(identity, now)
        if source is None:
            self._send([identity, proto.NOT_REGISTERED])
            self._send([identity, proto.UNDELIVERABLE, destination, meta, b"the sender is not registered"])
            return None
        target = self.registry.lookup(destination.bytes.decode("ascii", "replace"))
        if target is None:
            reason = f"'{destination.bytes.decode('ascii', 'replace')}' is not connected"
        else:
            failure = self._send([target.identity, proto.DELIVER, source.fqcn.encode(), meta, *frames[4:]])
            if failure is None:
                self.stats["routed"] += 1
                return None
            if failure == "gone":
                self.registry.remove_identity(target.identity)
                reason = f"'{target.fqcn}' is not connected"
            else:
                reason = f"'{target.fqcn}' is not keeping up (its queue is full)"
        self.stats["undeliverable"] += 1
        self._send([identity, proto.UNDELIVERABLE, destination, meta, reason.encode()])
        return None
