"""A zmq.asyncio.Context handed to a Broker or a Cell works (they use a synchronous shadow of it)."""

import asyncio
import os
import threading

import pytest
import zmq
import zmq.asyncio

from fedstream.broker import Broker
from fedstream.common import ReturnCode
from fedstream.nodes import Cell, FileStreamer, FLContext, aio

pytestmark = pytest.mark.timeout(60)


def test_an_asyncio_context_works_for_broker_and_cells(tmp_path):
    source = tmp_path / "f.bin"
    source.write_bytes(os.urandom(300_000))
    dest = tmp_path / "dest"
    dest.mkdir()
    done = threading.Event()
    ctx = zmq.asyncio.Context()
    try:
        with Broker(bind="tcp://127.0.0.1:0", context=ctx) as broker, \
                Cell("server", broker.address, context=ctx) as server, \
                Cell("site-1", broker.address, context=ctx) as site:
            site.register_request_cb("app", "echo", lambda msg: msg.payload)
            assert server.send_request("app", "echo", "site-1", "sync", timeout=5) == "sync"

            async def main():
                return await aio.send_request(server, "app", "echo", "site-1", "async", timeout=5)

            assert asyncio.run(main()) == "async"
            # push opens its own sockets on the cells' context: they are synchronous too
            FileStreamer.register_stream_processing(FLContext(site), "app", "f", dest_dir=str(dest),
                                                    stream_done_cb=lambda stream_ctx, fl_ctx: done.set())
            assert FileStreamer.stream_file("app", "f", None, ["site-1"], str(source), FLContext(server)) == \
                (ReturnCode.OK, True)
            assert done.wait(10)
            assert (dest / "f.bin").read_bytes() == source.read_bytes()
    finally:
        ctx.term()


def test_a_cell_started_inside_a_running_loop_with_an_asyncio_context():
    async def main():
        ctx = zmq.asyncio.Context()
        try:
            with Broker(bind="tcp://127.0.0.1:0", context=ctx) as broker, \
                    Cell("server", broker.address, context=ctx) as server, \
                    Cell("site-1", broker.address, context=ctx) as site:
                aio.register_request_cb(site, "app", "hello", _hello)
                return await aio.send_request(server, "app", "hello", "site-1", "you", timeout=5)
        finally:
            ctx.term()

    assert asyncio.run(main()) == "hello you"


async def _hello(msg):
    return f"hello {msg.payload}"


@pytest.mark.parametrize("factory", [lambda ctx: Cell("site-1", "tcp://127.0.0.1:1", context=ctx),
                                     lambda ctx: Broker(bind="tcp://127.0.0.1:0", context=ctx)])
def test_something_else_as_context_is_refused_at_once(factory):
    with pytest.raises(ValueError, match="context must be a zmq.Context, got str"):
        factory("not a context")
