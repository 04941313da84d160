"""Recipient side of pull: download_file, with a window of requests in flight and resume.

Data goes to `<location>/.fedstream-<RID>.part`, written in offset order and hashed as it
arrives, so the .part file is always a prefix of the source: a later call with the same RID and
location hashes that prefix and continues after it. The file gets its final name only after the
owner confirmed the whole-file digest.
"""

import fcntl
import logging
import math
import os
import shutil
import stat
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable, Optional

from fedstream.common import digest as digests
from fedstream.common.constants import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE
from fedstream.common.errors import BrokerUnreachableError, CellError, RemoteError, UnreachableError
from fedstream.common.filenames import check_dest_dir, commit_file, remove_quietly
from fedstream.common.fqcn import validate_fqcn
from fedstream.common.signal import Signal
from fedstream.nodes.pull import wire
from fedstream.nodes.cell import Cell, PendingRequest
from fedstream.nodes.message import Message

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # sends of one request that got no reply at all before the download fails
_TICK = 0.1  # seconds between checks of the abort signal while waiting
_RETRY_DELAY = 0.2  # pause before resending a request the broker could not deliver
_PENDING_DELAY = 0.1  # pause before asking again for a digest the owner is still computing

ProgressCallback = Callable[[int, int], None]


class _Failed(Exception):
    """The download cannot go on; `remove_part` tells whether its .part file is worthless."""

    def __init__(self, message: str, remove_part: bool = False) -> None:
        super().__init__(message)
        self.remove_part = remove_part


class _Aborted(Exception):
    pass


class _Request:
    """One request in flight, resent as needed."""

    __slots__ = ("topic", "headers", "offset", "length", "pending", "sent_at", "attempts")

    def __init__(self, topic: str, headers: dict, offset: int = 0, length: int = 0) -> None:
        self.topic = topic
        self.headers = headers
        self.offset = offset
        self.length = length
        self.pending: Optional[PendingRequest] = None
        self.sent_at = 0.0
        self.attempts = 0


def part_path(location: str, ref_id: str) -> str:
    """Where the partial data of `ref_id` is kept inside `location`."""
    return os.path.join(location, f".fedstream-{ref_id}.part")


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


class _Download:
    def __init__(self, owner: str, ref_id: str, timeout: float, cell: Cell, location: str, optional: bool,
                 abort_signal: Optional[Signal], chunk_size: int, window: int,
                 progress_cb: Optional[ProgressCallback], keep_partial: bool) -> None:
        self.owner = owner
        self.ref_id = ref_id
        self.timeout = timeout
        self.cell = cell
        self.location = location
        self.optional = optional
        self.abort_signal = abort_signal
        self.chunk_size = chunk_size
        self.window = window
        self.progress_cb = progress_cb
        self.keep_partial = keep_partial
        self.last_progress = time.monotonic()
        self.outstanding: set[_Request] = set()

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> tuple[Optional[str], Optional[str]]:
        path = part_path(self.location, self.ref_id)
        try:
            fd = _open_locked(path)
        except _Failed as exc:
            return self._failure(str(exc))
        except OSError as exc:
            return self._failure(f"cannot create {path}: {exc.strerror}")
        try:
            return None, self._transfer(fd, path)
        except _Aborted:
            remove_quietly(path)
            self._report_give_up()
            return self._failure("the download was aborted")
        except _Failed as exc:
            if exc.remove_part or not self.keep_partial:
                remove_quietly(path)
            return self._failure(str(exc))
        except OSError as exc:
            if not self.keep_partial:
                remove_quietly(path)
            return self._failure(f"cannot write {path}: {exc.strerror or exc}")
        finally:
            for request in self.outstanding:
                if request.pending is not None:
                    request.pending.cancel()
            os.close(fd)

    def _failure(self, message: str) -> tuple[str, None]:
        error = f"Download of {self.ref_id} from '{self.owner}' failed: {message}."
        log.log(logging.DEBUG if self.optional else logging.WARNING, "%s", error)
        return error, None

    def _transfer(self, fd: int, path: str) -> str:
        info = self._call(wire.TOPIC_OPEN, {"ref": self.ref_id})
        name, size, alg = info.get("name"), info.get("size"), info.get("alg")
        if not isinstance(name, str) or type(size) is not int or size < 0:
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
        self._progress(have, size)
        self._pull(fd, hasher, have, size)
        digest = hasher.hexdigest()
        verdict = self._call(wire.TOPIC_DONE, {"ref": self.ref_id, "digest": digest, "alg": digests.ALGORITHM},
                             retry_pending=True)
        if verdict.get("digest") != digest:
            raise _Failed("the received data does not match the owner's digest", remove_part=True)
        if verdict.get("ok") is not True:
            raise _Failed("the owner already recorded this download as failed", remove_part=True)
        final = commit_file(path, self.location, name)
        log.info("downloaded %s from '%s' to %s (%d bytes)", self.ref_id, self.owner, final, size)
        return final

    # -- data --------------------------------------------------------------------------------
    def _pull(self, fd: int, hasher: digests.Hasher, start: int, size: int) -> None:
        in_flight: deque[_Request] = deque()
        next_offset = written = start
        while written < size:
            while len(in_flight) < self.window and next_offset < size:
                length = min(self.chunk_size, size - next_offset)
                request = _Request(wire.TOPIC_CHUNK, {"ref": self.ref_id, "off": next_offset, "len": length},
                                   next_offset, length)
                self._send(request)
                in_flight.append(request)
                next_offset += length
            head = in_flight[0]
            message = self._wait(head, in_flight)
            in_flight.popleft()
            self.outstanding.discard(head)
            if message.headers:
                self._raise_for(message.headers)
            data = message.buffer
            if len(data) != head.length:
                raise _Failed(f"the owner sent {len(data)} bytes at offset {head.offset} instead of "
                              f"{head.length}: the file changed on the owner", remove_part=True)
            view = data
            offset = head.offset
            while view:
                count = os.pwrite(fd, view, offset)
                view, offset = view[count:], offset + count
            hasher.update(data)
            written += head.length
            self._progress(written, size)
            self._check_abort()

    def _progress(self, received: int, total: int) -> None:
        if self.progress_cb is not None:
            try:
                self.progress_cb(received, total)
            except Exception:
                log.exception("progress_cb raised an exception (ignored)")

    # -- requests ----------------------------------------------------------------------------
    def _call(self, topic: str, headers: dict, retry_pending: bool = False) -> dict:
        """One request with retries; returns the reply headers."""
        request = _Request(topic, headers)
        while True:
            self._send(request)
            reply = self._wait(request, [request]).headers
            self.outstanding.discard(request)
            if retry_pending and reply.get("err") == wire.ERR_PENDING:
                request.attempts = 0
                self._sleep(_PENDING_DELAY)
                continue
            self._raise_for(reply)
            return reply

    def _send(self, request: _Request) -> None:
        if request.pending is not None:
            request.pending.cancel()
        try:
            request.pending = self.cell.request_async(wire.CHANNEL, request.topic, self.owner,
                                                      headers=request.headers)
        except CellError as exc:
            raise _Failed(str(exc).rstrip(".")) from None
        request.pending.future.add_done_callback(self._on_reply)
        self.outstanding.add(request)
        request.sent_at = time.monotonic()
        request.attempts += 1

    def _on_reply(self, future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self.last_progress = time.monotonic()

    def _wait(self, head: _Request, in_flight: "deque[_Request] | list[_Request]") -> Message:
        """Wait for the reply to `head`, resending what got lost; fail after `timeout` without progress."""
        while True:
            self._check_abort()
            assert head.pending is not None
            try:
                return head.pending.future.result(_TICK)
            except FutureTimeout:
                now = time.monotonic()
                if now - max(self.last_progress, head.sent_at) < self.timeout:
                    continue
                if head.attempts >= MAX_ATTEMPTS:
                    raise _Failed(f"no reply from the owner within {self.timeout:g} s "
                                  f"({head.attempts} attempts)") from None
                log.debug("resending %d request(s) to '%s' after %g s without a reply",
                          len(in_flight), self.owner, self.timeout)
                for request in in_flight:
                    if request.pending is not None and not request.pending.done():
                        self._send(request)
            except (UnreachableError, BrokerUnreachableError) as exc:
                if time.monotonic() - self.last_progress >= self.timeout:
                    raise _Failed(str(exc).rstrip(".")) from None
                self._sleep(_RETRY_DELAY)
                self._send(head)
            except (RemoteError, CellError) as exc:
                raise _Failed(str(exc).rstrip(".")) from None

    def _raise_for(self, headers: dict) -> None:
        code = headers.get("err")
        if code is None:
            return
        text = str(headers.get("msg") or code)
        if code == wire.ERR_UNKNOWN_REF:
            raise _Failed(f"the owner answered: {wire.UNKNOWN_REF_MESSAGE}", remove_part=True)
        raise _Failed(f"the owner answered: {text}", remove_part=code == wire.ERR_CHANGED)

    # -- abort -------------------------------------------------------------------------------
    def _aborted(self) -> bool:
        return self.abort_signal is not None and self.abort_signal.triggered

    def _check_abort(self) -> None:
        if self._aborted():
            raise _Aborted()

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._check_abort()
            time.sleep(min(left, _TICK))

    def _report_give_up(self) -> None:
        report_give_up(self.cell, self.owner, self.ref_id)


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
    an unknown RID removes it. `per_request_timeout` is how long the owner may stay silent.
    `chunk_size` and `window` (requests in flight) tune throughput; `progress_cb(received, total)`
    is called as data is written. `keep_partial=False` removes the partial data on any failure.
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
    if secure:
        raise ValueError("secure=True is not supported: fedstream has no per-peer encryption.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be between 1 and {MAX_CHUNK_SIZE} bytes, got {chunk_size!r}.")
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive number of requests, got {window!r}.")
    if abort_signal is not None and not hasattr(abort_signal, "triggered"):
        raise ValueError("abort_signal must be a Signal or None.")
    if progress_cb is not None and not callable(progress_cb):
        raise ValueError("progress_cb must be callable or None.")
    return _Download(from_fqcn, ref_id, float(per_request_timeout), cell, location, optional, abort_signal,
                     chunk_size, window, progress_cb, keep_partial).run()
