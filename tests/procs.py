"""Start real fedstream processes for tests, read their output with deadlines, clean them up."""

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def process_gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def run_cli_on_a_terminal(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run the fedstream CLI with stderr on a pseudo-terminal; return (exit code, stdout, stderr)."""
    import pty

    master, slave = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "fedstream.nodes", *args], stdout=subprocess.PIPE, stderr=slave,
                            env=env)
    os.close(slave)
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal is closed once the process is gone
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.returncode, stdout.decode(), b"".join(chunks).decode()


class Proc:
    """A child process whose stdout lines are read in the background."""

    def __init__(self, args: list[str], env: Optional[dict] = None, cwd: Optional[str] = None) -> None:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH")]))
        full_env.update(env or {})
        self.args = args
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=full_env, cwd=cwd, start_new_session=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: list[str] = []
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump, args=(self.popen.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.popen.stderr, self.stderr_lines.append),
                         daemon=True).start()

    @staticmethod
    def _pump(stream, sink) -> None:
        try:
            for line in stream:
                sink(line.rstrip("\n"))
        except ValueError:  # the test's cleanup closed the pipe first
            pass

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def expect(self, prefix: str, timeout: float = 20.0) -> str:
        """Return the next stdout line starting with `prefix` (skipping others)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{self.args[:4]} printed no line starting with {prefix!r} within "
                                     f"{timeout} s; stdout so far: {self.seen[-10:]}; stderr: {self.stderr[-2000:]}")
            try:
                line = self.lines.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                if self.popen.poll() is not None and self.lines.empty():
                    time.sleep(0.1)
                    if self.lines.empty():
                        raise AssertionError(f"process exited with {self.popen.returncode} before printing "
                                             f"{prefix!r}; stdout: {self.seen[-10:]}; stderr: {self.stderr[-2000:]}")
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit and return its exit code."""
        return self.popen.wait(timeout)

    def remaining_stdout(self, timeout: float = 5.0) -> list[str]:
        """All stdout lines not read yet (after the process has exited)."""
        self.wait(timeout)
        time.sleep(0.1)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return self.seen

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signum)

    def kill(self) -> None:
        """Kill the process (and its children) at once."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(10)


class Procs:
    """Starts processes for one test and kills whatever is left at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Proc] = []

    def start(self, args: list[str], **kwargs) -> Proc:
        proc = Proc(args, **kwargs)
        self.started.append(proc)
        return proc

    def python(self, code: str, *args: str, **kwargs) -> Proc:
        """Run a snippet of Python in a new interpreter."""
        return self.start([sys.executable, "-c", textwrap.dedent(code), *args], **kwargs)

    def fedstream(self, *args: str, **kwargs) -> Proc:
        """Run the fedstream CLI."""
        return self.start([sys.executable, "-m", "fedstream.nodes", *args], **kwargs)

    def broker(self, *extra: str) -> tuple[Proc, str]:
        """Start a broker on free ports; return it and its address."""
        proc = self.fedstream("broker", "--bind", "tcp://127.0.0.1:0", *extra)
        return proc, proc.expect("tcp://")

    def cleanup(self) -> None:
        for proc in self.started:
            proc.kill()
            for stream in (proc.popen.stdout, proc.popen.stderr):
                if stream:
                    stream.close()
