"""bench.cpu_account: the CPU of one named thread, the rest of the process, the children."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from bench.cpu_account import CpuPerView, CpuSnapshot, process_tree_cpu_s

_CHILD = """
import sys, time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("spun", flush=True)
sys.stdin.read()
"""


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_named_thread_and_a_child_are_told_apart_from_the_rest() -> None:
    go, spun, leave = threading.Event(), threading.Event(), threading.Event()

    def busy() -> None:
        go.wait()
        _spin(0.4)
        spun.set()
        leave.wait(30)  # a thread's CPU is listed only while it lives

    thread = threading.Thread(target=busy, name="bench-model-thread")
    thread.start()
    before = CpuSnapshot.take("bench-model-thread")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        go.set()
        _spin(0.2)  # this thread: the rest of the process
        assert spun.wait(30)
        assert child.stdout is not None and child.stdout.readline() == "spun\n"
        after = CpuSnapshot.take("bench-model-thread")
    finally:
        leave.set()
        child.communicate(timeout=30)
        thread.join()
    cpu = CpuPerView.between(before, after, views=2)  # milliseconds per view: halves
    assert 150 <= cpu.thread <= 300, cpu
    assert 80 <= cpu.rest_of_process <= 200, cpu
    assert 100 <= cpu.children <= 400, cpu


def test_a_process_and_its_children_are_counted_apart() -> None:
    # A process that spins, then starts a child that spins, then waits: process_tree_cpu_s
    # of the first gives each its own share (a worker process and its decode processes).
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time\n"
            "end = time.process_time() + 0.3\n"
            "while time.process_time() < end: pass\n"
            f"child = subprocess.Popen([sys.executable, '-c', {_CHILD!r}],"
            " stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
            "child.stdout.readline()\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n"
            "child.stdin.close(); child.wait()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        own, children = process_tree_cpu_s(parent.pid)
        assert own >= 0.25
        assert children >= 0.25
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait(30)
