"""Where a run's CPU went: one thread of this process, the rest of it, and its children.

Read from ``/proc`` (Linux): utime + stime of the process, of one of its threads and of its
direct children, so a benchmark can say what the worker's own process costs per view beside
the model thread, against its decode processes — which is what sizes a GPU host, where the
forward is off the CPU and one worker process feeds many decode processes.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_s(stat_path: str) -> float:
    with open(stat_path) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _children_cpu_s(pid: int) -> float:
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                parent = int(handle.read().rsplit(")", 1)[1].split()[1])
            if parent == pid:
                total += _cpu_s(f"/proc/{entry}/stat")
        except (OSError, ValueError):  # gone meanwhile
            continue
    return total


def process_tree_cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds so far of process *pid* (all its threads) and of its direct children."""
    return _cpu_s(f"/proc/{pid}/stat"), _children_cpu_s(pid)


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU seconds so far: the process, its thread named *thread*, its children."""

    process: float
    thread: float
    children: float

    @classmethod
    def take(cls, thread: str) -> CpuSnapshot:
        """Now, for the thread of this process named *thread* (0 if none is)."""
        pid = os.getpid()
        thread_s = 0.0
        for candidate in threading.enumerate():
            if candidate.name == thread and candidate.native_id is not None:
                thread_s += _cpu_s(f"/proc/{pid}/task/{candidate.native_id}/stat")
        process, children = process_tree_cpu_s(pid)
        return cls(process, thread_s, children)


@dataclass(frozen=True)
class CpuPerView:
    """Milliseconds of CPU per view between two snapshots."""

    thread: float
    rest_of_process: float
    children: float

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot, views: int) -> CpuPerView:
        """The CPU spent from *before* to *after*, per view."""
        thread = after.thread - before.thread
        process = after.process - before.process
        scale = 1000 / max(1, views)
        return cls(
            thread * scale,
            (process - thread) * scale,
            (after.children - before.children) * scale,
        )
