"""WorkerPool: the Cell's worker threads (socket-free)."""

import threading

import pytest

from fedstream.nodes.workers import WorkerPool

pytestmark = pytest.mark.timeout(30)


def test_runs_every_call_on_at_most_its_threads_and_reuses_idle_ones():
    pool = WorkerPool(2, "test")
    release = threading.Event()
    running = threading.Semaphore(0)
    names: set[str] = set()
    done = threading.Semaphore(0)

    def call(number: int) -> None:
        names.add(threading.current_thread().name)
        running.release()
        release.wait(10)
        done.release()

    for number in range(6):
        pool.submit(call, number)
    assert running.acquire(timeout=10) and running.acquire(timeout=10)
    assert not running.acquire(timeout=0.2)  # both threads busy: the other four wait
    release.set()
    for _ in range(6):
        assert done.acquire(timeout=10)
    assert names == {"test_0", "test_1"}
    assert pool._idle == 2 and pool._unclaimed == 0  # both threads wait, none counted twice
    pool.submit(call, 6)  # an idle thread takes it: no third thread
    assert done.acquire(timeout=10) and names == {"test_0", "test_1"}
    pool.shutdown()


def test_shutdown_drops_waiting_calls_and_refuses_new_ones():
    pool = WorkerPool(1, "test")
    started, release = threading.Event(), threading.Event()
    ran: list[int] = []

    def call(number: int) -> None:
        ran.append(number)
        started.set()
        release.wait(10)

    pool.submit(call, 1)
    assert started.wait(10)
    pool.submit(call, 2)  # waits behind the first: dropped by shutdown, and handed back
    assert pool.shutdown() == [(call, (2,))]
    assert pool.shutdown() == []
    release.set()
    with pytest.raises(RuntimeError):
        pool.submit(call, 3)
    for thread in threading.enumerate():
        if thread.name == "test_0":
            thread.join(10)
    assert ran == [1]


def test_a_failing_call_does_not_end_its_thread():
    pool = WorkerPool(1, "test")
    done = threading.Event()
    pool.submit(lambda: 1 / 0)
    pool.submit(done.set)
    assert done.wait(10)
    pool.shutdown()


def test_a_thread_that_cannot_start_leaves_the_call_to_a_running_thread_or_refuses_it(monkeypatch):
    pool = WorkerPool(2, "test")
    release = threading.Event()
    ran: list[int] = []
    done = threading.Semaphore(0)

    def call(number: int) -> None:
        release.wait(10)
        ran.append(number)
        done.release()

    real_start = threading.Thread.start

    def no_thread(self) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError, match="cannot start a thread"):
        pool.submit(call, 0)  # no thread at all: refused, not queued where nothing would run it
    monkeypatch.setattr(threading.Thread, "start", real_start)
    pool.submit(call, 1)  # starts the first thread, which waits for `release`
    monkeypatch.setattr(threading.Thread, "start", no_thread)
    pool.submit(call, 2)  # no second thread: queued for the first one
    monkeypatch.setattr(threading.Thread, "start", real_start)
    release.set()
    assert done.acquire(timeout=10) and done.acquire(timeout=10)
    assert ran == [1, 2]
    assert pool._threads == 1 and pool._unclaimed == 0
    pool.shutdown()


def test_wait_for_running_waits_for_the_calls_running_but_never_for_its_own():
    pool = WorkerPool(2, "test-wait")
    started, release, done = threading.Event(), threading.Event(), threading.Event()
    try:
        pool.submit(lambda: (started.set(), release.wait(10), done.set()))
        assert started.wait(5)
        assert pool.wait_for_running(0.05) is False  # the call still runs
        waited: list = []
        waiter = threading.Thread(target=lambda: waited.append(pool.wait_for_running(10)))
        waiter.start()
        release.set()
        waiter.join(10)
        assert waited == [True] and done.is_set()
        inside = threading.Event()
        answer: list = []
        pool.submit(lambda: (answer.append(pool.wait_for_running(0.5)), inside.set()))
        assert inside.wait(5) and answer == [True]  # a call never waits for itself
    finally:
        release.set()
        pool.shutdown()
