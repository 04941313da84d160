"""Received file names: sanitizing peer-supplied names, committing files under final names, and
removing the stale `.part` files a killed receiver left behind (push: `.fedstream-<sid>-<hex>.part`,
pull: `.fedstream-<RID>.part`) once they are older than the stale-part age."""

import errno
import fcntl
import logging
import os
import re
import stat
import threading
import time
import unicodedata

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._+=,@~() -]")
MAX_NAME_LENGTH = 200


def sanitize_name(name: object) -> str:
    """Reduce a peer-supplied file name to a safe base name (never a path, never hidden)."""
    text = str(name) if name is not None else ""
    text = text.replace("\\", "/").rsplit("/", 1)[-1]
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = _UNSAFE.sub("_", text).strip(" .")
    text = text.lstrip(".")
    if len(text) > MAX_NAME_LENGTH:
        stem, dot, ext = text.rpartition(".")
        ext = ext[:20] if dot else ""
        text = (stem if dot else text)[: MAX_NAME_LENGTH - len(ext) - 1] + ("." + ext if ext else "")
    return text or "file"


def _candidates(name: str):
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    yield name
    for n in range(1, 10_000):
        yield f"{stem} ({n}).{ext}" if ext else f"{stem} ({n})"


def commit_file(part_path: str, dest_dir: str, name: str) -> str:
    """Move a verified `.part` file to `dest_dir/name` without overwriting anything.

    If the name is taken, a numbered suffix is added ('model (1).pt'). Returns the final path.
    """
    for candidate in _candidates(sanitize_name(name)):
        final = os.path.join(dest_dir, candidate)
        try:
            os.link(part_path, final)  # atomic, and fails instead of overwriting
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if os.path.lexists(final):  # the file system has no hard links
                continue
            os.rename(part_path, final)
            return final
        os.unlink(part_path)
        return final
    raise FileExistsError(f"no free file name for {name!r} in {dest_dir}")


def remove_quietly(path: "str | None") -> None:
    """Delete a file if it exists."""
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def check_dest_dir(dest_dir: "str | None", what: str = "dest_dir") -> str:
    """Return an existing, writable directory (the system temp dir if None); else ValueError."""
    import tempfile

    if dest_dir is None:
        return tempfile.gettempdir()
    if not isinstance(dest_dir, (str, os.PathLike)):
        raise ValueError(f"{what} must be a directory path, got {type(dest_dir).__name__}.")
    path = os.fspath(dest_dir)
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is not a directory.")
    if not os.access(path, os.W_OK):
        raise ValueError(f"{what} {path!r} is not writable.")
    return os.path.abspath(path)


DEFAULT_STALE_PART_AGE = 3600.0  # seconds without a write after which a .part file is left over
_PART_NAME = re.compile(r"\.fedstream-[A-Za-z0-9_-]{8,128}(-[0-9a-f]{8})?\.part")
_SWEEP_INTERVAL = 60.0  # seconds between two sweeps of the same directory
_sweep_lock = threading.Lock()
_swept: dict[str, float] = {}  # directory -> when it was last swept
_stale_part_age = DEFAULT_STALE_PART_AGE


def set_stale_part_age(seconds: float) -> None:
    """Set the age (seconds since the last write) after which receivers remove their .part files."""
    global _stale_part_age
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise ValueError(f"the stale .part age must be a positive number of seconds, got {seconds!r}.")
    with _sweep_lock:
        _stale_part_age = float(seconds)
        _swept.clear()


def part_path(directory: str, transfer_id: str, suffix: str = "") -> str:
    """The .part file of transfer `transfer_id` (a RID or a stream id) in `directory`.

    Pull names it by the RID alone (a later download of the same RID resumes it); push adds a
    random `suffix` of 8 hex digits per attempt.
    """
    name = f".fedstream-{transfer_id}" + (f"-{suffix}" if suffix else "") + ".part"
    if not is_part_name(name):
        raise ValueError(f"{transfer_id!r} cannot name a .part file")
    return os.path.join(directory, name)


def is_part_name(name: str) -> bool:
    """Tell whether `name` is one of fedstream's own .part file names."""
    return _PART_NAME.fullmatch(name) is not None


def remove_stale_parts(directory: str) -> list[str]:
    """Remove fedstream's .part files in `directory` not written for the stale-part age; return their paths.

    A directory is swept at most once a minute; a .part file another download holds locked,
    a symlink and anything not named like fedstream's .part files are left alone.
    """
    now = time.time()
    with _sweep_lock:
        key = os.path.abspath(directory)
        if now - _swept.get(key, float("-inf")) < _SWEEP_INTERVAL:
            return []
        _swept[key] = now
        max_age = _stale_part_age
    try:
        names = [name for name in os.listdir(directory) if is_part_name(name)]
    except OSError:
        return []
    paths = [os.path.join(directory, name) for name in names]
    removed = [path for path in paths if _remove_if_stale(path, now - max_age)]
    if removed:
        log.info("removed %d stale .part file(s) from %s", len(removed), directory)
    return removed


def _remove_if_stale(path: str, written_before: float) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        held = os.fstat(fd)
        if not stat.S_ISREG(held.st_mode) or held.st_mtime >= written_before:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a download in progress holds its .part locked
        except OSError:
            return False
        current = os.stat(path, follow_symlinks=False)
        if (current.st_dev, current.st_ino) != (held.st_dev, held.st_ino):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
