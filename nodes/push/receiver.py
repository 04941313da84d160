"""Receiver side of a push: one thread per stream writes chunks from the fan-out into a .part file.

A "start" request on a registered (channel, topic) creates a hidden `.part` file in the
destination directory and a thread that owns its own SUB socket, subscribed to the stream id.
The thread writes each chunk at its offset, hashes the contiguous prefix in order, acks
cumulatively over the Cell, asks the owner for chunks it missed (gaps, late subscription,
or silence while incomplete) and ends the stream with TIMEOUT when the owner stays silent.
The owner's "verify" compares the digest; "commit" renames the file into place. Every stream
ends exactly once, with stream_done_cb, and a failed stream leaves no file behind.
"""

import functools
import logging
import os
import secrets
import shutil
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import zmq

from fedstream.common import digest as digests
from fedstream.common.errors import BrokerUnreachableError, RemoteError, RequestTimeout, UnreachableError
from fedstream.common.filenames import check_dest_dir, commit_file, remove_quietly, sanitize_name
from fedstream.common.rc import ReturnCode
from fedstream.nodes.push import wire
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.cell import Cell
from fedstream.nodes.context import FLContext
from fedstream.nodes.message import Message, Reply
from fedstream.nodes.per_cell import PerCell
from fedstream.nodes.push.stream_context import StreamContext

log = logging.getLogger(__name__)

MAX_STREAMS = 64  # concurrent incoming streams per cell
_MAX_HOLES = 1024  # missing chunks named in one repair request
_COMPLETE_POLL_MS = 10
_ENDED_MEMORY = 4096  # ended stream ids remembered (a late "start" for one is refused)

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
    """

    sub_rcvhwm: Optional[int] = None
    subscribe_delay: float = 0.0


@dataclass
class _Registration:
    fl_ctx: FLContext
    channel: str
    topic: str
    dest_dir: str
    stream_done_cb: Optional[StreamCallback]
    chunk_consumed_cb: Optional[StreamCallback]
    cb_kwargs: dict


def _call_user_cb(what: str, cb: StreamCallback, reg: _Registration, ctx: StreamContext) -> bool:
    try:
        cb(ctx, reg.fl_ctx, **reg.cb_kwargs)
        return True
    except Exception:
        log.exception("%s of channel '%s' topic '%s' raised an exception (ignored)", what, reg.channel, reg.topic)
        return False


class _Stream:
    """One incoming stream: its .part file, progress, and the thread that receives it."""

    def __init__(self, hub: "_ReceiverHub", cell: Cell, reg: _Registration, info: dict, owner: str,
                 part_path: str, fd: int) -> None:
        self.hub = hub
        self.cell = cell
        self.reg = reg
        self.owner = owner
        self.sid: str = info["sid"]
        self.sid_frame = self.sid.encode()
        self.size: int = info["size"]
        self.chunk_size: int = info["chunk_size"]
        self.count: int = info["count"]
        self.window: int = info["window"]
        self.chunk_timeout = float(info["chunk_timeout"])
        self.nudge_interval = min(1.0, max(0.1, self.chunk_timeout / 4))
        self.idle_timeout = max(1.0, 2 * self.chunk_timeout)
        self.name = sanitize_name(info["name"])
        self.part_path = part_path
        self.fd = fd
        ctx = self.ctx = StreamContext(info["ctx"])
        ctx.update({keys.KEY_FILE_NAME: self.name, keys.KEY_FILE_SIZE: self.size, keys.KEY_FILE_LOCATION: None,
                    keys.KEY_RC: None, keys.KEY_STREAM_ID: self.sid, keys.KEY_SENDER: owner,
                    keys.KEY_CHANNEL: reg.channel, keys.KEY_TOPIC: reg.topic, keys.KEY_REPAIRED_CHUNKS: 0})
        self.lock = threading.Lock()
        self.ended = threading.Event()
        self.rc: Optional[ReturnCode] = None
        self.reason = ""
        self.notify_owner = False
        self.verified = False
        self.prefix = 0  # chunks [0, prefix) are written and hashed
        self.have: set[int] = set()  # chunks beyond the prefix already written
        self.highest = -1
        self.hasher = digests.new_hasher()
        self.acked = 0
        self.ready_sent = False
        self.repaired = 0
        self.last_heard = time.monotonic()
        self.next_repair = 0.0
        self.cb_failed = False
        self.thread = threading.Thread(target=self._run, name=f"fedstream-push-{self.sid}", daemon=True)

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
        self.hub.forget(self.sid)
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
            _call_user_cb("stream_done_cb", self.reg.stream_done_cb, self.reg, self.ctx)

    # -- the receiving thread --------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._receive()
        except Exception as exc:
            if self.end(ReturnCode.ERROR, f"{type(exc).__name__}: {exc}"):
                log.exception("stream %s failed", self.sid)
        finally:
            self._finish()

    def _receive(self) -> None:
        _, address = self.cell.fanout_endpoints
        tuning = self.hub.tuning
        sub = self.cell.context.socket(zmq.SUB)
        self.cell.secure_socket(sub)  # CURVE client of a secure broker (no-op without a kit)
        try:
            sub.setsockopt(zmq.RCVHWM, tuning.sub_rcvhwm or 2 * self.window + 16)
            sub.setsockopt(zmq.MAXMSGSIZE, self.chunk_size + 1024)
            sub.linger = 0
            if tuning.subscribe_delay > 0 and self.ended.wait(tuning.subscribe_delay):
                return
            sub.connect(address)
            sub.setsockopt(zmq.SUBSCRIBE, self.sid_frame)
            self.last_heard = time.monotonic()
            poll_ms = int(min(0.1, self.nudge_interval) * 1000)
            while not self.ended.is_set():
                # once complete, look often at the end of the stream: stream_done_cb follows commit closely
                if sub.poll(_COMPLETE_POLL_MS if self.prefix >= self.count else poll_ms, zmq.POLLIN):
                    self._drain(sub)
                self._ack()
                if self.ended.is_set():
                    break
                now = time.monotonic()
                holes = self._holes()
                if now >= self.next_repair and (holes or now - self.last_heard >= self.nudge_interval):
                    self._repair(holes)
                if time.monotonic() - self.last_heard > self.idle_timeout:
                    self.end(ReturnCode.TIMEOUT, f"nothing from the sender '{self.owner}' for "
                                                 f"{self.idle_timeout:g} s")
        finally:
            sub.close(linger=0)

    def _drain(self, sub: zmq.Socket) -> None:
        """Take what the SUB holds, but at most half a window before acking."""
        for _ in range(max(1, self.window // 2)):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()
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
        # The owner never runs more than a window ahead of this receiver's prefix.
        if seq >= min(self.count, self.prefix + self.window) or offset != seq * self.chunk_size or \
                len(frames[2]) != wire.chunk_length(seq, self.size, self.chunk_size):
            log.debug("stream %s: ignored a malformed chunk frame (seq %d)", self.sid, seq)
            return
        self._store(seq, frames[2].buffer, repaired=False)

    def _store(self, seq: int, data: memoryview, repaired: bool) -> None:
        """Write one chunk at its offset; extend the hashed prefix as far as it now goes."""
        if seq < self.prefix or seq in self.have:
            return
        with self.lock:
            if self.rc is not None:
                return
            offset = seq * self.chunk_size
            written = 0
            while written < len(data):
                written += os.pwrite(self.fd, data[written:], offset + written)
            if seq == self.prefix:
                self.hasher.update(data)
                self.prefix += 1
                while self.prefix in self.have:  # chunks that came after a repaired gap
                    self.have.discard(self.prefix)
                    start = self.prefix * self.chunk_size
                    digests.hash_range(self.fd, self.hasher, start,
                                       start + wire.chunk_length(self.prefix, self.size, self.chunk_size))
                    self.prefix += 1
            else:
                self.have.add(seq)
                self.highest = max(self.highest, seq)
        if repaired:
            self.repaired += 1
        if self.reg.chunk_consumed_cb is not None and not self.cb_failed:
            self.cb_failed = not _call_user_cb("chunk_consumed_cb", self.reg.chunk_consumed_cb, self.reg, self.ctx)

    def _holes(self) -> list[int]:
        return [s for s in range(self.prefix, self.highest + 1) if s not in self.have][:_MAX_HOLES]

    def _event(self, event: str, **fields: Any) -> None:
        self.cell.fire_and_forget(wire.CONTROL_CHANNEL, wire.TOPIC_EVENT, self.owner, None,
                                  headers={"sid": self.sid, "ev": event, **fields})

    def _ack(self) -> None:
        if self.prefix > self.acked:
            self.acked = self.prefix
            self._event(wire.EV_ACK, n=self.acked)

    def _repair(self, holes: list[int]) -> None:
        """Ask the owner for missing chunks (or, when idle, whether it is still there)."""
        now = time.monotonic()
        headers: dict[str, Any] = {"sid": self.sid, "ack": self.prefix, "missing": holes}
        if not holes:
            headers["from"] = max(self.prefix, self.highest + 1)
        timeout = max(0.05, min(self.chunk_timeout, self.idle_timeout - (now - self.last_heard)))
        try:
            reply = self.cell.request(wire.CONTROL_CHANNEL, wire.TOPIC_REPAIR, self.owner, headers=headers,
                                      timeout=timeout)
        except (RequestTimeout, UnreachableError, BrokerUnreachableError) as exc:
            log.debug("stream %s: no repair from '%s': %s", self.sid, self.owner, exc)
            self.next_repair = time.monotonic() + self.nudge_interval
            return
        except RemoteError as exc:
            self.end(ReturnCode.ERROR, f"the sender '{self.owner}' cannot serve the stream: {exc}")
            return
        if reply.headers.get("error"):
            self.end(ReturnCode.TASK_ABORTED, f"the sender '{self.owner}' ended the stream "
                                              f"({reply.headers['error']})", notify_owner=False)
            return
        self.last_heard = time.monotonic()
        self.next_repair = self.last_heard
        seqs = reply.headers.get("seqs")
        data = reply.buffer
        position = 0
        for seq in seqs if isinstance(seqs, list) else []:
            if not isinstance(seq, int) or not 0 <= seq < self.count:
                break
            length = wire.chunk_length(seq, self.size, self.chunk_size)
            if position + length > len(data):
                break
            self._store(seq, data[position:position + length], repaired=True)
            position += length

    # -- the owner's finishing requests (Cell worker threads) ------------------------------
    def verify(self, algo: object, digest: object) -> Reply:
        with self.lock:
            self.last_heard = time.monotonic()
            if self.rc is not None:
                return Reply(None, {"error": f"the stream already ended ({self.rc}: {self.reason})"})
            if self.prefix < self.count:
                return Reply(None, {"error": f"only {self.prefix} of {self.count} chunks arrived"})
            if algo != digests.ALGORITHM:
                return Reply(None, {"error": f"digest algorithm {algo!r} is not {digests.ALGORITHM}"})
            if self.hasher.hexdigest() != digest:
                self._end_locked(ReturnCode.ERROR, "the received data does not match the sender's digest",
                                 notify_owner=False)
                return Reply(None, {"error": "the received data does not match the sender's digest"})
            self.verified = True
        return Reply(None, {"ok": True})

    def commit(self) -> Reply:
        with self.lock:
            self.last_heard = time.monotonic()
            if self.rc is not None or not self.verified:
                return Reply(None, {"error": "the stream is not verified"})
            try:
                location = commit_file(self.part_path, self.reg.dest_dir, self.name)
            except OSError as exc:
                self._end_locked(ReturnCode.ERROR, f"cannot save the file: {exc}", notify_owner=False)
                return Reply(None, {"error": f"cannot save the file: {exc}"})
            self.ctx[keys.KEY_FILE_LOCATION] = location
            self._end_locked(ReturnCode.OK, "")
        return Reply(None, {"ok": True})


class _ReceiverHub:
    """Per-Cell registrations and running incoming streams."""

    def __init__(self, cell: Cell) -> None:
        self.cell_ref = weakref.ref(cell)
        self.tuning = ReceiverTuning()
        self._lock = threading.Lock()
        self._streams: dict[str, Optional[_Stream]] = {}  # None: being set up
        self._ended: "OrderedDict[str, None]" = OrderedDict()
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_VERIFY, self._on_verify)
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_COMMIT, self._on_commit)
        cell.register_request_cb(wire.CONTROL_CHANNEL, wire.TOPIC_ABORT, self._on_abort)
        cell.add_stop_hook(self._on_cell_stop)

    def register(self, reg: _Registration) -> None:
        cell = self.cell_ref()
        assert cell is not None
        cell.register_request_cb(reg.channel, reg.topic, functools.partial(self._on_start, reg))

    def forget(self, sid: str) -> None:
        with self._lock:
            self._streams.pop(sid, None)
            self._remember_ended(sid)

    def _remember_ended(self, sid: str) -> None:
        self._ended[sid] = None
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)

    def _on_start(self, reg: _Registration, message: Message) -> Reply:
        try:
            info = wire.check_start(message.payload)
        except ValueError as exc:
            return Reply(None, {"error": f"bad start request: {exc}"})
        if info["algo"] != digests.ALGORITHM:
            return Reply(None, {"error": f"digest algorithm {info['algo']!r} is not supported "
                                         f"(this site uses {digests.ALGORITHM})"})
        sid = info["sid"]
        with self._lock:
            if sid in self._streams or sid in self._ended:
                return Reply(None, {"error": f"stream {sid} is already known here"})
            if len(self._streams) >= MAX_STREAMS:
                return Reply(None, {"error": f"too many incoming streams (limit {MAX_STREAMS})"})
            self._streams[sid] = None
        try:
            stream = self._open(reg, info, message.source)
        except (OSError, ValueError) as exc:
            self.forget(sid)
            return Reply(None, {"error": str(exc)})
        with self._lock:
            aborted = sid in self._ended
            self._streams[sid] = stream
        if aborted:  # an abort overtook the start
            stream.end(ReturnCode.TASK_ABORTED, "the sender aborted the stream", notify_owner=False)
        stream.thread.start()
        log.debug("stream %s: receiving '%s' (%d bytes) from '%s'", sid, stream.name, stream.size, message.source)
        return Reply(None, {"ok": True})

    def _open(self, reg: _Registration, info: dict, owner: str) -> _Stream:
        cell = self.cell_ref()
        if cell is None:
            raise ValueError("the cell is gone")
        cell_name = cell.fqcn
        if not os.path.isdir(reg.dest_dir):
            raise ValueError(f"'{cell_name}' has no destination directory {reg.dest_dir!r}")
        free = shutil.disk_usage(reg.dest_dir).free
        if free < info["size"]:
            raise ValueError(f"'{cell_name}' has only {free} bytes free in its destination directory, "
                             f"{info['size']} needed")
        while True:
            path = os.path.join(reg.dest_dir, f".fedstream-{info['sid']}-{secrets.token_hex(4)}.part")
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
        return _Stream(self, cell, reg, info, owner, path, fd)

    def _stream_from_owner(self, message: Message) -> Optional[_Stream]:
        sid = message.headers.get("sid")
        if not isinstance(sid, str):
            return None
        with self._lock:
            stream = self._streams.get(sid)
        return stream if stream is not None and stream.owner == message.source else None

    def _on_verify(self, message: Message) -> Reply:
        stream = self._stream_from_owner(message)
        if stream is None:
            return Reply(None, {"error": "unknown stream"})
        return stream.verify(message.headers.get("algo"), message.headers.get("digest"))

    def _on_commit(self, message: Message) -> Reply:
        stream = self._stream_from_owner(message)
        if stream is None:
            return Reply(None, {"error": "unknown stream"})
        return stream.commit()

    def _on_abort(self, message: Message) -> None:
        sid = message.headers.get("sid")
        if not wire.is_stream_id(sid):
            return
        with self._lock:
            stream = self._streams.get(sid)
            if stream is None:
                self._remember_ended(sid)
                return
        if stream.owner == message.source:
            reason = message.headers.get("reason") or "the sender aborted the stream"
            stream.end(ReturnCode.TASK_ABORTED, str(reason), notify_owner=False)

    def _on_cell_stop(self) -> None:
        with self._lock:
            streams = [s for s in self._streams.values() if s is not None]
        for stream in streams:
            stream.end(ReturnCode.TASK_ABORTED, "the receiving cell is stopping")
        for stream in streams:
            if stream.thread.is_alive():
                stream.thread.join(2.0)


_hubs: PerCell[_ReceiverHub] = PerCell(_ReceiverHub)  # the receiver side of push, one per cell


def register_stream_processing(fl_ctx: FLContext, channel: str, topic: str, dest_dir: Optional[str] = None,
                               stream_done_cb: Optional[StreamCallback] = None,
                               chunk_consumed_cb: Optional[StreamCallback] = None, **cb_kwargs: Any) -> None:
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
    directory = check_dest_dir(dest_dir)
    cell = fl_ctx.get_engine().get_cell()
    _hubs.get(cell).register(_Registration(fl_ctx, channel, topic, directory, stream_done_cb, chunk_consumed_cb,
                                          dict(cb_kwargs)))


def set_receiver_tuning(cell: Cell, tuning: ReceiverTuning) -> None:
    """Use `tuning` for the streams this cell receives from now on."""
    if not isinstance(tuning, ReceiverTuning):
        raise ValueError(f"tuning must be a ReceiverTuning, got {type(tuning).__name__}.")
    if (tuning.sub_rcvhwm is not None and tuning.sub_rcvhwm < 1) or tuning.subscribe_delay < 0:
        raise ValueError("sub_rcvhwm must be at least 1 and subscribe_delay not negative.")
    _hubs.get(cell).tuning = tuning
