"""WorkerPool: a Cell's worker threads, started as needed up to a limit, with no Future per call.

`ThreadPoolExecutor.submit` costs about 9 µs of CPU per call (a Future, a work item and four
Condition operations) against 0.5 µs here, and a Cell submits a call per request it serves.
Nothing waits on a call's result, so none is kept: a call's exception is logged by the caller's
wrapper (the Cell wraps every call it submits).

Threads are daemons: a process that ends without stopping its Cells does not wait for them.
"""

import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


class WorkerPool:
    """Run calls on at most `workers` threads, in submission order as threads free up."""

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}.")
        self._max = workers
        self._name = name
        self._calls: "queue.SimpleQueue[tuple[Callable[..., Any], tuple] | None]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a call, none of them claimed by a queued call yet
        self._unclaimed = 0  # queued calls that no waiting thread was counted for: busy threads take them
        self._closed = False
        self._started = 0  # calls taken by a thread so far
        self._running: dict[int, int] = {}  # thread ident -> number of the call it runs
        self._returned = threading.Condition(self._lock)
        self._waiters = 0  # threads in wait_for_running: only then does a returning call notify

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue `fn(*args)`; raise RuntimeError once the pool is shut down, or if it has no thread to run it."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            if self._idle:
                self._idle -= 1
                self._calls.put((fn, args))
                return
            if self._threads >= self._max:
                self._unclaimed += 1  # a busy thread takes it when it is done
                self._calls.put((fn, args))
                return
            self._threads += 1
            number = self._threads
        try:
            threading.Thread(target=self._work, name=f"{self._name}_{number - 1}", daemon=True).start()
        except RuntimeError as exc:  # the process has no thread to give
            with self._lock:
                self._threads -= 1
                if not self._threads:  # nothing would ever run the call: refuse it
                    raise RuntimeError(f"worker pool {self._name} cannot start a thread: {exc}") from None
                self._unclaimed += 1  # one of the running threads takes it when it is done
                self._calls.put((fn, args))
            return
        self._calls.put((fn, args))

    def shutdown(self) -> list[tuple[Callable[..., Any], tuple]]:
        """Drop the calls not started yet, and return them; every thread ends after its current call."""
        with self._lock:
            if self._closed:
                return []
            self._closed = True
            threads = self._threads
        dropped = []
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                break
            if call is not None:
                dropped.append(call)
        for _ in range(threads):
            self._calls.put(None)
        return dropped

    def wait_for_running(self, timeout: float) -> bool:
        """Wait until the calls other threads run now have returned (not calls they take later).

        False if some still run after `timeout` seconds."""
        me = threading.get_ident()
        deadline = time.monotonic() + timeout
        with self._lock:
            now_running = {ident: number for ident, number in self._running.items() if ident != me}
            self._waiters += 1
            try:
                while any(self._running.get(ident) == number for ident, number in now_running.items()):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._returned.wait(remaining)
            finally:
                self._waiters -= 1
        return True

    def _work(self) -> None:
        calls = self._calls
        me = threading.get_ident()
        while True:
            call = calls.get()
            if call is None:
                return
            with self._lock:
                self._started += 1
                self._running[me] = self._started
            fn, args = call
            try:
                fn(*args)
            except BaseException:  # the Cell's wrappers log; this only keeps the thread alive
                log.exception("a call in worker pool %s failed", self._name)
            del call, fn, args  # release what the call held before waiting for the next one
            with self._lock:
                del self._running[me]
                if self._waiters:
                    self._returned.notify_all()
                if self._unclaimed:
                    self._unclaimed -= 1  # this thread takes a queued call at once
                else:
                    self._idle += 1
