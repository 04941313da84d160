"""Long runs against real processes: back-to-back pushes between the same two processes, and a broker
flooded with garbage, leave descriptors, threads and memory where they were."""

import os

import pytest

from tests.procs import wait_until
from tests.push_support import make_file, next_done, run_helper, sha256_of, start_receiver

MiB = 1 << 20
PUSHES = 50
WARM_UP = 5
FD_SLACK, THREAD_SLACK, RSS_SLACK = 4, 2, 20 * MiB


def _status(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _resources(pid: int) -> dict[str, int]:
    """Open descriptors, threads and resident bytes of a process."""
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": _status(pid, "Threads"),
            "rss": _status(pid, "VmRSS") * 1024}


def _within(start: dict[str, int], now: dict[str, int]) -> bool:
    return (now["fds"] <= start["fds"] + FD_SLACK and now["threads"] <= start["threads"] + THREAD_SLACK
            and now["rss"] <= start["rss"] + RSS_SLACK)


def _show(role: str, start: dict[str, int], end: dict[str, int]) -> str:
    return (f"{role}: fds {start['fds']} -> {end['fds']}, threads {start['threads']} -> {end['threads']}, "
            f"RSS {start['rss'] / MiB:.1f} -> {end['rss'] / MiB:.1f} MiB")


@pytest.mark.timeout(120)
def test_fifty_back_to_back_pushes_leak_no_descriptors_threads_or_memory(procs, broker_address, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    digests = {}
    for n in range(PUSHES):  # sizes vary around a few chunks, one of them not a multiple of the chunk size
        name = f"shard-{n:03d}.bin"
        digests[name] = make_file(str(source / name), (1 + n % 3) * MiB + 7 * n)
    dest = str(tmp_path / "dest")
    receiver = start_receiver(procs, "site-1", broker_address, dest)
    go = tmp_path / "go"
    owner = run_helper(procs, "soak_pusher", broker_address, str(source), "site-1", str(WARM_UP), str(go))
    owner.expect("STARTED", 30)

    def received(count: int) -> None:
        for _ in range(count):
            pushed = owner.expect("PUSHED ", 60).split()
            assert pushed[2] == "OK", pushed
            report = next_done(receiver, 60)
            assert report["rc"] == "OK" and report["name"] == pushed[1], report
            assert sha256_of(report["path"]) == digests[pushed[1]]
            os.unlink(report["path"])

    received(WARM_UP)  # warm up: pools, caches and the fan-out connection of both sides are in use now
    owner.expect("WARM", 30)
    pids = {"owner": owner.pid, "recipient": receiver.pid}
    start = {role: _resources(pid) for role, pid in pids.items()}
    go.touch()
    received(PUSHES - WARM_UP)
    owner.expect("FINISHED", 30)
    # a stream's last threads end just after its callbacks: give both sides a moment to become idle
    try:
        wait_until(lambda: all(_within(start[role], _resources(pid)) for role, pid in pids.items()), 10)
    except AssertionError:
        pass  # the assertions below say what grew
    end = {role: _resources(pid) for role, pid in pids.items()}
    for role in pids:
        print(_show(role, start[role], end[role]))
    for role in pids:
        assert _within(start[role], end[role]), _show(role, start[role], end[role])
    assert os.listdir(dest) == []  # every file arrived under its name and was removed; no .part left
