"""Crash injection for tests: ``MSK_TRIAGE_FAILPOINTS=after_send`` makes the process SIGKILL
itself the first time it reaches that point, the way a power cut or an OOM kill would.

Crash-consistency tests need the crash at one exact place (between an acknowledged send and
its bookkeeping, after a claim …); timing a ``kill -9`` from outside cannot hit it reliably.
The variable is read once per process; unset, :func:`hit` costs one set lookup.
"""

from __future__ import annotations

import os
import signal

_ACTIVE = frozenset(
    name.strip() for name in os.environ.get("MSK_TRIAGE_FAILPOINTS", "").split(",") if name.strip()
)


def hit(name: str) -> None:
    """Die here, without any cleanup, if the failpoint *name* is active."""
    if name in _ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
