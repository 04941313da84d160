"""A whole federation on one machine: broker, server and sites as processes, push and pull."""

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from fedstream.common.sizes import format_size
from fedstream.nodes.simulate.process import Process, SimulationError, fedstream_command

SERVER = "server"
MB = 1_000_000
_START_TIMEOUT = 30.0
_REPORT_GRACE = 5.0  # seconds to wait for sites' reports after the owner command ended
_OWNER_TIMEOUT = 60.0  # seconds the owner command may run after every site reported


@dataclass
class ModeResult:
    mode: str
    size: int
    seconds: float = 0.0
    verified: dict[str, bool] = field(default_factory=dict)
    rss: dict[str, Optional[int]] = field(default_factory=dict)
    error: Optional[str] = None
    secure: bool = False  # ran with kits: CURVE links, certified names

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.verified) and all(self.verified.values())


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def make_file(path: str, size: int) -> str:
    """Write `size` random bytes to `path` in 1 MiB pieces; return the sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        remaining = size
        while remaining:
            block = os.urandom(min(1 << 20, remaining))
            digest.update(block)
            out.write(block)
            remaining -= len(block)
    return digest.hexdigest()


class Simulation:
    """Runs the federation; `run()` returns one ModeResult per mode."""

    def __init__(self, sites: int, size: int, modes: list[str], chunk_size: int, workdir: str,
                 say: Callable[[str], None], progress: Callable[[str], None], secure: bool = False) -> None:
        self.sites = [f"site-{i + 1}" for i in range(sites)]
        self.secure = secure
        self.size = size
        self.modes = modes
        self.chunk_size = chunk_size
        self.workdir = workdir
        self.say = say
        self.progress = progress
        self.processes: list[Process] = []
        self.nodes: dict[str, Process] = {}
        self.broker: Optional[Process] = None
        self.address = ""

    # -- processes -----------------------------------------------------------------------
    def _spawn(self, label: str, *args: str) -> Process:
        proc = Process(label, fedstream_command(*args), os.path.join(self.workdir, "logs", f"{label}.log"))
        self.processes.append(proc)
        self.say(f"started {label} (pid {proc.pid})")
        return proc

    def _kit(self, name: str) -> list[str]:
        """`--kit DIR` for `name` in a secure simulation (kits of a throwaway project), else nothing."""
        return ["--kit", os.path.join(self.workdir, "kits", name)] if self.secure else []

    def start_federation(self) -> None:
        os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)
        if self.secure:
            from fedstream.common.kits import provision

            provision(os.path.join(self.workdir, "kits"), ["broker", SERVER, *self.sites])
        self.broker = self._spawn("broker", "broker", "--bind", "tcp://127.0.0.1:0", *self._kit("broker"))
        self.address = self.broker.expect_start("tcp://", _START_TIMEOUT, os.path.join(self.workdir, "logs"))
        for site in self.sites:
            recv_dir = os.path.join(self.workdir, site)
            os.makedirs(recv_dir, exist_ok=True)
            self.nodes[site] = self._spawn(site, "node", site, "--broker", self.address, "--recv-dir", recv_dir,
                                           *self._kit(site))
        for site, proc in self.nodes.items():
            proc.expect_start("ready", _START_TIMEOUT, os.path.join(self.workdir, "logs"))

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def check_alive(self) -> None:
        """Fail if the broker or a site died on its own."""
        for proc in [self.broker, *self.nodes.values()]:
            if proc is not None and proc.poll() is not None:
                raise SimulationError(f"{proc.label} (pid {proc.pid}) exited unexpectedly "
                                      f"with code {proc.popen.returncode}")

    # -- one mode ------------------------------------------------------------------------
    def _site_bytes(self, site: str, name: str) -> int:
        folder = os.path.join(self.workdir, site)
        total = 0
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file() and (entry.name == name or entry.name.endswith(".part")):
                    total += entry.stat().st_size
        return min(total, self.size)

    def _report_progress(self, mode: str, name: str, started: float) -> None:
        done = {site: self._site_bytes(site, name) for site in self.sites}
        total = sum(done.values())
        share = total / (self.size * len(self.sites)) if self.size else 1.0
        rate = total / max(time.monotonic() - started, 1e-6) / MB
        per_site = "  ".join(f"{site} {100 * n / self.size if self.size else 100:3.0f}%"
                             for site, n in done.items())
        self.progress(f"{mode}: {100 * share:5.1f}%  {rate:7.0f} MB/s  {per_site}")

    def run_mode(self, mode: str) -> ModeResult:
        result = ModeResult(mode, self.size, secure=self.secure)
        name = f"{mode}-payload.bin"
        source = os.path.join(self.workdir, SERVER, name)
        os.makedirs(os.path.dirname(source), exist_ok=True)
        self.say(f"{mode}: writing a {format_size(self.size)} test file")
        expected = make_file(source, self.size)
        targets = ",".join(self.sites)
        if mode == "push":
            args = ["push", source, "--to", targets, "--broker", self.address, "--as", SERVER,
                    "--chunk-size", str(self.chunk_size), "--quiet", *self._kit(SERVER)]
        else:
            args = ["serve", source, "--broker", self.address, "--as", SERVER, "--announce-to", targets,
                    "--timeout", "30", *self._kit(SERVER)]
        started = time.monotonic()
        owner = self._spawn(f"{SERVER}-{mode}", *args)
        received: dict[str, str] = {}
        failures: list[str] = []
        next_progress = started
        owner_done_at: Optional[float] = None
        while len(received) + len(failures) < len(self.sites):
            self.check_alive()
            self._collect(mode, received, failures)
            now = time.monotonic()
            if owner_done_at is None and owner.poll() is not None:
                owner_done_at = now
            if owner_done_at is not None and now - owner_done_at > _REPORT_GRACE:
                break
            if now >= next_progress:
                self._report_progress(mode, name, started)
                next_progress = now + 1.0
            time.sleep(0.05)
        code = owner.wait(_OWNER_TIMEOUT)
        result.seconds = time.monotonic() - started
        self._collect(mode, received, failures)
        self._report_progress(mode, name, started)
        for site in self.sites:
            path = received.get(site)
            result.verified[site] = bool(path) and os.path.getsize(path) == self.size and sha256_of(path) == expected
        for proc in (self.broker, owner, *self.nodes.values()):
            proc.record_rss()
            result.rss[SERVER if proc is owner else proc.label] = proc.peak_rss
        if code != 0:
            result.error = f"the {mode} command exited with code {code}"
        if failures:
            result.error = "; ".join(filter(None, [result.error, *failures]))
        elif not result.error and not all(result.verified.values()):
            bad = [s for s, ok in result.verified.items() if not ok]
            result.error = f"sha256 mismatch or missing file at {', '.join(bad)}"
        return result

    def _collect(self, mode: str, received: dict[str, str], failures: list[str]) -> None:
        for site, proc in self.nodes.items():
            while (line := proc.next_line(0)) is not None:
                fields = line.split("\t")
                if len(fields) >= 3 and fields[1] == mode and fields[0] == "received":
                    received[site] = fields[2]
                elif len(fields) >= 3 and fields[1] == mode and fields[0] == "failed":
                    failures.append(f"{site} failed to receive {fields[2]}: {' '.join(fields[3:])}")

    def run(self) -> list[ModeResult]:
        results = []
        self.start_federation()
        for mode in self.modes:
            result = self.run_mode(mode)
            results.append(result)
            if not result.ok:
                break
        return results


def format_table(result: ModeResult, sites: list[str]) -> str:
    """The per-mode summary table."""
    total = result.size * len(sites)
    rate = total / max(result.seconds, 1e-9) / MB
    mode = f"{result.mode} (secure)" if result.secure else result.mode
    lines = [
        f"{mode}: {len(sites)} sites x {format_size(result.size)} = {format_size(total)} "
        f"in {result.seconds:.2f} s, aggregate {rate:.0f} MB/s",
        f"  {'process':<10}{'sha256 verified':<17}{'peak RSS':>10}",
    ]
    for name, rss in result.rss.items():
        verified = {True: "yes", False: "NO"}.get(result.verified.get(name), "-") if name in sites else "-"
        lines.append(f"  {name:<10}{verified:<17}{(format_size(rss) if rss else '?'):>10}")
    if result.error:
        lines.append(f"  error: {result.error}")
    return "\n".join(lines)
