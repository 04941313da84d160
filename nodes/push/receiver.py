"""Receiver side of a push: one thread per stream writes chunks from the fan-out into a .part file.

A "start" request on a registered (channel, topic) creates a hidden `.part` file in the
destination directory and a thread that owns its own SUB socket, subscribed to the stream
id, with the stream's key from the "start" request. A secure "start" (secure=True) carries
the owner's certificate and salt instead: the receiver verifies the certificate against its
kit (it must name the broker-stamped sender), answers with its own certificate and salt, and
the stream's thread waits for the owner's "key" request, whose key only this receiver can
unwrap (common/e2e.py); repairs and the digest of such a stream come sealed as well. The
thread opens each sealed chunk
(nodes/push/seal.py; one that fails authentication is dropped, counted, and repaired
later) and drives an Assembly (nodes/push/assembly.py), which makes every decision: it
writes each admitted chunk at its offset, hashes the contiguous prefix in order, acks
cumulatively over the Cell, asks the owner for chunks it missed (gaps, late subscription,
or silence while incomplete), and ends the stream when the owner stays silent or nothing
moves for a bounded time. The owner's "verify" compares the digest; "commit" renames the
file into place. Every stream ends exactly once, with stream_done_cb on the stream's own
thread (never the Cell's I/O thread), and a failed stream leaves no file behind.

A one-chunk "start" (its payload is the whole file, its headers the description and the
digest; wire.check_one_chunk_start) is stored and verified by the start handler itself,
which answers "verified"; the stream's thread then opens no SUB socket and only waits for
the owner's commit or abort, asking after a quiet owner as a complete stream does. A stream
that ended in its start (a single target's, committed at once) starts its thread, which only
cleans up and calls stream_done_cb, once the answer went out (`Reply.then`).

Only a stream's owner (the broker-stamped source of its "start") may verify, commit or
abort it, or answer its repair requests; anything else is counted in `ignored` and dropped.
Slots are fair: at most MAX_STREAMS_PER_SENDER streams from one sender at a time, and a
stream whose sender left (the broker says it is not connected), stays silent for
`max_idle` or makes no progress for `max_stall` ends and removes its `.part`, whatever
chunk_timeout the sender asked for.
"""

import functools
import logging
import os
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import zmq

from fedstream.common import digest as digests
from fedstream.common import e2e
from fedstream.common import protocol as proto
from fedstream.common.errors import BrokerUnreachableError, RemoteError, RequestTimeout, UnreachableError
from fedstream.common.filenames import (
    check_dest_dir,
    commit_file,
    part_path,
    remove_quietly,
    remove_stale_parts,
    sanitize_name,
)
from fedstream.common.rc import ReturnCode
from fedstream.nodes.callbacks import call_user_cb
from fedstream.nodes.cell import Cell
from fedstream.nodes.context import FLContext
from fedstream.nodes.message import Message, Reply, reply_error
from fedstream.nodes.push import objects as push_objects
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.push import wire
from fedstream.nodes.push.assembly import MAX_IDLE, MAX_STALL, Assembly
from fedstream.nodes.push.seal import Sealer, StreamKey, sealed_length
from fedstream.nodes.push.service import IgnoredSenders, PushService
from fedstream.nodes.push.stream_context import StreamContext

log = logging.getLogger(__name__)

MAX_STREAMS = 64  # concurrent incoming streams per cell
MAX_STREAMS_PER_SENDER = 4  # concurrent incoming streams from one sender: one peer cannot take every slot
_COMPLETE_POLL_MS = 10
_ENDED_MEMORY = 4096  # ended stream ids remembered (a late "start" for one is refused)
_JOIN_WAIT = 2.0  # longest a stopping cell waits for each stream thread
_KEY_POLL = 0.05  # seconds between checks while a secure stream waits for its key

StreamCallback = Callable[..., Any]


@dataclass
class ReceiverTuning:
    """Knobs of a cell's push receivers; change them with set_receiver_tuning().

    sub_rcvhwm: receive queue of each stream's SUB socket, in messages. The default, twice
        the stream's window plus 16, never fills (the owner stays within the window) and
        bounds what a rogue publisher can make this process hold.
    subscribe_delay: seconds a new stream waits before subscribing to the fan-out. It makes
        this receiver a deliberately slow joiner: the chunks published before it subscribes
        reach it only through repair (used to exercise that path).
    max_idle: longest silence from a stream's owner before the stream ends, whatever
        chunk_timeout the owner asked for.
    max_stall: longest time a stream may make no progress before it ends and frees its slot.
    """

    sub_rcvhwm: Optional[int] = None
    subscribe_delay: float = 0.0
    max_idle: float = MAX_IDLE
    max_stall: float = MAX_STALL


@dataclass(frozen=True)
class _Secure:
    """What a secure stream's receiver keeps until the owner's key arrives."""

    pairwise: bytes
    binding: bytes  # start_binding of the start request: the wrapped key's context
    offer: dict  # this receiver's certificate and salt (sent again if the owner asks again)


@dataclass
class _Registration:
    fl_ctx: FLContext
    channel: str
    topic: str
    dest_dir: str
    stream_done_cb: Optional[StreamCallback]
    chunk_consumed_cb: Optional[StreamCallback]
    cb_kwargs: dict
    allow_pickle: bool = False


def _call_stream_cb(what: str, cb: StreamCallback, reg: _Registration, ctx: StreamContext) -> bool:
    return call_user_cb(f"{what} of channel '{reg.channel}' topic '{reg.topic}'", cb, ctx, reg.fl_ctx, **reg.cb_kwargs)


def _verified(sid: str, committed: bool) -> Reply:
    """A one-chunk start's answer: the file that came with it is here and matches (and has its final name)."""
    return Reply(None, {"sid": sid, "verified": True, "committed": True} if committed
                 else {"sid": sid, "verified": True})


class _Stream:
    """One incoming stream: its .part file, its Assembly, and the thread that receives it."""

    def __init__(self, side: "ReceiverSide", reg: _Registration, info: dict, key: Optional[StreamKey], owner: str,
                 part_path: str, fd: int, secure: Optional[_Secure] = None, one_chunk: bool = False) -> None:
        self.side = side
        self.cell = side.cell
        self.tuning = side.tuning
        self.reg = reg
        self.owner = owner
        self.sid: str = info["sid"]
        self.sid_frame = self.sid.encode()
        self.size: int = info["size"]
        self.chunk_size: int = info["chunk_size"]
        self.count: int = info["count"]
        self.window: int = info["window"]
        self.chunk_timeout = float(info["chunk_timeout"])
        self.name = sanitize_name(info["name"])
        self.secure = secure
        self.one_chunk = one_chunk  # the whole file came with start: no fan-out, no key
        self.sealer: Optional[Sealer] = Sealer(key) if key is not None else None  # a secure stream's comes later
        self.key_ready = threading.Event()
        if secure is None:
            self.key_ready.set()
        self.part_path = part_path
        self.fd = fd
        ctx = self.ctx = StreamContext(info["ctx"])
        ctx.update({keys.KEY_FILE_NAME: self.name, keys.KEY_FILE_SIZE: self.size, keys.KEY_FILE_LOCATION: None,
                    keys.KEY_RC: None, keys.KEY_STREAM_ID: self.sid, keys.KEY_SENDER: owner,
                    keys.KEY_CHANNEL: reg.channel, keys.KEY_TOPIC: reg.topic, keys.KEY_REPAIRED_CHUNKS: 0,
                    keys.KEY_REJECTED_CHUNKS: 0, keys.KEY_ALLOW_PICKLE: reg.allow_pickle,
                    keys.KEY_SECURE: secure is not None})
        self.lock = threading.Lock()  # the Assembly, the hasher and the outcome
        self.assembly = Assembly(self.count, self.window, self.chunk_timeout, time.monotonic(),
                                 self.tuning.max_idle, self.tuning.max_stall)
        self.hasher = digests.new_hasher()
        self.ended = threading.Event()
        self.rc: Optional[ReturnCode] = None
        self.reason = ""
        self.notify_owner = False
        self.verified = False
        self.ready_sent = False
        self.repaired = 0
        self.rejected = 0  # fan-out chunks that failed authentication
        self.cb_failed = False
        self.thread: Optional[threading.Thread] = None  # the stream's own, once started

    def start_thread(self) -> None:
        """Receive the stream (or only end it) on a thread of its own."""
        self.thread = threading.Thread(target=self._run, name=f"fedstream-push-{self.sid}", daemon=True)
        self.thread.start()

    # -- ending ----------------------------------------------------------------------------
    def end(self, rc: ReturnCode, reason: str, notify_owner: bool = True) -> bool:
        """Set the outcome once; the stream thread then cleans up and calls stream_done_cb."""
        with self.lock:
            return self._end_locked(rc, reason, notify_owner)

    def _end_locked(self, rc: ReturnCode, reason: str, notify_owner: bool = True) -> bool:
        if self.rc is not None:
            return False
        self.rc, self.reason, self.notify_owner = rc, reason, notify_owner and rc != ReturnCode.OK
        self.ended.set()
        return True

    def _finish(self) -> None:
        os.close(self.fd)
        rc = self.rc or ReturnCode.ERROR
        if rc != ReturnCode.OK:
            remove_quietly(self.part_path)
            self.ctx[keys.KEY_FILE_LOCATION] = None
        self.ctx[keys.KEY_RC] = rc
        self.ctx[keys.KEY_REPAIRED_CHUNKS] = self.repaired
        self.ctx[keys.KEY_REJECTED_CHUNKS] = self.rejected
        self.side.forget(self.sid, rc == ReturnCode.OK)
        if self.notify_owner:
            try:  # a request, not a one-way message: it must get out before a stopping cell closes
                self.cell.request(wire.CONTROL_CHANNEL, wire.TOPIC_EVENT, self.owner,
                                  headers={"sid": self.sid, "ev": wire.EV_FAIL, "error": self.reason},
                                  timeout=min(1.0, self.chunk_timeout))
            except Exception as exc:  # the owner then notices the silence
                log.debug("stream %s: could not tell '%s' about the failure: %s", self.sid, self.owner, exc)
        if rc == ReturnCode.OK:
            log.info("stream %s: received '%s' (%d bytes) from '%s' into %s", self.sid, self.name, self.size,
                     self.owner, self.ctx[keys.KEY_FILE_LOCATION])
        else:
            log.warning("stream %s of '%s' from '%s' ended with %s: %s", self.sid, self.name, self.owner, rc,
                        self.reason)
        if self.reg.stream_done_cb is not None:
            _call_stream_cb("stream_done_cb", self.reg.stream_done_cb, self.reg, self.ctx)
        push_objects.discard_received(self.ctx)

    # -- the receiving thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._receive()
        except OSError as exc:  # the disk is full or gone: one sentence naming the directory, no traceback
            if self.end(ReturnCode.ERROR, f"cannot write to {self.reg.dest_dir}: {exc.strerror or exc}"):
                log.warning("stream %s failed: cannot write to %s: %s", self.sid, self.reg.dest_dir, exc.strerror)
        except Exception as exc:
            if self.end(ReturnCode.ERROR, f"{type(exc).__name__}: {exc}"):
                log.exception("stream %s failed", self.sid)
        finally:
            self._finish()

    def _wait_for_key(self) -> bool:
        """Wait for a secure stream's key (at most chunk_timeout); False if the stream ended meanwhile."""
        deadline = time.monotonic() + self.chunk_timeout
        while not self.key_ready.wait(_KEY_POLL):
            if self.ended.is_set():
                return False
            if time.monotonic() >= deadline:
                self.end(ReturnCode.TIMEOUT, f"the sender '{self.owner}' did not send the stream key within "
                                             f"{self.chunk_timeout:g} s")
                return False
        return not self.ended.is_set()

    def set_key(self, wrapped: object) -> Reply:
        """Take a secure stream's key from the owner's "key" request (only this receiver can unwrap it)."""
        if self.secure is None:
            return Reply.failure(wire.ERR_BAD_REQUEST, "this stream is not secure: it has its key already")
        try:
            raw = e2e.unwrap_key(self.secure.pairwise, e2e.decode_b64(wrapped, "wrapped key"), self.secure.binding)
            key = StreamKey.from_bytes(raw)
        except ValueError as exc:  # E2EError is a ValueError
            reason = f"the stream key from '{self.owner}' cannot be used: {exc}"
            self.end(ReturnCode.ERROR, reason, notify_owner=False)
            return Reply.failure(wire.ERR_BAD_REQUEST, reason)
        with self.lock:
            if self.sealer is None:
                self.sealer = Sealer(key)
        self.key_ready.set()
        return Reply(None, {"sid": self.sid})

    def _receive(self) -> None:
        if not self._wait_for_key():
            return
        if self.assembly.complete:  # nothing (more) comes on the fan-out: an empty file or a one-chunk start
            while not self.ended.wait(min(0.1, self.assembly.nudge_interval)):
                self._tend()
            return
        _, address = self.cell.fanout_endpoints
        sub = self.cell.context.socket(zmq.SUB)
        self.cell.secure_socket(sub)  # CURVE client of a secure broker (no-op without a kit)
        try:
            sub.setsockopt(zmq.RCVHWM, self.tuning.sub_rcvhwm or 2 * self.window + 16)
            sub.setsockopt(zmq.MAXMSGSIZE, self.chunk_size + 1024)
            sub.linger = 0
            if self.tuning.subscribe_delay > 0 and self.ended.wait(self.tuning.subscribe_delay):
                return
            sub.connect(address)
            sub.setsockopt(zmq.SUBSCRIBE, self.sid_frame)
            poll_ms = int(min(0.1, self.assembly.nudge_interval) * 1000)
            while not self.ended.is_set():
                # once complete, look often at the end of the stream: stream_done_cb follows commit closely
                if sub.poll(_COMPLETE_POLL_MS if self.assembly.complete else poll_ms, zmq.POLLIN):
                    self._drain(sub)
                self._ack()
                if self.ended.is_set():
                    break
                self._tend()
        finally:
            sub.close(linger=0)

    def _tend(self) -> None:
        """Ask the owner for what is missing (or whether it is still there) when due; end the stream if expired."""
        with self.lock:
            due = self.assembly.repair_due(time.monotonic())
        if due:
            self._repair()
        with self.lock:
            expired = self.assembly.expired(time.monotonic())
        if expired:
            self.end(ReturnCode.TIMEOUT, f"{expired} ('{self.owner}')")

    def _drain(self, sub: zmq.Socket) -> None:
        """Take what the SUB holds, but at most half a window before acking."""
        for _ in range(max(1, self.window // 2)):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._on_fanout(frames)
            if self.ended.is_set():
                return

    def _on_fanout(self, frames: list) -> None:
        if len(frames) != 3 or frames[0].bytes != self.sid_frame:
            return
        header = wire.decode_header(frames[1].buffer)
        if header is None:
            return
        kind, seq, offset = header
        if kind == wire.KIND_PROBE:
            if not self.ready_sent:
                self.ready_sent = True
                self._event(wire.EV_READY)
            return
        if offset != seq * self.chunk_size or not 0 <= seq < self.count or \
                len(frames[2]) != sealed_length(wire.chunk_length(seq, self.size, self.chunk_size)):
            log.debug("stream %s: ignored a malformed chunk frame (seq %d)", self.sid, seq)
            return
        with self.lock:
            if not self.assembly.admit(seq):
                return
        assert self.sealer is not None  # the thread subscribes only once it has the key
        data = self.sealer.open(seq, frames[1].buffer, frames[2].buffer)
        if data is None:  # altered or forged: dropped, and repaired later
            self.rejected += 1
            log.log(logging.WARNING if self.rejected == 1 else logging.DEBUG,
                    "stream %s: dropped chunk %d, which failed authentication", self.sid, seq)
            return
        with self.lock:
            self.assembly.heard(time.monotonic())
        self._store(seq, memoryview(data), repaired=False)

    def _store(self, seq: int, data: memoryview, repaired: bool) -> None:
        """Write one chunk at its offset if the Assembly wants it; hash what joined the prefix."""
        with self.lock:
            if self.rc is not None or not self.assembly.admit(seq, repaired):
                return
            offset = seq * self.chunk_size
            written = 0
            while written < len(data):
                written += os.pwrite(self.fd, data[written:], offset + written)
            for joined in self.assembly.stored(seq, time.monotonic()):
                if joined == seq:
                    self.hasher.update(data)
                else:  # chunks that came after a gap, now contiguous: hash them from the file
                    start = joined * self.chunk_size
                    digests.hash_range(self.fd, self.hasher, start,
                                       start + wire.chunk_length(joined, self.size, self.chunk_size))
        if repaired:
            self.repaired += 1
        if self.reg.chunk_consumed_cb is not None and not self.cb_failed:
            self.cb_failed = not _call_stream_cb("chunk_consumed_cb", self.reg.chunk_consumed_cb, self.reg, self.ctx)

    def _event(self, event: str, **fields: Any) -> None:
        self.cell.fire_and_forget(wire.CONTROL_CHANNEL, wire.TOPIC_EVENT, self.owner, None,
                                  headers={"sid": self.sid, "ev": event, **fields})

    def _ack(self) -> None:
        with self.lock:
            acked = self.assembly.take_ack()
        if acked is not None:
            self._event(wire.EV_ACK, n=acked)

    def _repair(self) -> None:
        """Ask the owner for missing chunks (or, when idle, whether it is still there)."""
        with self.lock:
            ask = self.assembly.repair_request()
            timeout = self.assembly.repair_timeout(time.monotonic())
        headers: dict[str, Any] = {"sid": self.sid, "ack": ask.ack, "missing": ask.missing}
        if ask.start is not None:
            headers["from"] = ask.start
        try:
            reply = self.cell.request(wire.CONTROL_CHANNEL, wire.TOPIC_REPAIR, self.owner, headers=headers,
                                      timeout=timeout)
        except UnreachableError as exc:
            self.end(ReturnCode.COMMUNICATION_ERROR, f"the sender '{self.owner}' is gone: {exc}",
                     notify_owner=False)
            return
        except (RequestTimeout, BrokerUnreachableError, RemoteError) as exc:
            # An error reply may come from anyone (the Cell does not say who): it counts as no
            # answer, and a sender that really cannot serve the stream ends it by silence.
            log.debug("stream %s: no repair from '%s': %s", self.sid, self.owner, exc)
            with self.lock:
                self.assembly.repair_unanswered(time.monotonic())
            return
        if reply.source != self.owner:
            self.side.ignored_senders.add(reply.source, "repair reply", self.sid)
            with self.lock:
                self.assembly.repair_unanswered(time.monotonic())
            return
        error = reply_error(reply.headers)
        if error is not None:
            self.end(ReturnCode.TASK_ABORTED, f"the sender '{self.owner}' ended the stream ({error[1]})",
                     notify_owner=False)
            return
        others = reply.headers.get("acked")
        with self.lock:
            self.assembly.repair_answered(time.monotonic(), others if isinstance(others, int) else None)
        seqs = reply.headers.get("seqs")
        nonces = reply.headers.get("nonces") if self.secure is not None else None
        if self.secure is not None and not isinstance(nonces, list):
            nonces = []  # a secure stream takes sealed repairs only
        data = reply.buffer
        position = 0
        for i, seq in enumerate(seqs if isinstance(seqs, list) else []):
            if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < self.count:
                break
            length = wire.chunk_length(seq, self.size, self.chunk_size)
            if nonces is not None:
                length = sealed_length(length)
            if position + length > len(data):
                break
            part = data[position:position + length]
            position += length
            if nonces is not None:
                opened = self._open_repair(seq, nonces[i] if i < len(nonces) else None, part)
                if opened is None:
                    continue
                part = memoryview(opened)
            self._store(seq, part, repaired=True)

    def _open_repair(self, seq: int, nonce: object, sealed: memoryview) -> Optional[bytes]:
        """A secure stream's repaired chunk, opened; None (counted) if it fails authentication."""
        assert self.sealer is not None
        data = None
        if isinstance(nonce, int) and not isinstance(nonce, bool):
            header = wire.encode_header(wire.KIND_CHUNK, seq, seq * self.chunk_size)
            data = self.sealer.open_repair(nonce, header, sealed)
        if data is None:
            self.rejected += 1
            log.log(logging.WARNING if self.rejected == 1 else logging.DEBUG,
                    "stream %s: dropped repaired chunk %d, which failed authentication", self.sid, seq)
        return data

    # -- the owner's requests (Cell worker threads) ----------------------------------------
    def take_one_chunk(self, data: bytes, digest: str) -> Reply:
        """A one-chunk start: store the whole file that came with it and verify it; the start's answer."""
        if self.count:
            try:
                self._store(0, memoryview(data), repaired=False)
            except OSError as exc:
                reason = f"cannot write to {self.reg.dest_dir}: {exc.strerror or exc}"
                self.end(ReturnCode.ERROR, reason, notify_owner=False)
                return Reply.failure(wire.ERR_IO, reason)
        reply = self.verify(digests.ALGORITHM, digest)
        return reply if reply_error(reply.headers) is not None else _verified(self.sid, committed=False)

    def commit_in_start(self) -> Reply:
        """A verified one-chunk stream to a single target commits in its start; the start's answer."""
        reply = self.commit()
        return reply if reply_error(reply.headers) is not None else _verified(self.sid, committed=True)

    def start_reply(self) -> Reply:
        """The answer to the owner's start, asked again."""
        if self.one_chunk:
            with self.lock:
                if not self.verified or self.rc not in (None, ReturnCode.OK):
                    return Reply.failure(wire.ERR_ENDED, f"the stream already ended ({self.rc}: {self.reason})")
                return _verified(self.sid, committed=self.rc == ReturnCode.OK)
        if self.secure is not None:
            return Reply(None, {"sid": self.sid, "e2e": self.secure.offer})
        return Reply(None, {"sid": self.sid})

    def verify(self, algo: object, digest: object, sealed: object = None) -> Reply:
        """The owner's "verify": compare its digest (sealed, for a secure stream) with the received data."""
        if self.secure is not None:
            opened = None
            if self.sealer is not None:
                try:
                    opened = self.sealer.open_digest(e2e.decode_b64(sealed, "sealed digest"))
                except e2e.E2EError:
                    opened = None
            if opened is None:
                return Reply.failure(wire.ERR_BAD_REQUEST, "the sealed digest does not authenticate")
            digest = opened
        with self.lock:
            self.assembly.progressed(time.monotonic())
            if self.verified and self.rc is None:
                return Reply(None, {"sid": self.sid})
            if self.rc is not None:
                return Reply.failure(wire.ERR_ENDED, f"the stream already ended ({self.rc}: {self.reason})")
            if not self.assembly.complete:
                return Reply.failure(wire.ERR_INCOMPLETE,
                                     f"only {self.assembly.prefix} of {self.count} chunks arrived")
            if algo != digests.ALGORITHM:
                return Reply.failure(wire.ERR_BAD_REQUEST, f"digest algorithm {algo!r} is not {digests.ALGORITHM}")
            if self.hasher.hexdigest() != digest:
                message = "the received data does not match the sender's digest"
                self._end_locked(ReturnCode.ERROR, message, notify_owner=False)
                return Reply.failure(wire.ERR_DIGEST, message)
            self.verified = True
        return Reply(None, {"sid": self.sid})

    def commit(self) -> Reply:
        with self.lock:
            self.assembly.progressed(time.monotonic())
            if self.rc == ReturnCode.OK:  # committed already: the owner asks again
                return Reply(None, {"sid": self.sid})
            if self.rc is not None or not self.verified:
                return Reply.failure(wire.ERR_ENDED, "the stream is not verified")
            try:
                location = commit_file(self.part_path, self.reg.dest_dir, self.name)
            except OSError as exc:
                self._end_locked(ReturnCode.ERROR, f"cannot save the file: {exc}", notify_owner=False)
                return Reply.failure(wire.ERR_IO, f"cannot save the file: {exc}")
            self.ctx[keys.KEY_FILE_LOCATION] = location
            self._end_locked(ReturnCode.OK, "")
        return Reply(None, {"sid": self.sid})


class ReceiverSide:
    """The receiver side of push on one cell: registrations and running incoming streams."""

    def __init__(self, service: PushService) -> None:
        self._service = service
        self.tuning = ReceiverTuning()
        self.ignored_senders = IgnoredSenders("owner")
        self._lock = threading.Lock()
        self._streams: dict[str, Optional[_Stream]] = {}  # None: being set up
        self._owners: dict[str, str] = {}  # stream id -> owner, for every stream in _streams
        # ended stream ids -> the owner of a committed stream (it may ask again), else None
        self._ended: "OrderedDict[str, Optional[str]]" = OrderedDict()
        cell = service.cell
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_KEY, self._on_key)
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_VERIFY, self._on_verify)
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_COMMIT, self._on_commit)
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_ABORT, self._on_abort)

    @property
    def cell(self) -> Cell:
        return self._service.cell

    def register(self, reg: _Registration) -> None:
        remove_stale_parts(reg.dest_dir)  # what a killed receiver left behind
        self.cell.register_request_cb(reg.channel, reg.topic, functools.partial(self._on_start, reg))

    def forget(self, sid: str, committed: bool = False) -> None:
        with self._lock:
            self._streams.pop(sid, None)
            owner = self._owners.pop(sid, None)
            self._remember_ended(sid, owner if committed else None)

    @property
    def ignored(self) -> int:
        """Messages about a stream from a node that is not its owner."""
        return self.ignored_senders.count

    def _remember_ended(self, sid: str, committed_by: Optional[str] = None) -> None:
        self._ended[sid] = committed_by
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)

    def _on_start(self, reg: _Registration, message: Message) -> Reply:
        key = None
        try:
            if len(message.buffer) > max(wire.ONE_CHUNK_MAX, proto.MAX_JSON_PAYLOAD):  # refused before a copy
                raise ValueError(f"a payload of {len(message.buffer)} bytes is too large")
            payload = message.payload
            data = payload if isinstance(payload, bytes) else None  # a one-chunk start: the whole file
            if data is not None:
                info = wire.check_one_chunk_start(message.headers, len(data))
            else:
                info = wire.check_start(payload)
                key = StreamKey.from_wire(info.get("seal")) if "e2e" not in info else None
        except ValueError as exc:  # a ProtocolError (a payload that does not decode) is one too
            return Reply.failure(wire.ERR_BAD_REQUEST, f"bad start request: {exc}")
        secure = None
        if key is None and data is None:
            try:
                secure = self._secure_start(info, message.source)
            except ValueError as exc:
                return Reply.failure(wire.ERR_REFUSED, str(exc))
        if info["algo"] != digests.ALGORITHM:
            return Reply.failure(wire.ERR_BAD_REQUEST, f"digest algorithm {info['algo']!r} is not supported "
                                                       f"(this site uses {digests.ALGORITHM})")
        sid = info["sid"]
        with self._lock:
            if sid in self._streams:
                if self._owners.get(sid) == message.source:  # the owner asks again
                    running = self._streams[sid]
                    if running is not None:
                        return running.start_reply()
                    if data is not None:  # still being set up: no verdict yet
                        return Reply.failure(wire.ERR_ENDED, f"stream {sid} is not verified yet")
                    return Reply(None, {"sid": sid})
                self.ignored_senders.add(message.source, "'start'", sid)
                return Reply.failure(wire.ERR_REFUSED, f"stream {sid} is already known here")
            if sid in self._ended:
                if data is not None and self._ended[sid] == message.source:  # committed here: its owner asks again
                    return _verified(sid, committed=True)
                return Reply.failure(wire.ERR_REFUSED, f"stream {sid} is already known here")
            if len(self._streams) >= MAX_STREAMS:
                return Reply.failure(wire.ERR_REFUSED, f"too many incoming streams (limit {MAX_STREAMS})")
            if sum(1 for owner in self._owners.values() if owner == message.source) >= MAX_STREAMS_PER_SENDER:
                return Reply.failure(wire.ERR_REFUSED, f"too many incoming streams from '{message.source}' "
                                                       f"(limit {MAX_STREAMS_PER_SENDER})")
            self._streams[sid] = None
            self._owners[sid] = message.source
        try:
            stream = self._open(reg, info, key, message.source, secure, data is not None)
        except (OSError, ValueError) as exc:
            self.forget(sid)
            return Reply.failure(wire.ERR_REFUSED, str(exc))
        try:
            reply = stream.take_one_chunk(data, info["digest"]) if data is not None else stream.start_reply()
        except Exception as exc:  # never leave a stream half set up: its thread ends it (descriptor, .part, slot)
            log.exception("stream %s: could not be set up", sid)
            stream.end(ReturnCode.ERROR, "the stream could not be set up", notify_owner=False)
            with self._lock:
                self._streams[sid] = stream
            stream.start_thread()
            return Reply.failure(wire.ERR_IO, f"the stream could not be set up: {type(exc).__name__}")
        with self._lock:
            aborted = sid in self._ended
            self._streams[sid] = stream
        if aborted:  # an abort overtook the start
            stream.end(ReturnCode.TASK_ABORTED, "the sender aborted the stream", notify_owner=False)
        elif data is not None and info.get("commit") is True and reply_error(reply.headers) is None:
            reply = stream.commit_in_start()  # published first: an abort from now on ends it, or finds it committed
        if stream.ended.is_set():  # it ended in its start (committed, or aborted): only its end is left to run
            reply.then = stream.start_thread  # once the answer went out: it need not wait for a new thread
        else:
            stream.start_thread()
        log.debug("stream %s: receiving '%s' (%d bytes) from '%s'%s", sid, stream.name, stream.size, message.source,
                  " (secure)" if secure else " (one chunk)" if data is not None else "")
        return reply

    def _secure_start(self, info: dict, owner: str) -> _Secure:
        """Check a secure start's certificate and agree the pairwise key; ValueError with the reason."""
        kit = self.cell.kit
        if kit is None:
            raise ValueError(f"'{self.cell.fqcn}' has no kit, so it cannot take a secure stream (start it with a "
                             f"kit from `fedstream provision`)")
        try:
            peer, owner_salt = e2e.accept_offer(info.get("e2e"), kit, owner)
        except e2e.E2EError as exc:
            raise ValueError(f"the sender's certificate does not verify: {exc}") from None
        salt = e2e.new_salt()
        pairwise = e2e.pairwise_key(kit, peer, (owner_salt, salt), owner, self.cell.fqcn)
        return _Secure(pairwise, wire.start_binding(info), e2e.offer(kit, salt))

    def _open(self, reg: _Registration, info: dict, key: Optional[StreamKey], owner: str,
              secure: Optional[_Secure] = None, one_chunk: bool = False) -> _Stream:
        cell_name = self.cell.fqcn
        if not os.path.isdir(reg.dest_dir):
            raise ValueError(f"'{cell_name}' has no destination directory {reg.dest_dir!r}")
        free = shutil.disk_usage(reg.dest_dir).free
        if free < info["size"]:
            raise ValueError(f"'{cell_name}' has only {free} bytes free in {reg.dest_dir}, {info['size']} needed")
        while True:
            path = part_path(reg.dest_dir, info["sid"], secrets.token_hex(4))
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
        return _Stream(self, reg, info, key, owner, path, fd, secure, one_chunk)

    def _stream_from_owner(self, message: Message) -> Optional[_Stream]:
        """The running stream the message names, if its sender is the stream's owner."""
        sid = message.headers.get("sid")
        if not wire.is_stream_id(sid):
            return None
        with self._lock:
            stream = self._streams.get(sid)
        if stream is not None and stream.owner != message.source:
            self.ignored_senders.add(message.source, f"'{message.topic}' request", sid)
            return None
        return stream

    def _committed(self, message: Message) -> Optional[Reply]:
        """Success again for the owner of a stream committed here already (it asks again), else None."""
        sid = message.headers.get("sid")
        with self._lock:
            done = isinstance(sid, str) and self._ended.get(sid) == message.source
        return Reply(None, {"sid": sid}) if done else None

    def _on_verify(self, message: Message) -> Reply:
        stream = self._stream_from_owner(message)
        if stream is None:
            return self._committed(message) or Reply.failure(wire.ERR_UNKNOWN_STREAM, "unknown stream")
        return stream.verify(message.headers.get("algo"), message.headers.get("digest"), message.headers.get("sealed"))

    def _on_key(self, message: Message) -> Reply:
        stream = self._stream_from_owner(message)
        if stream is None:
            return Reply.failure(wire.ERR_UNKNOWN_STREAM, "unknown stream")
        return stream.set_key(message.headers.get("wrapped"))

    def _on_commit(self, message: Message) -> Reply:
        stream = self._stream_from_owner(message)
        if stream is None:
            return self._committed(message) or Reply.failure(wire.ERR_UNKNOWN_STREAM, "unknown stream")
        return stream.commit()

    def _on_abort(self, message: Message) -> Reply:
        sid = message.headers.get("sid")
        if not wire.is_stream_id(sid):
            return Reply.failure(wire.ERR_UNKNOWN_STREAM, "unknown stream")
        with self._lock:
            owner = self._owners.get(sid)
            stream = self._streams.get(sid)
            if owner is None or (stream is None and owner == message.source):
                if sid not in self._ended:  # an ended stream stays as it ended (committed or not)
                    self._remember_ended(sid)  # a start that comes after its abort is refused
                return Reply(None, {"sid": sid})
        if owner != message.source or stream is None:
            self.ignored_senders.add(message.source, "'abort' request", sid)
            return Reply.failure(wire.ERR_UNKNOWN_STREAM, "unknown stream")
        reason = message.headers.get("reason") or "the sender aborted the stream"
        stream.end(ReturnCode.TASK_ABORTED, str(reason), notify_owner=False)
        return Reply(None, {"sid": sid})

    def stop(self) -> None:
        """End every incoming stream and wait for their threads (a stop hook of the cell)."""
        with self._lock:
            streams = [s for s in self._streams.values() if s is not None]
        for stream in streams:
            stream.end(ReturnCode.TASK_ABORTED, "the receiving cell is stopping")
        for stream in streams:
            thread = stream.thread
            if thread is not None and thread.is_alive():
                thread.join(_JOIN_WAIT)


def register_stream_processing(fl_ctx: FLContext, channel: str, topic: str, dest_dir: Optional[str] = None,
                               stream_done_cb: Optional[StreamCallback] = None,
                               chunk_consumed_cb: Optional[StreamCallback] = None, allow_pickle: bool = False,
                               **cb_kwargs: Any) -> None:
    """Accept pushes on (channel, topic) of fl_ctx's cell into dest_dir (see FileStreamer)."""
    if not isinstance(fl_ctx, FLContext):
        raise ValueError(f"fl_ctx must be an FLContext, got {type(fl_ctx).__name__}.")
    for what, value in (("channel", channel), ("topic", topic)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} must be a non-empty string, got {value!r}.")
    if channel == wire.CONTROL_CHANNEL:
        raise ValueError(f"channel {channel!r} is reserved by fedstream.")
    for what, cb in (("stream_done_cb", stream_done_cb), ("chunk_consumed_cb", chunk_consumed_cb)):
        if cb is not None and not callable(cb):
            raise ValueError(f"{what} must be callable, got {type(cb).__name__}.")
    if not isinstance(allow_pickle, bool):
        raise ValueError(f"allow_pickle must be True or False, got {allow_pickle!r}.")
    directory = check_dest_dir(dest_dir)
    cell = fl_ctx.get_engine().get_cell()
    PushService.for_cell(cell).side(ReceiverSide).register(
        _Registration(fl_ctx, channel, topic, directory, stream_done_cb, chunk_consumed_cb, dict(cb_kwargs),
                      allow_pickle))


def set_receiver_tuning(cell: Cell, tuning: ReceiverTuning) -> None:
    """Use `tuning` for the streams this cell receives from now on."""
    if not isinstance(tuning, ReceiverTuning):
        raise ValueError(f"tuning must be a ReceiverTuning, got {type(tuning).__name__}.")
    if (tuning.sub_rcvhwm is not None and tuning.sub_rcvhwm < 1) or tuning.subscribe_delay < 0 \
            or tuning.max_idle <= 0 or tuning.max_stall <= 0:
        raise ValueError("sub_rcvhwm must be at least 1, subscribe_delay not negative, max_idle and max_stall "
                         "positive.")
    PushService.for_cell(cell).side(ReceiverSide).tuning = tuning
