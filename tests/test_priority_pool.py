"""The worker's process pool runs decodes (the model waits) before output building, and a
process that dies fails its own job and no other."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import (
    CancelledError,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest

from triage.scoring.priority_pool import BACKGROUND, URGENT, JobNotRun, PriorityPool


def _threads(count: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=count)


def _processes(count: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=count)


def test_urgent_jobs_overtake_waiting_background_jobs() -> None:
    gate = threading.Event()
    ran: list[str] = []
    pool = PriorityPool(_threads, slots=1)
    first = pool.submit(BACKGROUND, gate.wait, 10)
    later = [pool.submit(BACKGROUND, ran.append, f"build {n}") for n in range(3)]
    urgent = pool.submit(URGENT, ran.append, "decode")
    assert pool.waiting() == 4  # the executor holds only the one job it can run
    assert (pool.waiting(URGENT), pool.waiting(BACKGROUND)) == (1, 3)
    gate.set()
    for future in (first, *later, urgent):
        future.result(timeout=10)
    assert ran == ["decode", "build 0", "build 1", "build 2"]  # same priority: first come
    pool.shutdown()


def test_results_and_errors_come_back_from_processes() -> None:
    pool = PriorityPool(_processes, slots=2)
    squares = [pool.submit(URGENT, pow, n, 2) for n in range(6)]
    assert [f.result(timeout=60) for f in squares] == [0, 1, 4, 9, 16, 25]
    with pytest.raises(ZeroDivisionError):
        pool.submit(BACKGROUND, divmod, 1, 0).result(timeout=60)
    pool.shutdown()


def test_shutdown_cancels_waiting_jobs() -> None:
    gate = threading.Event()
    pool = PriorityPool(_threads, slots=1)
    running = pool.submit(URGENT, gate.wait, 10)
    waiting = pool.submit(BACKGROUND, print, "never")
    pool.shutdown(wait=False, cancel_futures=True)
    assert waiting.cancelled()
    with pytest.raises(CancelledError):
        waiting.result(timeout=1)
    gate.set()
    assert running.result(timeout=10) is True


def _die() -> None:
    os._exit(139)


def _wait_for(paths: list[Path], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths):
        assert time.monotonic() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.01)


def _die_once_these_run(markers: list[str]) -> None:
    """Dies once the jobs beside it have started (each wrote its marker)."""
    _wait_for([Path(marker) for marker in markers])
    os._exit(139)


def _run_for_a_while(marker: str, value: int) -> tuple[int, int]:
    """Writes *marker* (this process's pid in it), takes a second, returns *value* and the
    pid."""
    Path(marker).write_text(str(os.getpid()))
    time.sleep(1.0)
    return value, os.getpid()


def test_a_process_that_dies_alone_fails_its_job_and_the_waiting_jobs_run_in_new_ones() -> None:
    pool = PriorityPool(_processes, slots=1)
    dying = pool.submit(URGENT, _die)
    waiting = pool.submit(URGENT, pow, 2, 2)  # behind it: not yet handed to the executor
    with pytest.raises(BrokenProcessPool):  # the only job running: it killed the process
        dying.result(timeout=60)
    assert waiting.result(timeout=60) == 4
    assert pool.restarts == 1
    assert pool.submit(BACKGROUND, pow, 3, 2).result(timeout=60) == 9
    pool.shutdown()


def _two_beside_a_dying_one(tmp_path: Path) -> tuple[PriorityPool, list[Future[Any]], Future[Any]]:
    """A pool of three processes running two jobs and one that dies once they have begun."""
    markers = [str(tmp_path / f"running-{n}") for n in range(2)]
    pool = PriorityPool(_processes, slots=3)
    beside = [pool.submit(URGENT, _run_for_a_while, marker, n) for n, marker in enumerate(markers)]
    return pool, beside, pool.submit(URGENT, _die_once_these_run, markers)


def test_the_jobs_beside_a_dying_one_run_again_alone_and_only_it_fails(tmp_path: Path) -> None:
    pool, beside, dying = _two_beside_a_dying_one(tmp_path)
    waiting = pool.submit(BACKGROUND, pow, 2, 5)
    with pytest.raises(BrokenProcessPool):  # alone, it killed its process again
        dying.result(timeout=60)
    assert [future.result(timeout=60)[0] for future in beside] == [0, 1]
    assert waiting.result(timeout=60) == 32
    assert pool.restarts == 1  # the process each ran alone in is not the pool's
    pool.shutdown()


def test_a_process_killed_from_outside_costs_no_job(tmp_path: Path) -> None:
    """The OOM killer picks a process, not a culprit: every job it held runs again."""
    markers = [tmp_path / f"running-{n}" for n in range(2)]
    pool = PriorityPool(_processes, slots=2)
    jobs = [
        pool.submit(URGENT, _run_for_a_while, str(marker), n) for n, marker in enumerate(markers)
    ]
    _wait_for(markers)
    first_pid = int(markers[0].read_text())
    os.kill(first_pid, signal.SIGKILL)
    results = [future.result(timeout=60) for future in jobs]
    assert [value for value, _pid in results] == [0, 1]
    assert all(pid != first_pid for _value, pid in results)
    assert pool.restarts == 1
    pool.shutdown()


def test_a_stop_leaves_no_job_waiting_to_run_again(tmp_path: Path) -> None:
    pool, beside, dying = _two_beside_a_dying_one(tmp_path)
    with pytest.raises(BrokenProcessPool):
        dying.result(timeout=60)
    pool.stop(5.0)
    done, not_done = wait(beside, timeout=30)
    assert not not_done
    for future in done:  # ran alone before the stop, was killed by it, or never ran again
        error = future.exception()
        assert error is None or isinstance(error, (JobNotRun, BrokenProcessPool))


def test_a_job_that_fails_on_its_own_leaves_the_pool_whole() -> None:
    pool = PriorityPool(_processes, slots=1)
    with pytest.raises(ZeroDivisionError):
        pool.submit(URGENT, divmod, 1, 0).result(timeout=60)
    assert pool.restarts == 0
    assert pool.submit(URGENT, pow, 2, 3).result(timeout=60) == 8
    pool.shutdown()


_STOP_SCRIPT = """
import os, signal, sys, time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from triage.scoring.priority_pool import URGENT, PriorityPool

def stuck_job(marker):
    open(marker, "w").close()
    time.sleep(3600)

pool = PriorityPool(lambda count: ProcessPoolExecutor(max_workers=count), slots=2)
assert pool.submit(URGENT, pow, 2, 5).result(timeout=60) == 32
if sys.argv[1] == "stuck":
    stuck = pool.submit(URGENT, stuck_job, sys.argv[2])
    while not os.path.exists(sys.argv[2]):
        time.sleep(0.01)
else:  # idle, stopped: it never reads the executor's "exit now"
    os.kill(pool.submit(URGENT, os.getpid).result(timeout=60), signal.SIGSTOP)
started = time.monotonic()
killed = pool.stop(1.0)
if sys.argv[1] == "stuck":
    try:
        stuck.result(timeout=10)
    except BrokenProcessPool:
        pass
print(killed, round(time.monotonic() - started, 1))
"""


@pytest.mark.parametrize("case", ["stuck", "stopped"])
def test_stop_kills_the_processes_still_busy_after_its_timeout(case: str, tmp_path) -> None:
    """A codec stuck in a loop, or a process stopped with SIGSTOP, kept the daemon running
    after its stop: the executor joins every process at interpreter exit."""
    import subprocess
    import sys
    import time

    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", _STOP_SCRIPT, case, str(tmp_path / "running")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    count, seconds = run.stdout.split()
    # The idle sibling may go too: the executor lets its processes go once every job ended.
    assert count in ("1", "2") and float(seconds) < 5
    assert time.monotonic() - started < 30  # the interpreter exited: nothing left to join


class _ExecutorWhoseThreadReapedItsProcess:
    """Stands in for a ProcessPoolExecutor being shut down whose own thread reaped its
    process (its waitpid came first) and has yet to record the exit code: the state in
    which a stop finds a process that exited, now and then (2 stops in 12 here)."""

    def __init__(self, process: Any) -> None:
        self._processes = {process.pid: process}

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def test_a_process_that_exited_is_not_reported_killed_when_another_thread_reaped_it() -> None:
    """is_alive() says True for a process another thread reaped first (ECHILD): the stop
    then "killed" a decode process that had exited with the executor, logged
    decode_processes_killed at a clean stop and signalled a pid that may be another's."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(target=int)
    process.start()
    os.waitpid(process.pid, 0)  # exited, and reaped as by the executor's own thread
    pool = PriorityPool(lambda count: _ExecutorWhoseThreadReapedItsProcess(process), slots=1)
    started = time.monotonic()
    assert pool.stop(5.0) == 0
    assert time.monotonic() - started < 5.0
