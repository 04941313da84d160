"""Cell: a node's connection to the broker, with request/reply and one-way messages.

Threading rule (every change to this module follows it):

1. **One I/O thread reads the broker connection; any thread sends on it, under
   `_socket_lock`.** The I/O thread creates the DEALER and the outbox PULL socket, and closes
   them when it ends. While other threads may send (`_accepting`, set with the first REGISTER
   and cleared before BYE, both under the lock), every use of the DEALER, by any thread,
   happens under `_socket_lock` (the lock gives ZeroMQ the memory barrier it needs to use a
   socket from several threads), so a request or a reply leaves from the thread that makes it,
   with no hand-off. Nothing goes out while a REGISTER waits for the connection: the broker
   must read REGISTER first. While it sleeps, the I/O thread polls only the DEALER's file
   descriptor, never the socket itself. That descriptor is edge-triggered: a send by another
   thread may consume the signal of a message that arrived, so a sender that then finds input
   waiting (or that started a backlog, which the I/O thread must flush once the connection has
   room) wakes the I/O thread through the outbox, which carries only such wake-ups (PUSH side
   under `_send_lock`; `stop()` closes it). Messages the connection cannot take yet wait in
   order in the backlog; a thread other than the I/O thread waits (bounded, afresh each time
   the backlog moves) for room in it. After `_accepting` is cleared, the I/O thread alone uses
   the DEALER (BYE, then close).
2. **No disk I/O and no user code on the I/O thread.** It moves frames, decodes headers
   with the bounded codec of `nodes/message.py`, resolves pending requests and dispatches.
   Request callbacks run in the Cell's pool: a bounded `WorkerPool` (`workers`
   threads, at most `_MAX_QUEUED_CALLBACKS` calls or `_MAX_QUEUED_BYTES` waiting; beyond
   that a request is answered "busy" at once) — never a new thread per message. Its threads
   are daemons: a process that exits without `stop()` does not wait for callbacks in it.
   `register_request_cb(..., inline=True)` runs a callback on the I/O thread for the few
   internal handlers that only record an event: such a callback must not block, wait or
   touch the disk, or every message of the Cell waits with it; it may return `InPool(work)`
   to have `work()` make the reply in the pool. A callback whose `Reply` has `then` set gets
   `then()` called on its thread once the reply was handed to the connection.
3. **Any exception from one message is contained.** The I/O thread drops the message,
   counts it in `stats`, logs it at most once per peer per minute, and keeps serving.
4. **The I/O thread sleeps until there is work.** It waits in one poll for a message (from the
   broker, a sender's or stop()'s wake-up on the outbox), for the connection to come up
   (a REGISTER that could not go out yet), or for its next heartbeat; a tick of `_BACKLOG_TICK`
   only while the connection is full. An idle Cell wakes twice per heartbeat and no more.
5. **`stop()` checks.** It joins the I/O thread with a timeout and logs an error if the
   thread did not end (its sockets and the context are then left alone, not closed under it).

Who may answer: a reply, an error reply or an `undeliverable` notice resolves a pending
request only if it comes from (is about) the request's target, as stamped by the broker,
and carries the request's id; ids are 64-bit random, so another node can neither guess
nor reuse them. Anything else is ignored and counted in `stats["forged_replies"]`.
"""

import asyncio
import errno
import logging
import secrets
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Generator, Iterable, Optional, Union

import zmq
import zmq.asyncio
from zmq.backend import zmq_poll
from zmq.utils.monitor import recv_monitor_message

from fedstream.common import protocol as proto
from fedstream.common.address import parse_endpoint, reachable
from fedstream.common.errors import (
    BrokerUnreachableError,
    CellError,
    ConnectionFull,
    NoBrokerError,
    RegistrationTimeout,
    RegistrationError,
    RemoteError,
    RequestTimeout,
    UnreachableError,
)
from fedstream.common.fqcn import validate_fqcn
from fedstream.common.frames import NOBLOCK, POLLIN, POLLOUT, events, readable, recv_frames, send_frames
from fedstream.common.peerlog import PeerErrors
from fedstream.nodes.message import (
    KIND_ERROR,
    KIND_ONE_WAY,
    KIND_REPLY,
    KIND_REQUEST,
    InPool,
    Message,
    Meta,
    Reply,
    decode_meta,
    encode_meta,
    encode_payload,
)
from fedstream.common.kits import Kit, PathLike, load_kit
from fedstream.nodes.workers import WorkerPool

log = logging.getLogger(__name__)

RequestCallback = Callable[[Message], Any]

DEFAULT_HEARTBEAT = 4.0  # seconds between heartbeats (at most; see _BEATS_PER_NODE_TIMEOUT)
_BEATS_PER_NODE_TIMEOUT = 2.5  # heartbeats within the broker's node timeout, whatever heartbeat_interval says
_MIN_BEAT = 0.1  # seconds: the shortest heartbeat interval a broker's node timeout can ask for
_BROKER_SILENCE = 3.0  # heartbeats without an answer before the broker counts as lost
_OUT_HWM = 1000  # messages: the DEALER's queues, the outbox, and the backlog other threads may fill
# ZMTP pings (answered by libzmq, not by the I/O thread) only find dead TCP connections, so that the socket
# reconnects; the heartbeats above find a silent broker. Every 10 s: 1000 idle Cells barely notice them.
_ZMTP_HEARTBEAT_IVL = 10_000  # ms
_ZMTP_HEARTBEAT_TIMEOUT = 10_000  # ms without traffic after a ping before the connection is dropped
_BACKLOG_TICK = 0.2  # seconds between looks at the connection while it is full (a safety net for its signal)
_BACKLOG_LIMIT = 64 << 20  # bytes waiting for the broker connection before requests are left unread
_CALLBACK_GRACE = 2.0  # seconds stop() lets callbacks already running finish, so that their replies go out
_SEND_WAIT = 10.0  # seconds a sending thread waits for room in the backlog before giving up
_STOP_DRAIN = 1.0  # seconds stop() spends sending what the backlog holds
_BYE_WAIT = 0.5  # seconds stop() waits for the broker to confirm its BYE
_WAKE = b""  # posted to the I/O thread to make it look at the DEALER and the stop flag
_JOIN_TIMEOUT = 5.0  # seconds stop() waits for the I/O thread
_MAX_QUEUED_CALLBACKS = 1024  # callbacks waiting for or running in the pool
_MAX_QUEUED_BYTES = 64 << 20  # payload bytes held by those callbacks
_ERROR_LOG_INTERVAL = 60.0
# What the command, destination and framing add to a message, next to meta and payload.
_ENVELOPE = 2 + 256
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


def _on_event_loop() -> bool:
    """Whether the calling thread runs an asyncio event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


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

    def _settle(self, result: Any = None, error: Optional[BaseException] = None) -> None:
        """Complete the request once (the cell took it out of its pending requests first)."""
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def cancel(self) -> None:
        """Stop waiting for this reply."""
        self._cell._forget(self.request_id)

    def __await__(self) -> Generator[Any, None, Message]:
        """`await pending` inside asyncio gives the reply Message; cancelling the await cancels the request."""
        waiter = asyncio.wrap_future(self.future)
        try:  # shielded: the reply side never sees a cancelled future, only a forgotten request
            return (yield from asyncio.shield(waiter).__await__())
        except asyncio.CancelledError:
            self.cancel()
            raise


class Cell:
    """A named endpoint (FQCN) connected to the broker.

    Many Cells in one process share one `context=` whose socket limit is raised (`zmq.MAX_SOCKETS`):
    a Cell holds 3 sockets (the broker connection and its outbox pair), 2 more while it starts.
    """

    def __init__(self, fqcn: str, broker: str, context: Optional[zmq.Context] = None,
                 heartbeat_interval: float = DEFAULT_HEARTBEAT, workers: int = 8,
                 kit: Optional[PathLike] = None) -> None:
        self.fqcn = validate_fqcn(fqcn)
        self.kit: Optional[Kit] = load_kit(kit) if kit is not None else None
        if self.kit is not None and self.kit.name != self.fqcn:
            raise ValueError(f"Cell '{self.fqcn}' cannot use kit {str(kit)!r}: its certificate is for "
                             f"'{self.kit.name}'.")
        self.broker = broker
        self._broker_endpoint = parse_endpoint(broker)
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval!r}.")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}.")
        self._hb_interval = heartbeat_interval
        self._beat = heartbeat_interval  # the interval in use: shorter if the broker's node timeout asks for it
        self._workers = workers
        if context is not None and not isinstance(context, zmq.Context):
            raise ValueError(f"context must be a zmq.Context, got {type(context).__name__}.")
        if isinstance(context, zmq.asyncio.Context):  # its sockets need an event loop; the I/O thread has none
            context = zmq.Context.shadow(context.underlying)
        self._own_context = context is None
        self.context = context or zmq.Context()
        self._handlers: dict[tuple[str, str], tuple[RequestCallback, bool]] = {}
        self._pending: dict[int, PendingRequest] = {}
        self._pending_lock = threading.Lock()
        self.stats: Counter = Counter()
        self._peer_errors = PeerErrors(_ERROR_LOG_INTERVAL)
        self._handler_errors = PeerErrors(_ERROR_LOG_INTERVAL)
        self._queued_lock = threading.Lock()
        self._queued_calls = 0
        self._queued_bytes = 0
        self._send_lock = threading.Lock()  # the outbox PUSH (wake-ups), shared by senders and stop()
        self._socket_lock = threading.Lock()  # the DEALER and the backlog
        self._room = threading.Condition(self._socket_lock)  # notified as the backlog drains or the DEALER closes
        self._dealer: Optional[zmq.Socket] = None
        self._accepting = False  # other threads may send on the DEALER (it is open and set up)
        self._io_asleep = False  # the I/O thread polls and no wake-up was posted since
        self._backlog_moved = 0  # counts the times the connection took messages from the backlog
        self._io_thread: Optional[threading.Thread] = None  # the latest I/O thread, kept after stop()
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._reg_reason: Optional[str] = None
        self._reg_answer = threading.Event()
        self._open_error: Optional[str] = None  # why the I/O thread could not open its sockets
        self._handshake_failure: Optional[dict] = None  # a monitor event: the broker refused the handshake
        self._connected = threading.Event()  # something accepted the connection (a monitor event)
        self._monitor: Optional[zmq.Socket] = None
        self._fanout: tuple[str, str] = ("", "")
        self._thread: Optional[threading.Thread] = None
        self._executor: Optional[WorkerPool] = None
        self._stop_hooks: list[Callable[[], None]] = []
        self._lifecycle_lock = threading.Lock()
        self._stopping = False
        self._backlog: deque = deque()  # messages the broker connection could not take yet
        self._register_due = False  # a REGISTER waits for the connection to come up
        self._backlog_bytes = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 10.0, connect_timeout: Optional[float] = None) -> "Cell":
        """Connect to the broker and register; raise RegistrationError if refused or unanswered.

        With `connect_timeout`, raise NoBrokerError after that many seconds if nothing accepted a
        connection at the broker address (no broker listens there); `timeout` bounds the whole start.
        """
        if self._thread is not None:
            raise CellError(f"Cell '{self.fqcn}' is already started.")
        if self._io_thread is not None and self._io_thread.is_alive():
            raise CellError(f"Cell '{self.fqcn}' cannot start again: its previous I/O thread has not ended "
                            f"(a callback on it may be blocking).")
        if timeout <= 0 or (connect_timeout is not None and connect_timeout <= 0):
            raise ValueError(f"timeouts must be positive, got {timeout!r} and {connect_timeout!r}.")
        self._stop.clear()
        self._open_error = None
        if self._own_context and self.context.closed:  # stop() ended the context it made: a new start makes one
            self.context = zmq.Context()
        self._outbox_endpoint = f"inproc://fedstream-cell-{id(self)}-{time.monotonic_ns()}"
        try:
            self._out_push = self.context.socket(zmq.PUSH)
        except zmq.ZMQError as exc:
            raise CellError(self._cannot_open(exc)) from None
        self._out_push.setsockopt(zmq.SNDHWM, _OUT_HWM)
        self._out_push.connect(self._outbox_endpoint)  # inproc may connect before the I/O thread binds
        self._executor = WorkerPool(self._workers, f"cell-{self.fqcn}")
        self._thread = self._io_thread = threading.Thread(target=self._io_loop, name=f"cell-io-{self.fqcn}",
                                                          daemon=True)
        self._thread.start()
        if connect_timeout is not None and connect_timeout < timeout and self._broker_endpoint.scheme != "inproc":
            self._reg_answer.wait(connect_timeout)
            if not self._reg_answer.is_set() and not self._connected.is_set():
                self.stop()
                raise NoBrokerError(f"No broker is listening at {self.broker} (nothing accepted a connection "
                                    f"within {connect_timeout:g} s).")
            timeout -= connect_timeout
        self._reg_answer.wait(timeout)
        if self._open_error is not None:
            reason = self._open_error
            self.stop()
            raise CellError(reason)
        handshake_failure = self._handshake_failure
        if handshake_failure is not None:
            self.stop()
            raise RegistrationError(self._explain_handshake(handshake_failure))
        if not self._reg_answer.is_set():
            self.stop()
            raise RegistrationTimeout(f"The broker at {self.broker} did not answer within {timeout:g} s.")
        if not self._registered.is_set():
            reason = self._reg_reason
            self.stop()
            raise RegistrationError(f"The broker refused '{self.fqcn}': {reason}.")
        return self

    def _cannot_open(self, exc: zmq.ZMQError) -> str:
        """One sentence for a socket the Cell could not open (most often: the context's socket limit)."""
        if exc.errno == errno.EMFILE:
            return (f"Cell '{self.fqcn}' cannot open its sockets: its ZeroMQ context has reached its limit of "
                    f"{self.context.get(zmq.MAX_SOCKETS)} sockets (a Cell holds 3, and 2 more while it starts). "
                    f"A process hosting many Cells must raise it (ctx.set(zmq.MAX_SOCKETS, n) before the "
                    f"context's first socket) and give them context=ctx.")
        return f"Cell '{self.fqcn}' cannot open its connection to the broker at {self.broker}: {exc}"

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
        """Leave the broker, fail pending requests, and release the sockets.

        Callbacks already running in the pool get up to 2 s to return first, so their replies go
        out (not when stop() is called on an asyncio loop's thread, or by the callback itself).
        """
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

    def _open_sockets(self) -> None:
        """Create the broker connection and the outbox end; called on the I/O thread, which owns them."""
        self._dealer = self._out_pull = self._monitor = None  # what a failure leaves open is closed
        dealer = self._dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_SIZE)
        dealer.setsockopt(zmq.SNDHWM, _OUT_HWM)
        dealer.setsockopt(zmq.RCVHWM, _OUT_HWM)
        dealer.setsockopt(zmq.RECONNECT_IVL, 100)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.setsockopt(zmq.HEARTBEAT_IVL, _ZMTP_HEARTBEAT_IVL)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ZMTP_HEARTBEAT_TIMEOUT)
        if self._broker_endpoint.is_ipv6:
            dealer.setsockopt(zmq.IPV6, 1)
        self.secure_socket(dealer)
        # ZeroMQ keeps a failed CURVE handshake to itself: watch for one until the first registration answer.
        self._monitor = dealer.get_monitor_socket(_HANDSHAKE_FAILURES | zmq.EVENT_CONNECTED)
        dealer.connect(self.broker)
        self._out_pull = self.context.socket(zmq.PULL)
        self._out_pull.setsockopt(zmq.RCVHWM, _OUT_HWM)
        self._out_pull.bind(self._outbox_endpoint)

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            with self._socket_lock:
                self._dealer.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

    def _watch_handshake(self) -> None:
        """Note a failed handshake and wake start(); called on the I/O thread when the monitor has an event."""
        event = recv_monitor_message(self._monitor)
        if event["event"] == zmq.EVENT_CONNECTED:
            self._connected.set()
        elif event["event"] & _HANDSHAKE_FAILURES and not self._reg_answer.is_set():
            self._handshake_failure = event
            self._reg_answer.set()

    def _close_sockets(self) -> None:
        """Close the I/O thread's sockets; called on the I/O thread as it ends."""
        self._close_monitor()
        if self._out_pull is not None:
            self._out_pull.close(linger=0)
        with self._socket_lock:
            self._accepting = False
            self._room.notify_all()  # a sender waiting for room learns that the cell stopped
            if self._dealer is not None:
                self._dealer.close(linger=500)
        self._drop_backlog(stopping=True)  # what the connection never took fails now, not at a next start

    def _shutdown(self) -> None:
        assert self._thread is not None
        for hook in list(self._stop_hooks):
            try:
                hook()
            except Exception:  # a hook must not prevent the cell from stopping
                log.exception("stop hook of cell '%s' failed", self.fqcn)
        self._let_running_callbacks_answer()
        self._stop.set()
        self._wake_io()
        self._thread.join(_JOIN_TIMEOUT)
        io_ended = not self._thread.is_alive()
        if not io_ended:
            log.error("cell '%s': its I/O thread did not end within %g s; leaving its sockets open",
                      self.fqcn, _JOIN_TIMEOUT)
        self._thread = None
        if self._executor is not None:
            for fn, args in self._executor.shutdown():
                if fn == self._run_queued:  # never to run: its share of the queue limits is free again
                    self._release(args[3])
        with self._pending_lock:
            pending, self._pending = self._pending, {}
        for request in pending.values():
            request._settle(error=self._stopped())
        with self._send_lock:  # a sender may still be waking the I/O thread: never close under it
            self._out_push.close(linger=0)
        self._registered.clear()
        self._reg_answer.clear()
        self._handshake_failure = None
        self._connected.clear()
        self._fanout = ("", "")
        if self._own_context and io_ended:
            self.context.term()

    def _let_running_callbacks_answer(self) -> None:
        """Wait (bounded) for the pool's running callbacks, whose replies can still go out now.

        Not on a thread running an asyncio loop: the loop must not block, and a callback of
        `fedstream.nodes.aio` waits for that very loop."""
        if self._executor is None or _on_event_loop():
            return
        if not self._executor.wait_for_running(_CALLBACK_GRACE):
            log.warning("cell '%s' stops with callbacks still running after %g s: what they answer is not sent",
                        self.fqcn, _CALLBACK_GRACE)

    def __enter__(self) -> "Cell":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def add_stop_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook()` first thing when the cell stops (used by the file features)."""
        self._stop_hooks.append(hook)

    def call_soon(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run `fn(*args, **kwargs)` in the Cell's worker pool, never on its I/O thread.

        For user callbacks of the file features; an exception is logged, not raised. Once the
        cell has stopped, `fn` runs in the calling thread.
        """
        def run() -> None:
            try:
                fn(*args, **kwargs)
            except Exception:
                log.exception("cell '%s': callback %s failed", self.fqcn, getattr(fn, "__qualname__", fn))

        executor = self._executor
        try:
            if executor is not None:
                executor.submit(run)
                return
        except RuntimeError:  # the pool shut down meanwhile
            pass
        run()

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
        if not self._fanout[0]:
            raise CellError(f"Cell '{self.fqcn}' is not registered with a broker.")
        return self._fanout

    # -- handlers --------------------------------------------------------------------------
    def register_request_cb(self, channel: str, topic: str, cb: RequestCallback, inline: bool = False) -> None:
        """Call `cb(message)` for requests and one-way messages on (channel, topic); `*` matches any topic.

        The callback's return value (bytes, a JSON value, None or a Reply) is the reply payload.
        Callbacks run in the Cell's bounded worker pool. `inline=True` runs the callback on the
        I/O thread instead: it must return at once and must not block, wait on a reply or do
        disk I/O, or every message of the Cell waits with it (see the module's threading rule).
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
                      headers: Optional[dict] = None, *, block: bool = True) -> PendingRequest:
        """Send a request without waiting for the reply; the returned PendingRequest gives it.

        While the connection to the broker takes nothing and its backlog is full, the send waits
        for room (CellError after 10 s without progress); with `block=False` it raises
        ConnectionFull at once instead.
        """
        validate_fqcn(target)
        with self._pending_lock:
            request_id = self._new_request_id()
            pending = PendingRequest(self, request_id, target)
            self._pending[request_id] = pending
        try:
            self._send_message(target, KIND_REQUEST, channel, topic, payload, headers, request_id, block)
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

    def _new_request_id(self) -> int:
        """A 64-bit random id no other node can guess; called under `_pending_lock`."""
        while True:
            request_id = secrets.randbits(64)
            if request_id and request_id not in self._pending:
                return request_id

    def _send_message(self, target: str, kind: str, channel: str, topic: str, payload: Any,
                      headers: Optional[dict], request_id: int, block: bool = True) -> None:
        if self._thread is None:  # never started, or stopped (stop() sets _stop before it lets go of the thread)
            raise self._stopped() if self._stop.is_set() else CellError(f"Cell '{self.fqcn}' is not started.")
        self._post(self._encode(target, kind, channel, topic, payload, headers, request_id), block)

    @staticmethod
    def _encode(target: str, kind: str, channel: str, topic: str, payload: Any,
                headers: Optional[dict], request_id: int) -> list:
        """The frames of one message; ValueError (saying "too large") if the broker would refuse it."""
        if isinstance(payload, Reply):
            headers, payload = payload.headers, payload.payload
        ptype, frames = encode_payload(payload)
        meta = encode_meta(Meta(kind, request_id, channel, topic, ptype, headers or {}))
        size = _ENVELOPE + len(meta) + sum(_frame_size(frame) for frame in frames)
        if size > proto.MAX_MESSAGE_SIZE:
            raise ValueError(f"Message to '{target}' is too large: {size} bytes, the broker accepts at most "
                             f"{proto.MAX_MESSAGE_SIZE} bytes per message.")
        return [proto.SEND, target.encode(), meta, *frames]

    def _post(self, frames: list, block: bool = True) -> None:
        """Send on the broker connection from any thread, in order behind what it could not take yet.

        Another thread waits for room in the backlog; with `block=False` it gets ConnectionFull instead."""
        on_io_thread = threading.current_thread() is self._io_thread
        with self._socket_lock:
            if not on_io_thread:
                self._wait_for_room(block)
            touches_dealer = not self._backlog and not self._register_due  # else it joins the backlog or fails
            sent = self._send_or_queue(frames)
            wake = not on_io_thread and touches_dealer and self._io_asleep and self._io_needed()
            if wake:
                self._io_asleep = False
        if not sent:
            self._undeliverable_locally(frames)
        if wake:
            self._wake_io()

    def _wait_for_room(self, block: bool) -> None:
        """Wait until the backlog has room for one more message (raise ConnectionFull if not `block`).

        Called under `_socket_lock`."""
        deadline = 0.0
        moved = -1
        while True:
            if not self._accepting:
                raise self._stopped()
            if len(self._backlog) < _OUT_HWM and self._backlog_bytes < _BACKLOG_LIMIT:
                return
            if not block:
                raise ConnectionFull(f"Cell '{self.fqcn}' cannot send now: {len(self._backlog)} messages wait for "
                                     f"the connection to the broker.")
            now = time.monotonic()
            if moved != self._backlog_moved:  # the connection took something: wait afresh
                moved, deadline = self._backlog_moved, now + _SEND_WAIT
            if now >= deadline:
                raise CellError(f"Cell '{self.fqcn}' cannot send: the connection to the broker took nothing "
                                f"for {_SEND_WAIT:g} s.")
            self._room.wait(deadline - now)

    def _stopped(self) -> CellError:
        return CellError(f"Cell '{self.fqcn}' stopped.")

    def _io_needed(self) -> bool:
        """Whether the I/O thread must look at the DEALER after a send (its descriptor may not say so).

        Called under `_socket_lock`: a message went to a new backlog, or one waits to be read."""
        return bool(self._backlog) or readable(self._dealer)

    def _wake_io(self) -> None:
        """Make the I/O thread leave its poll and look at the DEALER and the stop flag."""
        with self._send_lock:
            if not self._out_push.closed:
                try:
                    self._out_push.send(_WAKE, NOBLOCK)
                except zmq.Again:  # the outbox is full of wake-ups already
                    pass

    def _forget(self, request_id: int) -> None:
        with self._pending_lock:
            self._pending.pop(request_id, None)

    def _resolve(self, request_id: int, source: str, result: Any = None,
                 error: Optional[BaseException] = None) -> None:
        """Complete a pending request, but only from (or about) the node it was sent to."""
        with self._pending_lock:
            pending = self._pending.get(request_id)
            if pending is None or pending.target != source:
                pending = None
            else:
                del self._pending[request_id]
        if pending is None:
            self.stats["forged_replies"] += 1
            log.debug("cell '%s' ignored an answer from '%s' to no request of its own", self.fqcn, source)
            return
        pending._settle(result, error)

    # -- I/O thread ------------------------------------------------------------------------
    def _send_or_queue(self, frames: list) -> bool:
        """Send now, or keep the message in order until the connection has room; under `_socket_lock`.

        False: the message cannot go (the connection is down and the cell not registered)."""
        if self._backlog:
            self._queue_backlog(frames)
            return True
        if self._register_due:  # the connection is down, and REGISTER must be the first to go when it is up
            return False
        try:
            send_frames(self._dealer, frames, NOBLOCK)
        except zmq.Again:
            if not self._registered.is_set():
                return False
            self._queue_backlog(frames)
        return True

    def _queue_backlog(self, frames: list) -> None:
        self._backlog.append(frames)
        self._backlog_bytes += sum(_frame_size(frame) for frame in frames)

    def _flush_backlog(self) -> None:
        """Send what waits, in order, while the connection takes it; under `_socket_lock`."""
        sent = False
        while self._backlog:
            try:
                send_frames(self._dealer, self._backlog[0], NOBLOCK)
            except zmq.Again:
                break
            self._backlog_bytes -= sum(_frame_size(frame) for frame in self._backlog.popleft())
            sent = True
        if sent:
            self._backlog_moved += 1
            self._room.notify_all()

    def _drop_backlog(self, stopping: bool = False) -> None:
        with self._socket_lock:
            backlog, self._backlog, self._backlog_bytes = self._backlog, deque(), 0
            self._room.notify_all()
        for frames in backlog:
            self._undeliverable_locally(frames, stopping)

    def _undeliverable_locally(self, frames: list, stopping: bool = False) -> None:
        """The broker connection cannot take the message (or the cell stops): fail its request at once."""
        if len(frames) < 3 or bytes(frames[0]) != proto.SEND:
            return
        try:  # one of this cell's own messages: its meta decodes
            meta = decode_meta(bytes(frames[2]))
        except proto.ProtocolError:
            return
        if meta.kind != KIND_REQUEST:
            return
        with self._pending_lock:
            pending = self._pending.pop(meta.request_id, None)
        if pending is not None:  # None: its caller gave up already
            pending._settle(error=self._stopped() if stopping else BrokerUnreachableError(
                f"Cell '{self.fqcn}' cannot reach the broker at {self.broker}."))

    def _io_loop(self) -> None:
        try:
            self._open_sockets()
        except zmq.ZMQError as exc:
            self._close_sockets()  # in a shared context, a socket left open would block its term()
            self._open_error = self._cannot_open(exc)
            self._reg_answer.set()
            return
        try:
            self._serve()
        finally:
            self._close_sockets()

    def _serve(self) -> None:
        """Move messages until stop(); sleep in poll until the DEALER or the outbox stirs, or the next heartbeat."""
        self._beat = self._hb_interval
        with self._socket_lock:
            dealer_fd = self._dealer.get(zmq.FD)
            self._register_with_broker()
            self._accepting = True  # other threads send from now on, behind the REGISTER
        last_heard = last_beat = time.monotonic()  # last_beat: when the broker last got a beat or a REGISTER
        items: list = []
        while not self._stop.is_set():
            next_beat = last_beat + self._beat  # registering may shorten the interval
            timeout = next_beat - time.monotonic()
            if self._backlog:
                timeout = min(timeout, _BACKLOG_TICK)
            if self._monitor is not None and self._reg_answer.is_set():
                self._close_monitor()
            if len(items) != (2 if self._monitor is None else 3):
                items = [(dealer_fd, POLLIN), (self._out_pull, POLLIN)]
                if self._monitor is not None:
                    items.append((self._monitor, POLLIN))
            if not self._tend_dealer(sleep=True):
                for sock, _ in zmq_poll(items, max(0, int(timeout * 1000) + 1)):
                    if sock is self._out_pull:
                        self._take_wakeups()
                    elif sock is self._monitor:
                        self._watch_handshake()
                with self._socket_lock:
                    self._io_asleep = False
            for _ in range(256):  # then look at the rest of the loop (stop flag, heartbeat)
                frames = self._next_message()
                if frames is None:
                    break
                last_heard = time.monotonic()
                try:
                    self._from_broker(frames)
                except Exception as exc:  # one message must never stop the I/O thread
                    self._dropped(frames, exc)
            now = time.monotonic()
            if now >= next_beat:
                if self._registered.is_set() and now - last_heard > _BROKER_SILENCE * self._beat:
                    log.warning("cell '%s' lost the broker at %s; reconnecting", self.fqcn, self.broker)
                    self._registered.clear()
                    self._drop_backlog()
                if self._registered.is_set():
                    self._post([proto.HEARTBEAT])
                elif not self._register_due:  # sent but unanswered (or refused): ask again
                    with self._socket_lock:
                        self._register_with_broker()
                last_beat = now
        if self._registered.is_set():
            self._flush_before_bye(dealer_fd, _STOP_DRAIN)
            self._say_bye()

    def _tend_dealer(self, sleep: bool) -> bool:
        """Send what waits for the connection if it has room; whether a message waits to be read.

        With `sleep`, a False answer also marks the I/O thread asleep, under the same lock as the look:
        from then on a sender that finds work for it wakes it (see `_post`)."""
        with self._socket_lock:
            ready = events(self._dealer)
            if ready & POLLOUT and (self._backlog or self._register_due):
                if self._register_due and not self._backlog:
                    self._register_with_broker()
                self._flush_backlog()
                ready = events(self._dealer)
            # Past a byte limit of waiting messages, stop reading: replies cannot pile up without bound.
            readable_now = bool(ready & POLLIN) and self._backlog_bytes < _BACKLOG_LIMIT
            self._io_asleep = sleep and not readable_now
            return readable_now

    def _next_message(self) -> Optional[list]:
        """The next message from the broker, or None if none waits (or the backlog is over its limit)."""
        with self._socket_lock:
            if self._backlog_bytes >= _BACKLOG_LIMIT or not readable(self._dealer):
                return None
            return recv_frames(self._dealer, NOBLOCK)

    def _take_wakeups(self) -> None:
        """Empty the outbox: it only carries wake-ups (the DEALER and the stop flag are looked at next)."""
        for _ in range(_OUT_HWM):
            if not readable(self._out_pull):
                return
            self._out_pull.recv(NOBLOCK)

    def _say_bye(self) -> None:
        """Unregister, and wait (bounded) until the broker has done it, so a cell started next under this name
        is not refused: the broker reads a connection in order, and answers the heartbeat after BYE with N.

        Other threads can no longer send: what they send from now on fails with CellError."""
        with self._socket_lock:
            self._accepting = False
            self._room.notify_all()
            if self._backlog:  # the connection takes nothing: the broker forgets the name after its node timeout
                return
        try:
            self._dealer.send(proto.BYE, zmq.NOBLOCK)
            self._dealer.send(proto.HEARTBEAT, zmq.NOBLOCK)
        except zmq.Again:
            return
        deadline = time.monotonic() + _BYE_WAIT
        while self._dealer.poll(max(1, int((deadline - time.monotonic()) * 1000)), zmq.POLLIN):
            try:
                cmd = self._dealer.recv_multipart(zmq.NOBLOCK, copy=False)[0].bytes
            except zmq.Again:
                continue
            if cmd == proto.NOT_REGISTERED or time.monotonic() >= deadline:
                return  # anything else (a message for this leaving cell) is dropped

    def _flush_before_bye(self, dealer_fd: int, timeout: float) -> None:
        """Send what waits for the connection (bounded), so nothing already sent is lost by stopping.

        It sleeps on the DEALER's descriptor without the lock: senders told not to wait (`block=False`)
        must not wait for the lock either."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._socket_lock:
                if self._backlog and events(self._dealer) & POLLOUT:
                    self._flush_backlog()
                if not self._backlog:
                    return
            zmq_poll([(dealer_fd, POLLIN)], 50)  # the descriptor signals a change; a sender may take the signal

    def _register_with_broker(self) -> None:
        """Send REGISTER now; if no connection can take it yet, send it once one can (see _serve).

        Called under `_socket_lock`."""
        hello: dict = {"v": proto.VERSION}
        if self.kit is not None:
            hello["cert"] = self.kit.certificate_bytes.decode("ascii")
        frames = [proto.REGISTER, self.fqcn.encode(), proto.encode_json(hello)]
        if self._backlog:  # in order behind what the connection has not taken yet
            self._register_due = False
            self._queue_backlog(frames)
            return
        try:
            self._dealer.send_multipart(frames, zmq.NOBLOCK)
            self._register_due = False
        except zmq.Again:  # IMMEDIATE: no connection is up yet
            self._register_due = True

    def _dropped(self, frames: list, exc: Exception) -> None:
        """Count a message that could not be handled; log it at most once per sender per minute."""
        self.stats["dropped"] += 1
        peer = "the broker"
        if len(frames) > 1 and frames[0].bytes == proto.DELIVER and len(frames[1]) <= 255:
            peer = "'" + frames[1].bytes.decode("ascii", "replace") + "'"
        if self._peer_errors.record(peer, time.monotonic()):
            log.warning("cell '%s' dropped a message from %s: %s: %s (further ones are logged once a minute)",
                        self.fqcn, peer, type(exc).__name__, str(exc)[:200])

    def _from_broker(self, frames: list) -> None:
        cmd = frames[0].bytes
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
                with self._socket_lock:
                    self._register_with_broker()
        elif cmd != proto.HEARTBEAT_ACK:
            raise proto.ProtocolError(f"unknown command {bytes(cmd[:8])!r} with {len(frames)} frames")

    def _on_registered(self, frames: list) -> None:
        status = frames[1].bytes
        if status == proto.REG_OK:
            info = proto.decode_object(frames[2].buffer)
            self._fanout = self._fanout_from(info)
            self._beat = self._beat_for(info)
            self._reg_reason = None
            if not self._registered.is_set():
                log.info("cell '%s' registered with broker %s", self.fqcn, self.broker)
            self._close_monitor()  # the handshake it watched succeeded: closed before start() returns
            with self._socket_lock:
                self._register_due = False  # a resend that could not go out yet is not needed any more
            self._registered.set()
        else:
            reason = bytes(frames[2].buffer[:1024]).decode("utf-8", "replace")
            if reason != self._reg_reason:  # a first refusal is start()'s exception, not a log line
                log.log(logging.ERROR if self._reg_answer.is_set() else logging.DEBUG,
                        "broker refused cell '%s': %s", self.fqcn, reason)
            self._reg_reason = reason
        self._reg_answer.set()

    def _beat_for(self, info: object) -> float:
        """`heartbeat_interval`, or shorter so that the broker hears from this cell within its node timeout."""
        node_timeout = info.get("node_timeout") if isinstance(info, dict) else None
        if type(node_timeout) not in (int, float) or not 0 < node_timeout < float("inf"):
            return self._hb_interval  # a broker that does not say (or says nonsense): as configured
        return max(_MIN_BEAT, min(self._hb_interval, node_timeout / _BEATS_PER_NODE_TIMEOUT))

    def _fanout_from(self, info: object) -> tuple[str, str]:
        """The fan-out endpoints the broker advertised, made connectable (a tcp host `*` = the broker's host)."""
        try:
            if not isinstance(info, dict):
                raise ValueError("not an object")
            ends = [reachable(parse_endpoint(info.get(key)), self._broker_endpoint)
                    for key in ("fanout_in", "fanout_out")]
        except ValueError:
            raise proto.ProtocolError("the registration answer lacks valid fan-out endpoints") from None
        if any(end.is_ipv6 for end in ends):
            self.context.setsockopt(zmq.IPV6, 1)  # the push sockets are made by this context
        return ends[0].url(), ends[1].url()

    def _on_undeliverable(self, frames: list) -> None:
        destination = frames[1].bytes.decode("ascii")
        reason = bytes(frames[3].buffer[:1024]).decode("utf-8", "replace")
        meta = decode_meta(frames[2].buffer)
        if meta.kind == KIND_REQUEST:
            error_type = UnreachableError if "not connected" in reason else BrokerUnreachableError
            self._resolve(meta.request_id, destination,
                          error=error_type(f"Cannot deliver to '{destination}': {reason}."))
        elif meta.kind == KIND_ONE_WAY:
            log.warning("cell '%s' could not deliver a message to '%s': %s", self.fqcn, destination, reason)
        else:  # a reply to a requester that left or gave up
            log.debug("cell '%s' could not deliver a reply to '%s': %s", self.fqcn, destination, reason)

    def _on_deliver(self, frames: list) -> None:
        source = frames[1].bytes.decode("ascii")
        meta = decode_meta(frames[2].buffer)
        frame = frames[3] if len(frames) == 4 else None
        message = Message(source, meta.channel, meta.topic, meta.headers, meta.ptype, frame)
        if meta.kind == KIND_REPLY:
            self._resolve(meta.request_id, source, result=message)
        elif meta.kind == KIND_ERROR:
            self._resolve(meta.request_id, source, error=RemoteError(f"'{source}' answered: {_error_text(message)}"))
        else:
            self._dispatch(message, meta.request_id if meta.kind == KIND_REQUEST else 0)

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
        else:
            self._queue(callback, message, request_id)

    def _queue(self, callback: RequestCallback, message: Message, request_id: int) -> None:
        """Run `callback` in the pool, or answer "busy" when too many calls or bytes are waiting."""
        size = message.buffer.nbytes
        with self._queued_lock:
            full = (self._queued_calls >= _MAX_QUEUED_CALLBACKS
                    or (self._queued_calls and self._queued_bytes + size > _MAX_QUEUED_BYTES))
            if not full:
                self._queued_calls += 1
                self._queued_bytes += size
        if full or self._executor is None:
            self._answer_busy(message, request_id, "too many requests waiting")
            return
        try:
            self._executor.submit(self._run_queued, callback, message, request_id, size)
        except RuntimeError:  # the pool is shutting down with the cell, or has no thread to run it
            self._release(size)
            self._answer_busy(message, request_id, "no worker thread")

    def _answer_busy(self, message: Message, request_id: int, why: str) -> None:
        self.stats["busy"] += 1
        if request_id:
            self._reply(message, request_id, KIND_ERROR, f"'{self.fqcn}' is busy: {why}")

    def _release(self, size: int) -> None:
        with self._queued_lock:
            self._queued_calls -= 1
            self._queued_bytes -= size

    def _run_queued(self, callback: RequestCallback, message: Message, request_id: int, size: int) -> None:
        try:
            self._run_callback(callback, message, request_id)
        finally:
            self._release(size)

    def _run_callback(self, callback: RequestCallback, message: Message, request_id: int) -> None:
        try:
            result = callback(message)
        except Exception as exc:
            self.stats["handler_errors"] += 1
            with self._queued_lock:
                loud = self._handler_errors.record(message.source, time.monotonic())
            if loud:  # a ValueError is a handler refusing bad input: no traceback for that
                log.warning("handler for %s/%s on '%s' failed on a message from '%s': %s: %s (further failures "
                            "for this sender are logged once a minute)", message.channel, message.topic,
                            self.fqcn, message.source, type(exc).__name__, str(exc)[:200],
                            exc_info=not isinstance(exc, ValueError))
            if request_id:
                self._reply(message, request_id, KIND_ERROR, f"handler failed: {type(exc).__name__}: {exc}")
            return
        if isinstance(result, InPool):
            self._queue(lambda _message: result.work(), message, request_id)
            return
        if request_id:
            self._reply(message, request_id, KIND_REPLY, result)
        if isinstance(result, Reply) and result.then is not None:
            try:
                result.then()
            except Exception:
                log.exception("cell '%s': what the handler for %s/%s left to do after its reply failed",
                              self.fqcn, message.channel, message.topic)

    def _reply(self, message: Message, request_id: int, kind: str, result: Any) -> None:
        """Answer a request; an answer that cannot be encoded becomes an error reply saying why."""
        try:
            frames = self._encode(message.source, kind, message.channel, message.topic, result, None, request_id)
        except ValueError as exc:
            frames = self._encode(message.source, KIND_ERROR, message.channel, message.topic,
                                  f"the reply cannot be sent: {exc}", None, request_id)
        try:
            self._post(frames)
        except CellError as exc:
            log.warning("cell '%s' could not reply to '%s': %s", self.fqcn, message.source, exc)


def _frame_size(frame: Any) -> int:
    if isinstance(frame, memoryview):
        return frame.nbytes
    return len(frame)


def _error_text(message: Message) -> str:
    """The text of an error reply, whatever its payload (a peer may send anything)."""
    try:
        text = message.payload
    except proto.ProtocolError:
        text = None
    return str(text)[:1000] if text is not None else "(no reason given)"
