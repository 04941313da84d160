"""`fedstream simulate`: a broker, a server and N sites as processes running rounds of FedAvg.

The parent starts every process, relays the server's progress events (JSON lines, see
`roles`), kills a site at a chosen round if asked (`--kill-site NAME@ROUND`), samples each
process's peak RSS, and turns the events into a per-round report. The FedAvg itself and
its bit-for-bit check run in the server (`server.py`); the sites in `site.py`.
"""

import json
import os
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from fedstream.common.sizes import format_size
from fedstream.nodes.simulate import roles
from fedstream.nodes.simulate.process import Process, fedstream_command, module_command

MB = 1_000_000
_START_TIMEOUT = 30.0
_EXIT_GRACE = 30.0  # seconds the server may take to exit after its final event


@dataclass
class RoundReport:
    number: int
    sites: list[str]
    missing: list[str]
    bytes_down: int
    bytes_up: int
    seconds_down: float
    seconds_up: float
    slowest: Optional[str]

    @property
    def rate(self) -> float:
        """Aggregate MB/s of the round (down and up bytes over down and up time)."""
        seconds = self.seconds_down + self.seconds_up
        return (self.bytes_down + self.bytes_up) / seconds / MB if seconds > 0 else 0.0


@dataclass
class FedAvgResult:
    sites: list[str]
    rounds: list[RoundReport] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    verified: bool = False
    error: Optional[str] = None
    exit_code: int = 1
    rss: dict[str, Optional[int]] = field(default_factory=dict)
    secure: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "sites": self.sites, "secure": self.secure, "verified": self.verified, "missing": self.missing,
            "error": self.error, "exit_code": self.exit_code,
            "rounds": [{"round": r.number, **{k: v for k, v in vars(r).items() if k != "number"},
                        "mb_per_s": round(r.rate, 1)} for r in self.rounds],
            "peak_rss": self.rss,
        }


@dataclass
class FedAvgConfig:
    sites: int = 4
    rounds: int = 3
    model_size: int = 64 << 20
    layers: int = 8
    down: str = "pull"
    kill_site: Optional[tuple[str, int]] = None
    round_timeout: float = 120.0
    kit_dir: Optional[str] = None  # a provisioned project: kits in kit_dir/<name>


class FedAvgSimulation:
    """Runs one simulated federation; `run()` returns its FedAvgResult."""

    def __init__(self, config: FedAvgConfig, workdir: str, say: Callable[[str], None],
                 progress: Callable[[str], None]) -> None:
        self.config = config
        self.sites = [f"site-{i + 1}" for i in range(config.sites)]
        self.workdir = workdir
        self.say = say
        self.progress = progress
        self.processes: list[Process] = []
        self._site_state: dict[str, str] = {}

    def _spawn(self, label: str, argv: list[str]) -> Process:
        proc = Process(label, argv, os.path.join(self.workdir, "logs", f"{label}.log"))
        self.processes.append(proc)
        self.say(f"started {label} (pid {proc.pid})")
        return proc

    def _kit(self, name: str) -> list[str]:
        return ["--kit", os.path.join(self.config.kit_dir, name)] if self.config.kit_dir else []

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def run(self) -> FedAvgResult:
        os.makedirs(os.path.join(self.workdir, "logs"), exist_ok=True)
        result = FedAvgResult(self.sites, secure=self.config.kit_dir is not None)
        broker = self._spawn("broker", fedstream_command("broker", "--bind", "tcp://127.0.0.1:0",
                                                         *self._kit("broker")))
        address = broker.expect_start("tcp://", _START_TIMEOUT, os.path.join(self.workdir, "logs"))
        site_procs = {}
        for site in self.sites:
            site_procs[site] = self._spawn(site, module_command("fedstream.nodes.simulate.site", site,
                                                               "--broker", address, *self._kit(site)))
        for proc in site_procs.values():
            proc.expect_start("ready", _START_TIMEOUT, os.path.join(self.workdir, "logs"))
        server = self._spawn(roles.SERVER, module_command(
            "fedstream.nodes.simulate.server", "--broker", address, "--sites", ",".join(self.sites),
            "--rounds", str(self.config.rounds), "--model-size", str(self.config.model_size),
            "--layers", str(self.config.layers), "--down", self.config.down,
            "--round-timeout", str(self.config.round_timeout), "--workdir", self.workdir, *self._kit(roles.SERVER)))
        final = self._follow(server, site_procs, result)
        code = server.wait(_EXIT_GRACE)
        for proc in self.processes:
            proc.record_rss()
            result.rss[proc.label] = proc.peak_rss
        if final is None:
            result.error = (f"the server exited with code {code} before finishing "
                            f"(see server.log in {self.workdir}/logs)")
            return result
        result.verified = bool(final.get("verified"))
        result.missing = list(final.get("missing") or [])
        result.error = final.get("error")
        result.exit_code = code
        return result

    def _follow(self, server: Process, site_procs: dict[str, Process], result: FedAvgResult) -> Optional[dict]:
        """Relay the server's events until its final one (None if it ended without one)."""
        killed = False
        while True:
            line = server.next_line(0.2)
            for proc in self.processes:
                proc.record_rss()
            if line is None:
                if server.poll() is not None:
                    return None
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            kind = event.get("event")
            if kind == roles.EV_ROUND_START:
                self._site_state = {s: "starting" for s in event["sites"]}
                self._show(event["round"])
                kill = self.config.kill_site
                if kill and not killed and kill[1] == event["round"] and kill[0] in site_procs:
                    os.kill(site_procs[kill[0]].pid, signal.SIGKILL)
                    killed = True
                    self.say(f"killed {kill[0]} at round {event['round']}")
            elif kind in (roles.EV_SITE_DOWN, roles.EV_SITE_UP, roles.EV_SITE_MISSING):
                state = {roles.EV_SITE_DOWN: "training", roles.EV_SITE_UP: "done", roles.EV_SITE_MISSING: "missing"}
                self._site_state[event["site"]] = state[kind]
                self._show(event["round"])
                if kind == roles.EV_SITE_MISSING:
                    self.say(f"round {event['round']}: {event['site']} is missing ({event['reason']})")
            elif kind == roles.EV_ROUND_DONE:
                report = RoundReport(event["round"], event["sites"], event["missing"], event["bytes_down"],
                                     event["bytes_up"], event["seconds_down"], event["seconds_up"], event["slowest"])
                result.rounds.append(report)
                self.say(f"round {report.number}: {len(report.sites)} sites aggregated, "
                         f"{report.rate:.0f} MB/s")
            elif kind == roles.EV_FINAL:
                return event

    def _show(self, round_no: int) -> None:
        states = "  ".join(f"{site} {state}" for site, state in sorted(self._site_state.items()))
        self.progress(f"round {round_no}/{self.config.rounds}: {states}")


def format_report(result: FedAvgResult, config: FedAvgConfig) -> str:
    """The per-round table and the peak RSS of every process."""
    mode = "secure" if result.secure else "plain"
    lines = [
        f"FedAvg: {len(result.sites)} sites, {config.rounds} rounds, model {format_size(config.model_size)} "
        f"in {config.layers} layers, down by {config.down}, {mode}",
        f"  {'round':>5} {'bytes down':>11} {'bytes up':>11} {'s down':>7} {'s up':>7} {'MB/s':>7}  slowest",
    ]
    for r in result.rounds:
        lines.append(f"  {r.number:>5} {format_size(r.bytes_down):>11} {format_size(r.bytes_up):>11} "
                     f"{r.seconds_down:>7.2f} {r.seconds_up:>7.2f} {r.rate:>7.0f}  {r.slowest or '-'}")
    lines.append(f"  {'process':<10}{'peak RSS':>10}")
    for name, rss in result.rss.items():
        lines.append(f"  {name:<10}{(format_size(rss) if rss else '?'):>10}")
    return "\n".join(lines)
