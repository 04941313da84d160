"""Hostile peers against real processes: the broker, `fedstream node` and `fedstream serve`
keep serving whatever bytes arrive, replies come only from the node asked, and floods of
unread messages cost the broker a bounded amount of memory.
"""

import os
import subprocess
import sys
import time

import pytest
import zmq

from fedstream.common import protocol as proto
from fedstream.nodes.simulate.procstats import peak_rss
from tests.helpers.bus_frames import fuzz_messages
from tests.procs import wait_until
from tests.pull_support import make_file, sha256_of

MiB = 1 << 20
BROKER_BUDGET = 100 * MiB


def _dealer(ctx: zmq.Context, address: str, reads: bool = True) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndtimeo = 10_000
    sock.rcvtimeo = 10_000
    if not reads:  # a peer that never reads: keep its own buffers tiny so the broker's fill up
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(address)
    return sock


def _register(sock: zmq.Socket, name: str) -> dict:
    sock.send_multipart([proto.REGISTER, name.encode(), proto.encode_json({"v": proto.VERSION})])
    while True:
        frames = sock.recv_multipart()
        if frames[0] == proto.REGISTERED:
            assert frames[1] == proto.REG_OK, frames
            return proto.decode_object(frames[2])


def _drain(sock: zmq.Socket) -> None:
    while sock.poll(0):
        sock.recv_multipart()


def _cli(*args: str, cwd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedstream.nodes", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def _push_and_get_still_work(address: str, tmp_path, recv, ref: str, served_digest: str, tag: str) -> None:
    src = tmp_path / f"after-{tag}.bin"
    digest = make_file(str(src), 3 * MiB + 11)
    pushed = _cli("push", str(src), "--to", "site-1", "--broker", address, "--quiet", cwd=str(tmp_path))
    assert pushed.returncode == 0, pushed.stderr
    assert sha256_of(str(recv / src.name)) == digest
    out = tmp_path / f"got-{tag}"
    got = _cli("get", ref, "--from", "owner", "--broker", address, "-o", str(out), "--quiet", cwd=str(tmp_path))
    assert got.returncode == 0, got.stderr
    assert sha256_of(got.stdout.strip().splitlines()[-1]) == served_digest


@pytest.fixture
def federation(procs, tmp_path):
    """A broker, a `fedstream node site-1` and a `fedstream serve` as "owner"; yields what the tests need."""
    broker, address = procs.broker()
    recv = tmp_path / "recv"
    recv.mkdir()
    node = procs.fedstream("node", "site-1", "--broker", address, "--recv-dir", str(recv), cwd=str(tmp_path))
    node.expect("ready")
    served = tmp_path / "served.bin"
    served_digest = make_file(str(served), 2 * MiB + 3)
    serve = procs.fedstream("serve", str(served), "--broker", address, "--as", "owner", "--timeout", "300",
                            cwd=str(tmp_path))
    ref = serve.expect("", timeout=20).split("\t")[0]
    return {"address": address, "broker": broker, "node": node, "serve": serve, "recv": recv, "ref": ref,
            "digest": served_digest}


@pytest.mark.timeout(90)
def test_fuzzed_frames_leave_broker_node_and_serve_working(federation, tmp_path):
    address, ref = federation["address"], federation["ref"]
    ctx = zmq.Context()
    try:
        fuzz = _dealer(ctx, address)
        _register(fuzz, "fuzz")
        stranger = _dealer(ctx, address)  # never registers
        for i, frames in enumerate(fuzz_messages(16, 3000, ["site-1", "owner"], ref)):
            (stranger if i % 7 == 0 else fuzz).send_multipart(frames)
            if i % 50 == 0:
                _drain(fuzz)
                _drain(stranger)
                if i % 500 == 0:  # a fuzz frame may have unregistered it (BYE, a new name): keep it in
                    fuzz.send_multipart([proto.REGISTER, b"fuzz", proto.encode_json({"v": proto.VERSION})])
        # Everything sent has been handled once a ping through the broker comes back.
        fuzz.send_multipart([proto.REGISTER, b"fuzz", proto.encode_json({"v": proto.VERSION})])
        time.sleep(0.5)
        _drain(fuzz)
        fuzz.send_multipart([proto.HEARTBEAT])
        wait_until(lambda: fuzz.poll(100) and proto.HEARTBEAT_ACK in fuzz.recv_multipart(), 20)
    finally:
        ctx.destroy(linger=0)
    for name in ("broker", "node", "serve"):
        assert federation[name].popen.poll() is None, f"{name} died: {federation[name].stderr[-2000:]}"
        for sign in ("Exception in thread", "RecursionError", "Exceeds the limit"):
            assert sign not in federation[name].stderr, federation[name].stderr[-3000:]
    _push_and_get_still_work(address, tmp_path, federation["recv"], ref, federation["digest"], "fuzz")


def _accept_push(lurker: zmq.Socket, timeout: float) -> str:
    """Accept the first push `start` request that reaches `lurker` (a reply naming the stream); return its id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not lurker.poll(200):
            continue
        frames = lurker.recv_multipart()
        if frames[0] != proto.DELIVER or len(frames) != 4:
            continue
        payload = proto.decode_json(frames[3], limit=proto.MAX_JSON_PAYLOAD)
        if isinstance(payload, dict) and "sid" in payload:
            meta = proto.decode_object(frames[2])
            answer = {"k": "rep", "id": meta["id"], "ch": meta["ch"], "tp": meta["tp"], "pt": "n",
                      "h": {"sid": payload["sid"]}}
            lurker.send_multipart([proto.SEND, frames[1], proto.encode_json(answer)])
            return payload["sid"]
    raise AssertionError("no push start request reached the lurker")


@pytest.mark.timeout(120)
def test_floods_of_unread_messages_keep_the_broker_small(federation, tmp_path):
    """Issue 16's two floods: an unregistered peer that never reads sends large-meta messages;
    fan-out subscribers that never read sit on a 160 MiB push (one asking for every stream,
    one a target that accepted the stream, subscribed to it and then reads nothing)."""
    address = federation["address"]
    broker_pid = federation["broker"].pid
    ctx = zmq.Context()
    try:
        flooder = _dealer(ctx, address, reads=False)
        flooder.setsockopt(zmq.SNDHWM, 100_000)
        meta = b"{" + b" " * (proto.MAX_HEADER_SIZE - 2) + b"}"
        oversize = b"{" + b" " * (4 * proto.MAX_HEADER_SIZE) + b"}"
        for i in range(6000):
            flooder.send_multipart([proto.SEND, b"nobody", oversize if i % 3 == 0 else meta, b"x" * 4096])

        lurker = _dealer(ctx, address)
        info = _register(lurker, "lurker")
        fanout = f"tcp://127.0.0.1:{info['xpub_port']}"
        everything = _never_reading_sub(ctx, fanout, b"")

        big = tmp_path / "big.bin"
        with open(big, "wb") as out:
            block = os.urandom(MiB)
            for _ in range(160):
                out.write(block)
        pushed = _cli("push", str(big), "--to", "site-1", "--broker", address, "--quiet", cwd=str(tmp_path),
                      timeout=90)
        assert pushed.returncode == 0, pushed.stderr
        assert sha256_of(str(federation["recv"] / "big.bin")) == sha256_of(str(big))
        assert not everything.poll(100)  # a prefix subscription is never applied: it saw no stream at all

        push = subprocess.Popen([sys.executable, "-m", "fedstream.nodes", "push", str(big), "--to", "site-1,lurker",
                                 "--broker", address, "--quiet"], cwd=str(tmp_path),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            sid = _accept_push(lurker, 30)
            _never_reading_sub(ctx, fanout, sid.encode())  # the target subscribes, then reads nothing
            _, stderr = push.communicate(timeout=90)
        finally:
            push.kill()
        assert push.returncode != 0 and "lurker" in stderr  # the silent target fails the push, nothing more
        _push_and_get_still_work(address, tmp_path, federation["recv"], federation["ref"], federation["digest"],
                                 "flood")
        peak = peak_rss(broker_pid)
        assert peak is not None and peak < BROKER_BUDGET, f"broker peak RSS {peak / MiB:.1f} MiB"
    finally:
        ctx.destroy(linger=0)


def _never_reading_sub(ctx: zmq.Context, address: str, topic: bytes) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 4096)
    sub.connect(address)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    return sub
