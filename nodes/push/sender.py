"""Owner side of a push: publish each chunk once to all targets, in lockstep, with repair.

Flow of one stream (nodes/push/wire.py has the messages; every decision on what to publish,
when a target stalled and what to repair is made by nodes/push/window.py, socket-free):

1. validate the arguments, open the file, connect an XPUB (XPUB_NODROP) to the broker's XSUB
   and wait for the broker's subscription, which proves the pipe is live;
2. send "start" to every target at once on the application's channel/topic, with the
   stream's fresh key (nodes/push/seal.py); any refusal, unreachable target or missing
   reply fails the whole stream before data flows. A secure stream (secure=True) sends
   the owner's certificate and salt instead of the key; each target answers with its own,
   the owner verifies it (common/e2e.py) and sends the key wrapped for that target ("key");
   repairs and the final digest are then sealed too;
3. publish probes until every target saw one on its SUB ("ready"), for a short grace
   period: a target that joins later still gets every chunk through repair;
4. publish each chunk once, sealed, at most `window` chunks ahead of the slowest cumulative
   ack; receivers ask for missing chunks over the Cell and get them by unicast (os.pread);
5. check that the source did not change (size, mtime, inode, as pull does), then "verify"
   (every target compares the digest) and "commit" (every target renames its .part into
   place). Any failure aborts the stream for every target.

The one-chunk path (a plain stream whose whole file fits in one chunk of at most 256 KiB,
wire.one_chunk_path) replaces steps 1 and 3-5: the owner reads the file once, checks the
source, and sends it with its digest inside each target's "start"; every target stores and
verifies it there and answers "verified". Then "commit" as in step 5: two round trips, no
XPUB socket, probes or acks; a single target commits inside its "start" (one round trip).

The stream runs on the caller's thread; `OwnerSide` (one per cell, in its PushService)
hands the targets' events to it through a queue and answers repair requests in the Cell's
worker pool. Only the targets of a stream are heard; replies forged by others are counted.
"""

import base64
import logging
import os
import queue
import stat
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional

import zmq

from fedstream.common import digest as digests
from fedstream.common import e2e
from fedstream.common.constants import DEFAULT_CHUNK_SIZE, DEFAULT_CHUNK_TIMEOUT, MAX_CHUNK_SIZE
from fedstream.common.errors import CellError, RemoteError, UnreachableError
from fedstream.common.fqcn import validate_fqcn
from fedstream.common.protocol import encode_json, is_json_compatible
from fedstream.common.kits import Kit
from fedstream.common.rc import ReturnCode
from fedstream.nodes.cell import Cell, PendingRequest
from fedstream.nodes.message import Message, Reply, reply_error
from fedstream.nodes.push import wire
from fedstream.nodes.push.seal import Sealer, StreamKey
from fedstream.nodes.push.service import IgnoredSenders, PushService
from fedstream.nodes.push.window import Ack, Cancelled, Event, Fail, PushWindow, Ready, choose_repair

log = logging.getLogger(__name__)

_SEND_POLL_MS = 100  # XPUB send timeout; the loop then checks for failures and retries
_PROBE_MIN_INTERVAL = 0.005
_PROBE_MAX_INTERVAL = 0.05
_MAX_JOIN_GRACE = 1.0  # longest wait for every target's subscription before publishing anyway
_MAX_REPAIR_SEQS = 1024
_STOP_GRACE = 2.0  # longest a stopping cell waits for its streams to abort
_ABORT_WAIT = 1.0  # longest wait for targets to acknowledge an abort
_START_SETTLE = 1.0  # after a refused start, longest wait for the other targets' answers before aborting

ProgressCallback = Callable[[int], None]


@dataclass
class PushResult:
    """Outcome of one push: (rc, ok) as stream_file returns them, plus details."""

    rc: ReturnCode
    ok: bool
    error: Optional[str] = None
    size: int = 0
    seconds: float = 0.0
    bytes_published: int = 0  # chunk bytes sent on the fan-out (the file size once on success; 0 for one chunk)
    bytes_repaired: int = 0  # chunk bytes sent again by unicast repair
    bytes_in_start: int = 0  # one-chunk path: file bytes sent inside start requests (the file size per target)


class _Failure(Exception):
    def __init__(self, rc: ReturnCode, message: str) -> None:
        super().__init__(message)
        self.rc = rc
        self.message = message


class _Session:
    """What the owner side's handlers need to know about a running stream."""

    def __init__(self, sid: str, targets: Iterable[str], fd: int, size: int, chunk_size: int,
                 sealer: Optional[Sealer] = None) -> None:
        self.sid = sid
        self.sealer = sealer  # set for a secure stream: repairs are sealed with it
        self._repair_seals = 0  # repair nonces used so far (each one once)
        self.targets = frozenset(targets)
        self.size = size
        self.chunk_size = chunk_size
        self.events: "queue.SimpleQueue[Event]" = queue.SimpleQueue()
        self.published = 0  # chunks [0, published) went out on the fan-out
        self.slowest = 0  # every target holds chunks [0, slowest)
        self.bytes_repaired = 0
        self.finished = threading.Event()
        self._fd: Optional[int] = fd
        self._fd_lock = threading.Lock()

    def read_chunks(self, seqs: list[int]) -> tuple[bytes, Optional[list[int]]]:
        """Read chunks again for a repair (the caller bounds how many): (data, repair nonces if sealed)."""
        with self._fd_lock:
            if self._fd is None:
                raise _Failure(ReturnCode.ERROR, "stream closed")
            chunks = [os.pread(self._fd, wire.chunk_length(s, self.size, self.chunk_size), s * self.chunk_size)
                      for s in seqs]
            self.bytes_repaired += sum(len(c) for c in chunks)
            if self.sealer is None:
                return b"".join(chunks), None
            first = self._repair_seals
            self._repair_seals += len(chunks)
        nonces = list(range(first, first + len(chunks)))
        sealed = [self.sealer.seal_repair(n, wire.encode_header(wire.KIND_CHUNK, s, s * self.chunk_size), c)
                  for n, s, c in zip(nonces, seqs, chunks)]
        return b"".join(sealed), nonces

    def close_file(self) -> None:
        with self._fd_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _event_from(source: str, headers: dict) -> Optional[Event]:
    """The typed event a receiver's `event` message carries, or None if it is malformed."""
    kind, n = headers.get("ev"), headers.get("n")
    if kind == wire.EV_ACK and isinstance(n, int) and not isinstance(n, bool):
        return Ack(source, n)
    if kind == wire.EV_READY:
        return Ready(source)
    if kind == wire.EV_FAIL:
        return Fail(source, str(headers.get("error") or "no reason given"))
    return None


class OwnerSide:
    """The owner side of push on one cell: hands receivers' messages to the running streams.

    Only a stream's targets (the broker-stamped source) may send its acks, events and
    repair requests; others are counted in `ignored` and dropped.
    """

    def __init__(self, service: PushService) -> None:
        cell = service.cell
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self.ignored_senders = IgnoredSenders("target")
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_EVENT, self._on_event, inline=True)
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_REPAIR, self._on_repair)

    def add(self, session: _Session) -> None:
        with self._lock:
            self._sessions[session.sid] = session

    def remove(self, session: _Session) -> None:
        with self._lock:
            self._sessions.pop(session.sid, None)

    def _find(self, message: Message) -> Optional[_Session]:
        sid = message.headers.get("sid")
        with self._lock:
            session = self._sessions.get(sid) if isinstance(sid, str) else None
        if session is not None and message.source not in session.targets:
            self.ignored_senders.add(message.source, f"'{message.topic}' message", session.sid)
            return None
        return session

    @property
    def ignored(self) -> int:
        """Messages about a stream from a node that is not its target."""
        return self.ignored_senders.count

    def _on_event(self, message: Message) -> Optional[Reply]:
        """Inline on the Cell's I/O thread: hand the event to the stream's thread."""
        session = self._find(message)
        if session is None:
            return Reply.failure(wire.ERR_UNKNOWN_STREAM, "unknown stream")
        event = _event_from(message.source, message.headers)
        if event is not None:
            session.events.put(event)
        return Reply(None, {"sid": session.sid})

    def _on_repair(self, message: Message) -> Reply:
        """Send chunks a receiver misses (never any that was not published yet)."""
        session = self._find(message)
        if session is None:
            return Reply.failure(wire.ERR_UNKNOWN_STREAM, "unknown stream")
        h = message.headers
        ack = h.get("ack")
        if isinstance(ack, int) and not isinstance(ack, bool):
            session.events.put(Ack(message.source, ack))
        missing = h.get("missing")
        start = h.get("from")
        published = session.published
        seqs = choose_repair([s for s in missing if isinstance(s, int)] if isinstance(missing, list) else [],
                             start if isinstance(start, int) and not isinstance(start, bool) else None,
                             published, lambda s: wire.chunk_length(s, session.size, session.chunk_size),
                             wire.repair_budget(session.chunk_size), _MAX_REPAIR_SEQS)
        try:
            data, nonces = session.read_chunks(seqs) if seqs else (None, None)
        except (_Failure, OSError) as exc:
            return Reply.failure(wire.ERR_IO, f"cannot read the file: {exc}")
        if seqs:
            log.debug("stream %s: repairing %d chunk(s) for '%s' from %d", session.sid, len(seqs),
                      message.source, seqs[0])
        headers = {"sid": session.sid, "published": published, "seqs": seqs, "acked": session.slowest}
        if nonces is not None:
            headers["nonces"] = nonces
        return Reply(data, headers)

    def stop(self) -> None:
        """Cancel running streams and give them a moment to tell their targets, while the cell still can."""
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            session.events.put(Cancelled("the cell is stopping"))
        deadline = time.monotonic() + _STOP_GRACE
        for session in sessions:
            session.finished.wait(max(0.0, deadline - time.monotonic()))


def check_push_args(channel: object, topic: object, stream_ctx: object, targets: object, file_name: object,
                    chunk_size: object, chunk_timeout: object) -> tuple[list[str], int, float]:
    """Validate stream_file's arguments; return (targets without duplicates, chunk size, chunk timeout)."""
    for what, value in (("channel", channel), ("topic", topic)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} must be a non-empty string, got {value!r}.")
    if channel == wire.CONTROL_CHANNEL:
        raise ValueError(f"channel {channel!r} is reserved by fedstream.")
    if stream_ctx is not None:
        if not isinstance(stream_ctx, Mapping):
            raise ValueError(f"stream_ctx must be a dict, got {type(stream_ctx).__name__}.")
        for key, value in stream_ctx.items():
            if not isinstance(key, str):
                raise ValueError(f"stream_ctx keys must be strings, got {key!r}.")
            if not is_json_compatible(value):
                raise ValueError(f"stream_ctx value of {key!r} ({type(value).__name__}) is not JSON-compatible.")
    if isinstance(targets, str) or not isinstance(targets, Iterable):
        raise ValueError(f"targets must be a list of FQCNs, got {targets!r}.")
    target_list = list(dict.fromkeys(validate_fqcn(t) for t in targets))
    if not target_list:
        raise ValueError("targets is empty: name at least one site to stream the file to.")
    if not isinstance(file_name, (str, os.PathLike)):
        raise ValueError(f"file_name must be a path, got {type(file_name).__name__}.")
    try:
        st = os.stat(file_name)
    except OSError as exc:
        raise ValueError(f"Cannot stream {os.fspath(file_name)!r}: {exc.strerror}.") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"Cannot stream {os.fspath(file_name)!r}: it is not a regular file.")
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be a positive number of bytes up to {MAX_CHUNK_SIZE}, got {chunk_size!r}.")
    timeout = DEFAULT_CHUNK_TIMEOUT if chunk_timeout is None else chunk_timeout
    limit = wire.MAX_CHUNK_TIMEOUT
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 0 < timeout <= limit:
        raise ValueError(f"chunk_timeout must be a positive number of seconds up to {limit:g}, got {chunk_timeout!r}.")
    return target_list, size, float(timeout)


def check_secure(cell: object, secure: object) -> Optional[Kit]:
    """The cell's kit if `secure` (ValueError if it has none), else None."""
    if not isinstance(secure, bool):
        raise ValueError(f"secure must be True or False, got {secure!r}.")
    return e2e.require_kit(getattr(cell, "kit", None)) if secure else None


def send_file(cell: Cell, channel: str, topic: str, stream_ctx: Optional[Mapping], targets: Iterable[str],
              file_name: str, chunk_size: Optional[int] = None, chunk_timeout: Optional[float] = None,
              optional: bool = False, remote_name: Optional[str] = None,
              progress: Optional[ProgressCallback] = None, secure: bool = False) -> PushResult:
    """Push a file to every target; block until all hold the verified file or the stream failed.

    `remote_name` is the name sent to receivers (default: the file's base name; receivers
    sanitize it). `progress(bytes)` is called with the bytes every target acknowledged.
    `secure=True` agrees the stream key with each target end to end (this cell needs a kit).
    Raises ValueError for bad arguments; network-side failures are in the returned PushResult.
    """
    if not isinstance(cell, Cell):
        raise ValueError(f"a Cell is needed to stream a file, got {type(cell).__name__}.")
    kit = check_secure(cell, secure)
    target_list, size, timeout = check_push_args(channel, topic, stream_ctx, targets, file_name, chunk_size,
                                                 chunk_timeout)
    name = os.path.basename(os.path.abspath(file_name)) if remote_name is None else str(remote_name)
    try:
        fd = os.open(file_name, os.O_RDONLY)
    except OSError as exc:
        raise ValueError(f"Cannot stream {os.fspath(file_name)!r}: {exc.strerror}.") from None
    owner = PushService.for_cell(cell).side(OwnerSide)
    run = _Push(cell, owner, channel, topic, dict(stream_ctx or {}), target_list, os.fspath(file_name), fd, name,
                size, timeout, optional, progress, kit)
    return run.run()


class _Push:
    """One running push on the owner: drives a PushWindow with the sockets and the clock."""

    def __init__(self, cell: Cell, owner: OwnerSide, channel: str, topic: str, stream_ctx: dict,
                 targets: list[str], path: str, fd: int, name: str, chunk_size: int, chunk_timeout: float,
                 optional: bool, progress: Optional[ProgressCallback], kit: Optional[Kit] = None) -> None:
        self.cell = cell
        self.kit = kit  # set for a secure stream
        self.owner = owner
        self.channel = channel
        self.topic = topic
        self.stream_ctx = stream_ctx
        self.targets = targets
        self.name = name
        self.path = path
        self.source_stat = os.fstat(fd)
        self.size = self.source_stat.st_size
        self.chunk_size = chunk_size
        self.chunk_timeout = chunk_timeout
        self.count = wire.chunk_count(self.size, chunk_size)
        self.optional = optional
        self.progress = progress
        self.sid = wire.new_stream_id()
        self.topic_frame = self.sid.encode()
        self.stream_key = StreamKey.new()
        self.sealer = Sealer(self.stream_key)
        self.session = _Session(self.sid, targets, fd, self.size, chunk_size, self.sealer if kit else None)
        self.window = PushWindow(targets, self.count, wire.window_for(chunk_size), chunk_timeout, time.monotonic())
        self.fd = fd
        self.hasher = digests.new_hasher()
        self.xpub: Optional[zmq.Socket] = None
        self.started: list[str] = []  # targets that may hold stream state (to abort)
        self.bytes_published = 0
        self.bytes_in_start = 0
        self.reported = -1
        self.start_info = {"v": wire.WIRE_VERSION, "sid": self.sid, "name": name, "size": self.size,
                           "chunk_size": chunk_size, "count": self.count, "window": self.window.window,
                           "chunk_timeout": chunk_timeout, "algo": digests.ALGORITHM, "ctx": stream_ctx}
        self.one_chunk = wire.one_chunk_path(self.size, chunk_size, kit is not None,
                                             len(encode_json(self.start_info)))

    # -- the stream ------------------------------------------------------------------------
    def run(self) -> PushResult:
        began = time.monotonic()
        self.owner.add(self.session)
        ok = False
        try:
            if self.one_chunk:
                self._push_one_chunk()
            else:
                if self.count:
                    self._open_fanout()
                self._start_targets()
                if self.count:
                    self._wait_ready()
                    self._publish()
                self._finish()
            ok = True
            log.info("stream %s: pushed '%s' (%d bytes) to %s in %.2f s", self.sid, self.name, self.size,
                     ",".join(self.targets), time.monotonic() - began)
            return self._result(ReturnCode.OK, True, None, began)
        except _Failure as failure:
            return self._failed(failure.rc, failure.message, began)
        except (zmq.ZMQError, CellError) as exc:  # e.g. the cell was stopped meanwhile
            return self._failed(ReturnCode.COMMUNICATION_ERROR, str(exc), began)
        except OSError as exc:
            return self._failed(ReturnCode.ERROR, f"cannot read '{self.name}': {exc}", began)
        finally:
            if not ok:
                self._abort()
            self.owner.remove(self.session)
            self.session.close_file()
            if self.xpub is not None:
                self.xpub.close(linger=0)  # every target confirmed, or the stream was aborted
            self.session.finished.set()

    def _failed(self, rc: ReturnCode, message: str, began: float) -> PushResult:
        log.log(logging.DEBUG if self.optional else logging.WARNING, "stream %s of '%s' failed: %s",
                self.sid, self.name, message)
        return self._result(rc, False, message, began)

    def _result(self, rc: ReturnCode, ok: bool, error: Optional[str], began: float) -> PushResult:
        return PushResult(rc, ok, error, self.size, time.monotonic() - began, self.bytes_published,
                          self.session.bytes_repaired, self.bytes_in_start)

    def _check_verdict(self) -> None:
        verdict = self.window.verdict
        if verdict is not None:
            raise _Failure(verdict.rc, verdict.message)

    def _open_fanout(self) -> None:
        try:
            address, _ = self.cell.fanout_endpoints
        except CellError as exc:
            raise _Failure(ReturnCode.COMMUNICATION_ERROR, str(exc)) from None
        xpub = self.xpub = self.cell.context.socket(zmq.XPUB)
        self.cell.secure_socket(xpub)  # CURVE client of a secure broker (no-op without a kit)
        xpub.setsockopt(zmq.XPUB_NODROP, 1)
        xpub.setsockopt(zmq.SNDHWM, self.window.window + 16)
        xpub.setsockopt(zmq.SNDTIMEO, _SEND_POLL_MS)
        xpub.connect(address)
        # The broker's XSUB subscribes to everything: its subscription shows the pipe is live.
        deadline = time.monotonic() + self.chunk_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not xpub.poll(int(remaining * 1000) + 1, zmq.POLLIN):
                raise _Failure(ReturnCode.COMMUNICATION_ERROR,
                               f"the broker's fan-out at {address} did not accept the publisher within "
                               f"{self.chunk_timeout:g} s")
            if xpub.recv()[:1] == b"\x01":
                return

    # -- the steps on the ROUTER path ------------------------------------------------------
    def _start_targets(self) -> None:
        info = dict(self.start_info)
        salt = e2e.new_salt()
        if self.kit is None:
            info["seal"] = self.stream_key.to_wire()
        else:
            info["e2e"] = e2e.offer(self.kit, salt)

        def send(target: str) -> PendingRequest:
            pending = self.cell.request_async(self.channel, self.topic, target, payload=info)
            if target not in self.started:
                self.started.append(target)
            return pending

        replies = self._step("start", send)
        if self.kit is not None:
            self._deliver_keys(replies, salt, wire.start_binding(info))

    def _push_one_chunk(self) -> None:
        """The one-chunk path: the whole file and its digest in every target's start, each verifies; then commit.

        A single target commits at once when it verified (one round trip).
        """
        data = os.pread(self.fd, self.size, 0) if self.size else b""
        if len(data) != self.size:
            raise _Failure(ReturnCode.ERROR, f"'{self.name}' became shorter while it was being streamed")
        self._check_source()  # what was read is the file as it was when the push began
        self.hasher.update(data)
        alone = len(self.targets) == 1  # no other target to agree with: it may keep the file at once
        headers = {**self.start_info, "digest": self.hasher.hexdigest(), "commit": alone}

        def send(target: str) -> PendingRequest:
            pending = self.cell.request_async(self.channel, self.topic, target, payload=data, headers=headers)
            self.bytes_in_start += self.size
            if target not in self.started:
                self.started.append(target)
            return pending

        replies = self._step("start", send)
        for target in self.targets:
            if replies[target].headers.get("verified") is not True:
                raise _Failure(ReturnCode.ERROR, f"target '{target}' did not verify the file sent with 'start'")
        if alone and replies[self.targets[0]].headers.get("committed") is True:
            if self.progress is not None:
                self._report(self.size)
            self.started = []
            return
        self._take_events(0)  # a target that failed since, or the cell stopping
        self._check_verdict()
        if self.progress is not None:
            self._report(self.size)
        self._step("commit", self._sender(wire.TOPIC_COMMIT, {"sid": self.sid}))
        self.started = []

    def _deliver_keys(self, replies: dict[str, Message], salt: bytes, binding: bytes) -> None:
        """Verify each target's certificate and send it the stream key wrapped under their pairwise key."""
        assert self.kit is not None
        wrapped: dict[str, str] = {}
        for target in self.targets:
            try:
                peer, their_salt = e2e.accept_offer(replies[target].headers.get("e2e"), self.kit, target)
            except e2e.E2EError as exc:
                raise _Failure(ReturnCode.ERROR, f"target '{target}' cannot take a secure stream: {exc}") from None
            pairwise = e2e.pairwise_key(self.kit, peer, (salt, their_salt), self.cell.fqcn, target)
            wrapped[target] = base64.b64encode(e2e.wrap_key(pairwise, self.stream_key.to_bytes(), binding)).decode()
        self._step("key", lambda target: self.cell.request_async(
            wire.CONTROL_CHANNEL, wire.TOPIC_KEY, target, headers={"sid": self.sid, "wrapped": wrapped[target]}))

    def _step(self, step: str, send: Callable[[str], PendingRequest]) -> dict[str, Message]:
        """Send one step's request to every target and wait for every answer; fail at the first error.

        Returns each target's accepted reply.

        A reply whose broker-stamped source is not the target asked is a forgery: it is
        counted, and the request is sent to the target again (every step is idempotent).
        """
        deadline = time.monotonic() + self.chunk_timeout
        waiting: dict = {}
        replies: dict[str, Message] = {}
        try:
            for target in self.targets:
                try:
                    waiting[send(target).future] = target
                except CellError as exc:
                    raise _Failure(ReturnCode.COMMUNICATION_ERROR, f"cannot send to '{target}': {exc}") from None
            while waiting:
                remaining = deadline - time.monotonic()
                done = _first_done(list(waiting), max(0.0, remaining))
                if not done:
                    names = ", ".join(f"'{t}'" for t in waiting.values())
                    raise _Failure(ReturnCode.TIMEOUT, f"no answer to '{step}' from {names} within "
                                                       f"{self.chunk_timeout:g} s")
                for future in done:
                    target = waiting.pop(future)
                    if self._check_reply(step, target, future):
                        replies[target] = future.result()
                    else:
                        waiting[send(target).future] = target
            return replies
        except _Failure:
            if step == "start" and waiting:
                # Let the other targets' "start" land first, so that the abort finds their stream.
                wait(list(waiting), timeout=min(_START_SETTLE, max(0.0, deadline - time.monotonic())))
            raise
        finally:
            for future in waiting:
                future.cancel()

    def _check_reply(self, step: str, target: str, future: Future) -> bool:
        """True if `target` accepted the step; False for a reply forged by another node; else raise."""
        try:
            reply: Message = future.result()
        except UnreachableError:
            if step == "start" and target in self.started:
                self.started.remove(target)
            raise _Failure(ReturnCode.COMMUNICATION_ERROR,
                           f"target '{target}' is not connected to the broker") from None
        except RemoteError as exc:
            if step == "start":
                raise _Failure(ReturnCode.ERROR, f"target '{target}' cannot take streams on channel "
                                                 f"'{self.channel}' topic '{self.topic}': {exc}") from None
            raise _Failure(ReturnCode.ERROR, f"target '{target}' failed '{step}': {exc}") from None
        except CellError as exc:
            raise _Failure(ReturnCode.COMMUNICATION_ERROR, f"cannot reach '{target}': {exc}") from None
        if reply.source != target:
            self.owner.ignored_senders.add(reply.source, f"'{step}' reply in the name of '{target}'", self.sid)
            return False
        error = reply_error(reply.headers)
        if error is not None:
            raise _Failure(ReturnCode.ERROR, f"target '{target}' refused '{step}': {error[1]}")
        if reply.headers.get("sid") != self.sid:
            raise _Failure(ReturnCode.ERROR, f"target '{target}' did not accept '{step}': its handler for "
                                             f"channel '{self.channel}' topic '{self.topic}' is not stream "
                                             f"processing")
        return True

    # -- publishing ------------------------------------------------------------------------
    def _wait_ready(self) -> None:
        """Probe the fan-out until every target's subscription is live (or a short grace passed)."""
        grace = min(_MAX_JOIN_GRACE, self.chunk_timeout / 2)
        deadline = time.monotonic() + grace
        interval = _PROBE_MIN_INTERVAL
        probe = [self.topic_frame, wire.encode_header(wire.KIND_PROBE), b""]
        while not self.window.all_ready:
            now = time.monotonic()
            if now >= deadline:
                log.info("stream %s: %s not subscribed after %.2f s; starting anyway (they get repairs)",
                         self.sid, ", ".join(self.window.not_ready()), grace)
                break
            self._send(probe)
            self._take_events(min(interval, deadline - now))
            interval = min(interval * 2, _PROBE_MAX_INTERVAL)

    def _publish(self) -> None:
        """Publish every chunk once, as the window allows; fail on the window's verdict."""
        self.window.start_clocks(time.monotonic())
        while True:
            self._take_events(0)
            self._check_verdict()
            if self.window.all_acked:
                return
            seq = self.window.next_seq()
            if seq is not None:
                self._publish_chunk(seq)
                continue
            wait_for = self.window.check_stalls(time.monotonic())
            self._check_verdict()
            self._take_events(wait_for)

    def _publish_chunk(self, seq: int) -> None:
        offset = seq * self.chunk_size
        length = wire.chunk_length(seq, self.size, self.chunk_size)
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise _Failure(ReturnCode.ERROR, f"'{self.name}' became shorter while it was being streamed")
        self.hasher.update(data)
        header = wire.encode_header(wire.KIND_CHUNK, seq, offset)
        self._send([self.topic_frame, header, self.sealer.seal(seq, header, data)])
        self.bytes_published += length
        self.window.published(seq, time.monotonic())
        self.session.published = seq + 1

    def _send(self, frames: list) -> None:
        """Publish one message; NODROP makes a full pipe wait here, never lose data."""
        assert self.xpub is not None
        deadline = time.monotonic() + self.chunk_timeout
        while True:
            try:
                self.xpub.send_multipart(frames, copy=False)
                return
            except zmq.Again:
                self._take_events(0)
                self._check_verdict()
                if time.monotonic() > deadline:
                    raise _Failure(ReturnCode.COMMUNICATION_ERROR,
                                   f"the broker's fan-out took no data for {self.chunk_timeout:g} s") from None

    def _take_events(self, timeout: float) -> None:
        """Feed the window the targets' events, waiting up to `timeout` seconds for the first one."""
        events = self.session.events
        try:
            event = events.get(timeout=timeout) if timeout > 0 else events.get_nowait()
        except queue.Empty:
            return
        while True:
            self.window.handle(event, time.monotonic())
            try:
                event = events.get_nowait()
            except queue.Empty:
                break
        slowest = self.session.slowest = self.window.slowest
        if self.progress is not None and slowest > self.reported:
            self.reported = slowest
            self._report(min(slowest * self.chunk_size, self.size))

    def _report(self, done: int) -> None:
        assert self.progress is not None
        try:
            self.progress(done)
        except Exception:
            log.exception("progress callback failed (ignored)")

    # -- the end ---------------------------------------------------------------------------
    def _check_source(self) -> None:
        """Fail if the file changed since the push began (size, mtime, or another file under its name)."""
        before = self.source_stat
        try:
            now, named = os.fstat(self.fd), os.stat(self.path)
        except OSError as exc:
            raise _Failure(ReturnCode.ERROR, f"cannot check '{self.path}' after sending it: {exc.strerror}") from None
        if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or \
                (named.st_ino, named.st_dev) != (before.st_ino, before.st_dev):
            raise _Failure(ReturnCode.ERROR, f"'{self.path}' changed while it was being pushed")

    def _finish(self) -> None:
        """Two-phase end: every target checks the digest, then every target commits its file."""
        self._check_source()
        digest = self.hasher.hexdigest()
        if self.progress is not None and self.reported < self.count:
            self._report(self.size)
        verify: dict = {"sid": self.sid, "algo": digests.ALGORITHM}
        if self.kit is None:
            verify["digest"] = digest
        else:  # the broker learns nothing of the file, not even its digest
            verify["sealed"] = base64.b64encode(self.sealer.seal_digest(digest)).decode()
        self._step("verify", self._sender(wire.TOPIC_VERIFY, verify))
        self._step("commit", self._sender(wire.TOPIC_COMMIT, {"sid": self.sid}))
        self.started = []

    def _sender(self, topic: str, headers: dict) -> Callable[[str], PendingRequest]:
        return lambda target: self.cell.request_async(wire.CONTROL_CHANNEL, topic, target, headers=headers)

    def _abort(self) -> None:
        """Tell every target that may hold stream state; wait briefly for them to take it."""
        if not self.started:
            return
        headers = {"sid": self.sid, "reason": "the sender aborted the stream"}
        requests = []
        for target in self.started:
            try:
                requests.append(self.cell.request_async(wire.CONTROL_CHANNEL, wire.TOPIC_ABORT, target,
                                                        headers=headers))
            except CellError as exc:
                log.debug("stream %s: could not send abort to '%s': %s", self.sid, target, exc)
        wait([r.future for r in requests], timeout=min(_ABORT_WAIT, self.chunk_timeout))
        for request in requests:
            request.cancel()  # stop waiting for answers that did not come
        self.started = []


def _first_done(futures: list[Future], timeout: float) -> "set[Future]":
    """The futures done once at least one is (none if `timeout` passed first)."""
    if len(futures) == 1:  # a single target: wait on the future itself, without a waiter object per step
        try:
            futures[0].exception(timeout)
        except TimeoutError:
            return set()
        return {futures[0]}
    done, _ = wait(futures, timeout=timeout, return_when=FIRST_COMPLETED)
    return done
