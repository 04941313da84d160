"""Objects by push: serialized once on the owner, streamed like a file, loaded in stream_done_cb.

Sender (`stream_object`, also `FileStreamer.stream_object`):
1. check fl_ctx and the serializer, serialize the object once into a private spool file
   (nodes/objects/spool.py): the safe container, or cloudpickle on request;
2. push the spool file like any file, with the reserved key KEY_OBJECT (the serializer's name)
   added to stream_ctx so that receivers know the stream carries an object;
3. remove the spool file, whatever the outcome.

Receiver: the stream arrives like any file into the registration's dest_dir. The receiver sets
KEY_ALLOW_PICKLE in every stream_ctx from its registration (overriding anything a sender wrote),
`get_object(stream_ctx)` loads the file inside stream_done_cb, and the receiver removes the file
of an object stream once stream_done_cb returned.
"""

from typing import Any, List, Mapping, Optional

from fedstream.common.filenames import remove_quietly
from fedstream.common.rc import ReturnCode
from fedstream.nodes.context import FLContext
from fedstream.nodes.objects import spool
from fedstream.nodes.push import sender as push_sender
from fedstream.nodes.push import stream_context as keys

REMOTE_NAME = "fedstream-object.fsobj"  # the name the receivers' temporary file is based on


def stream_object(channel: str, topic: str, stream_ctx: Optional[Mapping[str, Any]], targets: List[str], obj: Any,
                  fl_ctx: FLContext, chunk_size: Optional[int] = None, chunk_timeout: Optional[float] = None,
                  optional: bool = False, secure: bool = False,
                  serializer: Optional[str] = None) -> tuple[ReturnCode, bool]:
    """Serialize `obj` once and stream it to every target; return (rc, ok) as stream_file does.

    `serializer`: None (the safe container) or "cloudpickle" (receivers must register with
    allow_pickle=True). Raises ValueError for bad arguments or a value the serializer cannot
    carry (naming its key path).
    """
    if not isinstance(fl_ctx, FLContext):
        raise ValueError(f"fl_ctx must be an FLContext, got {type(fl_ctx).__name__}.")
    push_sender.check_secure(fl_ctx.get_engine().get_cell(), secure)
    if stream_ctx is not None and not isinstance(stream_ctx, Mapping):
        raise ValueError(f"stream_ctx must be a dict, got {type(stream_ctx).__name__}.")
    serializer = spool.check_serializer(serializer)
    ctx = {**(stream_ctx or {}), keys.KEY_OBJECT: serializer}
    path = spool.spool_object(obj, serializer)
    try:
        result = push_sender.send_file(fl_ctx.get_engine().get_cell(), channel, topic, ctx, targets, path,
                                       chunk_size, chunk_timeout, optional=optional, remote_name=REMOTE_NAME,
                                       secure=secure)
    finally:
        remove_quietly(path)
    return result.rc, result.ok


def get_object(stream_ctx: Mapping[str, Any]) -> Any:
    """The object of a received object stream; call it inside stream_done_cb.

    Raises ValueError if the stream carries a plain file, failed, or its file is already gone,
    ObjectFormatError if the file is damaged, PickleRefusedError for a cloudpickle payload
    when the registration did not pass allow_pickle=True (nothing is executed then).
    """
    if not isinstance(stream_ctx, Mapping):
        raise ValueError(f"stream_ctx must be the stream context given to stream_done_cb, got "
                         f"{type(stream_ctx).__name__}.")
    if stream_ctx.get(keys.KEY_OBJECT) is None:
        raise ValueError("This stream carries a file, not an object: it was not sent with stream_object.")
    location = stream_ctx.get(keys.KEY_FILE_LOCATION)
    if location is None:
        raise ValueError(f"The object stream ended with {stream_ctx.get(keys.KEY_RC)}: there is no object.")
    try:
        return spool.load_object(location, stream_ctx.get(keys.KEY_ALLOW_PICKLE) is True)
    except FileNotFoundError:
        raise ValueError("The object's temporary file is gone: call get_object inside stream_done_cb.") from None
    except ValueError as exc:
        raise type(exc)(f"The object from '{stream_ctx.get(keys.KEY_SENDER)}' cannot be loaded: {exc}") from None


def discard_received(stream_ctx: Mapping[str, Any]) -> None:
    """Remove an object stream's received file (the receiver calls this after stream_done_cb)."""
    if stream_ctx.get(keys.KEY_OBJECT) is not None:
        remove_quietly(stream_ctx.get(keys.KEY_FILE_LOCATION))
