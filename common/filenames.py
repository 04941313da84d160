"""Received file names: sanitizing peer-supplied names and committing files under final names."""

import errno
import os
import re
import unicodedata

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
