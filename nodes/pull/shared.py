"""A file shared by a pull owner: its identity, digest and recipients' outcomes.

The owner keeps no cursor per recipient: every chunk request names its offset. Per recipient a
SharedFile only remembers whether it started and whether its outcome was reported, so each
file_downloaded_cb fires once per attempt: once for a success, and a recipient that failed (say,
aborted) and opens the file again starts a fresh outcome. The digest is computed once in a background thread (and cached
by file identity, so a file shared again is not hashed again). Its descriptor comes from the
owner's OpenFiles, opened on demand; a reopened file must still have the identity (device,
inode, size, mtime) it had when it was added, or it counts as changed. A small file that fits
in the process's KeptBytes is read once, when it is hashed, and served from memory (`content`).
"""

import logging
import os
import stat
import threading
from collections import OrderedDict
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from fedstream.common import digest as digests
from fedstream.common.rc import DownloadStatus
from fedstream.nodes.callbacks import call_user_cb
from fedstream.nodes.pull import wire
from fedstream.nodes.pull.kept import KeptBytes
from fedstream.nodes.pull.openfiles import DigestWorkers, OpenFiles

log = logging.getLogger(__name__)

_DIGEST_CACHE_SIZE = 256
_STARTED = "started"  # recipient state before its outcome (a DownloadStatus) is known


class Closed(Exception):
    """The file's transaction ended while a request was being served."""


class DigestCache:
    """(device, inode, size, mtime_ns) -> digest of the files one owner shared lately."""

    def __init__(self, size: int = _DIGEST_CACHE_SIZE) -> None:
        self._size = size
        self._digests: "OrderedDict[tuple, str]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, identity: tuple) -> Optional[str]:
        with self._lock:
            return self._digests.get(identity)

    def put(self, identity: tuple, digest: str) -> None:
        with self._lock:
            self._digests[identity] = digest
            while len(self._digests) > self._size:
                self._digests.popitem(last=False)


class SharedFile:
    """A file added to a transaction: its path and identity, digest and recipients."""

    def __init__(self, file_name: str, cb: Optional[Callable], cb_kwargs: dict, files: OpenFiles) -> None:
        self.ref_id = wire.new_id()
        self.file_name = file_name
        self.name = os.path.basename(os.path.abspath(file_name))
        self.cb = cb
        self.cb_kwargs = cb_kwargs
        self.secure_only = False  # served to secure downloads only (add_file(..., secure=True))
        try:
            fd = os.open(file_name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ValueError(f"File {file_name!r} cannot be read: {exc.strerror}.") from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)  # opened again on demand: thousands of shared files must not hold thousands of fds
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{file_name!r} is not a regular file.")
        self._files = files
        self.size = st.st_size
        self._identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        self._lock = threading.Lock()
        self._closed = False
        self.recipients: dict[str, str] = {}
        self.digest: Optional[str] = None
        self.digest_error: Optional[tuple[str, str]] = None  # (error code, sentence)
        self.digest_ready = threading.Event()
        self.content: Optional[bytes] = None  # the whole file, once hashed, if it is kept in memory
        self._kept: Optional[KeptBytes] = None  # the allowance `content` is reserved from
        self._kept_bytes = 0

    # -- reading -----------------------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[int]:
        """A descriptor of the file, open until the block ends; check `changed(fd)` before trusting it."""
        if self._closed:
            raise Closed()
        with self._files.reading(self.ref_id, self.file_name) as fd:
            yield fd

    def close(self) -> None:
        """Stop serving; the descriptor is closed as soon as no reader uses it, the kept bytes at once."""
        self._closed = True
        self._files.discard(self.ref_id)
        self._drop_content()

    def _drop_content(self) -> None:
        with self._lock:
            held, self._kept_bytes = self._kept_bytes, 0
            self.content = None
        if held and self._kept is not None:
            self._kept.give(held)

    def changed(self, fd: int) -> bool:
        """Tell whether the file behind `fd` is not the one added (replaced, resized or modified)."""
        st = os.fstat(fd)
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != self._identity

    # -- digest ------------------------------------------------------------------------
    def start_digest(self, cache: "DigestCache", workers: DigestWorkers, kept: Optional[KeptBytes] = None) -> None:
        """Have `workers` read and keep a small file that fits in `kept`; else use the cached digest or compute it."""
        if kept is not None and self.size and kept.take(self.size):
            self._kept, self._kept_bytes = kept, self.size
            workers.submit(lambda: self._compute_digest(cache, keep=True))
            return
        cached = cache.get(self._identity)
        if cached is not None:
            self.digest = cached
            self.digest_ready.set()
            return
        workers.submit(lambda: self._compute_digest(cache))

    def _compute_digest(self, cache: "DigestCache", keep: bool = False) -> None:
        hasher = digests.new_hasher()
        content = None
        try:
            with self.reading() as fd:
                if self.changed(fd):
                    self.digest_error = (wire.ERR_CHANGED, f"the file {self.name!r} changed on the owner")
                    return
                if keep:
                    content = os.pread(fd, self.size, 0)
                    if len(content) != self.size:
                        raise OSError(f"file ended at {len(content)} bytes, expected {self.size}")
                    hasher.update(content)
                else:
                    digests.hash_range(fd, hasher, 0, self.size, should_stop=lambda: self._closed)
                if self._closed:
                    return
                if self.changed(fd):
                    self.digest_error = (wire.ERR_CHANGED, f"the file {self.name!r} changed on the owner")
                    return
            self.digest = hasher.hexdigest()
            cache.put(self._identity, self.digest)
            if content is not None:
                with self._lock:
                    if self._kept_bytes:  # not closed meanwhile
                        self.content = content
        except Closed:
            return
        except OSError as exc:
            self.digest_error = (wire.ERR_IO, f"the owner cannot read {self.name!r}: {exc.strerror or exc}")
            log.error("digest of %s failed: %s", self.file_name, exc)
        finally:
            if keep and self.content is None:
                self._drop_content()
            self.digest_ready.set()

    # -- recipients --------------------------------------------------------------------
    def mark_started(self, site: str) -> None:
        with self._lock:
            self.recipients.setdefault(site, _STARTED)

    def begin(self, site: str) -> None:
        """`site` opens the file: a new attempt after a failure gets a fresh outcome (and callback)."""
        with self._lock:
            if self.recipients.get(site) != DownloadStatus.SUCCESS:
                self.recipients[site] = _STARTED

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
            call_user_cb("file_downloaded_cb", self.cb, self.ref_id, site, status, self.file_name,
                          **self.cb_kwargs)
