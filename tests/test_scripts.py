"""The start/stop scripts: a federation by hand, as the README walks through it."""

import os
import subprocess
import sys

import pytest

from fedstream.nodes.simulate.files import make_file, sha256_of
from tests.procs import REPO, process_gone, wait_until

SCRIPTS = REPO / "scripts"


def run_script(name, *args, env):
    return subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.timeout(120)
def test_start_sites_push_and_stop_all(tmp_path):
    run_dir = tmp_path / "run"
    # The scripts run the `fedstream` installed next to this interpreter.
    env = dict(os.environ, FEDSTREAM_RUN_DIR=str(run_dir),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    env.pop("FEDSTREAM_BROKER", None)
    try:
        started = run_script("start_broker.sh", "tcp://127.0.0.1:0", env=env)
        assert started.returncode == 0, started.stderr
        address = (run_dir / "broker.address").read_text().strip()
        assert f"export FEDSTREAM_BROKER={address}" in started.stdout

        sites = run_script("start_sites.sh", "2", env=env)
        assert sites.returncode == 0, sites.stderr
        assert "site-2 ready" in sites.stdout

        source = tmp_path / "model.bin"
        digest = make_file(str(source), 3 * 1024 * 1024 + 5)
        push = subprocess.run([sys.executable, "-m", "fedstream.nodes", "push", str(source), "--to", "site-1,site-2",
                               "--as", "server", "--quiet"], env=dict(env, FEDSTREAM_BROKER=address),
                              capture_output=True, text=True, timeout=60)
        assert push.returncode == 0, push.stderr
        for site in ("site-1", "site-2"):
            assert sha256_of(str(run_dir / site / "model.bin")) == digest
    finally:
        pids = [int(p.read_text()) for p in run_dir.glob("*.pid")]
        stopped = run_script("stop_all.sh", env=env)
    assert stopped.returncode == 0 and "all stopped" in stopped.stdout
    assert len(pids) == 3
    for pid in pids:
        wait_until(lambda: process_gone(pid), 15)
    assert not list(run_dir.glob("*.pid"))

