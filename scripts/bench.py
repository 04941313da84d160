#!/usr/bin/env python3
"""Benchmark fedstream against bare-ZeroMQ baselines run in the same process tree.

Every party is its own process on 127.0.0.1. Baselines do the same file read and write as
fedstream (same source file, same destination file system):

  bare relay N   DEALER -> ROUTER -> DEALER through a relay process, 8-chunk credit window,
                 the sender reading each chunk once and sending N unicast copies;
  bare fan-out N one XPUB (NODROP) feeding N SUB processes directly.

fedstream runs: pull by 1 and N recipients, push to 1 and N recipients, through a
`fedstream broker` process. Printed: MB/s, ratios to the matching baseline, peak RSS of
every process, and what the push owner sent over the network relative to the file size.
Per run also: how many of the machine's cores were busy while it moved its data (and the
kernel's share), and the CPU each process used meanwhile, from /proc sampled every 50 ms: a
run that kept every core busy was bound by the CPU, and its processes' CPU tells where it went.

--repeat K runs the whole plan K times, the cases interleaved (round 1: every case, round 2:
every case, ...), and prints each run's median and min-max over the rounds, and each ratio's
median and min-max, the ratio taken per round between runs of the same round.

--small measures the cost per file instead of bandwidth: one recipient pulls --files (1000)
files of 16 KiB shared in one transaction, one `download_file` after the other; the owner
pushes --push-files (200) files of 64 KiB one after the other (`send_file`); a Cell answers
--round-trips (2000) small requests. Baselines: the same exchanges with bare pyzmq through the
relay (DEALER -> ROUTER relay -> DEALER): per file a request and a reply carrying the data read
from the file, written to a new file; per pushed file the data, written, then an acknowledgement;
bare echo round trips. Every file is checked by name and sha256. "bare threaded round trips" are
the bare echo round trips with a Cell's threads and nothing else of fedstream: the caller sends
each request on the DEALER itself (under a lock) and gets the reply in a Future from an I/O thread
that reads the DEALER; the echo's I/O thread queues each request for one of 8 worker threads,
which sends the reply. Cell round trips over these tell what fedstream costs beyond its thread
layout. "cell inline round trips" answer on the echo Cell's I/O thread
(`register_request_cb(..., inline=True)`), which a handler that never blocks may ask for.

--rtt MS[,MS...] runs bare relay 1, pull 1 and push 1 with every node (and bare peer) reaching
the broker (relay) through a delay proxy of this script: an asyncio TCP forwarder that holds
each read for MS/2 each way, in order, without a bandwidth limit. Each of the broker's three
ports has its own proxy, and the broker is told (--advertise-fanout-in/-out) to announce the
proxied fan-out ports, so pushes cross the proxies too. Printed: a table per round trip, and
the bytes each proxy forwarded.

    python scripts/bench.py                        # 1 GiB, 4 recipients
    python scripts/bench.py --quick                # 64 MiB smoke run
    python scripts/bench.py --secure               # also pull 1 and push N with kits (CURVE), and their ratios
    python scripts/bench.py --repeat 3             # three interleaved rounds: medians and ranges
    python scripts/bench.py --small --repeat 3     # per-file cost and request/reply against bare pyzmq
    python scripts/bench.py --quick --rtt 0,20,50  # pull 1 and push 1 at 0, 20 and 50 ms round trips
"""

import argparse
import asyncio
import bisect
import hashlib
import itertools
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter, deque
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from fedstream.common.digest import file_digest  # noqa: E402
from fedstream.common.sizes import format_size, parse_size  # noqa: E402
from fedstream.nodes.simulate.procstats import cpu_ticks, io_counters, machine_cpu_ticks, peak_rss  # noqa: E402

CREDIT_WINDOW = 8  # chunks, as in DESIGN.md's baseline
MB = 1_000_000
PULL_FILE_SIZE = 16 << 10  # --small: the size of each pulled file
PUSH_FILE_SIZE = 64 << 10  # --small: the size of each pushed file
PING_SIZE = 64  # --small: the payload of a request/reply round trip
PING_WARMUP = 50  # round trips before the clock starts
PROXY_READ = 256 << 10  # --rtt: bytes the delay proxy reads at once
PROXY_HELD = 256  # --rtt: reads held per direction (at most 64 MiB waiting for their time)


# --------------------------------------------------------------------------------------------
# child process roles
# --------------------------------------------------------------------------------------------
def kit_of(args, name: str) -> Optional[str]:
    """The kit folder of `name` in a secure run (--kits is the provisioned project), else None."""
    return os.path.join(args.kits, name) if args.kits else None


def report(**fields) -> None:
    """Print the result line a coordinator reads, with this process's peak RSS and I/O."""
    fields.update(rss=peak_rss(), io=io_counters())
    print("RESULT " + json.dumps(fields), flush=True)


def wait_for_term() -> None:
    """Sleep until SIGTERM/SIGINT, then report and exit."""
    signal.signal(signal.SIGTERM, lambda *_: (report(), sys.exit(0)))
    signal.signal(signal.SIGINT, lambda *_: (report(), sys.exit(0)))
    while True:
        time.sleep(1)


def file_chunks(path: str, chunk_size: int) -> Iterator[tuple[bytes, bytes]]:
    """(offset header, data) for each chunk of a file, read once, then the end marker (offset -1)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while data := os.read(fd, chunk_size):
            yield struct.pack("!q", offset), data
            offset += len(data)
    finally:
        os.close(fd)
    yield struct.pack("!q", -1), b""


def role_relay(_args) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    print(f"PORT {port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (report(), os._exit(0)))
    waiting: dict = {}  # messages for peers that have not said hello yet
    while True:
        sender, target, *rest = router.recv_multipart(copy=False)
        if target.bytes == b"relay":
            for frames in waiting.pop(sender.bytes, []):
                router.send_multipart(frames, copy=False)
            continue
        frames = [target, sender, *rest]
        try:
            router.send_multipart(frames, copy=False)
        except zmq.ZMQError:
            waiting.setdefault(target.bytes, []).append(frames)


def role_relay_recv(args) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, args.name.encode())
    sock.connect(args.connect)
    fd = os.open(args.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(CREDIT_WINDOW):
        sock.send_multipart([b"send", b"credit"])
    started, received = None, 0
    while True:
        _sender, header, data = sock.recv_multipart(copy=False)
        if started is None:
            started = time.time()
        (offset,) = struct.unpack("!q", header.buffer)
        if offset < 0:
            break
        os.pwrite(fd, data.buffer, offset)
        received += len(data)
        sock.send_multipart([b"send", b"credit"])
    os.close(fd)
    report(start=started, end=time.time(), bytes=received)


def role_relay_send(args) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"send")
    sock.connect(args.connect)
    sock.send_multipart([b"relay", b"hello"])
    targets = [t.encode() for t in args.targets.split(",")]
    credit = dict.fromkeys(targets, 0)
    while min(credit.values()) < CREDIT_WINDOW:  # every receiver is connected and ready
        source, _ = sock.recv_multipart()
        credit[source] += 1
    started = time.time()
    size = 0
    for header, data in file_chunks(args.file, args.chunk_size):
        for target in targets:
            while credit[target] == 0:
                source, _ = sock.recv_multipart()
                credit[source] += 1
            credit[target] -= 1
            sock.send_multipart([target, header, data], copy=False)
        size += len(data)
    report(start=started, end=time.time(), bytes=size)
    sys.stdin.read()  # stay connected until the coordinator saw every receiver finish


def role_fan_pub(args) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    pub.setsockopt(zmq.SNDHWM, 16)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    print(f"PORT {port}", flush=True)
    for _ in range(args.count):  # one subscription message per subscriber
        pub.recv()
    started = time.time()
    size = 0
    for header, data in file_chunks(args.file, args.chunk_size):
        pub.send_multipart([b"s", header, data], copy=False)
        size += len(data)
    report(start=started, end=time.time(), bytes=size)
    sys.stdin.read()  # stay connected until the coordinator saw every subscriber finish


def role_fan_sub(args) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 16)
    sub.connect(args.connect)
    sub.setsockopt(zmq.SUBSCRIBE, b"s")
    fd = os.open(args.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    received = 0
    while True:
        _topic, header, data = sub.recv_multipart(copy=False)
        (offset,) = struct.unpack("!q", header.buffer)
        if offset < 0:
            break
        os.pwrite(fd, data.buffer, offset)
        received += len(data)
    os.close(fd)
    report(end=time.time(), bytes=received)


def role_pull_owner(args) -> None:
    import threading

    from fedstream.nodes import Cell, FileDownloader

    finished = []
    all_done = threading.Event()

    def downloaded(ref_id, to_site, status, file_name):
        finished.append((to_site, str(status)))
        if len(finished) == args.count:
            all_done.set()

    with Cell("server", args.connect, kit=kit_of(args, "server")) as cell:
        tx = FileDownloader.new_transaction(cell, timeout=60.0, timeout_cb=lambda *a, **k: all_done.set())
        ref_id = FileDownloader.add_file(tx, args.file, file_downloaded_cb=downloaded)
        print(f"RID {ref_id}", flush=True)
        all_done.wait(3600)
        FileDownloader.delete_transaction(tx)
    report(statuses=finished)


def role_pull_recv(args) -> None:
    from fedstream.nodes import Cell, download_file

    with Cell(args.name, args.connect, kit=kit_of(args, args.name)) as cell:
        started = time.time()
        error, path = download_file("server", args.ref, 30.0, cell, location=args.dest)
        ended = time.time()
    report(start=started, end=ended, error=error, path=path)


def role_push_recv(args) -> None:
    import threading

    from fedstream.nodes import Cell, FileStreamer, FLContext

    done = threading.Event()
    outcome: dict = {}

    def stream_done(stream_ctx, fl_ctx):
        outcome.update(end=time.time(), rc=str(FileStreamer.get_rc(stream_ctx)),
                       path=FileStreamer.get_file_location(stream_ctx))
        done.set()

    with Cell(args.name, args.connect, kit=kit_of(args, args.name)) as cell:
        FileStreamer.register_stream_processing(FLContext(cell), "bench", "file", dest_dir=args.dest,
                                                stream_done_cb=stream_done)
        print("READY", flush=True)
        done.wait(3600)
    report(**outcome)


def role_push_owner(args) -> None:
    from fedstream.nodes import Cell
    from fedstream.nodes.push.sender import send_file  # what FileStreamer.stream_file runs, with its byte counts

    with Cell("server", args.connect, kit=kit_of(args, "server")) as cell:
        read_before = io_counters().get("rchar", 0)
        started = time.time()
        result = send_file(cell, "bench", "file", {}, args.targets.split(","), args.file, args.chunk_size)
        ended = time.time()
        read = io_counters().get("rchar", 0) - read_before
    report(start=started, end=ended, rc=str(result.rc), ok=result.ok, error=result.error,
           published=result.bytes_published, repaired=result.bytes_repaired, read=read)

# -- small files and round trips (--small) ---------------------------------------------------
def names_in(path: str) -> list[str]:
    """The JSON list of names (file names or RIDs) the coordinator or an owner wrote to `path`."""
    with open(path) as names:
        return json.load(names)


def write_copy(dest: str, name: str, data) -> None:
    """Write `data` to a new file `name` in `dest` (what the bare receivers do per file)."""
    with open(os.path.join(dest, name), "wb") as out:
        out.write(data)


def role_pull_files_owner(args) -> None:
    from fedstream.nodes import Cell, FileDownloader

    names = names_in(args.list)
    finished = []
    all_done = threading.Event()

    def downloaded(ref_id, to_site, status, file_name):
        finished.append(str(status))
        if len(finished) == len(names):
            all_done.set()

    with Cell("server", args.connect, kit=kit_of(args, "server")) as cell:
        tx = FileDownloader.new_transaction(cell, timeout=60.0, timeout_cb=lambda *a, **k: all_done.set())
        refs = [FileDownloader.add_file(tx, os.path.join(args.file, name), file_downloaded_cb=downloaded)
                for name in names]
        with open(args.ref, "w") as out:
            json.dump(refs, out)
        print("RIDS", flush=True)
        all_done.wait(3600)
        FileDownloader.delete_transaction(tx)
    report(statuses=sorted(set(finished)), downloaded=len(finished))


def role_pull_files_recv(args) -> None:
    from fedstream.nodes import Cell, download_file

    refs = names_in(args.ref)
    errors = []
    with Cell(args.name, args.connect, kit=kit_of(args, args.name)) as cell:
        started = time.time()
        for ref in refs:
            error, _path = download_file("server", ref, 30.0, cell, location=args.dest)
            if error:
                errors.append(error)
        ended = time.time()
    report(start=started, end=ended, items=len(refs) - len(errors), errors=errors[:3], failed=len(errors))


def role_push_files_recv(args) -> None:
    from fedstream.nodes import Cell, FileStreamer, FLContext

    done = threading.Event()
    outcome: dict = {"ok": 0, "failed": []}

    def stream_done(stream_ctx, fl_ctx):
        rc = str(FileStreamer.get_rc(stream_ctx))
        if FileStreamer.get_file_location(stream_ctx):
            outcome["ok"] += 1
        else:
            outcome["failed"].append(rc)
        if outcome["ok"] + len(outcome["failed"]) == args.count:
            outcome["end"] = time.time()
            done.set()

    with Cell(args.name, args.connect, kit=kit_of(args, args.name)) as cell:
        FileStreamer.register_stream_processing(FLContext(cell), "bench", "file", dest_dir=args.dest,
                                                stream_done_cb=stream_done)
        print("READY", flush=True)
        done.wait(3600)
    report(**outcome)


def role_push_files_owner(args) -> None:
    from fedstream.nodes import Cell
    from fedstream.nodes.push.sender import send_file

    errors = []
    with Cell("server", args.connect, kit=kit_of(args, "server")) as cell:
        started = time.time()
        for name in names_in(args.list):
            result = send_file(cell, "bench", "file", {}, [args.targets], os.path.join(args.file, name))
            if not result.ok:
                errors.append(f"{result.rc}: {result.error}")
        ended = time.time()
    report(start=started, end=ended, errors=errors[:3], failed=len(errors))


def bare_peer(args, identity: bytes) -> zmq.Socket:
    """A DEALER named `identity` connected to the bare relay, which it greeted (so messages to it flow)."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(args.connect)
    sock.send_multipart([b"relay", b"hello"])
    return sock


def role_bare_files_owner(args) -> None:
    sock = bare_peer(args, b"owner")
    print("READY", flush=True)
    while True:  # until the coordinator stops it
        sender, name = sock.recv_multipart()
        with open(os.path.join(args.file, name.decode()), "rb") as source:
            data = source.read()
        sock.send_multipart([sender, name, data], copy=False)


def role_bare_files_recv(args) -> None:
    sock = bare_peer(args, args.name.encode())
    names = names_in(args.list)
    started = time.time()
    for name in names:
        sock.send_multipart([b"owner", name.encode()])
        _sender, got, data = sock.recv_multipart(copy=False)
        write_copy(args.dest, got.bytes.decode(), data.buffer)
    report(start=started, end=time.time(), items=len(names))


def role_bare_push_send(args) -> None:
    sock = bare_peer(args, b"send")
    target = args.targets.encode()
    sock.recv_multipart()  # the receiver is connected and ready
    names = names_in(args.list)
    started = time.time()
    for name in names:
        with open(os.path.join(args.file, name), "rb") as source:
            data = source.read()
        sock.send_multipart([target, name.encode(), data], copy=False)
        sock.recv_multipart()  # the receiver wrote it
    report(start=started, end=time.time(), items=len(names))
    sys.stdin.read()


def role_bare_push_recv(args) -> None:
    sock = bare_peer(args, args.name.encode())
    sock.send_multipart([b"send", b"ready"])
    for _ in range(args.count):
        sender, name, data = sock.recv_multipart(copy=False)
        write_copy(args.dest, name.bytes.decode(), data.buffer)
        sock.send_multipart([sender, b"ok"])
    report(items=args.count)
    sys.stdin.read()  # stay connected until the sender saw the last acknowledgement


def role_bare_echo(args) -> None:
    sock = bare_peer(args, b"echo")
    print("READY", flush=True)
    while True:  # until the coordinator stops it
        sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def role_bare_ping(args) -> None:
    sock = bare_peer(args, b"ping")
    payload = os.urandom(PING_SIZE)
    ok = 0
    for number in range(PING_WARMUP + args.count):
        if number == PING_WARMUP:
            started = time.time()
        sock.send_multipart([b"echo", payload])
        _sender, answer = sock.recv_multipart()
        ok += answer == payload
    report(start=started, end=time.time(), items=ok - PING_WARMUP)


class BareConnection:
    """A Cell's thread layout, bare: any thread sends on the DEALER under a lock; an I/O thread reads it.

    The I/O thread sleeps polling the DEALER's descriptor and an inproc wake-up socket; a sender that
    finds input waiting after its send (which may have consumed the descriptor's signal) wakes it.
    """

    def __init__(self, sock: zmq.Socket, on_message: Callable[[list], None]) -> None:
        self.sock = sock
        self.on_message = on_message
        self.lock = threading.Lock()
        self.wake_pull = sock.context.socket(zmq.PULL)
        self.wake_pull.bind("inproc://wake")
        self.wake_push = sock.context.socket(zmq.PUSH)
        self.wake_push.connect("inproc://wake")
        self.asleep = False
        threading.Thread(target=self.read_loop, daemon=True).start()

    def send(self, frames: list) -> None:
        with self.lock:
            self.sock.send_multipart(frames, copy=False)
            wake = self.asleep and self.sock.get(zmq.EVENTS) & zmq.POLLIN
            if wake:
                self.asleep = False
                self.wake_push.send(b"")

    def read_loop(self) -> None:
        items = [(self.sock.get(zmq.FD), zmq.POLLIN), (self.wake_pull, zmq.POLLIN)]
        while True:  # until the process ends
            with self.lock:
                ready = self.sock.get(zmq.EVENTS) & zmq.POLLIN
                frames = self.sock.recv_multipart(copy=False) if ready else None
                self.asleep = not ready
            if frames is not None:
                self.on_message(frames)
                continue
            for ready_sock, _ in zmq.zmq_poll(items):
                if ready_sock is self.wake_pull:
                    self.wake_pull.recv()


def role_bare_threaded_echo(args) -> None:
    """bare-echo with a Cell's threads: the I/O thread queues each request for a pool thread, which sends the reply."""
    sock = bare_peer(args, b"echo")
    requests: queue.SimpleQueue = queue.SimpleQueue()
    connection = BareConnection(sock, requests.put)

    def worker() -> None:
        while True:
            connection.send(requests.get())

    for _ in range(8):  # a Cell's default number of workers
        threading.Thread(target=worker, daemon=True).start()
    print("READY", flush=True)
    wait_for_term()


def role_bare_threaded_ping(args) -> None:
    """bare-ping with a Cell's threads: the caller sends each request itself, its reply comes back in a Future."""
    sock = bare_peer(args, b"ping")
    waiting: deque[Future] = deque()  # one request in flight, so replies come in order
    connection = BareConnection(sock, lambda frames: waiting.popleft().set_result(frames))
    payload = os.urandom(PING_SIZE)
    ok = 0
    for number in range(PING_WARMUP + args.count):
        if number == PING_WARMUP:
            started = time.time()
        reply: Future = Future()
        waiting.append(reply)
        connection.send([b"echo", payload])
        _sender, answer = reply.result(10.0)
        ok += answer.bytes == payload
    report(start=started, end=time.time(), items=ok - PING_WARMUP)


def role_cell_echo(args, inline: bool = False) -> None:
    from fedstream.nodes import Cell

    with Cell(args.name, args.connect, kit=kit_of(args, args.name)) as cell:
        cell.register_request_cb("bench", "echo", lambda message: message.payload, inline=inline)
        print("READY", flush=True)
        wait_for_term()


def role_cell_ping(args) -> None:
    from fedstream.nodes import Cell

    payload = os.urandom(PING_SIZE)
    ok = 0
    with Cell("server", args.connect, kit=kit_of(args, "server")) as cell:
        for number in range(PING_WARMUP + args.count):
            if number == PING_WARMUP:
                started = time.time()
            ok += cell.request("bench", "echo", args.targets, payload, timeout=10.0).payload == payload
        ended = time.time()
    report(start=started, end=ended, items=ok - PING_WARMUP)


# -- delay proxy (--rtt) -----------------------------------------------------------------------
async def delay_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float,
                     forwarded: Counter) -> None:
    """Copy bytes from `reader` to `writer`, each read delivered `delay` s after it arrived, in order.

    Nothing limits the bandwidth but the proxy's own speed; at most PROXY_HELD reads wait, then
    reading pauses (TCP pushes back on the sender). When either side ends, the writer is closed.
    """
    loop = asyncio.get_running_loop()
    held: "asyncio.Queue[Optional[tuple[float, bytes]]]" = asyncio.Queue(PROXY_HELD)

    async def deliver() -> None:
        broken = False
        while (item := await held.get()) is not None:
            if broken:  # keep taking reads so that the reading side never waits forever
                continue
            due, data = item
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionError, OSError):
                broken = True
            else:
                forwarded["bytes"] += len(data)

    writer.transport.set_write_buffer_limits(high=PROXY_READ * 4)
    delivery = asyncio.create_task(deliver())
    try:
        while data := await reader.read(PROXY_READ):
            await held.put((loop.time() + delay, data))
    except (ConnectionError, OSError):
        pass
    await held.put(None)
    await delivery
    writer.close()


def role_delay_proxy(args) -> None:
    """Listen on a free port; forward each connection to --connect, delaying each direction by --delay ms."""
    host, port = args.connect.removeprefix("tcp://").rsplit(":", 1)
    delay = float(args.delay) / 1000
    forwarded: Counter = Counter()

    async def link(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host, int(port), limit=PROXY_READ)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(delay_pipe(client_reader, upstream_writer, delay, forwarded),
                             delay_pipe(upstream_reader, client_writer, delay, forwarded))

    async def serve() -> None:
        server = await asyncio.start_server(link, "127.0.0.1", 0, limit=PROXY_READ)
        print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
        await server.serve_forever()

    signal.signal(signal.SIGTERM, lambda *_: (report(forwarded=forwarded["bytes"]), os._exit(0)))
    asyncio.run(serve())


ROLES = {
    "relay": role_relay, "relay-recv": role_relay_recv, "relay-send": role_relay_send,
    "fan-pub": role_fan_pub, "fan-sub": role_fan_sub,
    "pull-owner": role_pull_owner, "pull-recv": role_pull_recv,
    "push-owner": role_push_owner, "push-recv": role_push_recv,
    "pull-files-owner": role_pull_files_owner, "pull-files-recv": role_pull_files_recv,
    "push-files-owner": role_push_files_owner, "push-files-recv": role_push_files_recv,
    "bare-files-owner": role_bare_files_owner, "bare-files-recv": role_bare_files_recv,
    "bare-push-send": role_bare_push_send, "bare-push-recv": role_bare_push_recv,
    "bare-echo": role_bare_echo, "bare-ping": role_bare_ping, "cell-echo": role_cell_echo,
    "cell-echo-inline": lambda args: role_cell_echo(args, inline=True), "cell-ping": role_cell_ping,
    "bare-threaded-echo": role_bare_threaded_echo, "bare-threaded-ping": role_bare_threaded_ping,
    "delay-proxy": role_delay_proxy,
}


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """`count` distinct tcp ports free on 127.0.0.1 just now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class Child:
    """A role running in its own process."""

    def __init__(self, label: str, role: str, *args: str, meter: "CpuMeter", cmd: Optional[list] = None,
                 log_dir: Optional[Path] = None) -> None:
        self.label = label
        self.meter = meter
        argv = cmd or [sys.executable, __file__, "--role", role, *args]
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"{label}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True, cwd=REPO)
        self.result: dict = {}
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        meter.watch(self)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line)
        self.lines.put(None)  # end of output

    def line(self, prefix: str, timeout: float = 60.0) -> str:
        """The rest of the next stdout line starting with `prefix`; RuntimeError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"{self.label} did not print {prefix!r} (exit code {self.proc.poll()}); "
                           f"its stderr: {self.log_path.read_text()[-2000:]}")

    def finish(self, timeout: float = 600.0) -> dict:
        """Wait for the result line, tell the process it may exit, and wait for that."""
        self.result = json.loads(self.line("RESULT ", timeout))
        self.release()
        return self.result

    def result_line(self, timeout: float = 600.0) -> dict:
        """Wait for the result line; the process stays up until release()."""
        self.result = json.loads(self.line("RESULT ", timeout))
        return self.result

    def release(self) -> None:
        """Close the process's stdin (senders wait for that) and wait for it to exit."""
        self.meter.retire(self)
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(30)

    def stop(self) -> dict:
        """Read a long-running process's peak RSS, terminate it, and keep what it reported on its way out."""
        rss = peak_rss(self.proc.pid)
        self.meter.retire(self)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        try:
            reported = json.loads(self.line("RESULT ", 2))
        except (RuntimeError, ValueError):
            reported = {}
        self.result = {**reported, "rss": rss}
        return self.result

    def kill(self) -> None:
        self.meter.forget(self)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Run:
    """One measured transfer: its processes, outcome and figures."""

    def __init__(self, name: str, recipients: int, log_dir: Path, meter: "CpuMeter") -> None:
        self.name = name
        self.meter = meter
        self.recipients = recipients
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.seconds = 0.0
        self.mbps = 0.0
        self.items = 0  # --small: files moved or round trips made
        self.rate = 0.0  # ... per second
        self.ms = 0.0  # ... milliseconds each
        self.verified = False
        self.cores: Optional[tuple[float, float]] = None  # cores busy during the transfer, kernel's share of it
        self.cpu_during: dict[str, float] = {}  # process label -> CPU seconds it used during the transfer
        self.notes: list[str] = []

    def progress(self) -> str:
        """What the coordinator prints when the run ended."""
        if self.items:
            return f"{self.rate:.0f}/s, {self.ms:.3f} ms each, in {self.seconds:.2f} s, verified: {self.verified}"
        return f"{self.mbps:.0f} MB/s in {self.seconds:.2f} s, verified: {self.verified}"

    def start(self, label: str, role: str, *args: str, cmd: Optional[list] = None) -> Child:
        child = Child(label, role, *args, meter=self.meter, cmd=cmd, log_dir=self.log_dir)
        self.children.append(child)
        return child

    def close(self) -> None:
        proxies = [c for c in self.children if c.label.startswith("proxy") and c.proc.poll() is None]
        for proxy in proxies:
            proxy.stop()  # its peak RSS is shown with the run's
        if proxies:
            self.notes.append("forwarded by the delay proxies: " + ", ".join(
                f"{p.label} {p.result.get('forwarded', 0) / MB:.0f} MB" for p in proxies))
        for child in self.children:
            child.kill()

    def max_rss(self) -> int:
        """The largest peak RSS of the run's processes, the bench's delay proxies left out."""
        return max((c.result.get("rss") or 0) for c in self.children if not c.label.startswith("proxy"))


def interpolate(samples: "Sequence[tuple[float, int]]", at: float) -> float:
    """The value of a counter sampled as (time, value) at time `at`: linear between samples, flat beyond them."""
    if at <= samples[0][0]:
        return samples[0][1]
    if at >= samples[-1][0]:
        return samples[-1][1]
    after = bisect.bisect_right(samples, at, key=lambda sample: sample[0])
    (t0, v0), (t1, v1) = samples[after - 1], samples[after]
    return v0 + (v1 - v0) * (at - t0) / (t1 - t0)


def around(samples: "Sequence[tuple]", start: float, end: float) -> list:
    """The samples (time first) from the last one at or before `start` to the first one at or after `end`."""
    first = max(0, bisect.bisect_right(samples, start, key=lambda sample: sample[0]) - 1)
    last = bisect.bisect_left(samples, end, key=lambda sample: sample[0])
    return list(itertools.islice(samples, first, last + 1))


class CpuMeter:
    """CPU use during a run, from /proc: the machine's cores and each child process, sampled in a thread.

    A child is sampled once more when it is told to exit or stopped (its work is over then), so
    the end of a run needs no guess; its start is interpolated between two samples.
    """

    PERIOD = 0.05  # seconds between two samples (the kernel counts in 10 ms ticks)
    MIN_SPAN = 0.1  # seconds: a shorter run gets no figures
    KEPT = 72_000  # machine samples kept: an hour's worth

    def __init__(self) -> None:
        self._clock_ticks = os.sysconf("SC_CLK_TCK")
        self._lock = threading.Lock()
        # (time.time(), busy, kernel, total) in clock ticks summed over all cores
        self._machine: "deque[tuple[float, int, int, int]]" = deque(maxlen=self.KEPT)
        self._samples: "dict[Child, list[tuple[float, int]]]" = {}  # (time.time(), user + system ticks)
        self._live: "set[Child]" = set()

    def start(self) -> "CpuMeter":
        threading.Thread(target=self._sample_forever, daemon=True).start()
        return self

    def watch(self, child: "Child") -> None:
        with self._lock:
            self._samples[child] = []
            self._live.add(child)

    def retire(self, child: "Child") -> None:
        """Sample `child` a last time: it is about to exit."""
        self._sample(child, last=True)

    def forget(self, child: "Child") -> None:
        """Stop sampling `child` and drop its samples (it is killed, its pid may be reused)."""
        with self._lock:
            self._live.discard(child)
            self._samples.pop(child, None)

    def _sample(self, child: "Child", last: bool = False) -> None:
        ticks = cpu_ticks(child.proc.pid)
        now = time.time()
        with self._lock:
            series = self._samples.get(child)
            # a sample the sampling thread took before a later one was stored comes too late: drop it
            if ticks is not None and child in self._live and series is not None \
                    and (not series or series[-1][0] < now):
                series.append((now, ticks))
            if last:
                self._live.discard(child)

    def _sample_forever(self) -> None:
        while (ticks := machine_cpu_ticks()) is not None:
            now = time.time()
            with self._lock:
                self._machine.append((now, *ticks))
                live = list(self._live)
            for child in live:
                self._sample(child)
            time.sleep(self.PERIOD)

    def record(self, run: "Run", start: float, end: float) -> None:
        """Store on `run` how busy the cores were, and what CPU each of its processes used, from `start` to `end`."""
        for child in run.children:
            self._sample(child)  # a child still running has a sample after `end` now
        deadline = time.monotonic() + 4 * self.PERIOD
        while time.monotonic() < deadline and not self._machine_after(end):
            time.sleep(self.PERIOD / 5)
        with self._lock:
            machine = around(self._machine, start, end)
            samples = {child: self._samples.pop(child, []) for child in run.children}
        if end - start < self.MIN_SPAN:
            return
        if machine and machine[0][0] <= start and machine[-1][0] >= end:
            busy, kernel, total = (self._used([(sample[0], sample[i]) for sample in machine], start, end)
                                   for i in (1, 2, 3))
            if total > 0 and busy > 0:
                run.cores = ((os.cpu_count() or 1) * busy / total, kernel / busy)
        for child, series in samples.items():
            if series:
                run.cpu_during[child.label] = self._used(series, start, end) / self._clock_ticks

    @staticmethod
    def _used(series: "Sequence[tuple[float, int]]", start: float, end: float) -> float:
        return interpolate(series, end) - interpolate(series, start)

    def _machine_after(self, moment: float) -> bool:
        with self._lock:
            return bool(self._machine) and self._machine[-1][0] >= moment


class Bench:
    def __init__(self, size: int, recipients: int, chunk_size: int, workdir: Path, small: bool = False,
                 files: int = 1000, push_files: int = 200, round_trips: int = 2000) -> None:
        self.cpu = CpuMeter().start()
        self.size = size
        self.recipients = recipients
        self.chunk_size = chunk_size
        self.workdir = workdir
        self.source = workdir / "source.bin"
        self.digest = ""
        self.small = small
        self.files = files
        self.push_files = push_files
        self.round_trips = round_trips
        self.expected: dict[str, dict[str, str]] = {}  # --small: "pull"/"push" -> file name -> sha256
        self.rtts: list[float] = []  # --rtt: the round trips measured, in ms
        self.rtt: Optional[float] = None  # --rtt: the round trip of the runs being made, or None: no proxies
        self.rounds: list[dict[str, Run]] = []  # one dict per round of the plan (--repeat)
        self.runs: dict[str, Run] = {}  # the round being run

    def new_round(self) -> None:
        """Start collecting the runs of the next round of the plan."""
        self.runs = {}
        self.rounds.append(self.runs)

    def series(self, name: str) -> list[Run]:
        """The runs called `name`, one per round that completed it."""
        return [runs[name] for runs in self.rounds if name in runs]

    def at_rtt(self, rtt: float, step, *args) -> Run:
        """Run `step(*args)` with every node (and bare peer) reaching the broker (relay) through delay proxies."""
        self.rtt = rtt
        try:
            return step(*args)
        finally:
            self.rtt = None

    def tagged(self, name: str) -> str:
        """A run's name, with the round trip it was made at in an --rtt run."""
        return name if self.rtt is None else f"{name} @{self.rtt:g}ms"

    def through_proxy(self, run: Run, label: str, port: int) -> int:
        """The port to connect to for 127.0.0.1:`port`: a delay proxy's in an --rtt run, else `port` itself."""
        if self.rtt is None:
            return port
        proxy = run.start(label, "delay-proxy", "--connect", f"tcp://127.0.0.1:{port}", "--delay", str(self.rtt / 2))
        return int(proxy.line("PORT "))

    def make_source(self) -> None:
        block = 1 << 20
        with open(self.source, "wb") as out:
            remaining = self.size
            while remaining:
                n = min(block, remaining)
                out.write(os.urandom(n))
                remaining -= n
        self.digest = file_digest(str(self.source))

    def make_small(self) -> None:
        """--small: the files to pull and to push, their name lists (pull.json, push.json) and sha256s."""
        for kind, count, size in (("pull", self.files, PULL_FILE_SIZE), ("push", self.push_files, PUSH_FILE_SIZE)):
            folder = self.small_dir(kind)
            folder.mkdir(parents=True)
            digests = self.expected[kind] = {}
            for number in range(count):
                name = f"{kind}{number:05d}.bin"
                data = os.urandom(size)
                (folder / name).write_bytes(data)
                digests[name] = hashlib.sha256(data).hexdigest()
            (self.workdir / f"{kind}.json").write_text(json.dumps(list(digests)))

    def small_dir(self, kind: str) -> Path:
        return self.workdir / f"{kind}-source"

    def small_args(self, kind: str) -> list[str]:
        """Child arguments naming the source folder of `kind` and the list of its files."""
        return ["--file", str(self.small_dir(kind)), "--list", str(self.workdir / f"{kind}.json")]

    def dest(self, run: str, site: str) -> Path:
        path = self.workdir / run / site
        path.mkdir(parents=True, exist_ok=True)
        return path

    def verify(self, run: Run, paths: list) -> None:
        good = [p for p in paths if p and os.path.getsize(p) == self.size and file_digest(str(p)) == self.digest]
        run.verified = len(good) == run.recipients
        if not run.verified:
            run.notes.append(f"only {len(good)} of {run.recipients} copies verified")
        shutil.rmtree(self.workdir / run.name, ignore_errors=True)

    def finish(self, run: Run, start: float, end: float) -> None:
        run.seconds = max(end - start, 1e-9)
        run.mbps = self.size * run.recipients / run.seconds / MB
        self.cpu.record(run, start, end)
        self.runs[run.name] = run

    def finish_items(self, run: Run, start: float, end: float, items: int) -> None:
        """--small: record `items` files moved or round trips made between `start` and `end`."""
        run.seconds = max(end - start, 1e-9)
        run.items = items
        run.rate = items / run.seconds
        run.ms = 1000 * run.seconds / max(items, 1)
        self.cpu.record(run, start, end)
        self.runs[run.name] = run

    def verify_files(self, run: Run, dest: Path, kind: str) -> None:
        """--small: every file of `kind` arrived in `dest` under its name with its sha256, and nothing else."""
        expected = self.expected[kind]
        present = os.listdir(dest)
        good = sum(1 for name in present
                   if name in expected and hashlib.sha256((dest / name).read_bytes()).hexdigest() == expected[name])
        run.verified = good == len(expected) == len(present)
        if not run.verified:
            run.notes.append(f"{good} of {len(expected)} files verified; {len(present)} files in the destination")
        shutil.rmtree(self.workdir / run.name, ignore_errors=True)

    # -- baselines -----------------------------------------------------------------------
    def bare_relay(self, n: int) -> Run:
        run = Run(self.tagged(f"bare relay {n}"), n, self.workdir, self.cpu)
        try:
            relay = run.start("relay", "relay")
            address = f"tcp://127.0.0.1:{self.through_proxy(run, 'proxy', int(relay.line('PORT ')))}"
            names = [f"recv{i}" for i in range(n)]
            dests = [self.dest(run.name, name) / "copy.bin" for name in names]
            receivers = [run.start(name, "relay-recv", "--connect", address, "--name", name, "--dest", str(d))
                         for name, d in zip(names, dests)]
            sender = run.start("sender", "relay-send", "--connect", address, "--targets", ",".join(names),
                               "--file", str(self.source), "--chunk-size", str(self.chunk_size))
            sent = sender.result_line()
            ends = [r.finish()["end"] for r in receivers]
            sender.release()
            relay.stop()
            self.finish(run, sent["start"], max(ends))
            self.verify(run, dests)
        finally:
            run.close()
        return run

    def bare_fanout(self, n: int) -> Run:
        run = Run(f"bare fan-out {n}", n, self.workdir, self.cpu)
        try:
            pub = run.start("publisher", "fan-pub", "--file", str(self.source), "--count", str(n),
                            "--chunk-size", str(self.chunk_size))
            address = f"tcp://127.0.0.1:{pub.line('PORT ')}"
            dests = [self.dest(run.name, f"sub{i}") / "copy.bin" for i in range(n)]
            subs = [run.start(f"sub{i}", "fan-sub", "--connect", address, "--dest", str(d))
                    for i, d in enumerate(dests)]
            published = pub.result_line()
            ends = [s.finish()["end"] for s in subs]
            pub.release()
            self.finish(run, published["start"], max(ends))
            self.verify(run, dests)
        finally:
            run.close()
        return run

    # -- fedstream -----------------------------------------------------------------------
    def kits(self, secure: bool) -> list[str]:
        """Child arguments naming the provisioned project of a secure run (made once), or none."""
        if not secure:
            return []
        from fedstream.common.kits import provision

        project = self.workdir / "kits"
        provision(project, ["broker", "server"] + [f"site-{i + 1}" for i in range(self.recipients)])
        return ["--kits", str(project)]

    def start_broker(self, run: Run, kits: list[str]) -> tuple[Child, str]:
        """A `fedstream broker` process on free ports (with the broker kit in a secure run), and its address.

        In an --rtt run each of its three ports (messages, fan-out in, fan-out out) gets a delay
        proxy; the broker advertises the proxied fan-out ports, and the address returned is the
        proxied message port, so every node reaches every broker port through a proxy.
        """
        secure = ["--kit", os.path.join(kits[1], "broker")] if kits else []
        command = [sys.executable, "-m", "fedstream.nodes", "broker"]
        if self.rtt is None:
            broker = run.start("broker", "", cmd=[*command, "--bind", "tcp://127.0.0.1:0", *secure])
            return broker, "tcp://" + broker.line("tcp://", 30)
        ports = free_ports(3)
        proxied = [self.through_proxy(run, label, port)
                   for label, port in zip(("proxy", "proxy-in", "proxy-out"), ports)]
        broker = run.start("broker", "", cmd=[
            *command, "--bind", f"tcp://127.0.0.1:{ports[0]}", "--fanout-in", f"tcp://127.0.0.1:{ports[1]}",
            "--fanout-out", f"tcp://127.0.0.1:{ports[2]}", "--advertise-fanout-in", f"tcp://127.0.0.1:{proxied[1]}",
            "--advertise-fanout-out", f"tcp://127.0.0.1:{proxied[2]}", *secure])
        broker.line("tcp://", 30)
        return broker, f"tcp://127.0.0.1:{proxied[0]}"

    def pull(self, n: int, secure: bool = False) -> Run:
        run = Run(self.tagged(f"pull {n}" + (" secure" if secure else "")), n, self.workdir, self.cpu)
        kits = self.kits(secure)
        try:
            broker, address = self.start_broker(run, kits)
            owner = run.start("owner", "pull-owner", "--connect", address, "--file", str(self.source),
                              "--count", str(n), *kits)
            ref = owner.line("RID ")
            names = [f"site-{i + 1}" for i in range(n)]
            receivers = [run.start(name, "pull-recv", "--connect", address, "--name", name, "--ref", ref,
                                   "--dest", str(self.dest(run.name, name)), *kits) for name in names]
            results = [r.finish() for r in receivers]
            owner.finish()
            broker.stop()
            errors = [r["error"] for r in results if r.get("error")]
            run.notes.extend(errors)
            self.finish(run, min(r["start"] for r in results), max(r["end"] for r in results))
            self.verify(run, [r.get("path") for r in results])
        finally:
            run.close()
        return run

    def push(self, n: int, secure: bool = False) -> Run:
        run = Run(self.tagged(f"push {n}" + (" secure" if secure else "")), n, self.workdir, self.cpu)
        kits = self.kits(secure)
        try:
            broker, address = self.start_broker(run, kits)
            names = [f"site-{i + 1}" for i in range(n)]
            receivers = []
            for name in names:
                receiver = run.start(name, "push-recv", "--connect", address, "--name", name,
                                     "--dest", str(self.dest(run.name, name)), *kits)
                receiver.line("READY")
                receivers.append(receiver)
            owner = run.start("owner", "push-owner", "--connect", address, "--targets", ",".join(names),
                              "--file", str(self.source), "--chunk-size", str(self.chunk_size), *kits)
            sent = owner.finish()
            results = [r.finish() for r in receivers]
            broker.stop()
            if not sent.get("ok"):
                run.notes.append(f"stream_file returned {sent.get('rc')}: {sent.get('error')}")
            run.notes.append(f"owner published {sent['published'] / self.size:.2f}x the file size on the fan-out, "
                             f"repaired {sent['repaired'] / self.size:.2f}x by unicast, "
                             f"read {sent['read'] / self.size:.2f}x from disk")
            self.finish(run, sent["start"], sent["end"])
            self.verify(run, [r.get("path") for r in results])
        finally:
            run.close()
        return run


    # -- small files and round trips (--small) -------------------------------------------
    def bare_pull_small(self) -> Run:
        run = Run("bare pull files", 1, self.workdir, self.cpu)
        try:
            relay = run.start("relay", "relay")
            address = f"tcp://127.0.0.1:{relay.line('PORT ')}"
            owner = run.start("owner", "bare-files-owner", "--connect", address, *self.small_args("pull"))
            owner.line("READY")
            dest = self.dest(run.name, "recv0")
            receiver = run.start("recv0", "bare-files-recv", "--connect", address, "--name", "recv0",
                                 "--dest", str(dest), *self.small_args("pull"))
            result = receiver.finish()
            owner.stop()
            relay.stop()
            self.finish_items(run, result["start"], result["end"], result["items"])
            self.verify_files(run, dest, "pull")
        finally:
            run.close()
        return run

    def pull_small(self) -> Run:
        run = Run("pull files", 1, self.workdir, self.cpu)
        refs = self.workdir / "refs.json"
        try:
            broker, address = self.start_broker(run, [])
            owner = run.start("owner", "pull-files-owner", "--connect", address, "--ref", str(refs),
                              *self.small_args("pull"))
            owner.line("RIDS", 300)
            dest = self.dest(run.name, "site-1")
            receiver = run.start("site-1", "pull-files-recv", "--connect", address, "--name", "site-1",
                                 "--ref", str(refs), "--dest", str(dest))
            result = receiver.finish()
            owner.finish()
            broker.stop()
            if result["failed"]:
                run.notes.append(f"{result['failed']} downloads failed, e.g. {result['errors'][0]}")
            self.finish_items(run, result["start"], result["end"], result["items"])
            self.verify_files(run, dest, "pull")
        finally:
            run.close()
        return run

    def bare_push_small(self) -> Run:
        run = Run("bare push files", 1, self.workdir, self.cpu)
        try:
            relay = run.start("relay", "relay")
            address = f"tcp://127.0.0.1:{relay.line('PORT ')}"
            dest = self.dest(run.name, "recv0")
            receiver = run.start("recv0", "bare-push-recv", "--connect", address, "--name", "recv0",
                                 "--count", str(self.push_files), "--dest", str(dest))
            sender = run.start("sender", "bare-push-send", "--connect", address, "--targets", "recv0",
                               *self.small_args("push"))
            sent = sender.result_line()
            receiver.finish()
            sender.release()
            relay.stop()
            self.finish_items(run, sent["start"], sent["end"], sent["items"])
            self.verify_files(run, dest, "push")
        finally:
            run.close()
        return run

    def push_small(self) -> Run:
        run = Run("push files", 1, self.workdir, self.cpu)
        try:
            broker, address = self.start_broker(run, [])
            dest = self.dest(run.name, "site-1")
            receiver = run.start("site-1", "push-files-recv", "--connect", address, "--name", "site-1",
                                 "--count", str(self.push_files), "--dest", str(dest))
            receiver.line("READY")
            owner = run.start("owner", "push-files-owner", "--connect", address, "--targets", "site-1",
                              *self.small_args("push"))
            sent = owner.finish()
            receiver.finish()
            broker.stop()
            if sent["failed"]:
                run.notes.append(f"{sent['failed']} pushes failed, e.g. {sent['errors'][0]}")
            self.finish_items(run, sent["start"], sent["end"], self.push_files - sent["failed"])
            self.verify_files(run, dest, "push")
        finally:
            run.close()
        return run

    def bare_round_trips(self, threaded: bool = False) -> Run:
        """Echo round trips through the relay; `threaded`: each side with a Cell's threads (bare-threaded-*)."""
        run = Run("bare threaded round trips" if threaded else "bare round trips", 1, self.workdir, self.cpu)
        roles = "bare-threaded" if threaded else "bare"
        try:
            relay = run.start("relay", "relay")
            address = f"tcp://127.0.0.1:{relay.line('PORT ')}"
            echo = run.start("echo", f"{roles}-echo", "--connect", address)
            echo.line("READY")
            ping = run.start("ping", f"{roles}-ping", "--connect", address, "--count", str(self.round_trips))
            result = ping.finish()
            echo.stop()
            relay.stop()
            self.finish_items(run, result["start"], result["end"], result["items"])
            run.verified = result["items"] == self.round_trips
        finally:
            run.close()
        return run

    def cell_round_trips(self, inline: bool = False) -> Run:
        """Cell.request round trips to an echo Cell; `inline`: it answers on its I/O thread, not in its pool."""
        run = Run("cell inline round trips" if inline else "cell round trips", 1, self.workdir, self.cpu)
        try:
            broker, address = self.start_broker(run, [])
            echo = run.start("site-1", "cell-echo-inline" if inline else "cell-echo", "--connect", address,
                             "--name", "site-1")
            echo.line("READY")
            ping = run.start("server", "cell-ping", "--connect", address, "--targets", "site-1",
                             "--count", str(self.round_trips))
            result = ping.finish()
            echo.stop()
            broker.stop()
            self.finish_items(run, result["start"], result["end"], result["items"])
            run.verified = result["items"] == self.round_trips
        finally:
            run.close()
        return run


def spread(values: list[float], fmt: str = "{:.0f}", unit: str = "") -> str:
    """A figure over the rounds: the value itself for one round, else 'median [min-max]'."""
    if len(values) == 1:
        return fmt.format(values[0]) + unit
    return f"{fmt.format(statistics.median(values))}{unit} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def ratio(bench: Bench, a: str, b: str, attr: str = "mbps") -> str:
    """Run `a` over run `b` taken in the same round: 'r.rrx' for one round, else median [min-max] over rounds."""
    values = []
    for runs in bench.rounds:
        top, bottom = runs.get(a), runs.get(b)
        if top and bottom and getattr(bottom, attr):
            values.append(getattr(top, attr) / getattr(bottom, attr))
    return spread(values, "{:.2f}", "x") if values else "n/a"


def run_names(bench: Bench) -> list[str]:
    """Every run name in the order of the plan."""
    names: dict[str, None] = {}
    for runs in bench.rounds:
        names.update(dict.fromkeys(runs))
    return list(names)


def merged_summary(series: list[Run], per_item: bool) -> str:
    """Per process over the rounds: the largest peak RSS (MiB) / the median CPU it used during the transfer
    (seconds; with `per_item`, microseconds per file or round trip); '?' where one is missing."""
    rss: dict[str, list[int]] = {}
    cpu: dict[str, list[float]] = {}
    for run in series:
        for child in run.children:
            if child.result.get("rss"):
                rss.setdefault(child.label, []).append(child.result["rss"])
            used = run.cpu_during.get(child.label)
            if used is not None and (run.items or not per_item):
                cpu.setdefault(child.label, []).append(used * 1e6 / run.items if per_item else used)
    fmt = "{:.0f}" if per_item else "{:.2f}"
    return ", ".join(f"{label} " + (f"{max(rss[label]) / 2**20:.0f}" if label in rss else "?") + "/"
                     + (fmt.format(statistics.median(cpu[label])) if label in cpu else "?")
                     for label in dict.fromkeys([*rss, *cpu]))


def cores_busy(series: list[Run]) -> str:
    """Cores busy during the runs (median over the rounds) and, in brackets, the kernel's share of that."""
    measured = [run.cores for run in series if run.cores]
    if not measured:
        return "n/a"
    return f"{statistics.median(c for c, _ in measured):.2f} ({statistics.median(k for _, k in measured):.0%})"


def merged_notes(bench: Bench, name: str) -> list[str]:
    """The notes of run `name` over the rounds, each once, with the rounds it came from unless it came from all."""
    where: dict[str, list[int]] = {}
    for number, runs in enumerate(bench.rounds, 1):
        for note in runs[name].notes if name in runs else []:
            where.setdefault(note, []).append(number)
    return [note if len(rounds) == len(bench.rounds) else f"(round {','.join(map(str, rounds))}) {note}"
            for note, rounds in where.items()]


def print_runs(bench: Bench) -> None:
    """The table of runs: each run as measured (one round), or its median and range over the rounds."""
    rounds = len(bench.rounds)
    name_width = 20 if bench.rtts else 27 if bench.small else 16
    figure = "per s" if bench.small else "MB/s"
    figure_width = 9 if rounds == 1 else 24
    if rounds > 1:
        figure += " median [min-max]"
    each = f"{'ms each':>9}" if bench.small else ""
    cpu = "CPU us each" if bench.small else "CPU seconds"
    processes = (f"per process: peak RSS MiB / {cpu}" if rounds == 1
                 else f"per process: peak RSS MiB (largest) / {cpu} (median)")
    header = (f"{'run':<{name_width}}{figure:>{figure_width}}{each}{'seconds':>9}  {'verified':<9}"
              f"{'cores busy':<14}{processes}")
    print(header)
    print("-" * len(header))
    for name in run_names(bench):
        series = bench.series(name)
        values = [run.rate if bench.small else run.mbps for run in series]
        each = f"{statistics.median(run.ms for run in series):>9.3f}" if bench.small else ""
        if rounds == 1:
            verified = "yes" if series[0].verified else "NO"
        else:
            verified = f"{sum(run.verified for run in series)}/{rounds}"
        print(f"{name:<{name_width}}{spread(values):>{figure_width}}{each}"
              f"{statistics.median(run.seconds for run in series):>9.2f}  {verified:<9}{cores_busy(series):<14}"
              f"{merged_summary(series, bench.small)}")
        for note in merged_notes(bench, name):
            print(f"{'':<{name_width}}  {note}")


def print_rtt_table(bench: Bench) -> None:
    """--rtt: pull 1, push 1 and the bare relay 1 at each round trip, and their ratios (paired per round)."""
    rounds = len(bench.rounds)
    width = 19 if rounds == 1 else 24
    columns = ["bare relay 1", "pull 1", "push 1"]
    header = (f"{'RTT ms':>7}" + "".join(f"{name + ' MB/s':>{width}}" for name in columns)
              + f"{'pull 1 / bare':>{width}}{'push 1 / bare':>{width}}")
    print(header + ("   (median [min-max] over the rounds)" if rounds > 1 else ""))
    print("-" * len(header))
    for rtt in bench.rtts:
        names = [f"{name} @{rtt:g}ms" for name in columns]
        figures = [spread([run.mbps for run in bench.series(name)]) if bench.series(name) else "n/a" for name in names]
        ratios = [ratio(bench, names[1], names[0]), ratio(bench, names[2], names[0])]
        print(f"{rtt:>7g}" + "".join(f"{text:>{width}}" for text in figures + ratios))
    print(textwrap.fill(
        "RTT: each node's round trip to the broker (the bare peers' to the relay), added by a delay proxy process "
        "that holds every read for RTT/2 each way and keeps the order (it does not limit bandwidth, but its own speed "
        "caps the transfer: compare the 0 ms row with a run without --rtt). Every broker port (messages, fan-out in, "
        "fan-out out) has its own proxy and the broker advertises the proxied fan-out ports, so pushes cross the "
        "proxies too. Node to node through the broker the round trip is 2 x RTT, so a transfer with a fixed window "
        f"(the bare relay's {CREDIT_WINDOW} chunks, fedstream's own) moves at most window / (2 x RTT).", 100))


def print_report(bench: Bench) -> bool:
    runs = bench.runs
    n = bench.recipients
    rounds = len(bench.rounds)
    print()
    if bench.rtts:
        title = (f"fedstream bench --rtt: {format_size(bench.size)} file, {format_size(bench.chunk_size)} chunks, "
                 f"round trips {', '.join(f'{rtt:g}' for rtt in bench.rtts)} ms")
    elif bench.small:
        title = (f"fedstream bench --small: pull {bench.files} files of {format_size(PULL_FILE_SIZE)}, "
                 f"push {bench.push_files} files of {format_size(PUSH_FILE_SIZE)}, {bench.round_trips} round trips "
                 f"of {PING_SIZE} B")
    else:
        title = f"fedstream bench: {format_size(bench.size)} file, {format_size(bench.chunk_size)} chunks"
    print(f"{title}, {os.cpu_count()} CPUs, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}"
          + (f", {rounds} rounds (cases interleaved; ratios paired within a round)" if rounds > 1 else ""))
    print_runs(bench)
    print()
    if bench.rtts:
        print_rtt_table(bench)
        print()
        checks = []
    elif bench.small:
        checks = [
            ("pull per file vs bare (target <= 2x)", "pull files", "bare pull files", "ms"),
            ("push per file vs bare (target <= 2x)", "push files", "bare push files", "ms"),
            ("request/reply vs bare (target >= 0.7x)", "cell round trips", "bare round trips", "rate"),
            ("request/reply vs bare with the Cell's threads", "cell round trips", "bare threaded round trips",
             "rate"),
            ("bare with the Cell's threads vs bare (what the threads cost)", "bare threaded round trips",
             "bare round trips", "rate"),
            ("request/reply, inline handler, vs bare", "cell inline round trips", "bare round trips",
             "rate"),
        ]
    else:
        checks = [
            ("pull 1 vs bare relay 1 (throughput, budget >= 0.8x, target >= 0.9x)", "pull 1", "bare relay 1",
             "mbps"),
            (f"pull {n} vs bare relay {n} (aggregate, target >= 0.9x)", f"pull {n}", f"bare relay {n}", "mbps"),
            ("push 1 vs bare relay 1 (throughput)", "push 1", "bare relay 1", "mbps"),
            (f"push {n} vs bare relay {n} unicast copies (aggregate, budget >= 1.5x)", f"push {n}",
             f"bare relay {n}", "mbps"),
            (f"push {n} vs bare fan-out {n} (aggregate, target >= 0.9x)", f"push {n}", f"bare fan-out {n}",
             "mbps"),
            (f"push {n} wall time vs push 1 (budget <= 1.5x)", f"push {n}", "push 1", "seconds"),
            (f"bare fan-out {n} wall time vs bare fan-out 1 (what this machine allows)", f"bare fan-out {n}",
             "bare fan-out 1", "seconds"),
        ]
        if n == 1:  # the N-recipient cases are the single-recipient ones: only their ratios to bare remain
            checks = [checks[0], checks[2], checks[4]]
    if "pull 1 secure" in runs or f"push {n} secure" in runs:
        checks += [("pull 1 secure (CURVE) vs pull 1 plaintext (throughput)", "pull 1 secure", "pull 1", "mbps"),
                   (f"push {n} secure (CURVE) vs push {n} plaintext (aggregate throughput)", f"push {n} secure",
                    f"push {n}", "mbps")]
    print(textwrap.fill(
        f"cores busy: how many of the machine's {os.cpu_count()} cores were busy on average while the run moved its "
        "data (every process on the machine: the run's, the bench's own and anything else running; in brackets the "
        f"kernel's share of that time). A run at about {os.cpu_count()} was bound by the CPU. CPU per process: what "
        "each used in the same span"
        + (", per file or round trip" if bench.small else "") + " (both from /proc, sampled every "
        f"{CpuMeter.PERIOD * 1000:.0f} ms).", 100))
    print()
    width = 8 if rounds == 1 else 20
    if rounds > 1 and checks:
        print(f"{'ratio':<70}{'median [min-max]':>{width}}")
    for label, a, b, attr in checks:
        print(f"{label:<70}{ratio(bench, a, b, attr):>{width}}")
    peak = max((run.max_rss() for runs in bench.rounds for run in runs.values() if not run.name.startswith("bare")),
               default=0)
    print(f"{'largest peak RSS of any fedstream process (budget < 100 MiB)':<70}{peak / 2**20:>{width - 1}.0f}M")
    return all(run.verified for runs in bench.rounds for run in runs.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="file size (default 1G)")
    parser.add_argument("--quick", action="store_true", help="64 MiB smoke run")
    parser.add_argument("--recipients", type=int, default=4)
    parser.add_argument("--chunk-size", default="1M")
    parser.add_argument("--workdir", help="where to put the files (default: a temp dir, removed)")
    parser.add_argument("--secure", action="store_true", help="also run pull 1 and push N with kits (CURVE)")
    parser.add_argument("--small", action="store_true",
                        help="per-file cost: many small files by pull and push, and request/reply round trips")
    parser.add_argument("--files", type=int, default=1000, metavar="N",
                        help="--small: files of 16 KiB to pull (default 1000)")
    parser.add_argument("--push-files", type=int, default=200, metavar="N",
                        help="--small: files of 64 KiB to push (default 200)")
    parser.add_argument("--round-trips", type=int, default=2000, metavar="N",
                        help="--small: request/reply round trips (default 2000)")
    parser.add_argument("--rtt", metavar="MS[,MS...]",
                        help="bare relay 1, pull 1 and push 1 with every node reaching the broker through a delay "
                             "proxy adding this round trip, e.g. 0,20,50")
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="run the plan K times, cases interleaved; report medians and ranges (default 1)")
    # child roles
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    for flag in ("--connect", "--name", "--dest", "--file", "--targets", "--ref", "--kits", "--list", "--delay"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.chunk_size = parse_size(args.chunk_size)
    for flag in ("repeat", "files", "push_files", "round_trips"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.role:
        ROLES[args.role](args)
        return 0
    try:
        rtts = [float(ms) for ms in args.rtt.split(",")] if args.rtt else []
    except ValueError:
        parser.error(f"--rtt takes round trips in ms separated by commas, got {args.rtt!r}")
    if any(ms < 0 for ms in rtts):
        parser.error(f"--rtt round trips cannot be negative, got {args.rtt!r}")
    if rtts and (args.small or args.secure):
        parser.error("--rtt runs its own plan; it does not combine with --small or --secure")

    size = parse_size("64M") if args.quick else parse_size(args.size)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="fedstream-bench-", dir=args.workdir))
    try:
        bench = Bench(size, args.recipients, args.chunk_size, workdir, small=args.small, files=args.files,
                      push_files=args.push_files, round_trips=args.round_trips)
        n = args.recipients
        bench.rtts = rtts
        if rtts:
            print(f"writing a {format_size(size)} source file in {workdir} ...", flush=True)
            bench.make_source()
            plan = [(f"{name} @{ms:g}ms", lambda ms=ms, step=step: bench.at_rtt(ms, step, 1))
                    for ms in rtts for name, step in (("bare relay 1", bench.bare_relay), ("pull 1", bench.pull),
                                                      ("push 1", bench.push))]
        elif args.small:
            print(f"writing {args.files} + {args.push_files} small source files in {workdir} ...", flush=True)
            bench.make_small()
            plan = [("bare pull files", bench.bare_pull_small), ("pull files", bench.pull_small),
                    ("bare push files", bench.bare_push_small), ("push files", bench.push_small),
                    ("bare round trips", bench.bare_round_trips),
                    ("bare threaded round trips", lambda: bench.bare_round_trips(threaded=True)),
                    ("cell round trips", bench.cell_round_trips),
                    ("cell inline round trips", lambda: bench.cell_round_trips(inline=True))]
        else:
            print(f"writing a {format_size(size)} source file in {workdir} ...", flush=True)
            bench.make_source()
            plan = [("bare relay 1", lambda: bench.bare_relay(1)), ("pull 1", lambda: bench.pull(1)),
                    ("bare fan-out 1", lambda: bench.bare_fanout(1)), ("push 1", lambda: bench.push(1)),
                    (f"bare relay {n}", lambda: bench.bare_relay(n)),
                    (f"bare fan-out {n}", lambda: bench.bare_fanout(n)), (f"pull {n}", lambda: bench.pull(n)),
                    (f"push {n}", lambda: bench.push(n))]
        if args.secure and not args.small:
            plan += [("pull 1 secure", lambda: bench.pull(1, secure=True)),
                     (f"push {n} secure", lambda: bench.push(n, secure=True))]
        failed = []
        for round_no in range(1, args.repeat + 1):
            bench.new_round()
            for name, step in plan:
                label = name if args.repeat == 1 else f"{name} (round {round_no}/{args.repeat})"
                print(f"running {label} ...", flush=True)
                try:
                    run = step()
                except RuntimeError as exc:
                    print(f"  {label} failed: {exc}", flush=True)
                    failed.append(label)
                    continue
                print(f"  {run.progress()}", flush=True)
        return 0 if print_report(bench) and not failed else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
