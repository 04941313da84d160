"""Owner side of pull: one PullOwner per Cell serves its transactions; FileDownloader is the seed's face.

1. `FileDownloader.new_transaction(cell, ...)` finds (or starts) the cell's `PullOwner`, which
   registers the pull handlers on the cell and a stop hook: stopping the cell ends its
   transactions (their timeout_cb fires) and the owner's monitor thread.
2. `add_file` checks the file, gives it a RID and queues its digest for the owner's digest
   workers. Files are opened on demand through the owner's `OpenFiles` (a bounded set of
   descriptors), so a transaction may share thousands of files.
3. Handlers: `open` and `done` answer from memory on the Cell's I/O thread (the verdict is posted
   before any callback can run); an `open` that asks for the `first` bytes of the file gets them
   with its answer, read in the pool; when they are the whole file, the answer carries the file's
   digest too, and the recipient confirms with a one-way `done` (a small file costs one round
   trip). A small file kept in memory (`KeptBytes`, nodes/pull/kept.py) is answered on the I/O
   thread with its bytes: no hand-off to the pool, no read. `chunk` runs in the Cell's worker
   pool, reserves the reply's bytes in a `ReplyBudget` (too many in flight to that requester:
   "busy"), reads straight into a pooled buffer that becomes the reply frame (or takes a view of
   a kept file's bytes), and releases the bytes and the buffer once the frame left the process
   (its tracker is done).
4. A monitor thread ends transactions idle for their timeout; `FileDownloader.shutdown()` ends all.
5. A file serves plain and secure requests alike, or secure ones only when it was added with
   secure=True. A secure `open` (secure=True on the recipient) makes a session in
   `SecureSessions` (nodes/pull/secure.py), which needs this cell's kit; the session's chunk
   replies are sealed, its digest and verdict too.

Every failed request is answered with `Reply.failure(code, sentence)` (codes in wire.py).
"""

import json
import logging
import math
import os
import threading
import time
import weakref
from typing import Any, Callable, Optional

import zmq

from fedstream.common import digest as digests
from fedstream.common import e2e
from fedstream.common.filenames import remove_quietly
from fedstream.common.rc import DownloadStatus
from fedstream.nodes.callbacks import call_user_cb
from fedstream.nodes.cell import Cell
from fedstream.nodes.message import InPool, Message, Reply, reply_error
from fedstream.nodes.objects import spool
from fedstream.nodes.per_cell import PerCell
from fedstream.nodes.pull import wire
from fedstream.nodes.pull.budget import ReplyBudget
from fedstream.nodes.pull.buffers import BufferPool, buffer_size
from fedstream.nodes.pull.kept import kept_bytes
from fedstream.nodes.pull.openfiles import DigestWorkers, OpenFiles
from fedstream.nodes.pull.secure import SecureSessions, Session
from fedstream.nodes.pull.shared import Closed, DigestCache, SharedFile

log = logging.getLogger(__name__)

_MONITOR_INTERVAL = 0.2  # seconds between checks for inactive transactions
_MONITOR_JOIN = 2.0  # seconds stop() waits for the monitor thread


class _Transaction:
    def __init__(self, owner: "PullOwner", timeout: float, timeout_cb: Optional[Callable], cb_kwargs: dict) -> None:
        self.tx_id = wire.new_id()
        self.owner = owner
        self.timeout = timeout
        self.timeout_cb = timeout_cb
        self.cb_kwargs = cb_kwargs
        self.files: list[SharedFile] = []
        self.spool_files: list[str] = []  # objects serialized for this transaction, removed when it ends
        self.last_activity = time.monotonic()
        self.ended = False

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class PullOwner:
    """The owner side of pull on one Cell: its transactions, their files and the request handlers."""

    def __init__(self, cell: Cell) -> None:
        self.cell_ref = weakref.ref(cell)
        self.fqcn = cell.fqcn
        self._lock = threading.Lock()
        self._transactions: dict[str, _Transaction] = {}
        self._files: dict[str, tuple[_Transaction, SharedFile]] = {}
        self._digests = DigestCache()
        self._open_files = OpenFiles()
        self._digest_workers = DigestWorkers(name=f"fedstream-digest-{self.fqcn}")
        self._budget = ReplyBudget()
        self._budget_lock = threading.Lock()
        self._buffers = BufferPool()
        self._secure = SecureSessions()
        # replies on their way out: (budget token, tracker of the frame, its buffer)
        self._sending: list[tuple[int, zmq.MessageTracker, Optional[bytearray]]] = []
        self._stopping = threading.Event()
        self._monitor: Optional[threading.Thread] = None
        cell.register_request_cb(wire.CHANNEL, wire.TOPIC_OPEN, self._serve_open, inline=True)
        cell.register_request_cb(wire.CHANNEL, wire.TOPIC_CHUNK, self._serve_chunk)  # reads the disk: pool
        cell.register_request_cb(wire.CHANNEL, wire.TOPIC_DONE, self._serve_done, inline=True)
        cell.add_stop_hook(self.stop)

    # -- transactions ----------------------------------------------------------------------
    def new_transaction(self, timeout: float, timeout_cb: Optional[Callable], cb_kwargs: dict) -> str:
        tx = _Transaction(self, timeout, timeout_cb, cb_kwargs)
        with self._lock:
            self._transactions[tx.tx_id] = tx
            if self._monitor is None:
                self._monitor = threading.Thread(target=self._watch, name=f"fedstream-pull-monitor-{self.fqcn}",
                                                 daemon=True)
                self._monitor.start()
        log.debug("transaction %s created on '%s' (timeout %g s)", tx.tx_id, self.fqcn, timeout)
        return tx.tx_id

    def transaction(self, tx_id: str) -> Optional[_Transaction]:
        with self._lock:
            return self._transactions.get(tx_id)

    def add_file(self, tx: _Transaction, file_name: str, cb: Optional[Callable], cb_kwargs: dict,
                 spool: bool = False, secure: bool = False) -> str:
        """Share `file_name` in `tx`; a `spool` file belongs to the transaction and is removed when it ends.

        A `secure` file is served to secure downloads only.
        """
        if secure:
            cell = self.cell_ref()
            e2e.require_kit(cell.kit if cell is not None else None)
        shared = SharedFile(file_name, cb, cb_kwargs, self._open_files)
        shared.secure_only = secure
        with self._lock:
            if tx.ended:
                shared.close()
                raise ValueError(f"Unknown transaction {tx.tx_id!r}: it does not exist or has ended.")
            if spool:
                tx.spool_files.append(file_name)
            tx.files.append(shared)
            self._files[shared.ref_id] = (tx, shared)
            tx.touch()
        shared.start_digest(self._digests, self._digest_workers, kept_bytes)
        log.debug("shared %s as %s (%d bytes)", file_name, shared.ref_id, shared.size)
        return shared.ref_id

    def end(self, tx: _Transaction, call_cb: bool) -> None:
        """End `tx`: its RIDs stop working, unfinished recipients are reported failed."""
        with self._lock:
            if tx.ended:
                return
            tx.ended = True
            self._transactions.pop(tx.tx_id, None)
            for shared in tx.files:
                self._files.pop(shared.ref_id, None)
            files = list(tx.files)
        log.debug("transaction %s ended", tx.tx_id)
        self._secure.forget(shared.ref_id for shared in files)
        for shared in files:
            shared.close()
        for path in tx.spool_files:
            remove_quietly(path)
        for shared in files:
            for site in shared.take_unfinished():
                shared.report(site, DownloadStatus.FAILED)
        if call_cb and tx.timeout_cb is not None:
            call_user_cb("timeout_cb", tx.timeout_cb, tx.tx_id, [f.file_name for f in files], **tx.cb_kwargs)

    def end_all(self) -> None:
        """End every transaction, calling their timeout_cb."""
        with self._lock:
            pending = list(self._transactions.values())
        for tx in pending:
            self.end(tx, True)

    def stop(self) -> None:
        """The cell stops: end every transaction and the monitor thread."""
        self._stopping.set()
        self.end_all()
        self._digest_workers.stop()
        with self._lock:
            monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(_MONITOR_JOIN)
        self._stopping.clear()

    def _watch(self) -> None:
        while True:
            self._stopping.wait(_MONITOR_INTERVAL)
            now = time.monotonic()
            with self._lock:
                if self._stopping.is_set() or not self._transactions:
                    self._monitor = None
                    return
                expired = [tx for tx in self._transactions.values() if now - tx.last_activity >= tx.timeout]
            for tx in expired:
                log.info("transaction %s timed out after %g s without download activity", tx.tx_id, tx.timeout)
                self.end(tx, True)

    # -- request handlers --------------------------------------------------------------------
    def _lookup(self, headers: dict) -> "SharedFile | Reply":
        ref = headers.get("ref")
        with self._lock:
            entry = self._files.get(ref) if isinstance(ref, str) else None
        if entry is None or entry[0].ended:
            return Reply.failure(wire.ERR_UNKNOWN_REF, f"{wire.UNKNOWN_REF_MESSAGE} {str(ref)[:64]!r}")
        entry[0].touch()
        return entry[1]

    def _session(self, msg: Message, shared: SharedFile) -> "Session | Reply | None":
        """The secure session a request names, a failure if it names an unknown one, None for a plain request.

        A plain request for a file shared with secure=True is a failure too.
        """
        sid = msg.headers.get("e2e")
        if sid is None:
            if shared.secure_only:
                return Reply.failure(wire.ERR_SECURE, "this file is shared for secure downloads only: "
                                                      "download it with secure=True")
            return None
        session = self._secure.find(msg.source, sid, shared.ref_id)
        if session is None:
            return Reply.failure(wire.ERR_SECURE, "unknown secure session: open the download again")
        return session

    def _serve_open(self, msg: Message) -> "Reply | InPool":
        """Runs on the I/O thread (a recipient's start is recorded in order with its `done`).

        A request asking for its `first` bytes gets them as the answer's payload, read in the pool
        (or, for a plain download of a file kept in memory, taken from there at once); an owner
        without room for them in its budget answers without.
        """
        shared = self._lookup(msg.headers)
        if isinstance(shared, Reply):
            return shared
        meta = {"name": shared.name, "size": shared.size, "alg": digests.ALGORITHM}
        offer = msg.headers.get("e2e")
        session: "Session | Reply | None"
        if isinstance(offer, dict):  # a secure download begins (or its open is sent again)
            cell = self.cell_ref()
            try:
                session = self._secure.open(cell.kit if cell is not None else None, self.fqcn, msg.source,
                                            shared.ref_id, offer, meta)
            except e2e.E2EError as exc:
                log.warning("refused a secure download of %s by '%s': %s", shared.ref_id, msg.source, exc)
                return Reply.failure(wire.ERR_SECURE, str(exc))
        else:
            session = self._session(msg, shared)  # a secure download's presence probe names its session
            if isinstance(session, Reply):
                return session
        shared.begin(msg.source)
        answer = dict(session.answer) if session is not None else meta
        first = msg.headers.get("first")
        if type(first) is not int or not 0 < first <= wire.MAX_CHUNK_LENGTH or not shared.size:
            return Reply(None, answer)

        def with_first_bytes() -> Reply:
            data = self._chunk_reply(msg.source, shared, session, 0, first)
            if isinstance(data, Reply):
                failed = reply_error(data.headers)
                return Reply(None, answer) if failed and failed[0] == wire.ERR_BUSY else data
            if session is None and first >= shared.size and shared.digest_ready.is_set() and shared.digest:
                # The whole file: its digest lets the recipient verify it and confirm with a one-way `done`.
                return Reply(data, {**answer, "digest": shared.digest})
            return Reply(data, answer)

        if session is None and shared.content is not None:  # no disk, no sealing: nothing to wait for
            return with_first_bytes()
        return InPool(with_first_bytes)

    def _serve_chunk(self, msg: Message) -> "zmq.Frame | bytes | Reply":
        shared = self._lookup(msg.headers)
        if isinstance(shared, Reply):
            return shared
        session = self._session(msg, shared)
        if isinstance(session, Reply):
            return session
        offset, length = msg.headers.get("off"), msg.headers.get("len")
        if type(offset) is not int or type(length) is not int or offset < 0 \
                or not 0 < length <= wire.MAX_CHUNK_LENGTH:
            return Reply.failure(wire.ERR_BAD_REQUEST, f"bad chunk request: offset {offset!r}, length {length!r} "
                                                      f"(at most {wire.MAX_CHUNK_LENGTH} bytes)")
        return self._chunk_reply(msg.source, shared, session, offset, length)

    def _chunk_reply(self, requester: str, shared: SharedFile, session: Optional[Session], offset: int,
                     length: int) -> "zmq.Frame | bytes | Reply":
        """Bytes [offset, offset+length) of `shared` (clipped to its size, sealed for a session) within the budget."""
        length = max(0, min(length, shared.size - offset))
        extra = e2e.TAG_BYTES if session is not None else 0
        content = shared.content
        held = length if content is not None else buffer_size(length) if length else 0  # a kept file: a view
        token = self._reserve(requester, held + extra)
        if token is None:
            return Reply.failure(wire.ERR_BUSY, "too many reply bytes are in flight to you: ask again later")
        buffer = self._buffers.take(length) if length and content is None else None
        reply: "zmq.Frame | bytes | Reply" = b""
        try:
            reply = self._read(shared, offset, length, buffer, content)
            if session is not None and not isinstance(reply, Reply):
                plain = reply.buffer if isinstance(reply, zmq.Frame) else b""
                reply = zmq.Frame(session.sealer.seal(offset, plain), copy=False, track=True)
                if buffer is not None:  # the sealed copy is what goes out: the buffer is free now
                    self._buffers.give(buffer)
                    buffer = None
        finally:  # a frame holds its buffer until it left the process; anything else frees it now
            if isinstance(reply, zmq.Frame):
                with self._budget_lock:
                    self._sending.append((token, reply.tracker, buffer))
            else:
                self._release(token, buffer)
        return reply

    @staticmethod
    def _read(shared: SharedFile, offset: int, length: int, buffer: Optional[bytearray],
              content: Optional[bytes]) -> "zmq.Frame | bytes | Reply":
        """The reply to a chunk request: the bytes read straight into the buffer of the frame that is sent.

        A file kept in memory (its `content`) is not read: the frame is a view of its bytes.
        """
        if content is not None:
            return zmq.Frame(memoryview(content)[offset:offset + length], copy=False, track=True) if length else b""
        try:
            with shared.reading() as fd:
                if shared.changed(fd):
                    return Reply.failure(wire.ERR_CHANGED, f"the file {shared.name!r} changed on the owner")
                if buffer is None:
                    return b""
                count = os.preadv(fd, [memoryview(buffer)[:length]], offset)
        except Closed:
            return Reply.failure(wire.ERR_UNKNOWN_REF, f"{wire.UNKNOWN_REF_MESSAGE} {shared.ref_id!r}")
        except OSError as exc:
            log.error("cannot read %s: %s", shared.file_name, exc)
            return Reply.failure(wire.ERR_IO, f"the owner cannot read {shared.name!r}: {exc.strerror}")
        return zmq.Frame(memoryview(buffer)[:count], copy=False, track=True)

    def _serve_done(self, msg: Message) -> Reply:
        """Runs on the I/O thread: the verdict is posted before the callback can run (and, say, stop the cell).

        A one-way `done` (a recipient that verified a whole file against the digest of `open`) is
        recorded the same way; its verdict goes nowhere.
        """
        shared = self._lookup(msg.headers)
        if isinstance(shared, Reply):
            return shared
        site = msg.source
        if msg.headers.get("gave_up"):
            if shared.finish(site, DownloadStatus.FAILED):
                self._report_later(shared, site, DownloadStatus.FAILED)
            return Reply(None, {"ok": False})
        session = self._session(msg, shared)
        if isinstance(session, Reply):
            return session
        if not shared.digest_ready.is_set():
            return Reply.failure(wire.ERR_PENDING, "the owner is still computing the file digest")
        if shared.digest is None:
            return Reply.failure(*(shared.digest_error or (wire.ERR_IO, "the owner has no digest")))
        digest = msg.headers.get("digest")
        if session is not None:  # the digest and the verdict travel sealed: the broker can fake neither
            try:
                digest = e2e.open_note(session.pairwise, wire.NOTE_DIGEST, msg.headers.get("sealed")).decode()
            except (e2e.E2EError, UnicodeDecodeError):
                return Reply.failure(wire.ERR_SECURE, "the sealed digest does not authenticate")
        ok = msg.headers.get("alg") == digests.ALGORITHM and digest == shared.digest
        if ok:
            shared.mark_started(site)
            if shared.finish(site, DownloadStatus.SUCCESS):
                self._report_later(shared, site, DownloadStatus.SUCCESS)
            # The owner already reported this recipient as failed: it must not keep the file either.
            ok = shared.outcome(site) == DownloadStatus.SUCCESS
        verdict = {"ok": ok, "digest": shared.digest, "alg": digests.ALGORITHM}
        if session is not None:
            return Reply(None, {"sealed": e2e.seal_note(session.pairwise, wire.NOTE_VERDICT,
                                                        json.dumps(verdict).encode())})
        return Reply(None, verdict)

    def _report_later(self, shared: SharedFile, site: str, status: DownloadStatus) -> None:
        """Call file_downloaded_cb in the Cell's pool: user code never runs on its I/O thread."""
        cell = self.cell_ref()
        if cell is not None:
            cell.call_soon(shared.report, site, status)
        else:
            shared.report(site, status)

    # -- bytes in flight ---------------------------------------------------------------------
    def _reserve(self, requester: str, nbytes: int) -> Optional[int]:
        """Reserve reply bytes for `requester`, first freeing those of replies that left the process."""
        with self._budget_lock:
            still = []
            for token, tracker, buffer in self._sending:
                if tracker.done:
                    self._budget.release(token)
                    if buffer is not None:
                        self._buffers.give(buffer)
                else:
                    still.append((token, tracker, buffer))
            self._sending = still
            return self._budget.reserve(requester, nbytes)

    def _release(self, token: int, buffer: Optional[bytearray]) -> None:
        with self._budget_lock:
            self._budget.release(token)
        if buffer is not None:
            self._buffers.give(buffer)


class _Directory:
    """The index behind FileDownloader's classmethods: each cell's PullOwner, found by cell or by tx id."""

    def __init__(self) -> None:
        self._per_cell: PerCell[PullOwner] = PerCell(self._start)
        self._owners: "weakref.WeakSet[PullOwner]" = weakref.WeakSet()
        self._lock = threading.Lock()

    def _start(self, cell: Cell) -> PullOwner:
        owner = PullOwner(cell)
        with self._lock:
            self._owners.add(owner)
        return owner

    def owner_of(self, cell: Cell) -> PullOwner:
        return self._per_cell.get(cell)

    def owners(self) -> list[PullOwner]:
        with self._lock:
            return list(self._owners)

    def transaction(self, tx_id: object) -> Optional[_Transaction]:
        if not isinstance(tx_id, str):
            return None
        for owner in self.owners():
            tx = owner.transaction(tx_id)
            if tx is not None:
                return tx
        return None


_directory = _Directory()


class FileDownloader:
    """Share files with any number of recipients, who pull them at their own pace (the seed's API)."""

    @classmethod
    def new_transaction(cls, cell: Cell, timeout: float, timeout_cb: Optional[Callable], **cb_kwargs: Any) -> str:
        """Create a transaction and return its id.

        It ends after `timeout` seconds without download activity from any recipient on any of
        its files; then `timeout_cb(tx_id, file_names, **cb_kwargs)` is called once.
        """
        if not isinstance(cell, Cell):
            raise ValueError(f"new_transaction needs a Cell, got {type(cell).__name__}.")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
                or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
        if timeout_cb is not None and not callable(timeout_cb):
            raise ValueError("timeout_cb must be callable or None.")
        return _directory.owner_of(cell).new_transaction(float(timeout), timeout_cb, cb_kwargs)

    @classmethod
    def add_file(cls, transaction_id: str, file_name: str, file_downloaded_cb: Optional[Callable] = None,
                 *, chunk_size: Optional[int] = None, ref_id: Optional[str] = None, secure: bool = False,
                 **cb_kwargs: Any) -> str:
        """Share `file_name` in the transaction and return its reference id (RID).

        `file_downloaded_cb(ref_id, to_site, status, file_name, **cb_kwargs)` is called once per
        recipient, with DownloadStatus.SUCCESS or FAILED. `chunk_size` (NVFlare's owner-side
        option; None or 0 = default) is accepted for compatibility: each recipient chooses its
        own. `ref_id` cannot be chosen (RIDs are unguessable); passing one raises ValueError
        rather than landing in `cb_kwargs`. `secure=True` serves the file to secure downloads
        only (`download_file(..., secure=True)`), so that not even a compromised broker posing
        as a recipient gets it in clear; it needs a kit on this cell.
        """
        if not isinstance(secure, bool):
            raise ValueError(f"secure must be True or False, got {secure!r}.")
        if ref_id is not None:
            raise ValueError("ref_id cannot be chosen: fedstream makes every RID unguessable; use the one returned.")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 0):
            raise ValueError(f"chunk_size must be None, 0 or a positive number of bytes, got {chunk_size!r}.")
        tx = _directory.transaction(transaction_id)
        if tx is None:
            raise ValueError(f"Unknown transaction {transaction_id!r}: it does not exist or has ended.")
        if not isinstance(file_name, (str, os.PathLike)):
            raise ValueError(f"file_name must be a path, got {type(file_name).__name__}.")
        file_name = os.fspath(file_name)
        if not os.path.isfile(file_name):
            raise ValueError(f"File {file_name!r} does not exist or is not a regular file.")
        if file_downloaded_cb is not None and not callable(file_downloaded_cb):
            raise ValueError("file_downloaded_cb must be callable or None.")
        return tx.owner.add_file(tx, file_name, file_downloaded_cb, cb_kwargs, secure=secure)

    @classmethod
    def add_object(cls, transaction_id: str, obj: Any, file_downloaded_cb: Optional[Callable] = None,
                   serializer: Optional[str] = None, *, secure: bool = False, **cb_kwargs: Any) -> str:
        """Serialize `obj` once into a spool file owned by the transaction, share it, and return its RID.

        `serializer`: None (the safe container: plain values and numpy arrays, loaded without
        running code) or "cloudpickle" (recipients must pass allow_pickle=True). The spool file
        is removed when the transaction ends. `file_downloaded_cb` is called as for add_file.
        Raises ValueError for an unknown transaction, a bad argument, or a value the serializer
        cannot carry (naming its key path). `secure=True`: secure downloads only, as for add_file.
        """
        serializer = spool.check_serializer(serializer)
        if not isinstance(secure, bool):
            raise ValueError(f"secure must be True or False, got {secure!r}.")
        if file_downloaded_cb is not None and not callable(file_downloaded_cb):
            raise ValueError("file_downloaded_cb must be callable or None.")
        tx = _directory.transaction(transaction_id)
        if tx is None:
            raise ValueError(f"Unknown transaction {transaction_id!r}: it does not exist or has ended.")
        path = spool.spool_object(obj, serializer)
        try:
            ref_id = tx.owner.add_file(tx, path, file_downloaded_cb, cb_kwargs, spool=True, secure=secure)
        except BaseException:
            remove_quietly(path)
            raise
        log.debug("object shared as %s (%s, spool file %s)", ref_id, serializer, path)
        return ref_id

    @classmethod
    def delete_transaction(cls, tx_id: str, call_cb: bool = False) -> None:
        """End a transaction now (its RIDs stop working); call its timeout_cb if `call_cb`.

        Ending an unknown or already ended transaction does nothing.
        """
        tx = _directory.transaction(tx_id)
        if tx is not None:
            tx.owner.end(tx, call_cb)

    @classmethod
    def shutdown(cls) -> None:
        """End every transaction of this process, calling their timeout_cb."""
        for owner in _directory.owners():
            owner.end_all()
