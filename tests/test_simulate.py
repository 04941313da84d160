"""`fedstream simulate` and `scripts/bench.py --quick` end to end."""

import os
import re
import sys

import pytest

from tests.procs import REPO, process_gone, wait_until


@pytest.mark.timeout(240)
def test_simulate_small_federation_verifies_every_site(procs, tmp_path):
    sim = procs.fedstream("simulate", "--sites", "2", "--size", "8M", "--workdir", str(tmp_path))
    assert sim.wait(200) == 0, sim.stderr
    out = "\n".join(sim.remaining_stdout())
    for mode in ("push", "pull"):
        assert re.search(rf"^{mode}: 2 sites x 8\.0 MiB", out, re.M), out
    assert len(re.findall(r"^  site-\d\s+yes", out, re.M)) == 4, out
    assert "all 2 sites verified in push, pull" in out
    assert os.listdir(tmp_path) == []  # files and logs removed


@pytest.mark.timeout(240)
def test_simulate_with_a_killed_site_fails_cleanly(procs, tmp_path):
    sim = procs.fedstream("simulate", "--sites", "2", "--size", "512M", "--mode", "push",
                          "--chunk-size", "256K", "--workdir", str(tmp_path))
    pids = {}
    for _ in range(5):  # broker, site-1, site-2, server-push ... lines
        line = sim.expect("started ", 60)
        label, pid = re.match(r"started (\S+) \(pid (\d+)\)", line).groups()
        pids[label] = int(pid)
        if label.startswith("server"):
            break
    os.kill(pids["site-2"], 9)
    code = sim.wait(120)
    assert code != 0
    assert "simulation failed: site-2" in sim.stderr and "exited unexpectedly" in sim.stderr
    for pid in pids.values():
        wait_until(lambda: process_gone(pid), 10)
    assert os.listdir(tmp_path) == []



@pytest.mark.timeout(300)
def test_bench_quick_runs_and_verifies(procs):
    bench = procs.start([sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--recipients", "2"])
    assert bench.wait(280) == 0, "\n".join(bench.remaining_stdout()) + bench.stderr
    out = "\n".join(bench.remaining_stdout())
    for run in ("bare relay 1", "pull 1", "push 1", "bare relay 2", "bare fan-out 2", "pull 2", "push 2"):
        assert re.search(rf"^{run}\s+\d+\s+[\d.]+\s+yes", out, re.M), out
    assert "pull 1 vs bare relay 1" in out
