#!/usr/bin/env python3
"""Benchmark fedstream against bare-ZeroMQ baselines run in the same process tree.

Every party is its own process on 127.0.0.1. Baselines do the same file read and write as
fedstream (same source file, same destination file system):

  bare relay N   DEALER -> ROUTER -> DEALER through a relay process, 8-chunk credit window,
                 the sender reading each chunk once and sending N unicast copies;
  bare fan-out N one XPUB (NODROP) feeding N SUB processes directly.

fedstream runs: pull by 1 and N recipients, push to 1 and N recipients, through a
`fedstream broker` process. Printed: MB/s, ratios to the matching baseline, peak RSS of
every process, and what the push owner sent over the network relative to the file size.

    python scripts/bench.py              # 1 GiB, 4 recipients
    python scripts/bench.py --quick      # 64 MiB smoke run
    python scripts/bench.py --secure     # also pull 1 and push N with kits (CURVE), and their ratios
"""

import argparse
import json
import os
import queue
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import zmq  # noqa: E402

from fedstream.common.digest import file_digest  # noqa: E402
from fedstream.common.sizes import format_size, parse_size  # noqa: E402
from fedstream.nodes.simulate.procstats import cpu_seconds, io_counters, peak_rss  # noqa: E402

CREDIT_WINDOW = 8  # chunks, as in DESIGN.md's baseline
MB = 1_000_000


# --------------------------------------------------------------------------------------------
# child process roles
# --------------------------------------------------------------------------------------------
def kit_of(args, name: str) -> Optional[str]:
    """The kit folder of `name` in a secure run (--kits is the provisioned project), else None."""
    return os.path.join(args.kits, name) if args.kits else None


def report(**fields) -> None:
    """Print the result line a coordinator reads, with this process's peak RSS and I/O."""
    fields.update(rss=peak_rss(), cpu=cpu_seconds(), io=io_counters())
    print("RESULT " + json.dumps(fields), flush=True)


def wait_for_term() -> None:
    """Sleep until SIGTERM/SIGINT, then report and exit."""
    signal.signal(signal.SIGTERM, lambda *_: (report(), sys.exit(0)))
    signal.signal(signal.SIGINT, lambda *_: (report(), sys.exit(0)))
    while True:
        time.sleep(1)


def file_chunks(path: str, chunk_size: int) -> Iterator[tuple[bytes, bytes]]:
    """(offset header, data) for each chunk of a file, read once, then the end marker (offset -1)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while data := os.read(fd, chunk_size):
            yield struct.pack("!q", offset), data
            offset += len(data)
    finally:
        os.close(fd)
    yield struct.pack("!q", -1), b""


def role_relay(_args) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    print(f"PORT {port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (report(), os._exit(0)))
    waiting: dict = {}  # messages for peers that have not said hello yet
    while True:
        sender, target, *rest = router.recv_multipart(copy=False)
        if target.bytes == b"relay":
            for frames in waiting.pop(sender.bytes, []):
                router.send_multipart(frames, copy=False)
            continue
        frames = [target, sender, *rest]
        try:
            router.send_multipart(frames, copy=False)
        except zmq.ZMQError:
            waiting.setdefault(target.bytes, []).append(frames)


def role_relay_recv(args) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, args.name.encode())
    sock.connect(args.connect)
    fd = os.open(args.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for _ in range(CREDIT_WINDOW):
        sock.send_multipart([b"send", b"credit"])
    started, received = None, 0
    while True:
        _sender, header, data = sock.recv_multipart(copy=False)
        if started is None:
            started = time.time()
        (offset,) = struct.unpack("!q", header.buffer)
        if offset < 0:
            break
        os.pwrite(fd, data.buffer, offset)
        received += len(data)
        sock.send_multipart([b"send", b"credit"])
    os.close(fd)
    report(start=started, end=time.time(), bytes=received)


def role_relay_send(args) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, b"send")
    sock.connect(args.connect)
    sock.send_multipart([b"relay", b"hello"])
    targets = [t.encode() for t in args.targets.split(",")]
    credit = dict.fromkeys(targets, 0)
    while min(credit.values()) < CREDIT_WINDOW:  # every receiver is connected and ready
        source, _ = sock.recv_multipart()
        credit[source] += 1
    started = time.time()
    size = 0
    for header, data in file_chunks(args.file, args.chunk_size):
        for target in targets:
            while credit[target] == 0:
                source, _ = sock.recv_multipart()
                credit[source] += 1
            credit[target] -= 1
            sock.send_multipart([target, header, data], copy=False)
        size += len(data)
    report(start=started, end=time.time(), bytes=size)
    sys.stdin.read()  # stay connected until the coordinator saw every receiver finish


def role_fan_pub(args) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_NODROP, 1)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    pub.setsockopt(zmq.SNDHWM, 16)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    print(f"PORT {port}", flush=True)
    for _ in range(args.count):  # one subscription message per subscriber
        pub.recv()
    started = time.time()
    size = 0
    for header, data in file_chunks(args.file, args.chunk_size):
        pub.send_multipart([b"s", header, data], copy=False)
        size += len(data)
    report(start=started, end=time.time(), bytes=size)
    sys.stdin.read()  # stay connected until the coordinator saw every subscriber finish


def role_fan_sub(args) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 16)
    sub.connect(args.connect)
    sub.setsockopt(zmq.SUBSCRIBE, b"s")
    fd = os.open(args.dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    received = 0
    while True:
        _topic, header, data = sub.recv_multipart(copy=False)
        (offset,) = struct.unpack("!q", header.buffer)
        if offset < 0:
            break
        os.pwrite(fd, data.buffer, offset)
        received += len(data)
    os.close(fd)
    report(end=time.time(), bytes=received)


def role_pull_owner(args) -> None:
    import threading

    from fedstream.nodes import Cell, FileDownloader

    finished = []
    all_done = threading.Event()

    def downloaded(ref_id, to_site, status, file_name):
        finished.append((to_site, str(status)))
        if len(finished) == args.count:
            all_done.set()

    with Cell("server", args.connect, kit=kit_of(args, "server")) as cell:
        tx = FileDownloader.new_transaction(cell, timeout=60.0, timeout_cb=lambda *a, **k: all_done.set())
        ref_id = FileDownloader.add_file(tx, args.file, file_downloaded_cb=downloaded)
        print(f"RID {ref_id}", flush=True)
        all_done.wait(3600)
        FileDownloader.delete_transaction(tx)
    report(statuses=finished)


def role_pull_recv(args) -> None:
    from fedstream.nodes import Cell, download_file

    with Cell(args.name, args.connect, kit=kit_of(args, args.name)) as cell:
        started = time.time()
        error, path = download_file("server", args.ref, 30.0, cell, location=args.dest)
        ended = time.time()
    report(start=started, end=ended, error=error, path=path)


def role_push_recv(args) -> None:
    import threading

    from fedstream.nodes import Cell, FileStreamer, FLContext

    done = threading.Event()
    outcome: dict = {}

    def stream_done(stream_ctx, fl_ctx):
        outcome.update(end=time.time(), rc=str(FileStreamer.get_rc(stream_ctx)),
                       path=FileStreamer.get_file_location(stream_ctx))
        done.set()

    with Cell(args.name, args.connect, kit=kit_of(args, args.name)) as cell:
        FileStreamer.register_stream_processing(FLContext(cell), "bench", "file", dest_dir=args.dest,
                                                stream_done_cb=stream_done)
        print("READY", flush=True)
        done.wait(3600)
    report(**outcome)


def role_push_owner(args) -> None:
    from fedstream.nodes import Cell
    from fedstream.nodes.push.sender import send_file  # what FileStreamer.stream_file runs, with its byte counts

    with Cell("server", args.connect, kit=kit_of(args, "server")) as cell:
        read_before = io_counters().get("rchar", 0)
        started = time.time()
        result = send_file(cell, "bench", "file", {}, args.targets.split(","), args.file, args.chunk_size)
        ended = time.time()
        read = io_counters().get("rchar", 0) - read_before
    report(start=started, end=ended, rc=str(result.rc), ok=result.ok, error=result.error,
           published=result.bytes_published, repaired=result.bytes_repaired, read=read)


ROLES = {
    "relay": role_relay, "relay-recv": role_relay_recv, "relay-send": role_relay_send,
    "fan-pub": role_fan_pub, "fan-sub": role_fan_sub,
    "pull-owner": role_pull_owner, "pull-recv": role_pull_recv,
    "push-owner": role_push_owner, "push-recv": role_push_recv,
}


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------
class Child:
    """A role running in its own process."""

    def __init__(self, label: str, role: str, *args: str, cmd: Optional[list] = None,
                 log_dir: Optional[Path] = None) -> None:
        self.label = label
        argv = cmd or [sys.executable, __file__, "--role", role, *args]
        self.log_path = (log_dir or Path(tempfile.gettempdir())) / f"{label}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                         text=True, cwd=REPO)
        self.result: dict = {}
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line)
        self.lines.put(None)  # end of output

    def line(self, prefix: str, timeout: float = 60.0) -> str:
        """The rest of the next stdout line starting with `prefix`; RuntimeError after `timeout` s."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                break
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"{self.label} did not print {prefix!r} (exit code {self.proc.poll()}); "
                           f"its stderr: {self.log_path.read_text()[-2000:]}")

    def finish(self, timeout: float = 600.0) -> dict:
        """Wait for the result line, tell the process it may exit, and wait for that."""
        self.result = json.loads(self.line("RESULT ", timeout))
        self.release()
        return self.result

    def result_line(self, timeout: float = 600.0) -> dict:
        """Wait for the result line; the process stays up until release()."""
        self.result = json.loads(self.line("RESULT ", timeout))
        return self.result

    def release(self) -> None:
        """Close the process's stdin (senders wait for that) and wait for it to exit."""
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(30)

    def stop(self) -> dict:
        """Read a long-running process's peak RSS, then terminate it."""
        rss, cpu = peak_rss(self.proc.pid), cpu_seconds(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.result = {"rss": rss, "cpu": cpu}
        return self.result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Run:
    """One measured transfer: its processes, outcome and figures."""

    def __init__(self, name: str, recipients: int, log_dir: Path) -> None:
        self.name = name
        self.recipients = recipients
        self.log_dir = log_dir
        self.children: list[Child] = []
        self.seconds = 0.0
        self.mbps = 0.0
        self.verified = False
        self.notes: list[str] = []

    def start(self, label: str, role: str, *args: str, cmd: Optional[list] = None) -> Child:
        child = Child(label, role, *args, cmd=cmd, log_dir=self.log_dir)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            child.kill()

    def rss_summary(self) -> str:
        parts = [f"{c.label} {c.result['rss'] / 2**20:.0f}/{c.result.get('cpu') or 0:.1f}"
                 for c in self.children if c.result.get("rss")]
        return ", ".join(parts)

    def max_rss(self) -> int:
        return max((c.result.get("rss") or 0) for c in self.children)


class Bench:
    def __init__(self, size: int, recipients: int, chunk_size: int, workdir: Path) -> None:
        self.size = size
        self.recipients = recipients
        self.chunk_size = chunk_size
        self.workdir = workdir
        self.source = workdir / "source.bin"
        self.digest = ""
        self.rounds: list[dict[str, Run]] = []  # one dict per round of the plan (--repeat)
        self.runs: dict[str, Run] = {}  # the round being run

    def new_round(self) -> None:
        """Start collecting the runs of the next round of the plan."""
        self.runs = {}
        self.rounds.append(self.runs)

    def series(self, name: str) -> list[Run]:
        """The runs called `name`, one per round that completed it."""
        return [runs[name] for runs in self.rounds if name in runs]

    def make_source(self) -> None:
        block = 1 << 20
        with open(self.source, "wb") as out:
            remaining = self.size
            while remaining:
                n = min(block, remaining)
                out.write(os.urandom(n))
                remaining -= n
        self.digest = file_digest(str(self.source))

    def dest(self, run: str, site: str) -> Path:
        path = self.workdir / run / site
        path.mkdir(parents=True, exist_ok=True)
        return path

    def verify(self, run: Run, paths: list) -> None:
        good = [p for p in paths if p and os.path.getsize(p) == self.size and file_digest(str(p)) == self.digest]
        run.verified = len(good) == run.recipients
        if not run.verified:
            run.notes.append(f"only {len(good)} of {run.recipients} copies verified")
        shutil.rmtree(self.workdir / run.name, ignore_errors=True)

    def finish(self, run: Run, start: float, end: float) -> None:
        run.seconds = max(end - start, 1e-9)
        run.mbps = self.size * run.recipients / run.seconds / MB
        self.runs[run.name] = run

    # -- baselines -----------------------------------------------------------------------
    def bare_relay(self, n: int) -> Run:
        run = Run(f"bare relay {n}", n, self.workdir)
        try:
            relay = run.start("relay", "relay")
            address = f"tcp://127.0.0.1:{relay.line('PORT ')}"
            names = [f"recv{i}" for i in range(n)]
            dests = [self.dest(run.name, name) / "copy.bin" for name in names]
            receivers = [run.start(name, "relay-recv", "--connect", address, "--name", name, "--dest", str(d))
                         for name, d in zip(names, dests)]
            sender = run.start("sender", "relay-send", "--connect", address, "--targets", ",".join(names),
                               "--file", str(self.source), "--chunk-size", str(self.chunk_size))
            sent = sender.result_line()
            ends = [r.finish()["end"] for r in receivers]
            sender.release()
            relay.stop()
            self.finish(run, sent["start"], max(ends))
            self.verify(run, dests)
        finally:
            run.close()
        return run

    def bare_fanout(self, n: int) -> Run:
        run = Run(f"bare fan-out {n}", n, self.workdir)
        try:
            pub = run.start("publisher", "fan-pub", "--file", str(self.source), "--count", str(n),
                            "--chunk-size", str(self.chunk_size))
            address = f"tcp://127.0.0.1:{pub.line('PORT ')}"
            dests = [self.dest(run.name, f"sub{i}") / "copy.bin" for i in range(n)]
            subs = [run.start(f"sub{i}", "fan-sub", "--connect", address, "--dest", str(d))
                    for i, d in enumerate(dests)]
            published = pub.result_line()
            ends = [s.finish()["end"] for s in subs]
            pub.release()
            self.finish(run, published["start"], max(ends))
            self.verify(run, dests)
        finally:
            run.close()
        return run

    # -- fedstream -----------------------------------------------------------------------
    def kits(self, secure: bool) -> list[str]:
        """Child arguments naming the provisioned project of a secure run (made once), or none."""
        if not secure:
            return []
        from fedstream.common.kits import provision

        project = self.workdir / "kits"
        provision(project, ["broker", "server"] + [f"site-{i + 1}" for i in range(self.recipients)])
        return ["--kits", str(project)]

    @staticmethod
    def start_broker(run: Run, kits: list[str]) -> tuple[Child, str]:
        """A `fedstream broker` process on free ports (with the broker kit in a secure run), and its address."""
        secure = ["--kit", os.path.join(kits[1], "broker")] if kits else []
        broker = run.start("broker", "", cmd=[sys.executable, "-m", "fedstream.nodes", "broker", "--bind",
                                               "tcp://127.0.0.1:0", *secure])
        return broker, "tcp://" + broker.line("tcp://", 30)

    def pull(self, n: int, secure: bool = False) -> Run:
        run = Run(f"pull {n}" + (" secure" if secure else ""), n, self.workdir)
        kits = self.kits(secure)
        try:
            broker, address = self.start_broker(run, kits)
            owner = run.start("owner", "pull-owner", "--connect", address, "--file", str(self.source),
                              "--count", str(n), *kits)
            ref = owner.line("RID ")
            names = [f"site-{i + 1}" for i in range(n)]
            receivers = [run.start(name, "pull-recv", "--connect", address, "--name", name, "--ref", ref,
                                   "--dest", str(self.dest(run.name, name)), *kits) for name in names]
            results = [r.finish() for r in receivers]
            owner.finish()
            broker.stop()
            errors = [r["error"] for r in results if r.get("error")]
            run.notes.extend(errors)
            self.finish(run, min(r["start"] for r in results), max(r["end"] for r in results))
            self.verify(run, [r.get("path") for r in results])
        finally:
            run.close()
        return run

    def push(self, n: int, secure: bool = False) -> Run:
        run = Run(f"push {n}" + (" secure" if secure else ""), n, self.workdir)
        kits = self.kits(secure)
        try:
            broker, address = self.start_broker(run, kits)
            names = [f"site-{i + 1}" for i in range(n)]
            receivers = []
            for name in names:
                receiver = run.start(name, "push-recv", "--connect", address, "--name", name,
                                     "--dest", str(self.dest(run.name, name)), *kits)
                receiver.line("READY")
                receivers.append(receiver)
            owner = run.start("owner", "push-owner", "--connect", address, "--targets", ",".join(names),
                              "--file", str(self.source), "--chunk-size", str(self.chunk_size), *kits)
            sent = owner.finish()
            results = [r.finish() for r in receivers]
            broker.stop()
            if not sent.get("ok"):
                run.notes.append(f"stream_file returned {sent.get('rc')}: {sent.get('error')}")
            run.notes.append(f"owner published {sent['published'] / self.size:.2f}x the file size on the fan-out, "
                             f"repaired {sent['repaired'] / self.size:.2f}x by unicast, "
                             f"read {sent['read'] / self.size:.2f}x from disk")
            self.finish(run, sent["start"], sent["end"])
            self.verify(run, [r.get("path") for r in results])
        finally:
            run.close()
        return run


def spread(values: list[float], fmt: str = "{:.0f}", unit: str = "") -> str:
    """A figure over the rounds: the value itself for one round, else 'median [min-max]'."""
    if len(values) == 1:
        return fmt.format(values[0]) + unit
    return f"{fmt.format(statistics.median(values))}{unit} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def ratio(bench: Bench, a: str, b: str, attr: str = "mbps") -> str:
    """Run `a` over run `b` taken in the same round: 'r.rrx' for one round, else median [min-max] over rounds."""
    values = []
    for runs in bench.rounds:
        top, bottom = runs.get(a), runs.get(b)
        if top and bottom and getattr(bottom, attr):
            values.append(getattr(top, attr) / getattr(bottom, attr))
    return spread(values, "{:.2f}", "x") if values else "n/a"


def run_names(bench: Bench) -> list[str]:
    """Every run name in the order of the plan."""
    names: dict[str, None] = {}
    for runs in bench.rounds:
        names.update(dict.fromkeys(runs))
    return list(names)


def merged_summary(series: list[Run]) -> str:
    """Per process over the rounds: the largest peak RSS (MiB) / the median CPU seconds."""
    rss: dict[str, list[int]] = {}
    cpu: dict[str, list[float]] = {}
    for run in series:
        for child in run.children:
            if child.result.get("rss"):
                rss.setdefault(child.label, []).append(child.result["rss"])
                cpu.setdefault(child.label, []).append(child.result.get("cpu") or 0)
    return ", ".join(f"{label} {max(rss[label]) / 2**20:.0f}/{statistics.median(cpu[label]):.1f}" for label in rss)


def merged_notes(bench: Bench, name: str) -> list[str]:
    """The notes of run `name` over the rounds, each once, with the rounds it came from unless it came from all."""
    where: dict[str, list[int]] = {}
    for number, runs in enumerate(bench.rounds, 1):
        for note in runs[name].notes if name in runs else []:
            where.setdefault(note, []).append(number)
    return [note if len(rounds) == len(bench.rounds) else f"(round {','.join(map(str, rounds))}) {note}"
            for note, rounds in where.items()]


def print_runs(bench: Bench) -> None:
    """The table of runs: each run as measured (one round), or its median and range over the rounds."""
    if len(bench.rounds) == 1:
        header = f"{'run':<16}{'MB/s':>9}{'seconds':>9}  {'verified':<9}{'per process: peak RSS MiB / CPU seconds'}"
        print(header)
        print("-" * len(header))
        for run in bench.runs.values():
            print(f"{run.name:<16}{run.mbps:>9.0f}{run.seconds:>9.2f}  {'yes' if run.verified else 'NO':<9}"
                  f"{run.rss_summary()}")
            for note in run.notes:
                print(f"{'':<16}  {note}")
        return
    header = (f"{'run':<16}{'MB/s median [min-max]':>22}{'seconds':>9}  {'verified':<9}"
              f"per process: peak RSS MiB (largest) / CPU seconds (median)")
    print(header)
    print("-" * len(header))
    for name in run_names(bench):
        series = bench.series(name)
        verified = sum(run.verified for run in series)
        print(f"{name:<16}{spread([r.mbps for r in series]):>22}"
              f"{statistics.median(r.seconds for r in series):>9.2f}  {verified}/{len(bench.rounds):<7}"
              f"{merged_summary(series)}")
        for note in merged_notes(bench, name):
            print(f"{'':<16}  {note}")


def print_report(bench: Bench) -> bool:
    runs = bench.runs
    n = bench.recipients
    rounds = len(bench.rounds)
    print()
    print(f"fedstream bench: {format_size(bench.size)} file, {format_size(bench.chunk_size)} chunks, "
          f"{os.cpu_count()} CPUs, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}"
          + (f", {rounds} rounds (cases interleaved; ratios paired within a round)" if rounds > 1 else ""))
    print_runs(bench)
    print()
    checks = [
        ("pull 1 vs bare relay 1 (throughput, budget >= 0.80x)", "pull 1", "bare relay 1", "mbps"),
        (f"pull {n} vs bare relay {n} (aggregate throughput)", f"pull {n}", f"bare relay {n}", "mbps"),
        ("push 1 vs bare relay 1 (throughput)", "push 1", "bare relay 1", "mbps"),
        (f"push {n} vs bare relay {n} unicast copies (aggregate, budget >= 1.5x)", f"push {n}", f"bare relay {n}",
         "mbps"),
        (f"push {n} vs bare fan-out {n} (aggregate throughput)", f"push {n}", f"bare fan-out {n}", "mbps"),
        (f"push {n} wall time vs push 1 (budget <= 1.5x)", f"push {n}", "push 1", "seconds"),
        (f"bare fan-out {n} wall time vs bare fan-out 1 (what this machine allows)", f"bare fan-out {n}",
         "bare fan-out 1", "seconds"),
    ]
    if "pull 1 secure" in runs or f"push {n} secure" in runs:
        checks += [("pull 1 secure (CURVE) vs pull 1 plaintext (throughput)", "pull 1 secure", "pull 1", "mbps"),
                   (f"push {n} secure (CURVE) vs push {n} plaintext (aggregate throughput)", f"push {n} secure",
                    f"push {n}", "mbps")]
    width = 8 if rounds == 1 else 20
    if rounds > 1:
        print(f"{'ratio':<70}{'median [min-max]':>{width}}")
    for label, a, b, attr in checks:
        print(f"{label:<70}{ratio(bench, a, b, attr):>{width}}")
    peak = max((run.max_rss() for runs in bench.rounds for run in runs.values()
                if run.name.startswith(("pull", "push"))), default=0)
    print(f"{'largest peak RSS of any fedstream process (budget < 100 MiB)':<70}{peak / 2**20:>{width - 1}.0f}M")
    return all(run.verified for runs in bench.rounds for run in runs.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="file size (default 1G)")
    parser.add_argument("--quick", action="store_true", help="64 MiB smoke run")
    parser.add_argument("--recipients", type=int, default=4)
    parser.add_argument("--chunk-size", default="1M")
    parser.add_argument("--workdir", help="where to put the files (default: a temp dir, removed)")
    parser.add_argument("--secure", action="store_true", help="also run pull 1 and push N with kits (CURVE)")
    parser.add_argument("--repeat", type=int, default=1, metavar="K",
                        help="run the plan K times, cases interleaved; report medians and ranges (default 1)")
    # child roles
    parser.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    for flag in ("--connect", "--name", "--dest", "--file", "--targets", "--ref", "--kits"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.chunk_size = parse_size(args.chunk_size)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.role:
        ROLES[args.role](args)
        return 0

    size = parse_size("64M") if args.quick else parse_size(args.size)
    workdir = Path(tempfile.mkdtemp(prefix="fedstream-bench-", dir=args.workdir))
    try:
        bench = Bench(size, args.recipients, args.chunk_size, workdir)
        print(f"writing a {format_size(size)} source file in {workdir} ...", flush=True)
        bench.make_source()
        n = args.recipients
        plan = [("bare relay 1", lambda: bench.bare_relay(1)), ("pull 1", lambda: bench.pull(1)),
                ("bare fan-out 1", lambda: bench.bare_fanout(1)), ("push 1", lambda: bench.push(1)),
                (f"bare relay {n}", lambda: bench.bare_relay(n)),
                (f"bare fan-out {n}", lambda: bench.bare_fanout(n)), (f"pull {n}", lambda: bench.pull(n)),
                (f"push {n}", lambda: bench.push(n))]
        if args.secure:
            plan += [("pull 1 secure", lambda: bench.pull(1, secure=True)),
                     (f"push {n} secure", lambda: bench.push(n, secure=True))]
        failed = []
        for round_no in range(1, args.repeat + 1):
            bench.new_round()
            for name, step in plan:
                label = name if args.repeat == 1 else f"{name} (round {round_no}/{args.repeat})"
                print(f"running {label} ...", flush=True)
                try:
                    run = step()
                except RuntimeError as exc:
                    print(f"  {label} failed: {exc}", flush=True)
                    failed.append(label)
                    continue
                print(f"  {run.mbps:.0f} MB/s in {run.seconds:.2f} s, verified: {run.verified}", flush=True)
        return 0 if print_report(bench) and not failed else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
