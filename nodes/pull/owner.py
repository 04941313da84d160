"""Owner side of pull: FileDownloader transactions and the handlers that serve their files.

The owner keeps no cursor per recipient: every chunk request names its offset, so retries are
idempotent and a recipient can resume. Per (file, recipient) it only remembers whether the
recipient started and whether its outcome was reported, so each callback fires once.
"""

import logging
import math
import os
import stat
import threading
import time
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from fedstream.common import digest as digests
from fedstream.common.constants import MAX_CHUNK_SIZE
from fedstream.common.rc import DownloadStatus
from fedstream.nodes.pull import wire
from fedstream.nodes.cell import Cell
from fedstream.nodes.message import Message, Reply

log = logging.getLogger(__name__)

_MONITOR_INTERVAL = 0.2  # seconds between checks for inactive transactions
_DIGEST_CACHE_SIZE = 256

_STARTED = "started"  # recipient state before its outcome (a DownloadStatus) is known

# (device, inode, size, mtime_ns) -> digest, so a file shared again is not hashed again
_digest_cache: "OrderedDict[tuple, str]" = OrderedDict()
_digest_cache_lock = threading.Lock()


class _Closed(Exception):
    """The file's transaction ended while a request was being served."""


def _call_user_cb(what: str, cb: Callable, *args: Any, **kwargs: Any) -> None:
    try:
        cb(*args, **kwargs)
    except Exception:
        log.exception("%s raised an exception (ignored)", what)


class _SharedFile:
    """A file added to a transaction: an open descriptor, its identity, digest and recipients."""

    def __init__(self, tx: "_Transaction", file_name: str, cb: Optional[Callable], cb_kwargs: dict) -> None:
        self.tx = tx
        self.ref_id = wire.new_id()
        self.file_name = file_name
        self.name = os.path.basename(os.path.abspath(file_name))
        self.cb = cb
        self.cb_kwargs = cb_kwargs
        try:
            fd = os.open(file_name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ValueError(f"File {file_name!r} cannot be read: {exc.strerror}.") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ValueError(f"{file_name!r} is not a regular file.")
        self._fd = fd
        self.size = st.st_size
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._lock = threading.Lock()
        self._readers = 0
        self._closed = False
        self.recipients: dict[str, str] = {}
        self.digest: Optional[str] = None
        self.digest_error: Optional[tuple[str, str]] = None  # (error code, sentence)
        self.digest_ready = threading.Event()

    # -- reading -----------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[int]:
        """The file descriptor, guaranteed to stay open until the block ends."""
        with self._lock:
            if self._closed:
                raise _Closed()
            self._readers += 1
        try:
            yield self._fd
        finally:
            with self._lock:
                self._readers -= 1
                if self._closed and self._readers == 0 and self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1

    def close(self) -> None:
        """Stop serving; the descriptor is closed as soon as no reader uses it."""
        with self._lock:
            self._closed = True
            if self._readers == 0 and self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def changed(self, fd: int) -> bool:
        """Tell whether the file was modified since it was added."""
        st = os.fstat(fd)
        return (st.st_size, st.st_mtime_ns) != self._identity[2:]

    # -- digest ------------------------------------------------------------------------
    def start_digest(self) -> None:
        """Use the cached digest, or compute it in a background thread."""
        with _digest_cache_lock:
            cached = _digest_cache.get(self._identity)
        if cached is not None:
            self.digest = cached
            self.digest_ready.set()
            return
        threading.Thread(target=self._compute_digest, name=f"fedstream-digest-{self.ref_id[:8]}",
                         daemon=True).start()

    def _compute_digest(self) -> None:
        hasher = digests.new_hasher()
        try:
            with self.reading() as fd:
                digests.hash_range(fd, hasher, 0, self.size, should_stop=lambda: self._closed)
                if self._closed:
                    return
                if self.changed(fd):
                    self.digest_error = (wire.ERR_CHANGED, f"the file {self.name!r} changed on the owner")
                    return
            self.digest = hasher.hexdigest()
            with _digest_cache_lock:
                _digest_cache[self._identity] = self.digest
                while len(_digest_cache) > _DIGEST_CACHE_SIZE:
                    _digest_cache.popitem(last=False)
        except _Closed:
            return
        except OSError as exc:
            self.digest_error = (wire.ERR_IO, f"the owner cannot read {self.name!r}: {exc.strerror}")
            log.error("digest of %s failed: %s", self.file_name, exc)
        finally:
            self.digest_ready.set()

    # -- recipients --------------------------------------------------------------------
    def mark_started(self, site: str) -> None:
        with self._lock:
            self.recipients.setdefault(site, _STARTED)

    def finish(self, site: str, status: DownloadStatus) -> bool:
        """Record `site`'s outcome; True only the first time (the callback must then fire)."""
        with self._lock:
            if isinstance(self.recipients.get(site), DownloadStatus):
                return False
            self.recipients[site] = status
            return True

    def outcome(self, site: str) -> "DownloadStatus | None":
        """The outcome recorded for `site` (what its callback reported), if any."""
        with self._lock:
            state = self.recipients.get(site)
            return state if isinstance(state, DownloadStatus) else None

    def take_unfinished(self) -> list[str]:
        """Recipients that started but never finished; they are marked finished."""
        with self._lock:
            sites = [site for site, state in self.recipients.items() if state == _STARTED]
            for site in sites:
                self.recipients[site] = DownloadStatus.FAILED
            return sites

    def report(self, site: str, status: DownloadStatus) -> None:
        """Call file_downloaded_cb for `site` (the caller made sure it is the first time)."""
        log.info("download of %s by '%s': %s", self.file_name, site, status.value)
        if self.cb is not None:
            _call_user_cb("file_downloaded_cb", self.cb, self.ref_id, site, status, self.file_name,
                          **self.cb_kwargs)


class _Transaction:
    def __init__(self, cell: Cell, timeout: float, timeout_cb: Optional[Callable], cb_kwargs: dict) -> None:
        self.tx_id = wire.new_id()
        self.cell = cell
        self.timeout = timeout
        self.timeout_cb = timeout_cb
        self.cb_kwargs = cb_kwargs
        self.files: list[_SharedFile] = []
        self.last_activity = time.monotonic()
        self.ended = False
        self.end_hooks: list[Callable[[], None]] = []  # run once when the transaction ends

    def touch(self) -> None:
        self.last_activity = time.monotonic()


def _error(code: str, message: str) -> Reply:
    return Reply(None, wire.error_headers(code, message))


class FileDownloader:
    """Share files with any number of recipients, who pull them at their own pace."""

    _lock = threading.Lock()
    _transactions: dict[str, _Transaction] = {}
    _files: dict[str, _SharedFile] = {}
    _monitor: Optional[threading.Thread] = None
    _cells: "weakref.WeakSet[Cell]" = weakref.WeakSet()
    # add_object(tx_id, obj, file_downloaded_cb=None, serializer=None, **cb_kwargs) -> ref_id,
    # attached by nodes/pull/objects.py (which builds on this class)
    add_object: Callable[..., str]

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
        cls._attach(cell)
        tx = _Transaction(cell, float(timeout), timeout_cb, cb_kwargs)
        with cls._lock:
            cls._transactions[tx.tx_id] = tx
            if cls._monitor is None:
                cls._monitor = threading.Thread(target=cls._monitor_loop, name="fedstream-pull-monitor",
                                                daemon=True)
                cls._monitor.start()
        log.debug("transaction %s created on '%s' (timeout %g s)", tx.tx_id, cell.fqcn, timeout)
        return tx.tx_id

    @classmethod
    def add_file(cls, transaction_id: str, file_name: str, file_downloaded_cb: Optional[Callable] = None,
                 **cb_kwargs: Any) -> str:
        """Share `file_name` in the transaction and return its reference id (RID).

        `file_downloaded_cb(ref_id, to_site, status, file_name, **cb_kwargs)` is called once per
        recipient, with DownloadStatus.SUCCESS or FAILED.
        """
        with cls._lock:
            tx = cls._transactions.get(transaction_id) if isinstance(transaction_id, str) else None
        if tx is None:
            raise ValueError(f"Unknown transaction {transaction_id!r}: it does not exist or has ended.")
        if not isinstance(file_name, (str, os.PathLike)):
            raise ValueError(f"file_name must be a path, got {type(file_name).__name__}.")
        file_name = os.fspath(file_name)
        if not os.path.isfile(file_name):
            raise ValueError(f"File {file_name!r} does not exist or is not a regular file.")
        if file_downloaded_cb is not None and not callable(file_downloaded_cb):
            raise ValueError("file_downloaded_cb must be callable or None.")
        shared = _SharedFile(tx, file_name, file_downloaded_cb, cb_kwargs)
        with cls._lock:
            if tx.ended:
                shared.close()
                raise ValueError(f"Unknown transaction {transaction_id!r}: it does not exist or has ended.")
            tx.files.append(shared)
            cls._files[shared.ref_id] = shared
            tx.touch()
        shared.start_digest()
        log.debug("shared %s as %s (%d bytes)", file_name, shared.ref_id, shared.size)
        return shared.ref_id

    @classmethod
    def add_end_hook(cls, transaction_id: str, hook: Callable[[], None]) -> None:
        """Call `hook()` once when the transaction ends (timeout, deletion, shutdown or cell stop)."""
        with cls._lock:
            tx = cls._transactions.get(transaction_id) if isinstance(transaction_id, str) else None
            if tx is None:
                raise ValueError(f"Unknown transaction {transaction_id!r}: it does not exist or has ended.")
            tx.end_hooks.append(hook)

    @classmethod
    def delete_transaction(cls, tx_id: str, call_cb: bool = False) -> None:
        """End a transaction now (its RIDs stop working); call its timeout_cb if `call_cb`.

        Ending an unknown or already ended transaction does nothing.
        """
        with cls._lock:
            tx = cls._transactions.get(tx_id) if isinstance(tx_id, str) else None
        if tx is not None:
            cls._end(tx, call_cb)

    @classmethod
    def shutdown(cls) -> None:
        """End every transaction of this process, calling their timeout_cb."""
        with cls._lock:
            pending = list(cls._transactions.values())
        for tx in pending:
            cls._end(tx, True)

    # -- life cycle ------------------------------------------------------------------------
    @classmethod
    def _end(cls, tx: _Transaction, call_cb: bool) -> None:
        with cls._lock:
            if tx.ended:
                return
            tx.ended = True
            cls._transactions.pop(tx.tx_id, None)
            for shared in tx.files:
                cls._files.pop(shared.ref_id, None)
            files = list(tx.files)
        log.debug("transaction %s ended", tx.tx_id)
        for shared in files:
            shared.close()
        for shared in files:
            for site in shared.take_unfinished():
                shared.report(site, DownloadStatus.FAILED)
        for hook in tx.end_hooks:
            _call_user_cb("transaction end hook", hook)
        if call_cb and tx.timeout_cb is not None:
            _call_user_cb("timeout_cb", tx.timeout_cb, tx.tx_id, [f.file_name for f in files], **tx.cb_kwargs)

    @classmethod
    def _monitor_loop(cls) -> None:
        while True:
            time.sleep(_MONITOR_INTERVAL)
            now = time.monotonic()
            with cls._lock:
                if not cls._transactions:
                    cls._monitor = None
                    return
                expired = [tx for tx in cls._transactions.values() if now - tx.last_activity >= tx.timeout]
            for tx in expired:
                log.info("transaction %s timed out after %g s without download activity", tx.tx_id, tx.timeout)
                cls._end(tx, True)

    @classmethod
    def _end_cell(cls, cell: Cell) -> None:
        with cls._lock:
            pending = [tx for tx in cls._transactions.values() if tx.cell is cell]
        for tx in pending:
            cls._end(tx, True)

    @classmethod
    def _attach(cls, cell: Cell) -> None:
        """Serve pull requests on `cell` (once per cell)."""
        with cls._lock:
            if cell in cls._cells:
                return
            cls._cells.add(cell)
        cell.register_request_cb(wire.CHANNEL, wire.TOPIC_OPEN, lambda m: cls._serve_open(cell, m), inline=True)
        cell.register_request_cb(wire.CHANNEL, wire.TOPIC_CHUNK, lambda m: cls._serve_chunk(cell, m), inline=True)
        cell.register_request_cb(wire.CHANNEL, wire.TOPIC_DONE, lambda m: cls._serve_done(cell, m), inline=True)
        cell.add_stop_hook(lambda: cls._end_cell(cell))

    # -- request handlers --------------------------------------------------------------------
    @classmethod
    def _lookup(cls, cell: Cell, headers: dict) -> "_SharedFile | Reply":
        ref = headers.get("ref")
        shared = cls._files.get(ref) if isinstance(ref, str) else None
        if shared is None or shared.tx.cell is not cell or shared.tx.ended:
            return _error(wire.ERR_UNKNOWN_REF, f"{wire.UNKNOWN_REF_MESSAGE} {str(ref)[:64]!r}")
        shared.tx.touch()
        return shared

    @classmethod
    def _serve_open(cls, cell: Cell, msg: Message) -> Reply:
        shared = cls._lookup(cell, msg.headers)
        if isinstance(shared, Reply):
            return shared
        shared.mark_started(msg.source)
        return Reply(None, {"name": shared.name, "size": shared.size, "alg": digests.ALGORITHM})

    @classmethod
    def _serve_chunk(cls, cell: Cell, msg: Message) -> "bytes | Reply":
        shared = cls._lookup(cell, msg.headers)
        if isinstance(shared, Reply):
            return shared
        offset, length = msg.headers.get("off"), msg.headers.get("len")
        if type(offset) is not int or type(length) is not int or offset < 0 or not 0 < length <= MAX_CHUNK_SIZE:
            return _error(wire.ERR_BAD_REQUEST, f"bad chunk request: offset {offset!r}, length {length!r}")
        try:
            with shared.reading() as fd:
                if shared.changed(fd):
                    return _error(wire.ERR_CHANGED, f"the file {shared.name!r} changed on the owner")
                if offset >= shared.size:
                    return b""
                return os.pread(fd, min(length, shared.size - offset), offset)
        except _Closed:
            return _error(wire.ERR_UNKNOWN_REF, f"{wire.UNKNOWN_REF_MESSAGE} {shared.ref_id!r}")
        except OSError as exc:
            log.error("cannot read %s: %s", shared.file_name, exc)
            return _error(wire.ERR_IO, f"the owner cannot read {shared.name!r}: {exc.strerror}")

    @classmethod
    def _serve_done(cls, cell: Cell, msg: Message) -> Reply:
        """Runs on the I/O thread: the verdict is posted before the callback can run (and, say, stop the cell)."""
        shared = cls._lookup(cell, msg.headers)
        if isinstance(shared, Reply):
            return shared
        site = msg.source
        if msg.headers.get("gave_up"):
            if shared.finish(site, DownloadStatus.FAILED):
                _report_later(shared, site, DownloadStatus.FAILED)
            return Reply(None, {"ok": False})
        if not shared.digest_ready.is_set():
            return _error(wire.ERR_PENDING, "the owner is still computing the file digest")
        if shared.digest is None:
            return _error(*(shared.digest_error or (wire.ERR_IO, "the owner has no digest")))
        ok = msg.headers.get("alg") == digests.ALGORITHM and msg.headers.get("digest") == shared.digest
        if ok:
            shared.mark_started(site)
            if shared.finish(site, DownloadStatus.SUCCESS):
                _report_later(shared, site, DownloadStatus.SUCCESS)
            # The owner already reported this recipient as failed: it must not keep the file either.
            ok = shared.outcome(site) == DownloadStatus.SUCCESS
        return Reply(None, {"ok": ok, "digest": shared.digest, "alg": digests.ALGORITHM})


def _report_later(shared: _SharedFile, site: str, status: DownloadStatus) -> None:
    """Call file_downloaded_cb in its own thread: user code never runs on a Cell's I/O thread."""
    threading.Thread(target=shared.report, args=(site, status), name="fedstream-pull-cb", daemon=True).start()
