"""FileStreamer: push a file to one or more sites that registered stream processing in advance."""

from typing import Any, Callable, List, Mapping, Optional

from fedstream.common.rc import ReturnCode
from fedstream.nodes.push import objects as push_objects, receiver as push_receiver, sender as push_sender
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.context import FLContext
from fedstream.nodes.push.stream_context import StreamContext

__all__ = ["FileStreamer", "StreamContext"]


class FileStreamer:
    """Push ("stream") files: every target takes the same chunks in lockstep; one failure fails all."""

    @staticmethod
    def register_stream_processing(fl_ctx: FLContext, channel: str, topic: str, dest_dir: Optional[str] = None,
                                   stream_done_cb: Optional[Callable[..., Any]] = None,
                                   chunk_consumed_cb: Optional[Callable[..., Any]] = None,
                                   allow_pickle: bool = False, **cb_kwargs: Any) -> None:
        """Accept files pushed on (channel, topic) to this site.

        Files are written as hidden `.part` files in `dest_dir` (default: the system temp dir)
        and renamed to the sender's sanitized base name once verified (a numbered suffix is
        added rather than overwriting). `stream_done_cb(stream_ctx, fl_ctx, **cb_kwargs)` is
        called once per stream, success or not; `chunk_consumed_cb(stream_ctx, fl_ctx,
        **cb_kwargs)` after each chunk is written. Registering (channel, topic) again replaces
        the previous registration. `allow_pickle=True` lets get_object load cloudpickle payloads
        (only for senders you trust). Raises ValueError for bad arguments.
        """
        push_receiver.register_stream_processing(fl_ctx, channel, topic, dest_dir, stream_done_cb,
                                                 chunk_consumed_cb, allow_pickle, **cb_kwargs)

    @staticmethod
    def stream_file(channel: str, topic: str, stream_ctx: Optional[Mapping[str, Any]], targets: List[str],
                    file_name: str, fl_ctx: FLContext, chunk_size: Optional[int] = None,
                    chunk_timeout: Optional[float] = None, optional: bool = False,
                    secure: bool = False) -> tuple[ReturnCode, bool]:
        """Stream a file to every target; block until done.

        Returns (ReturnCode.OK, True) only after every target confirmed the whole file with a
        matching digest; otherwise (a non-OK ReturnCode, False), and the stream is aborted on
        every target. `stream_ctx` values must be JSON-compatible; they arrive in each
        receiver's stream_ctx. `optional=True` logs failures at debug level only.
        `secure=True` encrypts end to end: the stream key is agreed with each target from their
        certified keys (this cell and every target need a kit), so the broker can neither read
        nor alter the data. Raises ValueError for bad arguments (missing file, empty or invalid
        targets, secure=True without a kit, ...).
        """
        if not isinstance(fl_ctx, FLContext):
            raise ValueError(f"fl_ctx must be an FLContext, got {type(fl_ctx).__name__}.")
        result = push_sender.send_file(fl_ctx.get_engine().get_cell(), channel, topic, stream_ctx, targets,
                                       file_name, chunk_size, chunk_timeout, optional=optional, secure=secure)
        return result.rc, result.ok

    stream_object = staticmethod(push_objects.stream_object)  # (..., obj, fl_ctx, ..., serializer=None) -> (rc, ok)
    get_object = staticmethod(push_objects.get_object)  # the object of a stream, inside stream_done_cb

    get_file_name = staticmethod(keys.get_file_name)
    get_file_location = staticmethod(keys.get_file_location)
    get_file_size = staticmethod(keys.get_file_size)
    get_rc = staticmethod(keys.get_rc)
    is_secure = staticmethod(keys.is_secure)
