"""Cell: a node's connection to the broker, with request/reply and one-way messages."""

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Iterable, Optional, Union

import zmq
from zmq.utils.monitor import recv_monitor_message

from fedstream.common import protocol as proto
from fedstream.common.address import split_tcp_address
from fedstream.common.errors import (
    BrokerUnreachableError,
    CellError,
    RegistrationError,
    RemoteError,
    RequestTimeout,
    UnreachableError,
)
from fedstream.common.fqcn import validate_fqcn
from fedstream.common.kits import Kit, PathLike, load_kit
from fedstream.nodes.message import PAYLOAD_NONE, Message, Reply, encode_payload

log = logging.getLogger(__name__)

RequestCallback = Callable[[Message], Any]

KIND_REQUEST = "req"
KIND_REPLY = "rep"
KIND_ERROR = "err"
KIND_ONE_WAY = "ff"

DEFAULT_HEARTBEAT = 1.0
_BROKER_SILENCE = 3.0  # heartbeats without an answer before the broker counts as lost
_OUT_HWM = 1000
_REGISTER_RETRY = 0.1  # seconds between registration attempts while not registered
_BACKLOG_LIMIT = 64 << 20  # bytes waiting for the broker connection before requests are left unread
_STOP_DRAIN = 1.0  # seconds stop() spends forwarding messages sent just before it
_WAKE = b""  # posted to the I/O thread to make it look at the stop flag
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class PendingRequest:
    """A request in flight: `result(timeout)` returns the reply Message or raises."""

    def __init__(self, cell: "Cell", request_id: int, target: str) -> None:
        self._cell = cell
        self.request_id = request_id
        self.target = target
        self.future: Future = Future()

    def result(self, timeout: float) -> Message:
        """Wait up to `timeout` seconds for the reply; raise RequestTimeout after that."""
        try:
            return self.future.result(timeout)
        except FutureTimeout:
            self.cancel()
            raise RequestTimeout(f"no reply from '{self.target}' within {timeout:g} s") from None

    def done(self) -> bool:
        return self.future.done()

    def cancel(self) -> None:
        """Stop waiting for this reply."""
        self._cell._forget(self.request_id)


class Cell:
    """A named endpoint (FQCN) connected to the broker."""

    def __init__(self, fqcn: str, broker: str, context: Optional[zmq.Context] = None,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT, workers: int = 8,
                 kit: Optional[PathLike] = None) -> None:
        self.fqcn = validate_fqcn(fqcn)
        self.kit: Optional[Kit] = load_kit(kit) if kit is not None else None
        if self.kit is not None and self.kit.name != self.fqcn:
            raise ValueError(f"Cell '{self.fqcn}' cannot use kit {str(kit)!r}: its certificate is for "
                             f"'{self.kit.name}'.")
        self.broker = broker
        self._broker_host, _ = split_tcp_address(broker)
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval!r}.")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}.")
        self._hb_interval = heartbeat_interval
        self._workers = workers
        self._own_context = context is None
        self.context = context or zmq.Context()
        self._handlers: dict[tuple[str, str], tuple[RequestCallback, bool]] = {}
        self._pending: dict[int, PendingRequest] = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._reg_reason: Optional[str] = None
        self._reg_answer = threading.Event()
        self._fanout: dict = {}
        self._thread: Optional[threading.Thread] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._stop_hooks: list[Callable[[], None]] = []
        self._lifecycle_lock = threading.Lock()
        self._stopping = False
        self._backlog: deque = deque()  # messages the broker connection could not take yet
        self._backlog_bytes = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> "Cell":
        """Connect to the broker and register; raise RegistrationError if refused or unanswered."""
        if self._thread is not None:
            raise CellError(f"Cell '{self.fqcn}' is already started.")
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}.")
        self._stop.clear()
        dealer = self._dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_SIZE)
        dealer.setsockopt(zmq.SNDHWM, _OUT_HWM)
        dealer.setsockopt(zmq.RCVHWM, _OUT_HWM)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        self.secure_socket(dealer)
        monitor = dealer.get_monitor_socket(_HANDSHAKE_FAILURES)
        dealer.connect(self.broker)
        endpoint = f"inproc://fedstream-cell-{id(self)}-{time.monotonic_ns()}"
        self._out_pull = self.context.socket(zmq.PULL)
        self._out_pull.setsockopt(zmq.RCVHWM, _OUT_HWM)
        self._out_pull.bind(endpoint)
        self._out_push = self.context.socket(zmq.PUSH)
        self._out_push.setsockopt(zmq.SNDHWM, _OUT_HWM)
        self._out_push.setsockopt(zmq.SNDTIMEO, 10_000)
        self._out_push.connect(endpoint)
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix=f"cell-{self.fqcn}")
        self._thread = threading.Thread(target=self._io_loop, name=f"cell-io-{self.fqcn}", daemon=True)
        self._thread.start()
        handshake_failure = self._await_registration(monitor, timeout)
        if handshake_failure is not None:
            self.stop()
            raise RegistrationError(self._explain_handshake(handshake_failure))
        if not self._reg_answer.is_set():
            self.stop()
            raise RegistrationError(f"The broker at {self.broker} did not answer within {timeout:g} s.")
        if not self._registered.is_set():
            reason = self._reg_reason
            self.stop()
            raise RegistrationError(f"The broker refused '{self.fqcn}': {reason}.")
        return self

    def _await_registration(self, monitor: zmq.Socket, timeout: float) -> Optional[dict]:
        """Wait for the broker's answer to REGISTER; return the monitor event if the handshake failed."""
        deadline = time.monotonic() + timeout
        try:
            while not self._reg_answer.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if monitor.poll(int(min(remaining, 0.05) * 1000) + 1):
                    return recv_monitor_message(monitor)
            return None
        finally:
            self._dealer.disable_monitor()  # libzmq guards the monitor with its own lock
            monitor.close(linger=0)

    def _explain_handshake(self, event: dict) -> str:
        """One sentence for a failed connection handshake (ZeroMQ itself stays silent about it)."""
        if self.kit is None:  # a plain client sees a mismatch or a dropped connection, depending on timing
            return (f"The broker at {self.broker} refused the connection: it runs a secure federation "
                    f"and '{self.fqcn}' needs a kit of its project (--kit or kit=).")
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and \
                event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            return (f"The broker at {self.broker} runs without a kit; start '{self.fqcn}' without --kit "
                    f"or the broker with its kit.")
        return (f"The broker at {self.broker} refused the secure connection: it is not the broker of "
                f"project {self.kit.project} of kit {str(self.kit.path)!r}, or it runs without a kit.")

    def secure_socket(self, sock: zmq.Socket) -> zmq.Socket:
        """Make `sock` a CURVE client of the broker when this cell has a kit (call before connect)."""
        if self.kit is not None:
            for option, value in self.kit.client_options().items():
                sock.setsockopt(option, value)
        return sock

    def stop(self) -> None:
        """Leave the broker, fail pending requests, and release the sockets."""
        if threading.current_thread() is self._thread:  # called from a handler on the I/O thread
            threading.Thread(target=self.stop, name=f"cell-stop-{self.fqcn}", daemon=True).start()
            return
        with self._lifecycle_lock:
            if self._thread is None or self._stopping:
                return
            self._stopping = True
        try:
            self._shutdown()
        finally:
            self._stopping = False

    def _shutdown(self) -> None:
        assert self._thread is not None
        for hook in list(self._stop_hooks):
            try:
                hook()
            except Exception:  # a hook must not prevent the cell from stopping
                log.exception("stop hook of cell '%s' failed", self.fqcn)
        self._stop.set()
        with self._send_lock:
            try:
                self._out_push.send(_WAKE, zmq.NOBLOCK)
            except zmq.Again:
                pass
        self._thread.join(5.0)
        self._thread = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for request in pending.values():
            if not request.future.done():
                request.future.set_exception(CellError(f"Cell '{self.fqcn}' stopped."))
        self._out_push.close(linger=0)
        self._out_pull.close(linger=0)
        self._dealer.close(linger=500)
        self._registered.clear()
        self._reg_answer.clear()
        self._fanout = {}
        if self._own_context:
            self.context.term()

    def __enter__(self) -> "Cell":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_stop_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook()` first thing when the cell stops (used by the file features)."""
        self._stop_hooks.append(hook)

    @property
    def is_registered(self) -> bool:
        """True while the broker knows this cell."""
        return self._registered.is_set()

    def wait_registered(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until the cell is registered with the broker."""
        return self._registered.wait(timeout)

    @property
    def fanout_endpoints(self) -> tuple[str, str]:
        """(address to publish chunks to, address to subscribe to chunks from) on the broker."""
        if not self._fanout:
            raise CellError(f"Cell '{self.fqcn}' is not registered with a broker.")
        host = self._broker_host
        return f"tcp://{host}:{self._fanout['xsub_port']}", f"tcp://{host}:{self._fanout['xpub_port']}"

    # -- handlers --------------------------------------------------------------------------
    def register_request_cb(self, channel: str, topic: str, cb: RequestCallback, inline: bool = False) -> None:
        """Call `cb(message)` for requests and one-way messages on (channel, topic); `*` matches any topic.

        The callback's return value (bytes, a JSON value, None or a Reply) is the reply payload.
        Callbacks run in a worker pool; `inline=True` runs a fast, non-blocking one on the I/O thread.
        """
        if not isinstance(channel, str) or not channel or not isinstance(topic, str) or not topic:
            raise ValueError("channel and topic must be non-empty strings.")
        if not callable(cb):
            raise ValueError("the request callback must be callable.")
        self._handlers[(channel, topic)] = (cb, inline)

    def unregister_request_cb(self, channel: str, topic: str) -> None:
        """Remove the callback registered for (channel, topic), if any."""
        self._handlers.pop((channel, topic), None)

    # -- sending ---------------------------------------------------------------------------
    def send_request(self, channel: str, topic: str, target: str, payload: Any, timeout: float) -> Any:
        """Send a request and return the reply payload.

        Raises UnreachableError (target not connected), RequestTimeout, RemoteError (the target
        answered with an error) or BrokerUnreachableError.
        """
        return self.request(channel, topic, target, payload, timeout=timeout).payload

    def request(self, channel: str, topic: str, target: str, payload: Any = None,
                headers: Optional[dict] = None, timeout: float = 10.0) -> Message:
        """Send a request and return the whole reply Message (headers and payload)."""
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}.")
        return self.request_async(channel, topic, target, payload, headers).result(timeout)

    def request_async(self, channel: str, topic: str, target: str, payload: Any = None,
                      headers: Optional[dict] = None) -> PendingRequest:
        """Send a request without waiting; the returned PendingRequest gives the reply."""
        validate_fqcn(target)
        request_id = next(self._ids)
        pending = PendingRequest(self, request_id, target)
        with self._pending_lock:
            self._pending[request_id] = pending
        try:
            self._send_message(target, KIND_REQUEST, channel, topic, payload, headers, request_id)
        except BaseException:
            self._forget(request_id)
            raise
        return pending

    def fire_and_forget(self, channel: str, topic: str, targets: Union[str, Iterable[str]], payload: Any,
                        headers: Optional[dict] = None) -> None:
        """Send a one-way message to one or more targets; undeliverable ones are only logged."""
        for target in [targets] if isinstance(targets, str) else list(targets):
            validate_fqcn(target)
            self._send_message(target, KIND_ONE_WAY, channel, topic, payload, headers, 0)

    def _send_message(self, target: str, kind: str, channel: str, topic: str, payload: Any,
                      headers: Optional[dict], request_id: int) -> None:
        if self._thread is None:
            raise CellError(f"Cell '{self.fqcn}' is not started.")
        if isinstance(payload, Reply):
            headers, payload = payload.headers, payload.payload
        ptype, frames = encode_payload(payload)
        meta = {"k": kind, "id": request_id, "ch": channel, "tp": topic, "pt": ptype}
        if headers:
            meta["h"] = headers
        self._post([proto.SEND, target.encode(), proto.encode_json(meta), *frames])

    def _post(self, frames: list) -> None:
        if threading.current_thread() is self._thread:
            self._to_broker(frames)
            return
        with self._send_lock:
            try:
                self._out_push.send_multipart(frames, copy=False)
            except zmq.Again:
                raise CellError(f"Cell '{self.fqcn}' cannot send: its I/O thread is stuck.") from None

    def _forget(self, request_id: int) -> None:
        with self._pending_lock:
            self._pending.pop(request_id, None)

    def _resolve(self, request_id: int, result: Any = None, error: Optional[BaseException] = None) -> None:
        with self._pending_lock:
            pending = self._pending.pop(request_id, None)
        if pending is None or pending.future.done():
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(result)

    # -- I/O thread ------------------------------------------------------------------------
    def _to_broker(self, frames: list) -> None:
        """Send now, or keep the message in order until the connection has room."""
        if self._backlog:
            self._queue_backlog(frames)
            return
        try:
            self._dealer.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if self._registered.is_set():
                self._queue_backlog(frames)
            else:
                self._undeliverable_locally(frames)

    def _queue_backlog(self, frames: list) -> None:
        self._backlog.append(frames)
        self._backlog_bytes += sum(len(frame) for frame in frames)

    def _flush_backlog(self) -> None:
        while self._backlog:
            try:
                self._dealer.send_multipart(self._backlog[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._backlog_bytes -= sum(len(frame) for frame in self._backlog.popleft())

    def _drop_backlog(self) -> None:
        backlog, self._backlog, self._backlog_bytes = self._backlog, deque(), 0
        for frames in backlog:
            self._undeliverable_locally(frames)

    def _undeliverable_locally(self, frames: list) -> None:
        """The broker connection cannot take the message: fail its request at once."""
        if len(frames) < 3 or bytes(frames[0]) != proto.SEND:
            return
        try:
            meta = proto.decode_object(bytes(frames[2]))
        except proto.ProtocolError:
            return
        if meta.get("k") == KIND_REQUEST:
            self._resolve(meta.get("id", 0), error=BrokerUnreachableError(
                f"Cell '{self.fqcn}' cannot reach the broker at {self.broker}."))

    def _io_loop(self) -> None:
        poller = zmq.Poller()
        self._register_with_broker()
        last_heard = time.monotonic()
        next_beat = last_heard + _REGISTER_RETRY
        while not self._stop.is_set():
            timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000))
            # While the connection is full, stop taking new messages: senders feel backpressure.
            # Past a byte limit, stop reading requests too, so replies cannot pile up without bound.
            reading = zmq.POLLIN if self._backlog_bytes < _BACKLOG_LIMIT else 0
            poller.register(self._dealer, reading | (zmq.POLLOUT if self._backlog else 0))
            poller.register(self._out_pull, 0 if self._backlog else zmq.POLLIN)
            events = dict(poller.poll(min(timeout_ms, 200)))
            if self._backlog and events.get(self._dealer, 0) & zmq.POLLOUT:
                self._flush_backlog()
            if events.get(self._out_pull, 0) & zmq.POLLIN:
                for _ in range(256):
                    try:
                        frames = self._out_pull.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    if len(frames) > 1 or len(frames[0]):
                        self._to_broker(frames)
                    if self._backlog:
                        break
            if events.get(self._dealer, 0) & zmq.POLLIN:
                for _ in range(256):
                    try:
                        frames = self._dealer.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    last_heard = time.monotonic()
                    self._from_broker(frames)
            now = time.monotonic()
            if now >= next_beat:
                if self._registered.is_set() and now - last_heard > _BROKER_SILENCE * self._hb_interval:
                    log.warning("cell '%s' lost the broker at %s; reconnecting", self.fqcn, self.broker)
                    self._registered.clear()
                    self._drop_backlog()
                if self._registered.is_set():
                    self._to_broker([proto.HEARTBEAT])
                    next_beat = now + self._hb_interval
                else:
                    self._register_with_broker()
                    retry = self._hb_interval if self._reg_reason else _REGISTER_RETRY
                    next_beat = now + min(retry, self._hb_interval)
        if self._registered.is_set():
            self._drain_outbox(_STOP_DRAIN)
            self._to_broker([proto.BYE])

    def _drain_outbox(self, timeout: float) -> None:
        """Forward what other threads sent before stop(), so nothing already sent is lost."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._backlog:
                if self._dealer.poll(50, zmq.POLLOUT):
                    self._flush_backlog()
                continue
            try:
                frames = self._out_pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) > 1 or len(frames[0]):
                self._to_broker(frames)

    def _register_with_broker(self) -> None:
        hello: dict = {"v": proto.VERSION}
        if self.kit is not None:
            hello["cert"] = self.kit.certificate_bytes.decode("ascii")
        self._to_broker([proto.REGISTER, self.fqcn.encode(), proto.encode_json(hello)])

    def _from_broker(self, frames: list) -> None:
        cmd = frames[0].bytes
        try:
            if cmd == proto.DELIVER and len(frames) in (3, 4):
                self._on_deliver(frames)
            elif cmd == proto.UNDELIVERABLE and len(frames) == 4:
                self._on_undeliverable(frames)
            elif cmd == proto.REGISTERED and len(frames) == 3:
                self._on_registered(frames)
            elif cmd == proto.NOT_REGISTERED:
                if self._registered.is_set():
                    log.warning("broker at %s forgot cell '%s'; registering again", self.broker, self.fqcn)
                    self._registered.clear()
                    self._register_with_broker()
            elif cmd != proto.HEARTBEAT_ACK:
                log.debug("cell '%s' ignored an unknown frame %r from the broker", self.fqcn, cmd)
        except (proto.ProtocolError, UnicodeDecodeError, KeyError, TypeError) as exc:
            log.warning("cell '%s' dropped a malformed message: %s", self.fqcn, exc)

    def _on_registered(self, frames: list) -> None:
        status = frames[1].bytes
        if status == proto.REG_OK:
            self._reg_reason = None
            self._fanout = proto.decode_object(frames[2].bytes)
            if not self._registered.is_set():
                log.info("cell '%s' registered with broker %s", self.fqcn, self.broker)
            self._registered.set()
        else:
            reason = frames[2].bytes.decode("utf-8", "replace")
            if reason != self._reg_reason:
                log.error("broker refused cell '%s': %s", self.fqcn, reason)
            self._reg_reason = reason
        self._reg_answer.set()

    def _on_undeliverable(self, frames: list) -> None:
        destination = frames[1].bytes.decode("ascii", "replace")
        meta = proto.decode_object(frames[2].bytes)
        reason = frames[3].bytes.decode("utf-8", "replace")
        if meta.get("k") == KIND_REQUEST:
            error_type = UnreachableError if "not connected" in reason else BrokerUnreachableError
            self._resolve(meta.get("id", 0), error=error_type(f"Cannot deliver to '{destination}': {reason}."))
        elif meta.get("k") == KIND_ONE_WAY:
            log.warning("cell '%s' could not deliver a message to '%s': %s", self.fqcn, destination, reason)
        else:  # a reply to a requester that left or gave up
            log.debug("cell '%s' could not deliver a reply to '%s': %s", self.fqcn, destination, reason)

    def _on_deliver(self, frames: list) -> None:
        source = frames[1].bytes.decode("ascii")
        meta = proto.decode_object(frames[2].bytes)
        kind = meta["k"]
        headers = meta.get("h") or {}
        if not isinstance(headers, dict):
            raise proto.ProtocolError("headers are not an object")
        frame = frames[3] if len(frames) == 4 else None
        message = Message(source, str(meta.get("ch", "")), str(meta.get("tp", "")), headers,
                          meta.get("pt", PAYLOAD_NONE), frame)
        if kind == KIND_REPLY:
            self._resolve(meta["id"], result=message)
        elif kind == KIND_ERROR:
            self._resolve(meta["id"], error=RemoteError(f"'{source}' answered: {message.payload}"))
        elif kind in (KIND_REQUEST, KIND_ONE_WAY):
            self._dispatch(message, meta["id"] if kind == KIND_REQUEST else 0)

    def _dispatch(self, message: Message, request_id: int) -> None:
        entry = self._handlers.get((message.channel, message.topic)) or self._handlers.get((message.channel, "*"))
        if entry is None:
            if request_id:
                self._reply(message, request_id, KIND_ERROR,
                            f"'{self.fqcn}' has no handler for channel '{message.channel}' topic '{message.topic}'")
            else:
                log.debug("cell '%s' has no handler for %s/%s", self.fqcn, message.channel, message.topic)
            return
        callback, inline = entry
        if inline:
            self._run_callback(callback, message, request_id)
        elif self._executor is not None:
            self._executor.submit(self._run_callback, callback, message, request_id)

    def _run_callback(self, callback: RequestCallback, message: Message, request_id: int) -> None:
        try:
            result = callback(message)
        except Exception as exc:
            log.exception("handler for %s/%s on '%s' failed", message.channel, message.topic, self.fqcn)
            if request_id:
                self._reply(message, request_id, KIND_ERROR, f"handler failed: {type(exc).__name__}: {exc}")
            return
        if request_id:
            try:
                self._reply(message, request_id, KIND_REPLY, result)
            except ValueError as exc:
                self._reply(message, request_id, KIND_ERROR, str(exc))

    def _reply(self, message: Message, request_id: int, kind: str, result: Any) -> None:
        headers = None
        if isinstance(result, Reply):
            headers, result = result.headers, result.payload
        ptype, frames = encode_payload(result)
        meta = {"k": kind, "id": request_id, "ch": message.channel, "tp": message.topic, "pt": ptype}
        if headers:
            meta["h"] = headers
        try:
            self._post([proto.SEND, message.source.encode(), proto.encode_json(meta), *frames])
        except CellError as exc:
            log.warning("cell '%s' could not reply to '%s': %s", self.fqcn, message.source, exc)
