"""`fedstream simulate` and `scripts/bench.py` (--quick, --small, --rtt) end to end."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.procs import REPO, process_gone, wait_until


@pytest.mark.timeout(240)
def test_simulate_small_federation_verifies_every_site(procs, tmp_path):
    sim = procs.fedstream("simulate", "--files", "--sites", "2", "--size", "8M", "--workdir", str(tmp_path))
    assert sim.wait(200) == 0, sim.stderr
    out = "\n".join(sim.remaining_stdout())
    for mode in ("push", "pull"):
        assert re.search(rf"^{mode}: 2 sites x 8\.0 MiB", out, re.M), out
    assert len(re.findall(r"^  site-\d\s+yes", out, re.M)) == 4, out
    assert "all 2 sites verified in push, pull" in out
    assert os.listdir(tmp_path) == []  # files and logs removed


@pytest.mark.timeout(240)
def test_simulate_with_a_killed_site_fails_cleanly(procs, tmp_path):
    sim = procs.fedstream("simulate", "--files", "--sites", "2", "--size", "512M", "--mode", "push",
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
        assert re.search(rf"^{run}\s+\d+\s+[\d.]+\s+yes\s+([\d.]+ \(\d+%\)|n/a)\s+\w+ \d+/([\d.]+|\?)", out, re.M), out
    assert "pull 1 vs bare relay 1" in out and "cores busy" in out


@pytest.mark.timeout(300)
def test_bench_small_repeated_runs_and_verifies(procs, tmp_path):
    bench = procs.start([sys.executable, str(REPO / "scripts" / "bench.py"), "--small", "--files", "20",
                         "--push-files", "5", "--round-trips", "50", "--repeat", "2", "--workdir", str(tmp_path)])
    assert bench.wait(280) == 0, "\n".join(bench.remaining_stdout()) + bench.stderr
    out = "\n".join(bench.remaining_stdout())
    for run in ("bare pull files", "pull files", "bare push files", "push files", "bare round trips",
                "bare threaded round trips", "cell round trips", "cell inline round trips"):
        assert re.search(rf"^{run}\s+\d+ \[\d+-\d+\]\s+[\d.]+\s+[\d.]+\s+2/2\s", out, re.M), out
    for ratio in ("pull per file vs bare", "push per file vs bare", "request/reply vs bare",
                  "request/reply vs bare with the Cell's threads", "bare with the Cell's threads vs bare",
                  "request/reply, inline handler, vs bare"):
        assert re.search(rf"^{re.escape(ratio)} .*\s[\d.]+x \[[\d.]+-[\d.]+\]$", out, re.M), out
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(300)
def test_bench_rtt_proxies_every_broker_port(procs, tmp_path):
    bench = procs.start([sys.executable, str(REPO / "scripts" / "bench.py"), "--size", "4M", "--rtt", "0,10",
                         "--workdir", str(tmp_path)])
    assert bench.wait(280) == 0, "\n".join(bench.remaining_stdout()) + bench.stderr
    out = "\n".join(bench.remaining_stdout())
    for rtt in ("0", "10"):
        for run in ("bare relay 1", "pull 1", "push 1"):
            assert re.search(rf"^{run} @{rtt}ms\s+\d+\s+[\d.]+\s+yes\s", out, re.M), out
        assert re.search(rf"^\s+{rtt}(\s+\d+){{3}}(\s+[\d.]+x){{2}}$", out, re.M), out
    # chunks of a push cross the fan-out proxies the broker advertised, not only the message port's
    assert re.search(r"^push 1 @10ms (.*\n)+?.*forwarded by the delay proxies: proxy \d+ MB, proxy-in [1-9]\d* MB, "
                     r"proxy-out [1-9]\d* MB$", out, re.M), out
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(300)
def test_simulate_fedavg_rounds_verify_bit_for_bit(procs, tmp_path):
    sim = procs.fedstream("simulate", "--rounds", "2", "--sites", "3", "--model-size", "8M",
                          "--workdir", str(tmp_path))
    assert sim.wait(280) == 0, sim.stderr
    out = "\n".join(sim.remaining_stdout())
    assert "final model verified bit for bit: all 3 sites in all 2 rounds" in out, out
    assert re.search(r"^\s+2\s+24\.0 MiB\s+24\.0 MiB", out, re.M), out  # round 2: 3 x 8 MiB each way
    for process in ("broker", "server", "site-1", "site-2", "site-3"):
        assert re.search(rf"^  {process}\s+[\d.]+ MiB$", out, re.M), out
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(300)
def test_simulate_fedavg_by_push_as_json(procs, tmp_path):
    sim = procs.fedstream("simulate", "--rounds", "2", "--sites", "2", "--model-size", "4M", "--down", "push",
                          "--json", "--workdir", str(tmp_path))
    assert sim.wait(280) == 0, sim.stderr
    result = json.loads("\n".join(sim.remaining_stdout()))
    assert result["verified"] is True and result["missing"] == [] and result["error"] is None
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert all(r["sites"] == ["site-1", "site-2"] for r in result["rounds"])
    assert set(result["peak_rss"]) == {"broker", "server", "site-1", "site-2"}


@pytest.mark.timeout(300)
def test_simulate_fedavg_with_a_killed_site_exits_3(procs, tmp_path):
    sim = procs.fedstream("simulate", "--rounds", "3", "--sites", "3", "--model-size", "8M",
                          "--kill-site", "site-2@2", "--workdir", str(tmp_path))
    pids = {}
    for _ in range(5):  # broker, site-1..3, server
        label, pid = re.match(r"started (\S+) \(pid (\d+)\)", sim.expect("started ", 60)).groups()
        pids[label] = int(pid)
    assert sim.wait(280) == 3, sim.stderr
    out = "\n".join(sim.remaining_stdout())
    assert "final model verified; missing: site-2" in out, out
    assert re.search(r"round 2: site-2 is missing", out), out
    for pid in pids.values():
        wait_until(lambda: process_gone(pid), 10)
    assert os.listdir(tmp_path) == []


@pytest.mark.timeout(120)
def test_readme_local_federation_example_runs(tmp_path):
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- readme-example: local-federation -->", 1)[1]
    code = block.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "example.py").write_text(code)
    ran = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert ran.returncode == 0, ran.stderr[-3000:]
