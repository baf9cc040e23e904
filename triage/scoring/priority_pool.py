"""A process pool that runs the most urgent job first, and survives a process that dies.

The worker's processes both decode views (which the model waits for) and build SRs and
overlays (which only the PACS waits for). A plain ``ProcessPoolExecutor`` runs jobs in the
order they came, so a burst of output building kept the next batch's decodes waiting and the
model idle. :class:`PriorityPool` hands the executor only as many jobs as it has processes
and keeps the rest in a priority queue: a decode submitted after ten builds still runs next.

When a process dies (a codec crash, the OOM killer), the executor fails every job it holds
with ``BrokenProcessPool`` and runs nothing more. The pool then makes a new executor for the
jobs still waiting, which never ran. Of the jobs the broken executor held, only one killed it
(or none: the OOM killer picks a process, not a culprit); so when it held several, each is
run again *alone*, one after another in a process of its own, and only a job that kills that
process too fails with ``BrokenProcessPool``. A job that was the only one running when its
executor broke is the culprit, and fails at once. So a poisoned view fails its own study and
no other, however many processes decode.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_sentinels
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: Priorities: lower runs first.
URGENT = 0
BACKGROUND = 1


class JobNotRun(RuntimeError):
    """The job never ran to its end: the pool was shut down, or no process could be started."""


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    future: Future[Any] = field(compare=False)
    fn: Callable[..., Any] = field(compare=False)
    args: tuple[Any, ...] = field(compare=False)
    #: Its future is running: it was handed to an executor that broke before taking it.
    started: bool = field(default=False, compare=False)

    def drop(self, reason: str) -> None:
        """It will not run: cancelled while it never started, else failed as not run."""
        if not (self.future.cancel() or self.future.done()):
            self.future.set_exception(JobNotRun(reason))


@dataclass(eq=False)
class _Generation:
    """One executor, and the jobs it holds."""

    executor: Executor
    jobs: set[int] = field(default_factory=set)  # the orders of the jobs it holds
    #: How many jobs it held when it broke (None while whole).
    held_at_break: int | None = None


class PriorityPool:
    """Runs ``fn(*args)`` jobs on *slots* processes of an executor that
    ``make_executor(processes)`` makes: the most urgent first, and a new executor when a
    process dies (see the module's docstring)."""

    def __init__(self, make_executor: Callable[[int], Executor], slots: int) -> None:
        self._make_executor = make_executor
        self._slots = max(1, slots)
        self._current = _Generation(make_executor(self._slots))
        self._order = itertools.count()
        self._waiting: list[_Job] = []
        self._lock = threading.Lock()
        # Jobs to run again alone (their executor broke under several), and the one-process
        # executor that runs them, made when first needed.
        self._suspects: deque[_Job] = deque()
        self._isolating: _Job | None = None
        self._isolation: Executor | None = None
        self._closed = False
        #: How many times a dead process made the pool start new ones.
        self.restarts = 0

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in a process, before every waiting job of a higher *priority*."""
        future: Future[Any] = Future()
        with self._lock:
            heapq.heappush(self._waiting, _Job(priority, next(self._order), future, fn, args))
        self._dispatch()
        return future

    def waiting(self, priority: int | None = None) -> int:
        """Jobs not yet handed to a process (of *priority* only, when given)."""
        with self._lock:
            if priority is None:
                return len(self._waiting)
            return sum(1 for job in self._waiting if job.priority == priority)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        """Shut the executors down; with *cancel_futures*, cancel every waiting job too."""
        with self._lock:
            self._closed = True
            waiting: list[_Job] = []
            if cancel_futures:
                waiting, self._waiting = self._waiting, []
            suspects, self._suspects = list(self._suspects), deque()
            executors = [self._current.executor, self._isolation]
        for job in waiting + suspects:
            job.drop("the pool was shut down")
        for executor in executors:
            if executor is not None:
                executor.shutdown(wait=wait, cancel_futures=cancel_futures)

    def stop(self, timeout: float) -> int:
        """Cancel the waiting jobs, let the running ones end for *timeout* seconds, then kill
        the processes still alive; returns how many were killed.

        A process that never ends its job (a codec in an endless loop, a process stopped
        with SIGSTOP) would otherwise keep the executor's manager thread, which joins every
        process at interpreter exit, and with it the daemon, running after its stop.
        """
        with self._lock:  # first, so that no job finishing now starts another process
            self._closed = True
            waiting, self._waiting = self._waiting, []
            suspects, self._suspects = list(self._suspects), deque()
            executors = [e for e in (self._current.executor, self._isolation) if e is not None]
        for job in waiting + suspects:
            job.drop("the pool was stopped")
        processes = [
            process
            for executor in executors
            for process in list((getattr(executor, "_processes", None) or {}).values())
        ]
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        killed = 0
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if _running(process):
                process.kill()
                process.join(5.0)
                killed += 1
        return killed

    # --- running jobs -------------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            with self._lock:
                generation = self._current
                if len(generation.jobs) >= self._slots or not self._waiting:
                    return
                job = heapq.heappop(self._waiting)
                if not (job.started or job.future.set_running_or_notify_cancel()):
                    continue
                job.started = True
                generation.jobs.add(job.order)
            try:
                inner = generation.executor.submit(job.fn, *job.args)
            except Exception as exc:
                with self._lock:
                    generation.jobs.discard(job.order)
                    # Broke before this job reached it: the job runs on the next executor.
                    again = isinstance(exc, BrokenProcessPool) and self._replace(generation)
                    if again:
                        heapq.heappush(self._waiting, job)
                if not again:
                    job.future.set_exception(JobNotRun(f"{type(exc).__name__}: {exc}"))
                continue
            inner.add_done_callback(lambda done, g=generation, j=job: self._finished(g, j, done))

    def _finished(self, generation: _Generation, job: _Job, inner: Future[Any]) -> None:
        error = None if inner.cancelled() else inner.exception()
        suspect = False
        with self._lock:
            if isinstance(error, BrokenProcessPool):
                if generation.held_at_break is None:
                    generation.held_at_break = len(generation.jobs)
                self._replace(generation)
                suspect = generation.held_at_break > 1 and not self._closed
                if suspect:
                    self._suspects.append(job)
            generation.jobs.discard(job.order)
        if suspect:
            self._isolate_next()
        else:
            _settle(job.future, inner)
        self._dispatch()

    def _replace(self, generation: _Generation) -> bool:
        """A new executor for *generation*'s broken one (once); called with the lock held.
        False when the pool is closed or no executor could be made."""
        if self._closed:
            return False
        if generation is not self._current:
            return True
        try:
            executor = self._make_executor(self._slots)
        except Exception as exc:
            log.error("process_pool_not_restarted", error=f"{type(exc).__name__}: {exc}")
            return False
        self._current = _Generation(executor)
        self.restarts += 1
        generation.executor.shutdown(wait=False)
        log.warning("process_pool_restarted", processes=self._slots, restarts=self.restarts)
        return True

    # --- suspects, each run again alone -------------------------------------------------

    def _isolate_next(self) -> None:
        with self._lock:
            if self._isolating is not None or not self._suspects or self._closed:
                return
            job = self._isolating = self._suspects.popleft()
            isolation = self._isolation
        try:
            if isolation is None:
                isolation = self._make_executor(1)
                with self._lock:
                    self._isolation = isolation
            inner = isolation.submit(job.fn, *job.args)
        except Exception as exc:
            with self._lock:
                self._isolating = None
                self._isolation = None
            job.future.set_exception(JobNotRun(f"{type(exc).__name__}: {exc}"))
            self._isolate_next()
            return
        inner.add_done_callback(lambda done, j=job: self._isolated(j, done))

    def _isolated(self, job: _Job, inner: Future[Any]) -> None:
        broken = not inner.cancelled() and isinstance(inner.exception(), BrokenProcessPool)
        with self._lock:
            self._isolating = None
            # Broken (it killed the process alone: it is the culprit), or no longer needed:
            # an idle process would hold its memory until the next crash.
            isolation = None
            if broken or not self._suspects:
                isolation, self._isolation = self._isolation, None
        if isolation is not None:
            isolation.shutdown(wait=False)
        _settle(job.future, inner)
        self._isolate_next()


def _settle(outer: Future[Any], inner: Future[Any]) -> None:
    """Give *outer* the outcome of *inner*."""
    if inner.cancelled():
        outer.set_exception(CancelledError())
    elif (error := inner.exception()) is not None:
        outer.set_exception(error)
    else:
        outer.set_result(inner.result())


def _running(process: Any) -> bool:
    """Whether *process* has not exited.

    ``is_alive()`` alone says True for a process that the executor's own thread, joining it
    after the shutdown, reaped an instant before (its waitpid came first: ECHILD here, and
    no exit code recorded yet): a clean stop then "killed" a decode process that had exited,
    logged ``decode_processes_killed``, and signalled a pid the system may have reused. The
    sentinel (the end of a pipe the process holds open) is ready once it has exited."""
    if not process.is_alive():
        return False
    try:
        return not wait_for_sentinels([process.sentinel], 0)
    except (OSError, ValueError):  # its sentinel was closed: the process was released
        return False
