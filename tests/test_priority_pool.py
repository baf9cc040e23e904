"""The worker's process pool runs decodes (the model waits) before output building."""

from __future__ import annotations

import os
import threading
from concurrent.futures import CancelledError, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

from triage.scoring.priority_pool import BACKGROUND, URGENT, JobNotRun, PriorityPool


def test_urgent_jobs_overtake_waiting_background_jobs() -> None:
    gate = threading.Event()
    ran: list[str] = []
    pool = PriorityPool(ThreadPoolExecutor(max_workers=1), slots=1)
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
    pool = PriorityPool(ProcessPoolExecutor(max_workers=2), slots=2)
    squares = [pool.submit(URGENT, pow, n, 2) for n in range(6)]
    assert [f.result(timeout=60) for f in squares] == [0, 1, 4, 9, 16, 25]
    with pytest.raises(ZeroDivisionError):
        pool.submit(BACKGROUND, divmod, 1, 0).result(timeout=60)
    pool.shutdown()


def test_shutdown_cancels_waiting_jobs() -> None:
    gate = threading.Event()
    pool = PriorityPool(ThreadPoolExecutor(max_workers=1), slots=1)
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


def test_a_process_that_dies_breaks_the_pool_and_the_jobs_still_waiting_never_ran() -> None:
    pool = PriorityPool(ProcessPoolExecutor(max_workers=1), slots=1)
    dying = pool.submit(URGENT, _die)
    waiting = pool.submit(URGENT, pow, 2, 2)  # behind it: never handed to the executor
    with pytest.raises(BrokenProcessPool):
        dying.result(timeout=60)
    with pytest.raises(JobNotRun):
        waiting.result(timeout=60)
    assert pool.broken
    with pytest.raises(JobNotRun):  # and nothing more runs there
        pool.submit(BACKGROUND, pow, 3, 2).result(timeout=60)
    pool.shutdown()


def test_a_job_that_fails_on_its_own_leaves_the_pool_whole() -> None:
    pool = PriorityPool(ProcessPoolExecutor(max_workers=1), slots=1)
    with pytest.raises(ZeroDivisionError):
        pool.submit(URGENT, divmod, 1, 0).result(timeout=60)
    assert not pool.broken
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

pool = PriorityPool(ProcessPoolExecutor(max_workers=2), slots=2)
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
