"""`fedstream push` end to end: receivers in their own processes, exit codes, output, progress bar."""

import os
import time

from fedstream.common.constants import DEFAULT_CHANNEL, DEFAULT_PUSH_TOPIC
from tests.procs import run_cli_on_a_terminal
from tests.push_support import check_received, listing, make_file, next_done, sha256_of, start_receiver

TOPICS = [[DEFAULT_CHANNEL, DEFAULT_PUSH_TOPIC]]


def test_push_to_two_sites_exits_0_and_prints_one_line(procs, broker_address, tmp_path):
    src = str(tmp_path / "weights.bin")
    sha = make_file(src, 3 * 1024 * 1024 + 5)
    dests = {name: str(tmp_path / name) for name in ("site-1", "site-2")}
    sites = {name: start_receiver(procs, name, broker_address, dests[name], topics=TOPICS) for name in dests}
    push = procs.fedstream("push", src, "--to", "site-1,site-2", "--broker", broker_address, "--as", "server",
                           "--chunk-size", "256K", "--chunk-timeout", "5")
    assert push.wait(60) == 0, push.stderr
    out = push.remaining_stdout()
    assert len(out) == 1 and out[0].startswith(f"pushed {src} to site-1,site-2 (3.0 MiB, "), out
    assert push.stderr == ""  # no progress bar when stderr is not a terminal
    for name, proc in sites.items():
        report = next_done(proc)
        check_received(report, dests[name], sha, "weights.bin")
        assert report["ctx"] == {}


def test_push_failures_exit_non_zero_with_one_line(procs, broker_address, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 1000)
    site = start_receiver(procs, "site-1", broker_address, str(tmp_path / "site-1"), topics=TOPICS)
    cases = [
        (["push", src, "--to", "site-1,ghost"], "'ghost' is not connected"),
        (["push", str(tmp_path / "missing.bin"), "--to", "site-1"], "missing.bin"),
        (["push", src, "--to", "site-1", "--chunk-size", "0"], "chunk_size"),
        (["push", src, "--to", "site-1", "--chunk-size", "lots"], "Invalid size"),
        (["push", src, "--to", "bad name"], "Invalid FQCN"),
        (["push", src, "--to", ","], "targets is empty"),
        (["push", src, "--to", "site-1", "--chunk-timeout", "0"], "chunk_timeout"),
    ]
    started = time.monotonic()
    for args, message in cases:
        proc = procs.fedstream(*args, "--broker", broker_address)
        assert proc.wait(30) != 0
        proc.remaining_stdout()
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedstream: error: ") and message in lines[0], lines
        assert proc.seen == []
    assert time.monotonic() - started < 30
    report = next_done(site)  # site-1 accepted the first push; it was aborted without leaving a file
    assert report["rc"] == "TASK_ABORTED"
    assert listing(str(tmp_path / "site-1")) == []


def test_progress_bar_on_a_terminal_and_quiet(procs, broker_address, tmp_path):
    src = str(tmp_path / "f.bin")
    make_file(src, 2 * 1024 * 1024)
    site = start_receiver(procs, "site-1", broker_address, str(tmp_path / "site-1"), topics=TOPICS)
    outputs = {}
    for quiet in (False, True):
        code, stdout, outputs[quiet] = run_cli_on_a_terminal(
            "push", src, "--to", "site-1", "--broker", broker_address, "--chunk-size", "64K",
            *(["--quiet"] if quiet else []))
        assert code == 0
        assert stdout.startswith(f"pushed {src} to site-1 ")
        assert next_done(site)["rc"] == "OK"
    assert "100%" in outputs[False] and "f.bin [" in outputs[False]
    assert outputs[True] == ""


def test_push_to_fedstream_node_processes(procs, broker_address, tmp_path):
    src = str(tmp_path / "model.pt")
    sha = make_file(src, 5 * 1024 * 1024 + 3)
    nodes = {}
    for name in ("site-1", "site-2"):
        nodes[name] = procs.fedstream("node", name, "--broker", broker_address, "--recv-dir", str(tmp_path / name))
        nodes[name].expect(f"ready\t{name}", 30)
    for _ in range(2):  # the second copy gets a numbered name instead of overwriting the first
        push = procs.fedstream("push", src, "--to", "site-1,site-2", "--broker", broker_address, "--quiet")
        assert push.wait(60) == 0, push.stderr
    for name, node in nodes.items():
        paths = [node.expect("received\tpush\t", 30).split("\t")[2] for _ in range(2)]
        assert sorted(os.path.basename(p) for p in paths) == ["model (1).pt", "model.pt"]
        for path in paths:
            assert os.path.dirname(path) == str(tmp_path / name) and sha256_of(path) == sha
