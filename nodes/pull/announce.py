"""Telling nodes about shared files (RIDs), and downloading the files announced to a node.

`serve --announce-to` calls `announce`; `fedstream node` calls `accept_announcements`. The
announcement is a request on (DEFAULT_CHANNEL, ANNOUNCE_TOPIC) whose JSON payload lists the RIDs;
the owner is the message's source as stamped by the broker, never a name inside the payload.
"""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

from fedstream.common import constants
from fedstream.common.errors import FedstreamError
from fedstream.common.filenames import check_dest_dir, sanitize_name
from fedstream.common.fqcn import validate_fqcn
from fedstream.nodes.pull import wire
from fedstream.nodes.cell import Cell
from fedstream.nodes.message import Message
from fedstream.nodes.pull.recipient import download_file, report_give_up

log = logging.getLogger(__name__)

KIND_PULL = "pull"
MAX_FILES_PER_ANNOUNCEMENT = 1000
DEFAULT_REQUEST_TIMEOUT = 10.0  # per-request timeout of announced downloads
_DOWNLOAD_WORKERS = 2
_MAX_QUEUED = 256  # announced files waiting for a download worker; more are refused
_REMEMBERED = 10_000  # (owner, ref) pairs remembered so that a repeated announcement is skipped

# on_result(kind, ok, path_or_name, detail): path of the received file when ok, else the
# announced (sanitized) name and the error message
ResultCallback = Callable[[str, bool, str, str], None]


def announce(cell: Cell, targets: Iterable[str], files: list[dict], timeout: float = 10.0) -> dict[str, Optional[str]]:
    """Send the RIDs in `files` ({"ref", "name", "size"} each) to every target.

    Returns {target: None if it accepted, else the error message}.
    """
    targets = [validate_fqcn(t) for t in targets]
    entries = [{"ref": f["ref"], "name": str(f["name"]), "size": int(f["size"])} for f in files]
    if not entries or len(entries) > MAX_FILES_PER_ANNOUNCEMENT:
        raise ValueError(f"An announcement lists 1 to {MAX_FILES_PER_ANNOUNCEMENT} files, got {len(entries)}.")
    for entry in entries:
        if not wire.is_valid_ref(entry["ref"]):
            raise ValueError(f"{entry['ref']!r} is not a valid reference id.")
    payload = {"kind": KIND_PULL, "files": entries}
    pending = {t: cell.request_async(constants.DEFAULT_CHANNEL, constants.ANNOUNCE_TOPIC, t, payload)
               for t in targets}
    results: dict[str, Optional[str]] = {}
    for target, request in pending.items():
        try:
            reply = request.result(timeout)
            accepted = reply.payload.get("accepted") if isinstance(reply.payload, dict) else None
            results[target] = None if accepted == len(entries) else f"'{target}' did not accept the files"
        except FedstreamError as exc:
            results[target] = str(exc).rstrip(".")
    return results


def accept_announcements(cell: Cell, recv_dir: Optional[str], on_result: ResultCallback,
                         per_request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> None:
    """Download every file announced to `cell` into `recv_dir`, in the background.

    `on_result(kind, ok, path_or_name, detail)` is called once per announced file: on success with
    the final path and the owner's name, on failure with the announced name and the error.
    Call before `cell.start()` or after; downloads stop when the cell stops.
    """
    recv_dir = check_dest_dir(recv_dir, "recv_dir")
    if not callable(on_result):
        raise ValueError("on_result must be callable.")
    if per_request_timeout <= 0:
        raise ValueError(f"per_request_timeout must be positive, got {per_request_timeout!r}.")
    workers = ThreadPoolExecutor(_DOWNLOAD_WORKERS, thread_name_prefix=f"fedstream-pull-{cell.fqcn}")
    closed = threading.Event()
    lock = threading.Lock()
    taken: dict[tuple[str, str], None] = {}  # (owner, ref) accepted, oldest first: repeats are skipped
    queued = [0]  # downloads accepted but not started

    def fetch(owner: str, ref: str, name: str) -> None:
        with lock:
            queued[0] -= 1
        if closed.is_set():
            return
        try:
            err, path = download_file(owner, ref, per_request_timeout, cell, recv_dir, keep_partial=False)
        except ValueError as exc:  # e.g. recv_dir was removed meanwhile
            err, path = str(exc), None
        if err is not None and not closed.is_set():
            report_give_up(cell, owner, ref)  # nobody will resume it: let the owner know now
        try:
            if path is not None:
                on_result(KIND_PULL, True, path, owner)
            else:
                on_result(KIND_PULL, False, name, err or "unknown error")
        except Exception:
            log.exception("on_result raised an exception (ignored)")

    def on_announce(msg: Message) -> dict:
        files = _parse(msg.payload)
        if closed.is_set():
            raise RuntimeError(f"'{cell.fqcn}' is shutting down")
        for ref, name in files:
            with lock:
                if (msg.source, ref) in taken:
                    continue
                if queued[0] >= _MAX_QUEUED:
                    raise RuntimeError(f"'{cell.fqcn}' has {_MAX_QUEUED} downloads waiting already")
                taken[(msg.source, ref)] = None
                if len(taken) > _REMEMBERED:
                    del taken[next(iter(taken))]
                queued[0] += 1
            workers.submit(fetch, msg.source, ref, name)
        log.info("'%s' announced %d file(s)", msg.source, len(files))
        return {"accepted": len(files)}

    def on_stop() -> None:
        closed.set()
        workers.shutdown(wait=False, cancel_futures=True)

    cell.register_request_cb(constants.DEFAULT_CHANNEL, constants.ANNOUNCE_TOPIC, on_announce)
    cell.add_stop_hook(on_stop)


def _parse(payload: object) -> list[tuple[str, str]]:
    """(ref, sanitized name) of each announced file; ValueError if the payload is malformed."""
    if not isinstance(payload, dict) or payload.get("kind") != KIND_PULL:
        raise ValueError("not a pull announcement")
    files = payload.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES_PER_ANNOUNCEMENT:
        raise ValueError("an announcement lists 1 to %d files" % MAX_FILES_PER_ANNOUNCEMENT)
    parsed = []
    for entry in files:
        ref = entry.get("ref") if isinstance(entry, dict) else None
        if not wire.is_valid_ref(ref):
            raise ValueError("an announced reference id is malformed")
        parsed.append((str(ref), sanitize_name(entry.get("name"))))
    return parsed
