"""scripts/bench.py's CPU meter: the figures it derives from /proc samples (fed synthetic samples here)."""

import importlib.util
import os
from types import SimpleNamespace

import pytest

from tests.procs import REPO

_spec = importlib.util.spec_from_file_location("fedstream_bench", REPO / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

TICKS = os.sysconf("SC_CLK_TCK")


class FakeChild:
    """Shaped like the bench's Child; /proc knows no process of its pid, so the meter never samples it."""

    def __init__(self, label):
        self.label = label
        self.proc = SimpleNamespace(pid=2**22 + 1)
        self.result = {}


def a_meter(machine, processes):
    meter = bench.CpuMeter()  # not started: no sampling thread, only the samples given here
    meter._machine.extend(machine)
    for child, samples in processes.items():
        meter.watch(child)
        meter._samples[child].extend(samples)
    return meter


# one sample a second: 2 cores, 150 of every 200 ticks busy, 50 of them in the kernel
MACHINE = [(float(t), 150 * t, 50 * t, 200 * t) for t in range(11)]


@pytest.mark.timeout(10)
def test_interpolate_is_linear_between_samples_and_flat_beyond():
    samples = [(1.0, 10), (3.0, 30)]
    assert bench.interpolate(samples, 0.0) == 10
    assert bench.interpolate(samples, 2.5) == pytest.approx(25)
    assert bench.interpolate(samples, 9.0) == 30


@pytest.mark.timeout(10)
def test_around_keeps_the_samples_that_bracket_the_span():
    assert [s[0] for s in bench.around(MACHINE, 2.5, 4.5)] == [2.0, 3.0, 4.0, 5.0]
    assert [s[0] for s in bench.around(MACHINE, 3.0, 4.0)] == [3.0, 4.0]


@pytest.mark.timeout(10)
def test_a_run_gets_the_cores_busy_and_each_process_cpu_in_its_span():
    worker, early = FakeChild("worker"), FakeChild("early")
    # "worker" runs at one core until it is told to exit at 4.5 s (its last sample); "early" exits at 1.5 s
    meter = a_meter(MACHINE, {worker: [(float(t), TICKS * t) for t in range(5)] + [(4.5, TICKS * 4.5)],
                              early: [(0.0, 0), (1.0, TICKS / 2), (1.5, TICKS)]})
    run = bench.Run("case", 1, REPO, meter)
    run.children = [worker, early]
    meter.record(run, 0.5, 6.0)
    cores, kernel_share = run.cores
    assert cores == pytest.approx(1.5) and kernel_share == pytest.approx(1 / 3)
    assert run.cpu_during["worker"] == pytest.approx(4.0)  # 0.5 s to 4.5 s at one core, nothing after
    assert run.cpu_during["early"] == pytest.approx(0.75)  # 0.25 by 1 s, then 0.5 more by 1.5 s
    assert bench.merged_summary([run], per_item=False) == "worker ?/4.00, early ?/0.75"


@pytest.mark.timeout(10)
def test_a_run_too_short_to_measure_gets_no_figures():
    worker = FakeChild("worker")
    meter = a_meter(MACHINE, {worker: [(float(t), TICKS * t) for t in range(11)]})
    run = bench.Run("case", 1, REPO, meter)
    run.children = [worker]
    meter.record(run, 2.0, 2.0 + bench.CpuMeter.MIN_SPAN / 2)
    assert run.cores is None and run.cpu_during == {}
    assert bench.cores_busy([run]) == "n/a"
    assert bench.merged_summary([run], per_item=True) == ""
