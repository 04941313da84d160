"""Spool files: an object serialized once into a file that pull or push then moves like any file.

`spool_object` writes the object into a new private file (mode 0600): the safe container by
default, or, when the sender asks for serializer="cloudpickle", a cloudpickle stream inside the
same envelope, whose kind byte marks it as pickle. If serializing fails the file is removed.
`load_object` reads a file back: a container is decoded without running any code; a pickle
stream is refused unless the caller passes allow_pickle=True, and even then it is unpickled only
after the whole body matched its digest.
"""

import os
import pickle
import tempfile
from typing import Any, Optional

from fedstream.common.filenames import check_dest_dir, remove_quietly
from fedstream.nodes.objects import container

SERIALIZER_CONTAINER = "container"
SERIALIZER_CLOUDPICKLE = "cloudpickle"
SERIALIZERS = (SERIALIZER_CONTAINER, SERIALIZER_CLOUDPICKLE)
SPOOL_PREFIX = "fedstream-object-"
SPOOL_SUFFIX = ".fsobj"
_BUFFER = 1 << 20


def check_serializer(serializer: Optional[str]) -> str:
    """The serializer's name (None means the container); ValueError for an unknown one."""
    if serializer is None:
        return SERIALIZER_CONTAINER
    if serializer not in SERIALIZERS:
        raise ValueError(f"serializer must be None, 'container' or 'cloudpickle', got {serializer!r}.")
    return serializer


def check_allow_pickle(allow_pickle: object) -> bool:
    """`allow_pickle` must be a real bool: consent is never implied by a truthy value."""
    if not isinstance(allow_pickle, bool):
        raise ValueError(f"allow_pickle must be True or False, got {allow_pickle!r}.")
    return allow_pickle


def write_object(obj: Any, f: Any, serializer: Optional[str] = None) -> int:
    """Serialize `obj` into the open binary file `f`; return the bytes written.

    Raises UnsupportedValueError for a value the chosen serializer cannot carry.
    """
    if check_serializer(serializer) == SERIALIZER_CONTAINER:
        return container.dump(obj, f)
    import cloudpickle

    out = container.BodyWriter(f, container.KIND_PICKLE)
    try:
        cloudpickle.dump(obj, out, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise container.UnsupportedValueError(f"the object cannot be pickled: {exc}") from exc
    return out.finish()


def spool_object(obj: Any, serializer: Optional[str] = None, directory: Optional[str] = None) -> str:
    """Serialize `obj` once into a new private file in `directory` (default: temp dir); return its path.

    The caller owns the file and removes it when done. Raises ValueError (UnsupportedValueError
    naming the key path) if the object cannot be serialized; no file is left behind then.
    """
    serializer = check_serializer(serializer)
    directory = check_dest_dir(directory, "spool directory")
    fd, path = tempfile.mkstemp(prefix=SPOOL_PREFIX, suffix=SPOOL_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb", buffering=_BUFFER) as f:
            write_object(obj, f, serializer)
    except BaseException:
        remove_quietly(path)
        raise
    return path


def load_object(path: str, allow_pickle: bool = False, *, max_depth: int = container.MAX_DEPTH,
                max_values: int = container.MAX_VALUES) -> Any:
    """Load the object in the file at `path`.

    Raises ObjectFormatError if the file is truncated or damaged (never returning part of an
    object), PickleRefusedError if it holds a cloudpickle stream and `allow_pickle` is False
    (nothing is executed then), and OSError if it cannot be read.
    """
    check_allow_pickle(allow_pickle)
    with open(path, "rb", buffering=_BUFFER) as f:
        size = os.fstat(f.fileno()).st_size
        envelope = container.read_envelope(f, size)
        if envelope.kind != container.KIND_PICKLE:
            return container.load(f, size, max_depth=max_depth, max_values=max_values)
        if not allow_pickle:
            raise container.PickleRefusedError(container.PICKLE_REFUSED)
        container.BodyReader(f, envelope).verify()
        f.seek(container.HEADER_SIZE)
        try:
            return pickle.load(f)
        except Exception as exc:
            raise container.ObjectFormatError(f"the pickled object cannot be loaded: {exc}") from exc
