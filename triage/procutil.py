"""Process settings: child processes that never outlive the daemon, an allocator that keeps
what the scoring path frees for its next batch, pipes that carry a whole view at once."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

#: What :func:`widen_pipe` asks for: Linux's default ceiling for an unprivileged process
#: (/proc/sys/fs/pipe-max-size).
WIDE_PIPE_BYTES = 1 << 20

_PR_SET_PDEATHSIG = 1


def stop_on_signals(
    *signums: int, on_signal: Callable[[str], None] | None = None
) -> threading.Event:
    """An event set once one of *signums* arrives; *on_signal* gets the first one's name.

    The handler only appends to a list: a signal handler that takes a lock (``Event.set``
    takes the event's) deadlocks when it interrupts its own thread inside that lock, as a
    second signal arriving during the first one's handler did (a hang-up sends SIGHUP to the
    listener as its parent sends SIGTERM): the listener then never stopped and was killed
    after the grace. A thread relays the list to the event.
    """
    received: list[int] = []
    stop = threading.Event()

    def handle(signum: int, _frame: object) -> None:
        received.append(signum)

    def relay() -> None:
        while not received:
            time.sleep(_SIGNAL_RELAY_S)
        if on_signal is not None:
            on_signal(signal.Signals(received[0]).name)
        stop.set()

    for signum in signums:
        signal.signal(signum, handle)
    threading.Thread(target=relay, name="signal-relay", daemon=True).start()
    return stop


#: How often the signal relay looks for a signal: well within any stop's grace.
_SIGNAL_RELAY_S = 0.1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask Linux to send *signum* to this process when its parent dies.

    A daemon killed with SIGKILL (OOM killer, `kill -9`) cannot stop its children; without this
    a listener process would keep the DICOM port and a restart would fail. Elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signum)


_collection_skipped = False


def skip_collection_at_exit() -> None:
    """Let this process exit without the interpreter's last garbage collections.

    At exit Python collects the whole heap, and again while it tears the modules down: with
    torch, pydicom and highdicom loaded that took 1.5–4 s of CPU per process, measured from a
    worker's last log line to its exit, so a stop (and a systemd restart) waited on it once
    per decode process and again for the daemon itself. Frozen objects are left out of those
    collections; the memory goes back to the kernel with the process all the same. What is
    lost: finalizers of objects in reference cycles, which Python does not promise to run at
    exit either (files, sockets and databases are closed explicitly before it).
    """
    global _collection_skipped
    if not _collection_skipped:
        atexit.register(gc.freeze)
        _collection_skipped = True


def widen_pipe(fd: int, size: int = WIDE_PIPE_BYTES) -> int:
    """Ask Linux to give the pipe of *fd* (either end) a buffer of *size* bytes; returns the
    size it has now, 0 where that cannot be known (not Linux, not a pipe).

    A pipe holds 64 KB by default, so a 2.5 MB message crosses it in 40 rounds, each waking
    the reader and then the writer again: on 2 vCPUs, 1.7–2.5 ms of the writer's CPU per
    message and 1.0–1.3 ms of the reader's, against 0.5–0.7 and 0.6–0.7 through a 1 MB pipe.
    A refusal (the user's pipe-buffer quota, a lower ceiling) keeps the pipe as it was.
    """
    if not hasattr(fcntl, "F_SETPIPE_SZ"):  # not Linux
        return 0
    with contextlib.suppress(OSError):
        return int(fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size))
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    except OSError:
        return 0


# mallopt(3) parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory(trim_threshold: int = 512 << 20) -> bool:
    """Let glibc's malloc keep freed memory for reuse rather than return it to the kernel.

    The scoring path allocates the same large buffers over and over (a batch's activations, a
    5-Mpx frame as float32, a 10 MB file). By default glibc serves blocks over a few MB with
    mmap and unmaps them on free, and a thread's arena gives whole heaps back once empty, so
    every forward pass faults its memory in again and the kernel zeroes it page by page (in a
    VM each first touch is dearer still). Here every block comes from the one main heap
    (no mmap, one arena) and up to *trim_threshold* of free memory stays there. Measured on a
    2-vCPU host, forward passes in a thread at mixed batch sizes 2–16: fp32 74.9 → 59.8 ms per
    view (13.3 ms of page-fault time → 0.1) with a lower peak resident size (1776 → 1494 MB);
    bf16 22.7 → 22.4. The price: memory freed in the middle of the heap is reused, not given
    back. Call it before the process starts its threads (arenas already made are kept).
    Returns whether it applied (glibc only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - absent from musl, whose mallopt does nothing
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(parameter, value)
        for parameter, value in (
            (_M_MMAP_MAX, 0),
            (_M_ARENA_MAX, 1),
            (_M_TRIM_THRESHOLD, int(trim_threshold)),
        )
    )


#: oneDNN's primitive cache setting (a count of primitives; oneDNN's default is 1024).
ONEDNN_CACHE_VARIABLE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
#: Primitives one DenseNet-169 forward pass at one batch size needs, rounded up (≈ 200:
#: convolutions, their reorders, pooling; measured as the capacity at which 16 sizes stop
#: evicting each other).
_PRIMITIVES_PER_BATCH_SIZE = 256


def size_primitive_cache(batch_sizes: int) -> int:
    """Give oneDNN's primitive cache room for a forward pass at each of *batch_sizes* sizes.

    oneDNN builds (JIT-compiles) a primitive per layer for every input shape and keeps 1024 of
    them; the worker runs every batch size from 1 to ``[model] batch_size`` as views come, so
    DenseNet-169's ~200 primitives per size evicted each other from the sixth size on and
    were rebuilt all the time (2 vCPUs, bf16, sizes 1..16 in turn, after a first round: 46 ms
    per view; with room for all of them 33). Takes effect only before the process's first
    oneDNN primitive (the variable is read when the cache is made); an operator's own value
    wins. Returns the capacity in force.
    """
    current = os.environ.get(ONEDNN_CACHE_VARIABLE) or os.environ.get(
        "DNNL_PRIMITIVE_CACHE_CAPACITY"
    )
    if current:
        try:
            return int(current)
        except ValueError:
            return 1024  # oneDNN ignores a value it cannot read
    capacity = max(1024, _PRIMITIVES_PER_BATCH_SIZE * max(1, int(batch_sizes)))
    os.environ[ONEDNN_CACHE_VARIABLE] = str(capacity)
    return capacity
