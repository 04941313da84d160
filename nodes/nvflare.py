"""NVFlare 2.7–2.9 face of fedstream: code written against NVFlare's file transfer API ports by changing imports.

Every name here maps onto fedstream's own objects (README "Porting NVFlare code" has the table):

- `ObjectDownloader(cell, timeout, num_receivers, ...)` wraps one `FileDownloader` transaction.
  Its files (`add_file`, or the module-level `add_file(downloader, ...)`) and objects
  (`add_object`) are shared by pull. Each recipient's end calls NVFlare's
  `file_downloaded_cb(to_receiver, status, file_name, **kw)`; once `num_receivers` recipients
  ended, it is called once more as `("", "", file_name, **kw)` (NVFlare's "downloaded to all").
  When every item reached `num_receivers`, the transaction ends and
  `transaction_done_cb(tx_id, TransactionDoneStatus.FINISHED, objects, **cb_kwargs)` is called;
  on inactivity (or the cell stopping) with TIMEOUT after `timeout_cb(tx_id, file_names,
  **cb_kwargs)`; on `delete()` with DELETED. It is called exactly once.
- `FileStreamer` is fedstream's, except that `register_stream_processing` accepts NVFlare's
  `chunk_consumed_cb(reply, stream_ctx, fl_ctx, **kw)` (fedstream's own `(stream_ctx, fl_ctx,
  **kw)` still works: the form is chosen by what the callback accepts), `chunk_size=0` means
  the default, and `get_channel` / `get_topic` read the stream context.
- `FLContext` adds NVFlare's property methods (`get_prop`, `set_prop`, `get_run_abort_signal`).
- `StreamContextKey`, `ReturnCode`, `DownloadStatus`, `TransactionDoneStatus` carry NVFlare's
  names; the keys' values are fedstream's, the constants' values are NVFlare's (equal to ours
  where fedstream has the name).
"""

import inspect
import logging
import os
import threading
from typing import Any, Callable, List, Mapping, Optional

from fedstream.common.rc import DownloadStatus
from fedstream.common.signal import Signal
from fedstream.nodes.cell import Cell
from fedstream.nodes.context import FLContext as _FLContext
from fedstream.nodes.pull import FileDownloader, download_file, download_object
from fedstream.nodes.push import FileStreamer as _FileStreamer
from fedstream.nodes.push import StreamContext
from fedstream.nodes.push import stream_context as _keys

__all__ = ["DownloadStatus", "FLContext", "FileStreamer", "ObjectDownloader", "ReturnCode", "Signal",
           "StreamContext", "StreamContextKey", "TransactionDoneStatus", "add_file", "add_object",
           "download_file", "download_object"]

log = logging.getLogger(__name__)


class ReturnCode:
    """NVFlare's return codes (`nvflare.apis.fl_constant.ReturnCode`): strings equal to their names.

    fedstream's `ReturnCode` members compare equal to the constants of the same name.
    """

    OK = "OK"
    BAD_PEER_CONTEXT = "BAD_PEER_CONTEXT"
    BAD_REQUEST_DATA = "BAD_REQUEST_DATA"
    BAD_TASK_DATA = "BAD_TASK_DATA"
    COMMUNICATION_ERROR = "COMMUNICATION_ERROR"
    TIMEOUT = "TIMEOUT"
    ERROR = "ERROR"
    EXECUTION_EXCEPTION = "EXECUTION_EXCEPTION"
    EXECUTION_RESULT_ERROR = "EXECUTION_RESULT_ERROR"
    HANDLER_EXCEPTION = "HANDLER_EXCEPTION"
    MISSING_PEER_CONTEXT = "MISSING_PEER_CONTEXT"
    RUN_MISMATCH = "RUN_MISMATCH"
    TASK_ABORTED = "TASK_ABORTED"
    TASK_DATA_FILTER_ERROR = "TASK_DATA_FILTER_ERROR"
    TASK_RESULT_FILTER_ERROR = "TASK_RESULT_FILTER_ERROR"
    TASK_UNKNOWN = "TASK_UNKNOWN"
    TASK_UNSUPPORTED = "TASK_UNSUPPORTED"
    TOPIC_UNKNOWN = "TOPIC_UNKNOWN"
    MODEL_UNRECOGNIZED = "MODEL_UNRECOGNIZED"
    VALIDATE_TYPE_UNKNOWN = "VALIDATE_TYPE_UNKNOWN"
    EMPTY_RESULT = "EMPTY_RESULT"
    UNSAFE_JOB = "UNSAFE_JOB"
    EARLY_TERMINATION = "EARLY_TERMINATION"
    SERVER_NOT_READY = "SERVER_NOT_READY"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"


class TransactionDoneStatus:
    """Why a download transaction ended (NVFlare's `TransactionDoneStatus`)."""

    FINISHED = "finished"
    TIMEOUT = "timeout"
    DELETED = "deleted"


class StreamContextKey:
    """NVFlare's stream context key names, mapped to the keys fedstream sets on a receiver."""

    CHANNEL = _keys.KEY_CHANNEL
    TOPIC = _keys.KEY_TOPIC
    RC = _keys.KEY_RC


class FLContext(_FLContext):
    """fedstream's FLContext plus NVFlare's property methods, for code that keeps state in its context."""

    RUN_ABORT_SIGNAL = "__run_abort_signal__"  # NVFlare's FLContextKey.RUN_ABORT_SIGNAL

    def __init__(self, cell: Cell) -> None:
        super().__init__(cell)
        self._props: dict[str, Any] = {self.RUN_ABORT_SIGNAL: Signal()}
        self._props_lock = threading.Lock()

    def get_prop(self, key: str, default: Any = None) -> Any:
        """The value set for `key`, or `default`."""
        with self._props_lock:
            return self._props.get(key, default)

    def set_prop(self, key: str, value: Any, private: bool = True, sticky: bool = True) -> bool:
        """Set `key` to `value` (`private` and `sticky` are accepted for NVFlare code; fedstream has one scope)."""
        with self._props_lock:
            self._props[key] = value
        return True

    def get_run_abort_signal(self) -> Optional[Signal]:
        """The Signal that aborts this run's transfers (pass it as abort_signal)."""
        return self.get_prop(self.RUN_ABORT_SIGNAL)


class _ChunkReply(dict):
    """What NVFlare's chunk_consumed_cb gets as `reply`: the receiver's answer to a written chunk (OK)."""

    def __init__(self) -> None:
        super().__init__()
        self["__rc__"] = ReturnCode.OK

    def get_return_code(self, default: str = ReturnCode.OK) -> str:
        """NVFlare's Shareable accessor: the chunk's return code."""
        return self.get("__rc__", default)


def _takes_reply(cb: Callable[..., Any], cb_kwargs: Mapping[str, Any]) -> bool:
    """True if `cb` accepts NVFlare's (reply, stream_ctx, fl_ctx, **kw); False for fedstream's form."""
    try:
        signature = inspect.signature(cb)
    except (TypeError, ValueError):  # not introspectable: assume the NVFlare form asked for by this module
        return True
    try:
        signature.bind(None, None, None, **cb_kwargs)
        return True
    except TypeError:
        return False


class FileStreamer(_FileStreamer):
    """fedstream's FileStreamer with NVFlare's callback signatures and argument conventions."""

    @staticmethod
    def register_stream_processing(fl_ctx: _FLContext, channel: str, topic: str, dest_dir: Optional[str] = None,
                                   stream_done_cb: Optional[Callable[..., Any]] = None,
                                   chunk_consumed_cb: Optional[Callable[..., Any]] = None,
                                   allow_pickle: bool = False, **cb_kwargs: Any) -> None:
        """As fedstream's; `chunk_consumed_cb` may be NVFlare's `(reply, stream_ctx, fl_ctx, **kw)`."""
        if chunk_consumed_cb is not None and callable(chunk_consumed_cb) \
                and _takes_reply(chunk_consumed_cb, cb_kwargs):
            nvflare_cb = chunk_consumed_cb

            def chunk_consumed_cb(stream_ctx: StreamContext, ctx: _FLContext, **kwargs: Any) -> None:
                nvflare_cb(_ChunkReply(), stream_ctx, ctx, **kwargs)

        _FileStreamer.register_stream_processing(fl_ctx, channel, topic, dest_dir, stream_done_cb,
                                                 chunk_consumed_cb, allow_pickle, **cb_kwargs)

    @staticmethod
    def stream_file(channel: str, topic: str, stream_ctx: Optional[Mapping[str, Any]], targets: List[str],
                    file_name: str, fl_ctx: _FLContext, chunk_size: Optional[int] = None,
                    chunk_timeout: Optional[float] = None, optional: bool = False,
                    secure: bool = False) -> tuple[str, bool]:
        """As fedstream's; `chunk_size=0` and `chunk_timeout=0` mean the defaults, as in NVFlare."""
        return _FileStreamer.stream_file(channel, topic, stream_ctx, targets, file_name, fl_ctx,
                                         chunk_size or None, chunk_timeout or None, optional, secure)

    @staticmethod
    def stream_object(channel: str, topic: str, stream_ctx: Optional[Mapping[str, Any]], targets: List[str],
                      obj: Any, fl_ctx: _FLContext, chunk_size: Optional[int] = None,
                      chunk_timeout: Optional[float] = None, optional: bool = False, secure: bool = False,
                      serializer: Optional[str] = None) -> tuple[str, bool]:
        """As fedstream's; `chunk_size=0` and `chunk_timeout=0` mean the defaults."""
        return _FileStreamer.stream_object(channel, topic, stream_ctx, targets, obj, fl_ctx, chunk_size or None,
                                           chunk_timeout or None, optional, secure, serializer)

    @staticmethod
    def get_channel(stream_ctx: Mapping[str, Any]) -> Optional[str]:
        """The channel the stream arrived on."""
        return stream_ctx.get(StreamContextKey.CHANNEL)

    @staticmethod
    def get_topic(stream_ctx: Mapping[str, Any]) -> Optional[str]:
        """The topic the stream arrived on."""
        return stream_ctx.get(StreamContextKey.TOPIC)


class _Item:
    """One file or object of a transaction and the recipients that ended it."""

    def __init__(self, base: Any, name: str, cb: Optional[Callable[..., Any]], cb_kwargs: dict) -> None:
        self.base = base  # what transaction_done_cb lists: the file name, or the object
        self.name = name  # what file_downloaded_cb gets as file_name
        self.cb = cb
        self.cb_kwargs = cb_kwargs
        self.ended: set[str] = set()
        self.all_reported = False


class ObjectDownloader:
    """A pull transaction with NVFlare's face: files and objects for `num_receivers` recipients.

    `num_receivers` 0 means unknown: the transaction then ends only on timeout or `delete()`.
    `cell` may be a Cell or an FLContext.
    """

    def __init__(self, cell: Any, timeout: float, num_receivers: int, timeout_cb: Optional[Callable[..., Any]] = None,
                 transaction_done_cb: Optional[Callable[..., Any]] = None, **cb_kwargs: Any) -> None:
        if isinstance(cell, _FLContext):
            cell = cell.get_engine().get_cell()
        if isinstance(num_receivers, bool) or not isinstance(num_receivers, int) or num_receivers < 0:
            raise ValueError(f"num_receivers must be a number of recipients (0: unknown), got {num_receivers!r}.")
        for what, cb in (("timeout_cb", timeout_cb), ("transaction_done_cb", transaction_done_cb)):
            if cb is not None and not callable(cb):
                raise ValueError(f"{what} must be callable or None.")
        self.num_receivers = num_receivers
        self._timeout_cb = timeout_cb
        self._done_cb = transaction_done_cb
        self._cb_kwargs = cb_kwargs
        self._items: dict[str, _Item] = {}
        self._lock = threading.Lock()
        self._status: Optional[str] = None
        self.tx_id: str = FileDownloader.new_transaction(cell, timeout, self._on_timeout)

    @property
    def status(self) -> Optional[str]:
        """None while open; then the TransactionDoneStatus it ended with."""
        return self._status

    def add_file(self, file_name: str, file_downloaded_cb: Optional[Callable[..., Any]] = None, *,
                 chunk_size: Optional[int] = None, ref_id: Optional[str] = None, **cb_kwargs: Any) -> str:
        """Share `file_name`; return its reference id. The callback is `(to_receiver, status, file_name, **kw)`.

        `chunk_size` (None or 0: the default) is accepted for NVFlare code: in fedstream each
        recipient chooses its chunk size. `ref_id` cannot be chosen: fedstream makes unguessable ones.
        """
        _check_nvflare_options(chunk_size, ref_id)
        _check_cb("file_downloaded_cb", file_downloaded_cb)
        name = os.fspath(file_name) if isinstance(file_name, os.PathLike) else file_name
        return self._add(name, name, file_downloaded_cb, cb_kwargs,
                         lambda: FileDownloader.add_file(self.tx_id, name, self._on_downloaded))

    def add_object(self, obj: Any, obj_downloaded_cb: Optional[Callable[..., Any]] = None, *,
                   ref_id: Optional[str] = None, serializer: Optional[str] = None, **cb_kwargs: Any) -> str:
        """Share a Python object (serialized once); return its reference id.

        The callback is `(to_receiver, status, name, **kw)`, `name` being "object <ref_id>";
        transaction_done_cb lists the object itself.
        """
        _check_nvflare_options(None, ref_id)
        _check_cb("obj_downloaded_cb", obj_downloaded_cb)
        return self._add(obj, "", obj_downloaded_cb, cb_kwargs,
                         lambda: FileDownloader.add_object(self.tx_id, obj, self._on_downloaded, serializer))

    def delete(self) -> None:
        """End the transaction now: its reference ids stop working; transaction_done_cb gets DELETED."""
        if self._finish(TransactionDoneStatus.DELETED):
            FileDownloader.delete_transaction(self.tx_id)

    delete_transaction = delete  # NVFlare's name for it

    # -- events from the pull owner (its own threads) ------------------------------------------
    def _add(self, base: Any, name: str, cb: Optional[Callable[..., Any]], cb_kwargs: dict,
             share: Callable[[], str]) -> str:
        if self._status is not None:
            raise ValueError(f"Transaction {self.tx_id} has ended ({self._status}).")
        ref_id = share()  # no recipient knows the RID before it is returned: no end is reported before this
        with self._lock:
            self._items[ref_id] = _Item(base, name or f"object {ref_id}", cb, cb_kwargs)
        return ref_id

    def _on_downloaded(self, ref_id: str, to_site: str, status: DownloadStatus, file_name: str) -> None:
        with self._lock:
            item = self._items.get(ref_id)
            if item is None or to_site in item.ended:
                return
            item.ended.add(to_site)
            report_all = 0 < self.num_receivers <= len(item.ended) and not item.all_reported
            item.all_reported = item.all_reported or report_all
            finished = self._status is None and 0 < self.num_receivers and all(
                len(i.ended) >= self.num_receivers for i in self._items.values())
        if item.cb is not None:
            _call("file_downloaded_cb", item.cb, to_site, str(status), item.name, **item.cb_kwargs)
            if report_all:
                _call("file_downloaded_cb", item.cb, "", "", item.name, **item.cb_kwargs)
        if finished and self._finish(TransactionDoneStatus.FINISHED):
            FileDownloader.delete_transaction(self.tx_id)

    def _on_timeout(self, tx_id: str, file_names: List[str]) -> None:
        if self._status is not None:
            return  # ended by us (finished or deleted): the owner's own end is no news
        if self._timeout_cb is not None:
            _call("timeout_cb", self._timeout_cb, tx_id, [i.base for i in self._items.values()
                                                          if isinstance(i.base, str)], **self._cb_kwargs)
        self._finish(TransactionDoneStatus.TIMEOUT)

    def _finish(self, status: str) -> bool:
        """Record the end once and call transaction_done_cb; False if it had already ended."""
        with self._lock:
            if self._status is not None:
                return False
            self._status = status
            objects = [item.base for item in self._items.values()]
        if self._done_cb is not None:
            _call("transaction_done_cb", self._done_cb, self.tx_id, status, objects, **self._cb_kwargs)
        return True


def add_file(downloader: ObjectDownloader, file_name: str, chunk_size: Optional[int] = None,
             ref_id: Optional[str] = None, file_downloaded_cb: Optional[Callable[..., Any]] = None,
             **cb_kwargs: Any) -> str:
    """NVFlare's module-level `add_file(downloader, file_name, chunk_size=None, ref_id=None,
    file_downloaded_cb=None)`."""
    if not isinstance(downloader, ObjectDownloader):
        raise ValueError(f"add_file needs an ObjectDownloader, got {type(downloader).__name__}.")
    return downloader.add_file(file_name, file_downloaded_cb, chunk_size=chunk_size, ref_id=ref_id, **cb_kwargs)


def add_object(downloader: ObjectDownloader, obj: Any, ref_id: Optional[str] = None,
               obj_downloaded_cb: Optional[Callable[..., Any]] = None, **cb_kwargs: Any) -> str:
    """Module-level twin of `ObjectDownloader.add_object`."""
    if not isinstance(downloader, ObjectDownloader):
        raise ValueError(f"add_object needs an ObjectDownloader, got {type(downloader).__name__}.")
    return downloader.add_object(obj, obj_downloaded_cb, ref_id=ref_id, **cb_kwargs)


def _check_nvflare_options(chunk_size: Any, ref_id: Any) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError(f"chunk_size must be a number of bytes (None or 0: the default), got {chunk_size!r}.")
    if ref_id is not None:
        raise ValueError("ref_id cannot be chosen in fedstream: it makes unguessable reference ids; pass none.")


def _check_cb(what: str, cb: Any) -> None:
    if cb is not None and not callable(cb):
        raise ValueError(f"{what} must be callable or None.")


def _call(what: str, cb: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Call user code; log (never raise) what it raises."""
    try:
        cb(*args, **kwargs)
    except Exception:
        log.exception("%s raised an exception (ignored)", what)
