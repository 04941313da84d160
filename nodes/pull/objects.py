"""Objects by pull: serialized once on the owner, downloaded, verified and loaded by each recipient.

Owner (`add_object`, also `FileDownloader.add_object`):
1. check the arguments and register an end hook on the transaction first, so that nothing is
   serialized for a transaction that does not exist;
2. serialize the object once into a private spool file (nodes/objects/spool.py): the safe
   container, or cloudpickle when the caller asks for serializer="cloudpickle";
3. share the spool file with add_file: every recipient downloads the same bytes at its own pace;
4. the end hook removes the spool file when the transaction ends (timeout, delete_transaction,
   shutdown, cell stop).

Recipient (`download_object`): download_file into a fresh private temporary directory (the
whole-file digest is verified before the file gets its name), load it (a container runs no code;
a cloudpickle payload is refused unless allow_pickle=True), and remove the directory, whatever
happened. Failures are returned as (error, None), never as part of an object.
"""

import logging
import shutil
import tempfile
import threading
from typing import Any, Callable, Optional

from fedstream.common.filenames import check_dest_dir, remove_quietly
from fedstream.common.signal import Signal
from fedstream.nodes.cell import Cell
from fedstream.nodes.objects import spool
from fedstream.nodes.objects.container import ObjectFormatError
from fedstream.nodes.pull.owner import FileDownloader
from fedstream.nodes.pull.recipient import download_file

log = logging.getLogger(__name__)


class _SpoolFile:
    """The spool file of one added object; removed once, by whoever comes last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._path: Optional[str] = None
        self._removed = False

    def set(self, path: str) -> None:
        with self._lock:
            self._path = path
            removed = self._removed
        if removed:  # the transaction ended while the object was being serialized
            remove_quietly(path)

    def remove(self) -> None:
        with self._lock:
            self._removed = True
            path = self._path
        remove_quietly(path)


def add_object(tx_id: str, obj: Any, file_downloaded_cb: Optional[Callable[..., Any]] = None,
               serializer: Optional[str] = None, **cb_kwargs: Any) -> str:
    """Serialize `obj` once into a spool file owned by the transaction and share it; return its RID.

    `serializer`: None (the safe container: plain values and numpy arrays) or "cloudpickle"
    (recipients must pass allow_pickle=True). `file_downloaded_cb(ref_id, to_site, status,
    file_name, **cb_kwargs)` is called once per recipient as for add_file; `file_name` is the
    spool file, which is removed when the transaction ends. Raises ValueError for an unknown
    transaction, a bad argument, or a value the serializer cannot carry (naming its key path).
    """
    serializer = spool.check_serializer(serializer)
    if file_downloaded_cb is not None and not callable(file_downloaded_cb):
        raise ValueError("file_downloaded_cb must be callable or None.")
    spool_file = _SpoolFile()
    FileDownloader.add_end_hook(tx_id, spool_file.remove)
    path = spool.spool_object(obj, serializer)
    spool_file.set(path)
    try:
        ref_id = FileDownloader.add_file(tx_id, path, file_downloaded_cb, **cb_kwargs)
    except BaseException:
        spool_file.remove()
        raise
    log.debug("object shared as %s (%s, spool file %s)", ref_id, serializer, path)
    return ref_id


FileDownloader.add_object = staticmethod(add_object)


def download_object(from_fqcn: str, ref_id: str, per_request_timeout: float, cell: Cell, secure: bool = False,
                    optional: bool = False, abort_signal: Optional[Signal] = None, allow_pickle: bool = False,
                    *, location: Optional[str] = None, **extras: Any) -> tuple[Optional[str], Any]:
    """Download the object `ref_id` from `from_fqcn`, verify and load it; return (None, obj) or (error, None).

    A cloudpickle payload is refused (an error, nothing executed) unless `allow_pickle=True`.
    The file travels through a temporary directory inside `location` (default: the system
    temp dir) that is removed before returning. `extras` are download_file's keyword options
    (chunk_size, window, progress_cb). Raises ValueError for bad arguments.
    """
    spool.check_allow_pickle(allow_pickle)
    if "keep_partial" in extras:
        raise ValueError("download_object always removes its temporary file: keep_partial is not supported.")
    directory = tempfile.mkdtemp(prefix="fedstream-object-", dir=check_dest_dir(location, "location"))
    try:
        error, path = download_file(from_fqcn, ref_id, per_request_timeout, cell, location=directory, secure=secure,
                                    optional=optional, abort_signal=abort_signal, keep_partial=False, **extras)
        if error is not None or path is None:
            return error or f"Download of {ref_id} from '{from_fqcn}' failed.", None
        try:
            return None, spool.load_object(path, allow_pickle)
        except (ObjectFormatError, OSError) as exc:
            error = f"Object {ref_id} from '{from_fqcn}' cannot be loaded: {exc}"
            log.log(logging.DEBUG if optional else logging.WARNING, "%s", error)
            return error, None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
