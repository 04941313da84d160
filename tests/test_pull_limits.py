"""A pull owner under hostile or greedy peers: bounded memory, capped requests, replies only from the owner."""

import os
import signal
import threading

from fedstream.nodes import Cell, download_file
from fedstream.nodes.pull import wire
from fedstream.nodes.simulate.procstats import peak_rss
from tests.pull_support import Events, make_file, part_files, run_helper, sha256_of, start_owner, start_receiver

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
    assert result["peak_rss"] < MEMORY_BUDGET, f"recipient peak RSS {result['peak_rss'] / MiB:.0f} MiB"


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
    # asks for 8 requests of 8 MiB in flight: download_file keeps it to what the broker and the owner allow
    receiver = start_receiver(procs, broker_address, "site-1", str(out), [refs[source]],
                              chunk_size=wire.MAX_CHUNK_LENGTH, window=8)
    result = receiver.one("result", timeout=120)
    assert result["error"] is None and sha256_of(result["path"]) == digest
    assert part_files(str(out)) == [] and os.listdir(out) == ["f.bin"]


def test_forged_replies_verdicts_and_errors_from_a_third_node_are_ignored(procs, broker_address, tmp_path,
                                                                          caplog):
    size, chunk = 256 * 1024, 4096
    source = str(tmp_path / "model.bin")
    digest = make_file(source, size)
    owner, refs = start_owner(procs, broker_address, [source])
    out = tmp_path / "out"
    out.mkdir()
    with Cell("site-1", broker_address) as cell:
        forger = run_helper(procs, "pull_forger", broker_address, "forger", "site-1", "500", str(size), str(chunk))
        forger.expect("sweep")

        def sweeps(count):
            for _ in range(count):
                forger.expect("sweep", timeout=30)

        at_done = threading.Event()

        def progress(received, total):
            if received == total and not at_done.is_set():
                owner.proc.signal(signal.SIGSTOP)  # the owner stalls just before the verdict
                at_done.set()

        outcome = {}
        owner.proc.signal(signal.SIGSTOP)  # ... and before it answered anything
        worker = threading.Thread(target=lambda: outcome.update(result=download_file(
            "owner", refs[source], 30, cell, str(out), chunk_size=chunk, progress_cb=progress)))
        try:
            worker.start()
            sweeps(3)  # forged open answers, data, verdicts and errors while only the forger speaks
            owner.proc.signal(signal.SIGCONT)
            assert at_done.wait(60)
            sweeps(3)
            owner.proc.signal(signal.SIGCONT)
            worker.join(60)
        finally:
            owner.proc.signal(signal.SIGCONT)
        assert not worker.is_alive()
    error, path = outcome["result"]
    assert error is None, error
    assert path == str(out / "model.bin") and sha256_of(path) == digest
    assert os.listdir(out) == ["model.bin"]
    # the forgeries were seen and dropped: by the Cell (replies only from the node asked) or by the recipient
    assert cell.stats["forged_replies"] > 0 or any("ignored a reply from 'forger'" in r.getMessage()
                                                   for r in caplog.records)
    done = owner.one("downloaded")
    assert (done["site"], done["status"]) == ("site-1", "success")


def test_a_transaction_of_5000_files_is_served_under_a_1024_open_file_limit(procs, broker_address, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    owner = Events(run_helper(procs, "pull_many_files", broker_address, "owner", "5000", str(shared)))
    refs = owner.one("refs", timeout=120)
    owner.one("ready")
    out = tmp_path / "out"
    out.mkdir()
    with Cell("site-1", broker_address) as cell:
        for index in [0, 1, 2499, 4999, *range(100, 164)]:
            error, path = download_file("owner", refs[index], 10, cell, str(out))
            assert error is None, error
            with open(path) as received:
                assert received.read() == f"file {index:09d}\n"
    open_fds = len(os.listdir(f"/proc/{owner.proc.pid}/fd"))
    assert open_fds < 200, f"the owner holds {open_fds} open descriptors"


def _resources(pid: "int | str") -> tuple[int, int, int]:
    """(open descriptors, threads, resident MiB) of a process."""
    with open(f"/proc/{pid}/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // MiB
    return len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task")), rss


def test_back_to_back_pulls_leak_no_descriptors_or_threads(procs, broker_address, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    owner = Events(run_helper(procs, "pull_many_files", broker_address, "owner", "110", str(shared)))
    refs = owner.one("refs", timeout=60)
    out = tmp_path / "out"
    out.mkdir()
    with Cell("site-1", broker_address) as cell:
        def pull(indexes):
            for index in indexes:
                error, path = download_file("owner", refs[index], 10, cell, str(out))
                assert error is None, error
                os.unlink(path)

        pull(range(10))  # warm up: the pools and caches of both sides are in use now
        before = _resources(owner.proc.pid), _resources("self")
        pull(range(10, 110))
        after = _resources(owner.proc.pid), _resources("self")
    for role, (fds_before, threads_before, rss_before), (fds_after, threads_after, rss_after) in \
            zip(("owner", "recipient"), before, after):
        print(f"{role}: fds {fds_before} -> {fds_after}, threads {threads_before} -> {threads_after}, "
              f"RSS {rss_before} -> {rss_after} MiB")
        assert fds_after <= fds_before + 5 and threads_after <= threads_before + 2, (before, after)
        assert rss_after <= rss_before + 20, (before, after)


def test_forty_recipients_in_four_processes_pull_one_file_at_once(procs, broker_address, tmp_path):
    source = str(tmp_path / "model.bin")
    digest = make_file(source, 8 * MiB)
    owner, refs = start_owner(procs, broker_address, [source])
    out = tmp_path / "out"
    out.mkdir()
    groups = [Events(run_helper(procs, "pull_many_recipients", broker_address, "owner", refs[source], str(out),
                                f"p{n}", "10")) for n in range(4)]
    results = [result for group in groups for result in group.wait("result", timeout=180, count=10)]
    for result in results:
        assert result["error"] is None, result
        assert sha256_of(result["path"]) == digest
    downloaded = owner.wait("downloaded", count=40, timeout=30)
    assert sorted(d["site"] for d in downloaded) == sorted(r["site"] for r in results)
    assert {d["status"] for d in downloaded} == {"success"}
    peak = peak_rss(owner.proc.pid)
    assert peak < MEMORY_BUDGET, f"owner peak RSS {peak / MiB:.0f} MiB"
    for group in groups:
        group.one("finished")
    assert len(owner.of("downloaded")) == 40  # exactly once per recipient
