"""Child processes of a simulation: started in their own session, stdout read line by line.

Peak RSS is sampled while a process runs and taken from its resource usage when it exits.
"""

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

from fedstream.nodes.simulate.procstats import peak_rss


class SimulationError(Exception):
    """The simulation could not complete; the message says why."""


def fedstream_command(*args: str) -> list[str]:
    """argv that runs `fedstream ARGS...` with this interpreter."""
    return [sys.executable, "-m", "fedstream.nodes", *args]


def module_command(module: str, *args: str) -> list[str]:
    """argv that runs `python -m MODULE ARGS...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


class Process:
    """A child process (own session), with its stdout read in the background."""

    def __init__(self, label: str, argv: list[str], log_path: str) -> None:
        self.label = label
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                      stderr=self._log, text=True, start_new_session=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.peak_rss: Optional[int] = None
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.popen.pid

    def next_line(self, timeout: float) -> Optional[str]:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def expect_start(self, prefix: str, timeout: float, log_dir: str) -> str:
        """The first stdout line starting with `prefix`; SimulationError if none within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.next_line(0.1)
            if line is not None and line.startswith(prefix):
                return line
            if line is None and self.poll() is not None:
                break
        raise SimulationError(f"{self.label} did not start (see {self.label}.log in {log_dir})")

    def record_rss(self) -> None:
        """Remember the peak RSS while the process is alive."""
        value = peak_rss(self.pid)
        if value is not None:
            self.peak_rss = max(self.peak_rss or 0, value)

    def poll(self) -> Optional[int]:
        """Exit code if the process ended (keeping its peak RSS from its resource usage), else None."""
        if self.popen.returncode is not None:
            return self.popen.returncode
        self.record_rss()
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        if not pid:
            return None
        self.peak_rss = max(self.peak_rss or 0, usage.ru_maxrss * 1024)
        self.popen.returncode = os.waitstatus_to_exitcode(status)
        return self.popen.returncode

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit; raise SimulationError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (code := self.poll()) is None:
            if time.monotonic() > deadline:
                raise SimulationError(f"{self.label} did not finish within {timeout:.0f} s")
            time.sleep(0.05)
        return code

    def stop(self) -> None:
        """Terminate the process group, escalating to SIGKILL."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.poll() is not None:
                break
            try:
                os.killpg(self.pid, sig)
                self.wait(5.0)
            except (ProcessLookupError, SimulationError):
                continue
        self._log.close()
