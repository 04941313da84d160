"""Objects by pull, recipient side: download, verify and load what `FileDownloader.add_object` shared.

`download_object` downloads into a fresh private temporary directory (the whole-file digest
is verified before the file gets its name), loads it (a container runs no code; a
cloudpickle payload is refused unless allow_pickle=True), and removes the directory,
whatever happened. Failures are returned as (error, None), never as part of an object.
The owner side (serialize once into a spool file owned by the transaction) is
`FileDownloader.add_object` in owner.py.
"""

import logging
import shutil
import tempfile
from typing import Any, Optional

from fedstream.common.filenames import check_dest_dir
from fedstream.common.signal import Signal
from fedstream.nodes.cell import Cell
from fedstream.nodes.objects import spool
from fedstream.nodes.objects.container import ObjectFormatError
from fedstream.nodes.pull.recipient import download_file

log = logging.getLogger(__name__)


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
