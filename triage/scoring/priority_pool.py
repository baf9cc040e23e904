"""A process pool that runs the most urgent job first.

The worker's processes both decode views (which the model waits for) and build SRs and
overlays (which only the PACS waits for). A plain ``ProcessPoolExecutor`` runs jobs in the
order they came, so a burst of output building kept the next batch's decodes waiting and the
model idle. :class:`PriorityPool` hands the executor only as many jobs as it has processes
and keeps the rest in a priority queue: a decode submitted after ten builds still runs next.

When a process dies, the executor fails every job it holds with ``BrokenProcessPool`` (one
of them killed it) and the pool says it is :attr:`~PriorityPool.broken`; the jobs still
waiting here never ran, and fail with :class:`JobNotRun` instead, so that the caller can
run them again elsewhere without blaming them.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures.process import BrokenProcessPool
from typing import Any

#: Priorities: lower runs first.
URGENT = 0
BACKGROUND = 1


class JobNotRun(RuntimeError):
    """The job never reached a process: the pool broke or was shut down before its turn."""


class PriorityPool:
    """Wraps *executor* (with *slots* processes); :meth:`submit` takes a priority."""

    def __init__(self, executor: Executor, slots: int) -> None:
        self._executor = executor
        self._slots = max(1, slots)
        self._running = 0
        self._order = itertools.count()
        self._waiting: list[tuple[int, int, Future[Any], Callable[..., Any], tuple[Any, ...]]] = []
        self._lock = threading.Lock()
        #: A process died: the executor runs nothing more (replace the pool).
        self.broken = False

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a process, before every waiting job of a higher *priority*."""
        future: Future[Any] = Future()
        with self._lock:
            heapq.heappush(self._waiting, (priority, next(self._order), future, fn, args))
        self._dispatch()
        return future

    def waiting(self, priority: int | None = None) -> int:
        """Jobs not yet handed to a process (of *priority* only, when given)."""
        with self._lock:
            if priority is None:
                return len(self._waiting)
            return sum(1 for job in self._waiting if job[0] == priority)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Shut the executor down; with *cancel_futures*, cancel every waiting job too."""
        if cancel_futures:
            with self._lock:
                waiting, self._waiting = self._waiting, []
            for _priority, _order, future, _fn, _args in waiting:
                future.cancel()
        self._executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def stop(self, timeout: float) -> int:
        """Cancel the waiting jobs, let the running ones end for *timeout* seconds, then kill
        the processes still alive; returns how many were killed.

        A process that never ends its job (a codec in an endless loop, a process stopped
        with SIGSTOP) would otherwise keep the executor's manager thread, which joins every
        process at interpreter exit, and with it the daemon, running after its stop.
        """
        with self._lock:  # first, so that no job finishing now starts another process
            waiting, self._waiting = self._waiting, []
        for _priority, _order, future, _fn, _args in waiting:
            future.cancel()
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        killed = 0
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5.0)
                killed += 1
        return killed

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                if self._running >= self._slots or not self._waiting:
                    return
                _priority, _order, future, fn, args = heapq.heappop(self._waiting)
                if not future.set_running_or_notify_cancel():
                    continue
                self._running += 1
            try:
                inner = self._executor.submit(fn, *args)
            except Exception as exc:  # a broken or shut-down pool
                with self._lock:
                    self._running -= 1
                    self.broken = self.broken or isinstance(exc, BrokenProcessPool)
                future.set_exception(JobNotRun(f"{type(exc).__name__}: {exc}"))
                continue
            inner.add_done_callback(lambda done, outer=future: self._finished(done, outer))

    def _finished(self, inner: Future[Any], outer: Future[Any]) -> None:
        with self._lock:
            self._running -= 1
        if inner.cancelled():
            outer.set_exception(CancelledError())
        elif (error := inner.exception()) is not None:
            if isinstance(error, BrokenProcessPool):
                self.broken = True
            outer.set_exception(error)
        else:
            outer.set_result(inner.result())
        self._dispatch()
