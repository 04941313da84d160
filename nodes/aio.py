"""asyncio face of fedstream: awaitable requests and transfers, and callbacks run on an event loop.

The threaded API stays the engine; this module only bridges it to asyncio:

1. `request` awaits a `PendingRequest` (itself awaitable): the Cell's I/O thread resolves its
   future, asyncio sees it through `asyncio.wrap_future`. Cancelling the await forgets the request.
   A request the Cell's connection has no room for yet is tried again after a pause on the loop
   (at most `_ROOM_PAUSE_MAX`), never waited for on the event loop's thread.
2. `download_file`, `download_object`, `stream_file` and `stream_object` run the blocking call
   in a thread of its own (one per transfer, never the event loop's thread) and resolve an
   asyncio future when it returns. Cancelling a download triggers its abort signal and waits
   (bounded) for the download to clean up, so no partial file is left under a final name;
   a push has no abort signal, so cancelling stops the await while the stream runs to its end.
3. `register_request_cb` registers a callback (coroutine function or plain function) that runs
   on a given event loop: the Cell's worker thread submits it with `run_coroutine_threadsafe`
   and waits at most `timeout` seconds for its result, which becomes the reply.
"""

import asyncio
import inspect
import logging
import threading
from typing import Any, Callable, List, Mapping, Optional, TypeVar

from fedstream.common.errors import ConnectionFull, RequestTimeout
from fedstream.common.rc import ReturnCode
from fedstream.common.signal import Signal
from fedstream.nodes.cell import Cell, PendingRequest
from fedstream.nodes.context import FLContext
from fedstream.nodes.message import Message
from fedstream.nodes.pull import download_file as _download_file
from fedstream.nodes.pull import download_object as _download_object
from fedstream.nodes.push import FileStreamer

log = logging.getLogger(__name__)

T = TypeVar("T")
AsyncRequestCallback = Callable[[Message], Any]  # may return a value or an awaitable of one

DEFAULT_CALLBACK_TIMEOUT = 30.0
_ROOM_PAUSE_MIN, _ROOM_PAUSE_MAX = 0.005, 0.1  # seconds between tries of a request the connection has no room for
_CANCEL_WAIT = 10.0  # seconds a cancelled download may take to clean up before the await gives up on it


async def request(cell: Cell, channel: str, topic: str, target: str, payload: Any = None,
                  timeout: float = 10.0, headers: Optional[dict] = None) -> Message:
    """Send a request and await the whole reply Message; raise RequestTimeout after `timeout` seconds.

    Raises the errors of `Cell.request` (UnreachableError, RemoteError, BrokerUnreachableError,
    CellError once the cell stops). While the Cell's connection to the broker has no room, the
    request is tried again within the same `timeout`.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    def send() -> PendingRequest:
        return cell.request_async(channel, topic, target, payload, headers, block=False)

    try:
        pending = send()
    except ConnectionFull:  # the connection is backed up: the loop must not wait for it
        pending = await _send_when_room(send, deadline, timeout, target)
    try:
        return await asyncio.wait_for(pending, max(0.0, deadline - loop.time()))  # type: ignore[arg-type]
    except TimeoutError:
        pending.cancel()
        raise RequestTimeout(f"no reply from '{target}' within {timeout:g} s") from None


async def _send_when_room(send: Callable[[], PendingRequest], deadline: float, timeout: float,
                          target: str) -> PendingRequest:
    """Try again a request the connection had no room for, sleeping on the loop between tries until `deadline`."""
    loop = asyncio.get_running_loop()
    pause = _ROOM_PAUSE_MIN
    while True:
        await asyncio.sleep(max(0.0, min(pause, deadline - loop.time())))
        if loop.time() >= deadline:  # a request sent now would only be dropped unanswered
            raise RequestTimeout(f"the request to '{target}' could not be sent within {timeout:g} s: the "
                                 f"connection to the broker took nothing")
        try:
            return send()
        except ConnectionFull:
            pause = min(2 * pause, _ROOM_PAUSE_MAX)


async def send_request(cell: Cell, channel: str, topic: str, target: str, payload: Any = None,
                       timeout: float = 10.0) -> Any:
    """Send a request and await the reply payload (the asyncio twin of `Cell.send_request`)."""
    return (await request(cell, channel, topic, target, payload, timeout)).payload


async def download_file(from_fqcn: str, ref_id: str, per_request_timeout: float, cell: Cell,
                        location: Optional[str] = None, secure: bool = False, optional: bool = False,
                        abort_signal: Optional[Signal] = None, **options: Any) -> tuple[Optional[str], Optional[str]]:
    """Await `fedstream.nodes.download_file` (same arguments and result); cancelling aborts the download."""
    signal = abort_signal if abort_signal is not None else Signal()
    return await _abortable(lambda: _download_file(from_fqcn, ref_id, per_request_timeout, cell, location, secure,
                                                   optional, signal, **options),
                            signal, f"fedstream-aio-get-{ref_id}")


async def download_object(from_fqcn: str, ref_id: str, per_request_timeout: float, cell: Cell,
                          secure: bool = False, optional: bool = False, abort_signal: Optional[Signal] = None,
                          allow_pickle: bool = False, **options: Any) -> tuple[Optional[str], Any]:
    """Await `fedstream.nodes.download_object` (same arguments and result); cancelling aborts the download."""
    signal = abort_signal if abort_signal is not None else Signal()
    return await _abortable(lambda: _download_object(from_fqcn, ref_id, per_request_timeout, cell, secure, optional,
                                                     signal, allow_pickle, **options),
                            signal, f"fedstream-aio-getobj-{ref_id}")


async def stream_file(channel: str, topic: str, stream_ctx: Optional[Mapping[str, Any]], targets: List[str],
                      file_name: str, fl_ctx: FLContext, **options: Any) -> tuple[ReturnCode, bool]:
    """Await `FileStreamer.stream_file` (same arguments and result).

    A push has no abort signal: cancelling ends the await at once, the stream runs on to its end.
    """
    return await _in_thread(lambda: FileStreamer.stream_file(channel, topic, stream_ctx, targets, file_name, fl_ctx,
                                                             **options), "fedstream-aio-push")


async def stream_object(channel: str, topic: str, stream_ctx: Optional[Mapping[str, Any]], targets: List[str],
                        obj: Any, fl_ctx: FLContext, **options: Any) -> tuple[ReturnCode, bool]:
    """Await `FileStreamer.stream_object` (same arguments and result); cancelling behaves as for stream_file."""
    return await _in_thread(lambda: FileStreamer.stream_object(channel, topic, stream_ctx, targets, obj, fl_ctx,
                                                               **options), "fedstream-aio-push-object")


def register_request_cb(cell: Cell, channel: str, topic: str, cb: AsyncRequestCallback,
                        loop: Optional[asyncio.AbstractEventLoop] = None,
                        timeout: float = DEFAULT_CALLBACK_TIMEOUT) -> None:
    """Run `cb(message)` on `loop` (default: the running loop) for requests on (channel, topic).

    `cb` may be a coroutine function or a plain function; its result is the reply payload, as
    with `Cell.register_request_cb`. A callback that has not finished after `timeout` seconds
    is cancelled and the requester gets an error reply; so does one whose loop is closed.
    """
    if not callable(cb):
        raise ValueError("the request callback must be callable.")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ValueError("register_request_cb needs loop= when called outside a running event loop.") from None
    cell.register_request_cb(channel, topic, _OnLoop(cb, loop, float(timeout)))


class _OnLoop:
    """A Cell request callback that hands the message to an event loop and waits for the answer."""

    def __init__(self, cb: AsyncRequestCallback, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self._cb = cb
        self._loop = loop
        self._timeout = timeout

    async def _call(self, message: Message) -> Any:
        result = self._cb(message)
        if inspect.isawaitable(result):
            result = await result
        return result

    def __call__(self, message: Message) -> Any:
        if self._loop.is_closed():
            raise RuntimeError("the event loop of this callback is closed")
        future = asyncio.run_coroutine_threadsafe(self._call(message), self._loop)
        try:
            return future.result(self._timeout)
        except TimeoutError:
            future.cancel()
            raise TimeoutError(f"the callback did not answer within {self._timeout:g} s") from None


async def _in_thread(call: Callable[[], T], name: str) -> T:
    """Run a blocking call in a thread of its own and await its result."""
    return await asyncio.shield(_start(call, name))


async def _abortable(call: Callable[[], T], signal: Signal, name: str) -> T:
    """Like _in_thread, but a cancelled await triggers `signal` and waits (bounded) for the call to end."""
    future = _start(call, name)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        signal.trigger("cancelled")
        await asyncio.wait([future], timeout=_CANCEL_WAIT)
        if not future.done():
            log.warning("%s did not end within %g s of its cancellation", name, _CANCEL_WAIT)
        raise


def _start(call: Callable[[], T], name: str) -> "asyncio.Future[T]":
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def run() -> None:
        try:
            result, error = call(), None
        except BaseException as exc:  # handed to the awaiting task, which raises it
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the loop is closed: nobody awaits the result any more
            log.debug("%s ended after its event loop closed", name)

    future.add_done_callback(_consume)
    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def _consume(future: asyncio.Future) -> None:
    """Mark the error of a transfer nobody awaits any more (a cancelled await) as seen."""
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future, result: Any, error: Optional[BaseException]) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
