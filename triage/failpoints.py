"""Fault injection for tests: ``MSK_TRIAGE_FAILPOINTS=after_send`` makes the process SIGKILL
itself the first time it reaches that point, the way a power cut or an OOM kill would;
``before_complete:3`` makes it wait 3 s there instead, the way a slow disk or store would.

Crash-consistency tests need the crash at one exact place (between an acknowledged send and
its bookkeeping, after a claim …); timing a ``kill -9`` from outside cannot hit it reliably.
A pause holds work at one place while the test acts (a SIGTERM while a study is finishing);
it logs ``failpoint_paused`` when it begins, so the test knows when to act.
The variable is read once per process; unset, :func:`hit` costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
import time

from triage.logs import get_logger

log = get_logger("triage.failpoints")


def _parse(value: str) -> dict[str, float | None]:
    """``name`` → None (kill), ``name:seconds`` → a pause of that many seconds."""
    active: dict[str, float | None] = {}
    for entry in value.split(","):
        name, _, seconds = entry.strip().partition(":")
        if name:
            active[name.strip()] = float(seconds) if seconds.strip() else None
    return active


_ACTIVE = _parse(os.environ.get("MSK_TRIAGE_FAILPOINTS", ""))


def hit(name: str) -> None:
    """Die here, without any cleanup, or pause, if the failpoint *name* is active."""
    if name not in _ACTIVE:
        return
    pause_s = _ACTIVE[name]
    if pause_s is None:
        os.kill(os.getpid(), signal.SIGKILL)
        return
    log.warning("failpoint_paused", failpoint=name, seconds=pause_s)
    time.sleep(pause_s)
