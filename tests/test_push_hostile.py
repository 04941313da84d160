"""Push against hostile or broken peers: forged messages, squatted stream slots, a source that changes."""

import threading
import time

import zmq

from fedstream.broker import Broker
from fedstream.common import digest as digests
from fedstream.common import protocol as proto
from fedstream.common.rc import ReturnCode
from fedstream.nodes import Cell, FileStreamer, FLContext
from fedstream.nodes.message import reply_error
from fedstream.nodes.push import stream_context as keys
from fedstream.nodes.push import wire
from fedstream.nodes.push.receiver import MAX_STREAMS_PER_SENDER, ReceiverSide
from fedstream.nodes.push.seal import StreamKey
from fedstream.nodes.push.sender import OwnerSide, PushResult, send_file
from fedstream.nodes.push.service import PushService
from tests.procs import wait_until
from tests.push_support import CHANNEL, TOPIC, check_received, listing, make_file, next_done, sha256_of, start_receiver

KIB = 1024
MIB = 1024 * KIB


def push_in_thread(cell: Cell, *args, **kwargs) -> dict:
    """Run send_file in a thread; the box gets "result" when it returns."""
    box: dict = {}
    box["thread"] = threading.Thread(target=lambda: box.update(result=send_file(cell, *args, **kwargs)), daemon=True)
    box["thread"].start()
    return box


def result_of(box: dict, timeout: float = 60.0) -> PushResult:
    box["thread"].join(timeout)
    assert "result" in box, "the push did not return in time"
    return box["result"]


class RawForger:
    """A registered node on a raw DEALER that sends replies nobody asked it for."""

    def __init__(self, context: zmq.Context, address: str, name: str) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.sock.send_multipart([proto.REGISTER, name.encode(), proto.encode_json({"v": proto.VERSION})])
        assert self.sock.poll(5000), "the broker did not answer the registration"
        assert self.sock.recv_multipart()[0] == proto.REGISTERED

    def forge_replies(self, target: str, ids: range, headers: dict) -> None:
        for request_id in ids:
            meta = {"k": "rep", "id": request_id, "ch": wire.CONTROL_CHANNEL, "tp": wire.TOPIC_VERIFY, "pt": "n",
                    "h": headers}
            self.sock.send_multipart([proto.SEND, target.encode(), proto.encode_json(meta)], zmq.NOBLOCK)

    def close(self) -> None:
        self.sock.close(linger=0)


def start_info(sid: str, chunk_timeout: float = 3600.0) -> dict:
    """A well-formed start request for a 1 MiB file."""
    return {"v": wire.WIRE_VERSION, "sid": sid, "name": "junk.bin", "size": MIB, "chunk_size": 64 * KIB,
            "count": 16, "window": wire.window_for(64 * KIB), "chunk_timeout": chunk_timeout,
            "algo": digests.ALGORITHM, "ctx": {}, "seal": StreamKey.new().to_wire()}


def test_a_third_node_cannot_steer_a_push(tmp_path):
    src = str(tmp_path / "f.bin")
    sha = make_file(src, 2 * MIB)
    sites = ["site-1", "site-2"]
    dests = {site: tmp_path / site for site in sites}
    outcomes: dict = {}
    sids: list = []

    def consumed(stream_ctx, fl_ctx):
        if not sids:
            sids.append(stream_ctx[keys.KEY_STREAM_ID])
        time.sleep(0.02)  # a slow receiver: the push lasts long enough to be attacked

    with Broker(bind="tcp://127.0.0.1:0") as broker, Cell("server", broker.address) as server, \
            Cell("site-1", broker.address) as site1, Cell("site-2", broker.address) as site2, \
            Cell("mallory", broker.address) as mallory:
        for cell in (site1, site2):
            dests[cell.fqcn].mkdir()
            FileStreamer.register_stream_processing(
                FLContext(cell), CHANNEL, TOPIC, dest_dir=str(dests[cell.fqcn]), chunk_consumed_cb=consumed,
                stream_done_cb=lambda ctx, fl_ctx: outcomes.update({fl_ctx.get_identity_name(): dict(ctx)}))
        forger = RawForger(server.context, broker.address, "forger")
        try:
            box = push_in_thread(server, CHANNEL, TOPIC, {}, sites, src, chunk_size=64 * KIB, chunk_timeout=10.0)
            sid = wait_until(lambda: sids and sids[0], 20)
            # events and repairs in a target's place: a forged "everything acked", a forged failure
            mallory.fire_and_forget(wire.CONTROL_CHANNEL, wire.TOPIC_EVENT, "server", None,
                                    headers={"sid": sid, "ev": wire.EV_ACK, "n": 10 ** 6})
            for headers, topic in (({"sid": sid, "ev": wire.EV_FAIL, "error": "forged"}, wire.TOPIC_EVENT),
                                   ({"sid": sid, "ack": 0, "from": 0}, wire.TOPIC_REPAIR)):
                reply = mallory.request(wire.CONTROL_CHANNEL, topic, "server", headers=headers, timeout=5)
                assert reply_error(reply.headers)[0] == wire.ERR_UNKNOWN_STREAM
            # the owner's steps in the owner's place, and a start that reuses the stream id
            for site in sites:
                for topic, headers in ((wire.TOPIC_VERIFY, {"sid": sid, "algo": digests.ALGORITHM, "digest": "0"}),
                                       (wire.TOPIC_COMMIT, {"sid": sid}), (wire.TOPIC_ABORT, {"sid": sid})):
                    reply = mallory.request(wire.CONTROL_CHANNEL, topic, site, headers=headers, timeout=5)
                    assert reply_error(reply.headers)[0] == wire.ERR_UNKNOWN_STREAM, (site, topic)
                reply = mallory.request(CHANNEL, TOPIC, site, payload=start_info(sid), timeout=5)
                assert reply_error(reply.headers)[0] == wire.ERR_REFUSED
            # replies nobody asked the forger for, to every party, until the push ends
            while box["thread"].is_alive():
                for name in ["server", *sites]:
                    forger.forge_replies(name, range(1, 16), {"sid": sid})
                time.sleep(0.001)
            result = result_of(box)
        finally:
            forger.close()
        assert (result.rc, result.ok) == (ReturnCode.OK, True), result.error
        # ack, fail, repair (and any forged reply that hit)
        assert PushService.for_cell(server).side(OwnerSide).ignored >= 3
        for cell in (site1, site2):
            assert PushService.for_cell(cell).side(ReceiverSide).ignored >= 4
        wait_until(lambda: len(outcomes) == 2, 10)
    for site in sites:
        ctx = outcomes[site]
        assert FileStreamer.get_rc(ctx) == ReturnCode.OK
        assert sha256_of(FileStreamer.get_file_location(ctx)) == sha
        assert listing(str(dests[site])) == ["f.bin"]


def test_stream_slots_are_per_sender_and_abandoned_streams_free_them(procs, broker_address, tmp_path):
    dest = str(tmp_path / "site-1")
    # chunk_timeout 3600 s in the squatters' start requests; the receiver caps silence at 3 s
    site = start_receiver(procs, "site-1", broker_address, dest, max_idle=3.0, max_stall=6.0)
    src = str(tmp_path / "f.bin")
    sha = make_file(src, 3 * MIB)
    with Cell("squatter", broker_address) as squatter, Cell("server", broker_address) as server:
        leaver = Cell("leaver", broker_address).start()
        try:
            for peer in (squatter, leaver):
                for _ in range(MAX_STREAMS_PER_SENDER):
                    reply = peer.request(CHANNEL, TOPIC, "site-1", payload=start_info(wire.new_stream_id()), timeout=5)
                    assert reply_error(reply.headers) is None
            reply = squatter.request(CHANNEL, TOPIC, "site-1", payload=start_info(wire.new_stream_id()), timeout=5)
            code, sentence = reply_error(reply.headers)
            assert code == wire.ERR_REFUSED and "from 'squatter'" in sentence
            assert sum(name.endswith(".part") for name in listing(dest)) == 2 * MAX_STREAMS_PER_SENDER
            # another sender is not blocked
            result = send_file(server, CHANNEL, TOPIC, {}, ["site-1"], src, chunk_size=256 * KIB)
            assert (result.rc, result.ok) == (ReturnCode.OK, True), result.error
        finally:
            leaver.stop()  # goes away with its streams open
        reports = [next_done(site, 30) for _ in range(2 * MAX_STREAMS_PER_SENDER + 1)]
        wait_until(lambda: listing(dest) == ["f.bin"], 10)  # every stale .part is gone
    legit = [r for r in reports if r["name"] == "f.bin"]
    assert len(legit) == 1
    check_received(legit[0], dest, sha, "f.bin")
    abandoned = [r for r in reports if r["name"] == "junk.bin"]
    assert len(abandoned) == 2 * MAX_STREAMS_PER_SENDER
    assert all(r["rc"] in ("TIMEOUT", "COMMUNICATION_ERROR") and r["path"] is None for r in abandoned)


def test_a_source_rewritten_during_the_push_fails_it_for_every_target(procs, broker_address, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 4 * MIB)
    dests = {name: str(tmp_path / name) for name in ("site-1", "site-2")}
    slow = start_receiver(procs, "site-1", broker_address, dests["site-1"], chunk_delay=0.02, print_chunks=True)
    other = start_receiver(procs, "site-2", broker_address, dests["site-2"])
    with Cell("server", broker_address) as server:
        box = push_in_thread(server, CHANNEL, TOPIC, {}, ["site-1", "site-2"], src, chunk_size=64 * KIB,
                             chunk_timeout=10.0)
        slow.expect("CHUNK None 5 ", 30)
        with open(src, "r+b") as f:  # rewritten in place: same size, same inode, other bytes
            f.write(b"\0" * 4096)
        result = result_of(box)
    assert (result.rc, result.ok) == (ReturnCode.ERROR, False)
    assert "changed while it was being pushed" in result.error
    for proc, name in ((slow, "site-1"), (other, "site-2")):
        report = next_done(proc, 30)
        assert report["rc"] == "TASK_ABORTED" and report["path"] is None
        assert listing(dests[name]) == []
