"""fedstream.nodes.aio: awaitable requests and transfers, async callbacks, on a real in-process federation.

Each test runs its coroutine with `asyncio.run` inside a plain test function; the broker and the
cells are real (LocalFederation on free loopback ports).
"""

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fedstream.common import (CellError, ConnectionFull, RemoteError, RequestTimeout, ReturnCode, Signal,
                              UnreachableError)
from fedstream.nodes import Cell, FileDownloader, FileStreamer, FLContext, LocalFederation, aio
from fedstream.nodes.simulate.files import make_file, sha256_of
from tests.procs import REPO, wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fed():
    with LocalFederation(sites=["site-1"]) as federation:
        yield federation


async def _ticker(counter: list) -> None:
    """Counts while it gets the loop: proof that an await did not block the event loop."""
    while True:
        counter[0] += 1
        await asyncio.sleep(0.005)


def test_request_and_pending_request_are_awaitable(fed):
    site = fed.sites["site-1"]
    site.register_request_cb("app", "echo", lambda msg: {"echo": msg.payload})

    async def main():
        reply = await aio.request(fed.server, "app", "echo", "site-1", {"x": 1}, timeout=5)
        direct = await fed.server.request_async("app", "echo", "site-1", "hi")
        payload = await aio.send_request(fed.server, "app", "echo", "site-1", [1, 2], timeout=5)
        return reply.payload, direct.payload, payload

    assert asyncio.run(main()) == ({"echo": {"x": 1}}, {"echo": "hi"}, {"echo": [1, 2]})


def test_request_errors_surface_in_the_await(fed):
    async def main():
        with pytest.raises(UnreachableError):
            await aio.request(fed.server, "app", "echo", "nobody", None, timeout=5)
        with pytest.raises(RemoteError, match="no handler"):
            await aio.request(fed.server, "app", "unknown", "site-1", None, timeout=5)
        with pytest.raises(ValueError, match="timeout"):
            await aio.request(fed.server, "app", "echo", "site-1", None, timeout=0)

    asyncio.run(main())


def test_request_timeout_does_not_block_the_loop(fed):
    release = threading.Event()
    fed.sites["site-1"].register_request_cb("app", "slow", lambda msg: release.wait(10))

    async def main():
        ticks = [0]
        ticker = asyncio.create_task(_ticker(ticks))
        try:
            with pytest.raises(RequestTimeout):
                await aio.request(fed.server, "app", "slow", "site-1", None, timeout=0.5)
        finally:
            ticker.cancel()
            release.set()
        return ticks[0]

    assert asyncio.run(main()) > 1


def test_cancelling_an_await_forgets_the_request(fed):
    release = threading.Event()
    fed.sites["site-1"].register_request_cb("app", "slow", lambda msg: release.wait(10) and "late")

    async def main():
        pending = fed.server.request_async("app", "slow", "site-1", None)
        task = asyncio.ensure_future(_wait(pending))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return pending

    async def _wait(pending):
        return await pending

    pending = asyncio.run(main())
    assert pending.request_id not in fed.server._pending
    release.set()
    # The cell keeps serving after a late reply to a forgotten request.
    fed.sites["site-1"].register_request_cb("app", "echo", lambda msg: msg.payload)
    assert fed.server.send_request("app", "echo", "site-1", "still here", timeout=5) == "still here"


def test_async_callbacks_run_on_the_given_loop(fed):
    seen = {}

    async def main():
        loop_thread = threading.get_ident()

        async def on_request(msg):
            await asyncio.sleep(0)
            seen["thread"] = threading.get_ident()
            return {"double": msg.payload * 2}

        def plain(msg):
            seen["plain_thread"] = threading.get_ident()
            return "plain"

        aio.register_request_cb(fed.sites["site-1"], "app", "double", on_request)
        aio.register_request_cb(fed.sites["site-1"], "app", "plain", plain, loop=asyncio.get_running_loop())
        doubled = await aio.send_request(fed.server, "app", "double", "site-1", 21, timeout=5)
        plain_reply = await aio.send_request(fed.server, "app", "plain", "site-1", None, timeout=5)
        return loop_thread, doubled, plain_reply

    loop_thread, doubled, plain_reply = asyncio.run(main())
    assert doubled == {"double": 42}
    assert plain_reply == "plain"
    assert seen == {"thread": loop_thread, "plain_thread": loop_thread}


def test_an_async_callback_past_its_timeout_is_cancelled_and_answered_with_an_error(fed):
    outcome = {}

    async def main():
        async def stuck(msg):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                outcome["cancelled"] = True
                raise

        aio.register_request_cb(fed.sites["site-1"], "app", "stuck", stuck, timeout=0.3)
        with pytest.raises(RemoteError, match="did not answer within"):
            await aio.request(fed.server, "app", "stuck", "site-1", None, timeout=10)
        await asyncio.sleep(0.05)  # let the loop run the cancellation

    asyncio.run(main())
    assert outcome == {"cancelled": True}


def test_register_outside_a_loop_needs_loop():
    with LocalFederation(sites=["site-1"]) as fed, pytest.raises(ValueError, match="loop="):
        aio.register_request_cb(fed.sites["site-1"], "app", "x", lambda msg: None)


def test_download_file_awaits_without_blocking_the_loop(fed, tmp_path):
    source = tmp_path / "model.bin"
    digest = make_file(str(source), 3 << 20)
    tx = FileDownloader.new_transaction(fed.server, 10, None)
    rid = FileDownloader.add_file(tx, str(source))
    out = tmp_path / "out"
    out.mkdir()

    async def main():
        ticks = [0]
        ticker = asyncio.create_task(_ticker(ticks))
        try:
            result = await aio.download_file("server", rid, 5, fed.sites["site-1"], location=str(out),
                                             chunk_size=64 << 10)
        finally:
            ticker.cancel()
        return result, ticks[0]

    (error, path), ticks = asyncio.run(main())
    FileDownloader.delete_transaction(tx)
    assert error is None and sha256_of(path) == digest
    assert ticks >= 1


def test_cancelling_a_download_aborts_it_and_leaves_no_file(fed, tmp_path):
    source = tmp_path / "big.bin"
    make_file(str(source), 4 << 20)
    tx = FileDownloader.new_transaction(fed.server, 10, None)
    rid = FileDownloader.add_file(tx, str(source))
    out = tmp_path / "out"
    out.mkdir()
    signal = Signal()

    async def main():
        loop = asyncio.get_running_loop()
        started = asyncio.Event()

        def progress(received, total):  # hold the download until the cancellation reached it
            loop.call_soon_threadsafe(started.set)
            signal.wait(10)

        task = asyncio.create_task(aio.download_file("server", rid, 5, fed.sites["site-1"], location=str(out),
                                                     abort_signal=signal, chunk_size=64 << 10, progress_cb=progress))
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    FileDownloader.delete_transaction(tx)
    assert signal.triggered
    assert os.listdir(out) == []


def test_stream_file_and_objects(fed, tmp_path):
    source = tmp_path / "weights.bin"
    digest = make_file(str(source), 2 << 20)
    dest = tmp_path / "dest"
    dest.mkdir()
    site_ctx = FLContext(fed.sites["site-1"])
    received = {}
    done, object_done = threading.Event(), threading.Event()

    def on_file(stream_ctx, fl_ctx):
        received["path"] = FileStreamer.get_file_location(stream_ctx)
        done.set()

    def on_object(stream_ctx, fl_ctx):
        received["object"] = FileStreamer.get_object(stream_ctx)
        object_done.set()

    FileStreamer.register_stream_processing(site_ctx, "app", "file", dest_dir=str(dest), stream_done_cb=on_file)
    FileStreamer.register_stream_processing(site_ctx, "app", "obj", dest_dir=str(dest), stream_done_cb=on_object)
    server_ctx = FLContext(fed.server)
    tx = FileDownloader.new_transaction(fed.server, 10, None)
    rid = FileDownloader.add_object(tx, {"round": 3, "weights": [1.5, 2.5]})

    async def main():
        pushed = await aio.stream_file("app", "file", {"round": 3}, ["site-1"], str(source), server_ctx)
        pushed_obj = await aio.stream_object("app", "obj", None, ["site-1"], {"k": "v"}, server_ctx)
        pulled = await aio.download_object("server", rid, 5, fed.sites["site-1"])
        return pushed, pushed_obj, pulled

    pushed, pushed_obj, pulled = asyncio.run(main())
    FileDownloader.delete_transaction(tx)
    assert pushed == (ReturnCode.OK, True) and pushed_obj == (ReturnCode.OK, True)
    assert done.wait(5) and sha256_of(received["path"]) == digest
    assert object_done.wait(5) and received["object"] == {"k": "v"}
    assert pulled == (None, {"round": 3, "weights": [1.5, 2.5]})


def test_readme_asyncio_example_runs(tmp_path):
    run_readme_example("asyncio", tmp_path)


def run_readme_example(name: str, tmp_path) -> str:
    """Run the README's example marked `<!-- readme-example: NAME -->` in tmp_path; return its stdout."""
    block = (REPO / "README.md").read_text().split(f"<!-- readme-example: {name} -->", 1)[1]
    (tmp_path / "example.py").write_text(block.split("```python\n", 1)[1].split("```", 1)[0])
    ran = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=50)
    assert ran.returncode == 0, ran.stderr[-3000:]
    return ran.stdout


class _Stalled:
    """A cell whose broker is SIGSTOPped and whose backlog another thread filled: it has no room to send.

    The flood goes to a cell of its own ("sink"): queued at the broker for the request's target, it
    would fill that target's queue there and have the request refused once the broker resumes.
    """

    def __init__(self, broker, cell) -> None:
        self.broker, self.cell = broker, cell
        self.stop_flooding = threading.Event()
        self.sent = [0]
        self.flooder = threading.Thread(target=self._flood, daemon=True)

    def _flood(self) -> None:
        try:
            while not self.stop_flooding.is_set():
                self.cell.fire_and_forget("test", "flood", "sink", b"x" * 1024)
                self.sent[0] += 1
        except CellError:  # the cell stopped, or the stall outlasted the Cell's wait for room
            pass

    def __enter__(self) -> "_Stalled":
        self.broker.signal(signal.SIGSTOP)  # the broker reads nothing: kernel buffers, then the backlog fill up
        self.flooder.start()

        def stalled() -> bool:
            before = self.sent[0]
            time.sleep(0.5)
            return self.sent[0] == before

        try:
            wait_until(stalled, 30)
        except BaseException:
            self.stop_flooding.set()
            self.__exit__()
            raise
        self.stop_flooding.set()  # the flooder sends one more once there is room, then ends
        return self

    def resume(self) -> None:
        self.broker.signal(signal.SIGCONT)

    def __exit__(self, *exc_info: object) -> None:
        self.resume()
        self.flooder.join(15)


def test_a_request_waiting_for_room_on_the_connection_does_not_block_the_loop(procs):
    broker, address = procs.broker("--node-timeout", "600")
    with Cell("sender", address, heartbeat_interval=60) as cell, Cell("sink", address, heartbeat_interval=60), \
            Cell("target", address, heartbeat_interval=60) as target:
        target.register_request_cb("test", "echo", lambda msg: {"echo": msg.payload})
        with _Stalled(broker, cell) as stalled:
            with pytest.raises(ConnectionFull):
                cell.request_async("test", "echo", "target", "now", block=False)

            async def main():
                ticks = [0]
                ticker = asyncio.create_task(_ticker(ticks))
                request = asyncio.create_task(aio.request(cell, "test", "echo", "target", "hi", timeout=60))
                await asyncio.sleep(1.0)
                # The loop ran meanwhile, and the request still waits for room: on the loop's thread it
                # would have held the loop until the Cell gave up on the connection, 10 s later.
                assert ticks[0] > 10 and not request.done()
                stalled.resume()
                reply = await asyncio.wait_for(request, 30)
                ticker.cancel()
                return reply.payload

            assert asyncio.run(main()) == {"echo": "hi"}


def test_a_request_that_finds_no_room_in_time_times_out_and_the_cell_recovers(procs):
    broker, address = procs.broker("--node-timeout", "600")
    with Cell("sender", address, heartbeat_interval=60) as cell, Cell("sink", address, heartbeat_interval=60), \
            Cell("target", address, heartbeat_interval=60) as target:
        target.register_request_cb("test", "echo", lambda msg: {"echo": msg.payload})
        with _Stalled(broker, cell):
            async def stalled_request():
                return await aio.request(cell, "test", "echo", "target", "late", timeout=1)

            with pytest.raises(RequestTimeout, match="could not be sent within 1 s"):
                asyncio.run(stalled_request())

        async def later_request():
            return (await aio.request(cell, "test", "echo", "target", "again", timeout=30)).payload

        assert asyncio.run(later_request()) == {"echo": "again"}
