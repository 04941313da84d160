"""Recipient side of pull: download_file, a thin driver of the protocol state in window.py.

1. Ask the owner to `open` the RID (name, size, digest algorithm) and, when nothing of it is
   here yet, for its first chunk with the answer. Nothing is created on disk before the owner
   answered, so an absent owner or a bad RID leaves no trace.
2. Open and lock `<location>/.fedstream-<RID>.part`. Data is written in offset order and hashed
   as it arrives, so the .part file is always a prefix of the source: a later call with the same
   RID and location hashes that prefix and continues after it (resume).
3. Pull the rest with a window of `chunk` requests in flight (`PullWindow` decides what to send,
   resend and write; this module only moves requests and replies and writes the file).
4. Send the digest with `done`; the file gets its final name only after the owner confirmed it.
   A file that came whole with `open`, with the owner's digest, is checked against that digest
   here, gets its final name, and `done` goes one-way (a small file costs one round trip).
   A failure removes the .part when it is empty or worthless and keeps it otherwise, for resume.

Every reply is taken only from the owner the download targets (the broker-stamped source).
A secure download (secure=True, needs a kit) sends this cell's certificate and a fresh salt
with `open`, checks the owner's certificate in the answer (it must name the owner) and derives
the pairwise key (common/e2e.py); the name and size come sealed, every chunk is opened (and
authenticated) before it is written, and the digest and verdict of `done` travel sealed.
"""

import fcntl
import json
import logging
import math
import os
import queue
import shutil
import stat
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Callable, Optional

from fedstream.common import digest as digests
from fedstream.common import e2e
from fedstream.common.constants import DEFAULT_CHUNK_SIZE
from fedstream.common.errors import BrokerUnreachableError, CellError, RemoteError, UnreachableError
from fedstream.common.filenames import check_dest_dir, commit_file, part_path, remove_quietly, remove_stale_parts
from fedstream.common.fqcn import validate_fqcn
from fedstream.common.kits import Kit
from fedstream.common.signal import Signal
from fedstream.nodes.cell import Cell, PendingRequest
from fedstream.nodes.message import Message, reply_error
from fedstream.nodes.pull import wire
from fedstream.nodes.pull.window import (
    Call,
    Event,
    Failure,
    Foreign,
    Liveness,
    Policy,
    PullWindow,
    Rejected,
    Replied,
    RetryLater,
    Undeliverable,
    WindowGrowth,
    error_outcome,
)

log = logging.getLogger(__name__)

_TICK = 0.1  # longest wait for replies between checks of the abort signal
_PROBE = -1  # request key of presence probes (chunk offsets are >= 0, single calls use 0)

ProgressCallback = Callable[[int, int], None]


class _Failed(Exception):
    """The download cannot go on; `remove_part` tells whether its .part file is worthless."""

    def __init__(self, message: str, remove_part: bool = False) -> None:
        super().__init__(message)
        self.remove_part = remove_part

    @classmethod
    def of(cls, failure: Failure) -> "_Failed":
        return cls(failure.message, failure.remove_part)


class _Aborted(Exception):
    pass


def _open_locked(path: str) -> int:
    """Open (or create) the .part file and lock it against a concurrent download of the same RID."""
    for _ in range(5):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _Failed(f"another download of this reference into {os.path.dirname(path)} is in progress") from None
        held = os.fstat(fd)
        try:
            current = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            current = None
        if current is not None and current.st_ino == held.st_ino and current.st_dev == held.st_dev:
            if not stat.S_ISREG(held.st_mode):
                os.close(fd)
                raise _Failed(f"{path} is not a regular file")
            return fd
        os.close(fd)  # the previous holder committed or removed it meanwhile: open the new one
    raise _Failed(f"cannot lock {path}")


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    while data:
        count = os.pwrite(fd, data, offset)
        data, offset = data[count:], offset + count


class _Opened:
    """A secure chunk reply, opened: its plaintext stands in for the message's buffer."""

    def __init__(self, data: bytes) -> None:
        self.buffer = memoryview(data)


# what one finished request turns into: (key, event, the answer's message, a fatal error reply)
_Outcome = tuple[int, Event, "Optional[Message | _Opened]", Optional[Failure]]


class _Download:
    def __init__(self, owner: str, ref_id: str, timeout: float, cell: Cell, location: str, optional: bool,
                 abort_signal: Optional[Signal], chunk_size: int, window: int,
                 progress_cb: Optional[ProgressCallback], keep_partial: bool, kit: Optional[Kit] = None) -> None:
        self.owner = owner
        self.kit = kit  # set for a secure download
        self.salt = e2e.new_salt() if kit is not None else b""
        self.open_headers: dict = {"ref": ref_id}
        if kit is not None:
            self.open_headers["e2e"] = e2e.offer(kit, self.salt)
        self.pairwise: Optional[bytes] = None  # the secure download's key, once the owner answered
        self.sealer: Optional[e2e.PullSealer] = None
        self.opening = False  # chunk replies are being taken (and opened, if secure)
        self.ref_id = ref_id
        self.timeout = timeout
        self.cell = cell
        self.location = location
        self.optional = optional
        self.abort_signal = abort_signal
        self.chunk_size = chunk_size
        self.window = window  # requests in flight at first; the window grows within the cell's share
        self.share = 0  # reply bytes in flight this download reserved from the cell's MAX_IN_FLIGHT_BYTES
        self.progress_cb = progress_cb
        self.keep_partial = keep_partial
        self.liveness = Liveness(Policy(timeout), time.monotonic())
        self._finished: "queue.SimpleQueue[tuple[int, Future]]" = queue.SimpleQueue()
        self._pending: dict[int, list[PendingRequest]] = {}  # key -> requests sent and not resolved

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> tuple[Optional[str], Optional[str]]:
        path = part_path(self.location, self.ref_id)
        try:
            headers = dict(self.open_headers)
            if not os.path.exists(path):  # nothing to resume: the first chunk comes with the answer
                headers["first"] = self.chunk_size
            answer = self._call(wire.TOPIC_OPEN, headers)
            info = self._agree(answer.headers) if self.kit is not None else answer.headers
            first = self._first_bytes(answer)
            fd = _open_locked(path)
        except _Aborted:
            self._report_give_up()
            return self._failure("the download was aborted")
        except _Failed as exc:
            if exc.remove_part:
                remove_quietly(path)  # e.g. the RID is unknown: what an earlier attempt left is worthless
            return self._failure(str(exc))
        except OSError as exc:
            return self._failure(f"cannot create {path}: {exc.strerror}")
        finally:
            self._forget_all()
        try:
            return None, self._transfer(fd, path, info, first)
        except _Aborted:
            remove_quietly(path)
            self._report_give_up()
            return self._failure("the download was aborted")
        except _Failed as exc:
            if exc.remove_part or not self.keep_partial or _is_empty(fd):
                remove_quietly(path)
            return self._failure(str(exc))
        except OSError as exc:
            if not self.keep_partial or _is_empty(fd):
                remove_quietly(path)
            return self._failure(f"cannot write {path}: {exc.strerror or exc}")
        finally:
            self._forget_all()
            os.close(fd)

    def _agree(self, answer: dict) -> dict:
        """Check the owner's certificate, derive the pairwise key, and open the sealed name and size."""
        assert self.kit is not None
        try:
            peer, owner_salt = e2e.accept_offer(answer.get("e2e"), self.kit, self.owner)
            self.pairwise = e2e.pairwise_key(self.kit, peer, (owner_salt, self.salt), self.owner, self.cell.fqcn)
            meta = json.loads(e2e.open_note(self.pairwise, wire.NOTE_META, answer.get("meta")))
        except e2e.E2EError as exc:
            raise _Failed(f"the owner's answer does not verify: {str(exc).rstrip('.')}") from None
        except ValueError:
            raise _Failed("the owner sent a malformed answer") from None
        if not isinstance(meta, dict):
            raise _Failed("the owner sent a malformed answer")
        self.sealer = e2e.PullSealer(self.pairwise)
        return meta

    def _first_bytes(self, answer: Message) -> memoryview:
        """The first bytes of the file that came with the owner's `open` answer (opened, if secure)."""
        data = answer.buffer
        if self.sealer is not None and len(data):
            try:
                data = memoryview(self.sealer.open(0, data))
            except e2e.E2EError as exc:
                raise _Failed(f"{str(exc).rstrip('.')}: it was altered on the way") from None
        if len(data) > self.chunk_size:
            raise _Failed("the owner sent a malformed answer")
        return data

    def _headers(self, **headers: object) -> dict:
        """Request headers, naming the secure session if there is one."""
        if self.kit is not None:
            headers["e2e"] = e2e.encode_b64(self.salt)
        return {"ref": self.ref_id, **headers}

    def _failure(self, message: str) -> tuple[str, None]:
        error = f"Download of {self.ref_id} from '{self.owner}' failed: {message}."
        log.log(logging.DEBUG if self.optional else logging.WARNING, "%s", error)
        return error, None

    def _transfer(self, fd: int, path: str, info: dict, first: memoryview) -> str:
        name, size, alg = info.get("name"), info.get("size"), info.get("alg")
        if not isinstance(name, str) or type(size) is not int or size < 0 or len(first) > size:
            raise _Failed("the owner sent a malformed answer")
        if alg != digests.ALGORITHM:
            raise _Failed(f"the owner verifies with {alg!r}, this node with {digests.ALGORITHM!r}")
        hasher = digests.new_hasher()
        have = os.fstat(fd).st_size
        if have > size:
            os.ftruncate(fd, 0)
            have = 0
        elif have:
            log.info("resuming %s from '%s' at byte %d of %d", self.ref_id, self.owner, have, size)
            digests.hash_range(fd, hasher, 0, have, should_stop=self._aborted)
            self._check_abort()
        free = shutil.disk_usage(self.location).free
        if free < size - have:
            raise _Failed(f"{self.location} has {free} bytes free, the file needs {size - have} more")
        if not have and len(first):
            _write_at(fd, first, 0)
            hasher.update(first)
            have = len(first)
        self._progress(have, size)
        self._pull(fd, hasher, have, size)
        digest = hasher.hexdigest()
        confirmed_by_open = self.pairwise is None and info.get("digest") == digest  # the whole file came with it
        if not confirmed_by_open:
            verdict = self._verdict(digest)
            if verdict.get("digest") != digest:
                raise _Failed("the received data does not match the owner's digest", remove_part=True)
            if verdict.get("ok") is not True:
                raise _Failed("the owner already recorded this download as failed", remove_part=True)
        final = commit_file(path, self.location, name)
        if confirmed_by_open:
            self._confirm(digest)
        log.info("downloaded %s from '%s' to %s (%d bytes)", self.ref_id, self.owner, final, size)
        return final

    def _verdict(self, digest: str) -> dict:
        """Send the digest with `done` and return the owner's verdict (both sealed for a secure download)."""
        if self.pairwise is None:
            return self._call(wire.TOPIC_DONE, {"ref": self.ref_id, "digest": digest,
                                                "alg": digests.ALGORITHM}).headers
        sealed = e2e.seal_note(self.pairwise, wire.NOTE_DIGEST, digest.encode())
        answer = self._call(wire.TOPIC_DONE, self._headers(alg=digests.ALGORITHM, sealed=sealed)).headers
        try:
            verdict = json.loads(e2e.open_note(self.pairwise, wire.NOTE_VERDICT, answer.get("sealed")))
        except e2e.E2EError as exc:
            raise _Failed(f"the owner's verdict does not authenticate ({str(exc).rstrip('.')})") from None
        except ValueError:
            raise _Failed("the owner sent a malformed verdict") from None
        return verdict if isinstance(verdict, dict) else {}

    def _confirm(self, digest: str) -> None:
        """Tell the owner (one-way) that the file it sent whole with `open` is verified and kept here."""
        try:
            self.cell.fire_and_forget(wire.CHANNEL, wire.TOPIC_DONE, self.owner, None,
                                      headers={"ref": self.ref_id, "digest": digest, "alg": digests.ALGORITHM})
        except CellError as exc:
            log.warning("download of %s: cannot confirm it to '%s': %s", self.ref_id, self.owner, exc)

    # -- data --------------------------------------------------------------------------------
    def _pull(self, fd: int, hasher: digests.Hasher, start: int, size: int) -> None:
        if start >= size:  # the whole file came with the answer to `open`
            self._check_abort()
            return
        window = PullWindow(size, start, self.chunk_size, self.window, self.liveness)
        growth = WindowGrowth(self.window, wire.MAX_IN_FLIGHT_BYTES // self.chunk_size, self.chunk_size, start,
                              time.monotonic())
        held: "dict[int, Message | _Opened]" = {}  # answers waiting for an earlier offset
        self.opening = True
        try:
            self._pull_with(window, growth, held, fd, hasher, size)
        finally:
            self.opening = False
        self._check_abort()

    def _pull_with(self, window: PullWindow, growth: WindowGrowth, held: "dict[int, Message | _Opened]", fd: int,
                   hasher: digests.Hasher, size: int) -> None:
        while not window.complete:
            if window.failure is not None:
                raise _Failed.of(window.failure)
            now = time.monotonic()
            for request in window.due(now):
                self._send(request.offset, wire.TOPIC_CHUNK, self._headers(off=request.offset, len=request.length))
            if window.probe_due(now):
                self._probe()
            ready: list[int] = []
            for key, event, message, fatal in self._outcomes(window.deadline()):
                if not window.wants(key):
                    continue
                if fatal is not None:
                    raise _Failed.of(fatal)
                if message is not None:
                    held[key] = message
                ready += window.handle(event, time.monotonic())
                if isinstance(event, Replied):
                    self._forget(key)
            if not ready:
                continue
            wanted = growth.wanted(window.written, time.monotonic())
            if wanted > window.window:
                extra = _in_flight.grow(self.cell, (wanted - window.window) * self.chunk_size)
                self.share += extra
                window.window += extra // self.chunk_size
                growth.granted(window.window)
            # Refill the window before writing: the owner reads and the broker forwards meanwhile.
            for request in window.due(time.monotonic()):
                self._send(request.offset, wire.TOPIC_CHUNK, self._headers(off=request.offset, len=request.length))
            for offset in ready:
                data = held.pop(offset).buffer
                _write_at(fd, data, offset)
                hasher.update(data)
                self._progress(offset + len(data), size)

    def _progress(self, received: int, total: int) -> None:
        if self.progress_cb is not None:
            try:
                self.progress_cb(received, total)
            except Exception:
                log.exception("progress_cb raised an exception (ignored)")

    # -- requests ----------------------------------------------------------------------------
    def _call(self, topic: str, headers: dict) -> Message:
        """One request (key 0) resent by the rules of `Call`; returns the owner's answer."""
        call = Call(self.liveness, time.monotonic())
        while True:
            if call.failure is not None:
                raise _Failed.of(call.failure)
            now = time.monotonic()
            if call.due(now):
                self._send(0, topic, headers)
            if call.probe_due(now):
                self._probe()
            for key, event, message, fatal in self._outcomes(call.deadline()):
                if key != 0:
                    continue
                if fatal is not None:
                    raise _Failed.of(fatal)
                if call.handle(event, time.monotonic()):
                    self._forget(0)
                    assert message is not None
                    return message

    def _send(self, key: int, topic: str, headers: dict) -> None:
        try:
            pending = self.cell.request_async(wire.CHANNEL, topic, self.owner, headers=headers)
        except CellError as exc:
            raise _Failed(str(exc).rstrip(".")) from None
        self._pending.setdefault(key, []).append(pending)
        # The callback must not refer to `pending`: a cycle through the future would keep every
        # reply's bytes alive until the garbage collector happens to run.
        pending.future.add_done_callback(lambda future: self._finished.put((key, future)))

    def _probe(self) -> None:
        """Ask the owner something cheap to learn whether the broker still reaches it."""
        self._forget(_PROBE)
        self._send(_PROBE, wire.TOPIC_OPEN, self.open_headers)  # a secure one names the same session

    def _outcomes(self, deadline: Optional[float]) -> list[_Outcome]:
        """Wait (at most until `deadline`, and a tick) for finished requests; return what they mean."""
        self._check_abort()
        wait = _TICK if deadline is None else min(_TICK, max(0.0, deadline - time.monotonic()))
        try:
            finished = [self._finished.get(timeout=wait)]
        except queue.Empty:
            return []
        while True:
            try:
                finished.append(self._finished.get_nowait())
            except queue.Empty:
                break
        outcomes = []
        for key, future in finished:
            pending = next((p for p in self._pending.get(key, ()) if p.future is future), None)
            if pending is None:
                continue  # its key was answered already, or it belongs to an earlier phase
            self._pending[key].remove(pending)
            outcome = self._outcome(key, pending)
            event = outcome[1]
            if isinstance(event, Undeliverable) and self.liveness.deadline() is None:
                log.info("'%s' is not reachable (%s); waiting up to %g s for it", self.owner,
                         event.reason.rstrip("."), self.liveness.policy.grace if self.liveness.reached
                         else self.liveness.policy.first_contact)
            if key == _PROBE:
                self.liveness.handle_probe(event, time.monotonic())
            else:
                outcomes.append(outcome)
        return outcomes

    def _outcome(self, key: int, pending: PendingRequest) -> _Outcome:
        error = pending.future.exception()
        if isinstance(error, (UnreachableError, BrokerUnreachableError)):
            return key, Undeliverable(key, str(error)), None, None
        if isinstance(error, RemoteError):
            return key, Rejected(key, str(error)), None, None
        if error is not None:
            raise _Failed(str(error).rstrip("."))  # the cell stopped
        message: Message = pending.future.result()
        if message.source != self.owner:
            log.warning("ignored a reply from '%s' to a request sent to '%s'", message.source, self.owner)
            return key, Foreign(key), None, None
        failed = reply_error(message.headers)
        if failed is None:
            if self.sealer is not None and self.opening and key >= 0:
                return self._open_chunk(key, message)
            return key, Replied(key, len(message.buffer)), message, None
        fatal = error_outcome(*failed)
        return key, RetryLater(key), None, fatal

    def _open_chunk(self, offset: int, message: Message) -> _Outcome:
        """A secure chunk reply, authenticated and decrypted; a fatal failure if it was altered."""
        assert self.sealer is not None
        try:
            data = self.sealer.open(offset, message.buffer)
        except e2e.E2EError as exc:
            log.warning("download of %s from '%s': %s", self.ref_id, self.owner, exc)
            return offset, RetryLater(offset), None, Failure(f"{str(exc).rstrip('.')}: it was altered on the way")
        return offset, Replied(offset, len(data)), _Opened(data), None

    def _forget(self, key: int) -> None:
        for pending in self._pending.pop(key, []):
            pending.cancel()

    def _forget_all(self) -> None:
        for key in list(self._pending):
            self._forget(key)

    # -- abort -------------------------------------------------------------------------------
    def _aborted(self) -> bool:
        return self.abort_signal is not None and self.abort_signal.triggered

    def _check_abort(self) -> None:
        if self._aborted():
            raise _Aborted()

    def _report_give_up(self) -> None:
        report_give_up(self.cell, self.owner, self.ref_id)


def _is_empty(fd: int) -> bool:
    try:
        return os.fstat(fd).st_size == 0
    except OSError:
        return False


def report_give_up(cell: Cell, owner: str, ref_id: str) -> None:
    """Tell the owner (best effort) that this cell will not download `ref_id`: it reports FAILED at once."""
    try:
        cell.fire_and_forget(wire.CHANNEL, wire.TOPIC_DONE, owner, None, headers={"ref": ref_id, "gave_up": True})
    except CellError:
        pass


def download_file(from_fqcn: str, ref_id: str, per_request_timeout: float, cell: Cell,
                  location: Optional[str] = None, secure: bool = False, optional: bool = False,
                  abort_signal: Optional[Signal] = None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                  window: int = wire.DEFAULT_WINDOW, progress_cb: Optional[ProgressCallback] = None,
                  keep_partial: bool = True) -> tuple[Optional[str], Optional[str]]:
    """Download the file `ref_id` from its owner `from_fqcn` into `location` (default: temp dir).

    Returns (None, full path) on success, (error message, None) on failure. A failed download keeps
    its partial data so that a later call with the same RID and location resumes it; an abort or
    an unknown RID removes it, and nothing is created before the owner answered. The owner may
    leave requests unanswered for `per_request_timeout` seconds (three times, then the download
    fails); an owner the broker reports as not connected fails it after 2 s, or after a 5 s grace
    if it answered before. `chunk_size` (at most 8 MiB) and `window` (requests in flight at
    first; it grows while throughput grows, as on a long link, to at most 12 MiB in flight
    across this cell's downloads) tune throughput; `progress_cb(received, total)` is called as data
    is written. `keep_partial=False` removes the partial data on any failure. `secure=True`
    encrypts end to end between the two certified cells (both need a kit; ValueError without
    one here): the broker can neither read nor alter the data, the name, the size or the verdict.
    """
    validate_fqcn(from_fqcn)
    if not wire.is_valid_ref(ref_id):
        raise ValueError(f"{ref_id!r} is not a valid reference id.")
    if isinstance(per_request_timeout, bool) or not isinstance(per_request_timeout, (int, float)) \
            or not math.isfinite(per_request_timeout) or per_request_timeout <= 0:
        raise ValueError(f"per_request_timeout must be a positive number of seconds, got {per_request_timeout!r}.")
    if not isinstance(cell, Cell):
        raise ValueError(f"download_file needs a Cell, got {type(cell).__name__}.")
    location = check_dest_dir(location, "location")
    remove_stale_parts(location)  # what a killed recipient left behind (locked ones are in use)
    if not isinstance(secure, bool):
        raise ValueError(f"secure must be True or False, got {secure!r}.")
    kit = e2e.require_kit(cell.kit) if secure else None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) \
            or not 0 < chunk_size <= wire.MAX_CHUNK_LENGTH:
        raise ValueError(f"chunk_size must be between 1 and {wire.MAX_CHUNK_LENGTH} bytes, got {chunk_size!r}.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of requests, got {window!r}.")
    if abort_signal is not None and not hasattr(abort_signal, "triggered"):
        raise ValueError("abort_signal must be a Signal or None.")
    if progress_cb is not None and not callable(progress_cb):
        raise ValueError("progress_cb must be callable or None.")
    share = _in_flight.reserve(cell, min(window * chunk_size, wire.MAX_IN_FLIGHT_BYTES), chunk_size)
    download = _Download(from_fqcn, ref_id, float(per_request_timeout), cell, location, optional, abort_signal,
                         chunk_size, max(1, share // chunk_size), progress_cb, keep_partial, kit)
    download.share = share
    try:
        return download.run()
    finally:
        _in_flight.release(cell, download.share)


class _InFlightShares:
    """How many reply bytes the downloads of each Cell may have in flight, together.

    Everything on its way to one cell waits in one broker queue, bounded at 16 MiB: several
    downloads at once share MAX_IN_FLIGHT_BYTES instead of each taking it (a later one gets
    what is left, at least one chunk), so the broker never has to drop their replies.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._used: "weakref.WeakKeyDictionary[Cell, int]" = weakref.WeakKeyDictionary()

    def reserve(self, cell: Cell, wanted: int, chunk_size: int) -> int:
        with self._lock:
            used = self._used.get(cell, 0)
            share = max(chunk_size, min(wanted, wire.MAX_IN_FLIGHT_BYTES - used))
            self._used[cell] = used + share
            return share

    def grow(self, cell: Cell, wanted: int) -> int:
        """Up to `wanted` more bytes for a download of `cell` (what is left of its MAX_IN_FLIGHT_BYTES)."""
        with self._lock:
            used = self._used.get(cell, 0)
            extra = max(0, min(wanted, wire.MAX_IN_FLIGHT_BYTES - used))
            self._used[cell] = used + extra
            return extra

    def release(self, cell: Cell, share: int) -> None:
        with self._lock:
            left = self._used.get(cell, 0) - share
            if left > 0:
                self._used[cell] = left
            else:
                self._used.pop(cell, None)


_in_flight = _InFlightShares()
