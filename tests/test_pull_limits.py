"""A pull owner under hostile or greedy peers: bounded memory, capped requests, replies only from the owner."""

import os

from fedstream.nodes import Cell, download_file
from fedstream.nodes.pull import wire
from fedstream.nodes.simulate.procstats import peak_rss
from tests.pull_support import make_file, part_files, run_helper, sha256_of, start_owner, start_receiver

MiB = 1 << 20
MEMORY_BUDGET = 100 * MiB


def test_a_flood_of_chunk_requests_that_are_never_read_leaves_the_owner_under_budget(procs, broker_address,
                                                                                      tmp_path):
    size = 256 * MiB
    source = str(tmp_path / "big.bin")
    digest = make_file(source, size)
    owner, refs = start_owner(procs, broker_address, [source])
    flood = run_helper(procs, "pull_flood", broker_address, "hostile", "owner", refs[source], str(size),
                       f"200:{64 * MiB}", f"200:{8 * MiB}")
    flood.expect("sent 200", timeout=30)
    flood.expect("sent 200", timeout=30)
    out = tmp_path / "out"
    out.mkdir()
    receiver = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]], timeout=30)
    result = receiver.one("result", timeout=240)
    assert result["error"] is None, result
    assert sha256_of(result["path"]) == digest
    peak = peak_rss(owner.proc.pid)
    assert peak is not None and peak < MEMORY_BUDGET, f"owner peak RSS {peak / MiB:.0f} MiB"


def test_oversized_chunk_requests_are_refused(procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    make_file(source, 100)
    _owner, refs = start_owner(procs, broker_address, [source])
    with Cell("asker", broker_address) as asker:
        for length, expected in ((wire.MAX_CHUNK_LENGTH, None), (wire.MAX_CHUNK_LENGTH + 1, wire.ERR_BAD_REQUEST),
                                 (64 * MiB, wire.ERR_BAD_REQUEST)):
            reply = asker.request(wire.CHANNEL, wire.TOPIC_CHUNK, "owner",
                                  headers={"ref": refs[source], "off": 0, "len": length}, timeout=10)
            assert reply.headers.get("err") == expected
            if expected is None:
                assert len(reply.payload) == 100
        error = None
        try:
            download_file("owner", refs[source], 10, asker, str(tmp_path), chunk_size=wire.MAX_CHUNK_LENGTH + 1)
        except ValueError as exc:
            error = str(exc)
        assert error is not None and "chunk_size must be between 1 and 8388608" in error


def test_a_greedy_recipient_is_slowed_by_busy_answers_not_failed(procs, broker_address, tmp_path):
    source = str(tmp_path / "f.bin")
    digest = make_file(source, 96 * MiB)
    _owner, refs = start_owner(procs, broker_address, [source])
    out = tmp_path / "out"
    out.mkdir()
    # 8 requests of 8 MiB in flight: twice what the owner lets wait for the network per requester
    receiver = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]],
                              chunk_size=wire.MAX_CHUNK_LENGTH, window=8)
    result = receiver.one("result", timeout=120)
    assert result["error"] is None and sha256_of(result["path"]) == digest
    assert part_files(str(out)) == [] and os.listdir(out) == ["f.bin"]
