"""fedstream installs as one namespace: a user's own `common/`, `nodes/`, `broker/` never clash.

Builds and installs this checkout (not editable) into a fresh venv whose third-party
dependencies come from the running interpreter, then runs code from a folder that has its
own `common`, `nodes` and `broker` packages.
"""

import os
import shutil
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.procs import REPO

USER_SCRIPT = """
import common, nodes, broker
assert common.MINE and nodes.MINE and broker.MINE, "the application's own packages"
from fedstream.broker import Broker
from fedstream.common import ReturnCode, Signal, DownloadStatus
from fedstream.nodes import Cell, FLContext, FileStreamer, FileDownloader, download_file
import fedstream.nodes
print(fedstream.nodes.__file__)
"""


def _run(args: list, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=240, **kwargs)


@pytest.mark.timeout(300)
def test_installs_as_one_namespace_beside_an_apps_own_packages(tmp_path):
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
    # pyzmq, click, ... come from the interpreter running the tests; fedstream itself does not.
    (purelib / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    # Built like `pip install .` (isolated build, as the CI's own install does), from a copy so
    # that the build's scratch files stay in this test's directory.
    source = tmp_path / "src"
    for name in ("broker", "nodes", "common"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    installed = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                      "--no-cache-dir", "--disable-pip-version-check", str(source)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]

    top_level = {p.name for p in purelib.iterdir()}
    assert "fedstream" in top_level
    assert not top_level & {"broker", "nodes", "common"}, sorted(top_level)
    for package in ("broker", "nodes", "common"):
        assert (purelib / "fedstream" / package / "py.typed").is_file()

    app = tmp_path / "app"
    for package in ("common", "nodes", "broker"):
        (app / package).mkdir(parents=True)
        (app / package / "__init__.py").write_text("MINE = True\n")
    (app / "main.py").write_text(textwrap.dedent(USER_SCRIPT))
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ran = _run([str(python), "main.py"], cwd=app, env=clean_env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.strip().startswith(str(purelib / "fedstream" / "nodes"))

    version = _run([str(venv / "bin" / "fedstream"), "--version"], cwd=app, env=clean_env)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("fedstream ")
    as_module = _run([str(python), "-m", "fedstream.nodes", "push", "--help"], cwd=app, env=clean_env)
    assert as_module.returncode == 0 and "--to" in as_module.stdout, as_module.stderr
