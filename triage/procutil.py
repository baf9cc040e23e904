"""Child processes that never outlive the daemon."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


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
