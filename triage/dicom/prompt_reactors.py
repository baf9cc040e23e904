"""Wake pynetdicom's two reactor threads when there is work, not after their 1 ms naps.

pynetdicom 3 polls: an association's DUL thread and its reactor thread each sleep 1 ms
whenever a pass of their loop finds nothing to do. One C-STORE crosses those naps three
times — the last PDU is read, then the reactor wakes to hand the message to our handler; our
answer is queued, then the DUL wakes to send it; the peer's next request arrives, then the DUL
wakes to read it — about 1.5 ms per instance on a link that is otherwise busy (measured,
bench/RESULTS.md), more than our whole header check.

The loops stay pynetdicom's own; only their naps become waits that can end early:

- the DUL thread waits in poll(2) on its socket and on a wake-up pipe written when another
  thread queues a primitive for it to send or an event for its state machine;
- the reactor thread waits on an :class:`threading.Event` set when the DUL completes a DIMSE
  message or queues a primitive for the service user (a release or abort request).

Every wait still ends after the same 1 ms at the latest, so timers, aborts and any path this
does not cover behave as before. Only associations given :func:`attach` are affected (the
listener's); every other sleep, thread and association (our C-STORE sender) is untouched.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from pynetdicom import association as _association_module
from pynetdicom import dul as _dul_module

#: The nap both pynetdicom reactors take when idle (``DULServiceProvider._run_loop_delay``
#: and the literal in ``Association._run_reactor``); only sleeps of exactly this length on an
#: attached thread are turned into waits.
NAP_S = 0.001

_WAIT_ATTRIBUTE = "_triage_wait"


class _ReactorTime:
    """Stands in for the ``time`` module inside pynetdicom's ``dul`` and ``association``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        """``time.sleep``, except a reactor's nap on an attached thread, which may end early."""
        wait: Callable[[float], None] | None = getattr(
            threading.current_thread(), _WAIT_ATTRIBUTE, None
        )
        if wait is None or seconds != NAP_S:
            time.sleep(seconds)
            return
        wait(seconds)


def install() -> None:
    """Route the naps of pynetdicom's reactors through :class:`_ReactorTime` (idempotent)."""
    for module in (_dul_module, _association_module):
        if not isinstance(module.time, _ReactorTime):
            module.time = _ReactorTime()  # type: ignore[assignment]


def attach(assoc: Any) -> None:
    """Make *assoc*'s DUL and reactor threads wake as soon as there is work for them.

    Call before the association starts; :func:`install` must have run for it to matter.
    """
    dul = assoc.dul
    dul_waiter = _DulWaiter(dul)
    setattr(dul, _WAIT_ATTRIBUTE, dul_waiter.wait)
    _wake_on_put(dul.to_provider_queue, dul_waiter.wake)
    _wake_on_put(dul.event_queue, dul_waiter.wake)

    reactor_work = threading.Event()
    setattr(assoc, _WAIT_ATTRIBUTE, _event_waiter(reactor_work))
    _wake_on_put(assoc.dimse.msg_queue, reactor_work.set)
    _wake_on_put(dul.to_user_queue, reactor_work.set)


def _wake_on_put(target: queue.Queue[Any], wake: Callable[[], None]) -> None:
    """Call *wake* after each ``put`` on *target* (this one queue object only)."""
    original_put = target.put

    def put(item: Any, block: bool = True, timeout: float | None = None) -> None:
        original_put(item, block, timeout)
        wake()

    target.put = put  # type: ignore[method-assign]


def _event_waiter(work: threading.Event) -> Callable[[float], None]:
    def wait(seconds: float) -> None:
        work.wait(seconds)
        # Cleared after the wait, before the loop looks: work queued from here on sets it
        # again, so nothing is missed — at worst one pass finds nothing.
        work.clear()

    return wait


class _DulWaiter:
    """Lets a DUL thread sleep until its socket is readable or another thread wakes it."""

    def __init__(self, dul: Any) -> None:
        self._dul = dul
        self._read_end, self._write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        weakref.finalize(self, _close_fds, self._read_end, self._write_end)

    def wake(self) -> None:
        """Wake the DUL thread (a no-op when called from it: it is awake)."""
        if threading.current_thread() is self._dul:
            return
        # A full pipe already holds a wake-up; a closed one belongs to a finished DUL.
        with contextlib.suppress(OSError):
            os.write(self._write_end, b"\0")

    def wait(self, seconds: float) -> None:
        """Sleep up to *seconds*, less when the peer sends data or :meth:`wake` is called."""
        # poll(2), not select(2): a busy listener may hold descriptors past FD_SETSIZE.
        poller = select.poll()
        poller.register(self._read_end, select.POLLIN)
        transport = self._dul.socket
        raw = getattr(transport, "socket", None)
        try:
            if raw is not None and getattr(transport, "_is_connected", False):
                poller.register(raw, select.POLLIN)
            ready = poller.poll(max(1, math.ceil(seconds * 1000)))
        except (OSError, ValueError):  # the socket was closed under us
            time.sleep(seconds)
            return
        if any(fd == self._read_end for fd, _events in ready):
            with contextlib.suppress(OSError):
                os.read(self._read_end, 4096)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
