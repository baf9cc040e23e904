"""Liveness and readiness of a running daemon, for ``/healthz``, ``/readyz`` and the systemd
watchdog.

- **live**: every loop the daemon runs is alive — the listener process(es), the scheduler, the
  worker (when enabled) and the sender (when destinations are configured). The watchdog is fed
  only while this holds, so systemd restarts a daemon whose loop died.
- **ready**: it can do its job now — the store answers, the listener is bound, the worker runs
  (when enabled) and the spool is above its free-space floor; never once the daemon is
  stopping.

``triage worker`` has no listener, scheduler or sender: its health is its worker's, the
store's and the spool's.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as futures_wait
from typing import Any, Protocol, TypeVar

from sqlalchemy import text

from triage.store.repository import Store
from triage.store.spool import Spool

#: How long /readyz waits for the store before it says it does not answer.
STORE_CHECK_TIMEOUT_S = 3.0
#: The spool check's bound: statvfs and the write probe on a hung network filesystem (the
#: shared spool of a scale-out) never return, and each probe's thread would hang with them.
SPOOL_CHECK_TIMEOUT_S = 3.0

T = TypeVar("T")


class StoreNotAnswering(TimeoutError):
    """A :class:`BoundedCall` got no answer in time (or its previous call is still waiting)."""


class BoundedCall:
    """Runs store reads for an HTTP endpoint in one background thread and waits at most
    *timeout_s* for each: a store that does not answer (a frozen server, a partition) must not
    hang the endpoint, and repeated requests must not pile up threads waiting on it. A call
    that comes while another is running waits for it within both their bounds (overlapping
    scrapes of a store that answers all succeed); while one is past its bound, the next
    fails at once rather than queue behind it."""

    def __init__(self, name: str, timeout_s: float, busy: str) -> None:
        self.timeout_s = timeout_s
        self._busy = busy
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: Future[Any] | None = None
        self._pending_deadline = 0.0
        self._lock = threading.Lock()

    def __call__(self, work: Callable[[], T]) -> T:
        """*work()*'s result or exception, or :class:`StoreNotAnswering`."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            with self._lock:
                pending, pending_deadline = self._pending, self._pending_deadline
                if pending is None or pending.done():
                    self._pending = future = self._pool.submit(work)
                    self._pending_deadline = deadline
                    break
            # Another request's call is running (overlapping scrapes or probes on a store that
            # answers): wait for it, within its bound and ours, then run ours. One past its
            # bound means the store does not answer: fail at once.
            wait_s = min(deadline, pending_deadline) - time.monotonic()
            if wait_s <= 0 or not futures_wait([pending], timeout=wait_s).done:
                raise StoreNotAnswering(self._busy)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            raise StoreNotAnswering(f"no answer within {self.timeout_s:g} s") from None

    def close(self) -> None:
        """Stop the thread once idle (a call still waiting is abandoned, not waited for)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class Loop(Protocol):
    """Anything with an ``alive()`` (listener pool, scheduler, worker, sender)."""

    def alive(self) -> bool:
        """True while the loop runs."""
        ...  # pragma: no cover


class Health:
    """The daemon's components, registered as they start, and the checks over them."""

    def __init__(self, store: Store, spool: Spool, *, listener: bool = True) -> None:
        self.store = store
        self.spool = spool
        self.loops: dict[str, Loop] = {}
        #: Whether this process has a listener to check (not ``triage worker``).
        self.listener_expected = listener
        self.listener_port: int | None = None
        self.worker_enabled = False
        #: Set when the shutdown begins (see :meth:`begin_stop`).
        self.stopping = False
        self._store_call = BoundedCall(
            "readyz-store",
            STORE_CHECK_TIMEOUT_S,
            busy="the previous store check has not returned yet",
        )
        self._spool_call = BoundedCall(
            "readyz-spool",
            SPOOL_CHECK_TIMEOUT_S,
            busy="the previous spool check has not returned yet (a hung filesystem?)",
        )

    def add(self, name: str, loop: Loop) -> None:
        """Watch *loop* under *name* (``listener``, ``scheduler``, ``worker``, ``sender``)."""
        self.loops[name] = loop

    def begin_stop(self) -> None:
        """The shutdown began: not ready from now on. The listener closes its socket at
        once but its process lives on through the associations' grace, and the worker and
        sender take their time: until then the checks above still passed, so a probe kept
        sending peers to a daemon that no longer accepted them."""
        self.stopping = True

    def live(self) -> tuple[bool, dict[str, bool]]:
        """(all loops alive, each loop's state); False before any loop was registered."""
        states = {}
        for name, loop in self.loops.items():
            try:
                states[name] = bool(loop.alive())
            except Exception:  # a component that cannot answer is not alive
                states[name] = False
        return bool(states) and all(states.values()), states

    def _ping_store(self) -> None:
        with self.store.read_session() as session:
            session.execute(text("SELECT 1"))

    def check_store(self) -> dict[str, Any]:
        """``{"ok": …, "error": …}`` within :data:`STORE_CHECK_TIMEOUT_S`."""
        try:
            self._store_call(self._ping_store)
        except StoreNotAnswering as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]
            return {"ok": False, "error": f"{type(exc).__name__}: {first}"}
        return {"ok": True}

    def ready(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """(ready, each check with ``ok`` and details)."""
        checks: dict[str, dict[str, Any]] = {"store": self.check_store()}
        if self.listener_expected:
            listener = self.loops.get("listener")
            listening = listener is not None and _alive(listener) and self.listener_port is not None
            checks["listener"] = {"ok": listening, "port": self.listener_port}
        if self.worker_enabled:
            worker = self.loops.get("worker")
            checks["worker"] = {"ok": worker is not None and _alive(worker)}
        try:
            free, unwritable = self._spool_call(
                lambda: (self.spool.free_bytes(), self.spool.unwritable())
            )
            checks["spool"] = {
                "ok": free >= self.spool.min_free_bytes and not unwritable,
                "free_bytes": free,
                "min_free_bytes": self.spool.min_free_bytes,
            }
            if unwritable:  # a read-only remount: received instances and outputs would fail
                checks["spool"]["unwritable"] = unwritable
        except OSError as exc:  # StoreNotAnswering too: a spool that did not answer in time
            checks["spool"] = {"ok": False, "error": str(exc)}
        if self.stopping:
            checks["stopping"] = {"ok": False}
        return all(check["ok"] for check in checks.values()), checks

    def close(self) -> None:
        """Stop the check threads (a hung check is abandoned)."""
        self._store_call.close()
        self._spool_call.close()


def _alive(loop: Loop) -> bool:
    try:
        return bool(loop.alive())
    except Exception:
        return False


__all__ = ["BoundedCall", "Health", "Loop", "StoreNotAnswering"]
