"""Listener processes: each runs one :class:`Listener`; the daemon supervises them.

The listener always runs in its own process(es): ingest never competes with scoring for the
GIL, the process never imports torch, and its temp folder can be the spool's. With more than
one process they share the port with SO_REUSEPORT and the kernel spreads associations.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from triage.config import Config
from triage.logs import RepeatedFailure, configure_logging, get_logger
from triage.procutil import die_with_parent, skip_collection_at_exit, stop_on_signals

if TYPE_CHECKING:
    from triage.dicom.listener import Listener

log = get_logger("triage.listener")


def run_listener_process(
    config: Config,
    conn: Connection,
    reuse_port: bool,
    temp_prefix: str = "tmp",
    beat: ctypes.c_double | None = None,
) -> None:
    """Entry point of one listener process: bind, report, serve until SIGTERM/SIGINT.

    The data sets it receives are named *temp_prefix*… in the spool's temp folder; its
    accept loop writes ``time.monotonic()`` to the shared *beat* at every turn (see
    :meth:`ListenerPool.supervise`).
    """
    configure_logging(config.log.level, config.log.format)
    from triage.dicom.listener import Listener
    from triage.store.db import make_engine
    from triage.store.repository import Store
    from triage.store.spool import Spool

    # A hang-up reaches the whole process group, the listener with its parent.
    stop = stop_on_signals(signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    die_with_parent(signal.SIGTERM)  # finish the associations in flight, then exit
    skip_collection_at_exit()
    engine = make_engine(config.store.url, spool_backed=True, role="listener")
    spool = Spool(config.spool_path, config.store.min_free_mb * 1024 * 1024)
    listener = Listener(
        config.dicom,
        Store(engine),
        spool,
        reuse_port=reuse_port,
        quiet_period_s=config.study.quiet_period_s,
        temp_prefix=temp_prefix,
        on_tick=None if beat is None else lambda: setattr(beat, "value", time.monotonic()),
    )
    try:
        listener.start()
    except OSError as exc:
        kind = "busy" if exc.errno == errno.EADDRINUSE else "error"
        message = f"cannot listen on {config.dicom.bind}:{config.dicom.port}: {exc.strerror or exc}"
        conn.send((kind, message))
        return
    except Exception as exc:  # e.g. a TLS certificate that does not load
        conn.send(("error", f"listener cannot start: {type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", listener.port))
    log.info("listener_started", pid=os.getpid(), port=listener.port)
    threading.Thread(
        target=_watch_parent, args=(os.getppid(), listener, stop), name="parent-watch", daemon=True
    ).start()
    stop.wait()
    if beat is not None:
        # The accept loop ends here, and the associations in flight may take the whole
        # grace: not a hang. The daemon kills this process itself if it outlasts it.
        beat.value = math.inf
    listener.stop(config.dicom.shutdown_grace_s)
    engine.dispose()
    log.info("listener_stopped", pid=os.getpid())


def _watch_parent(parent: int, listener: Listener, stop: threading.Event) -> None:
    """Release the port at once if the daemon is gone (killed with SIGKILL, OOM): the death
    signal alone was seen to leave a listener holding the port for over 20 s on a loaded
    host, so a restarted daemon could not listen."""
    while not stop.wait(PARENT_CHECK_S):
        if os.getppid() != parent:
            log.warning("listener_parent_gone", pid=os.getpid())
            listener.close_listening_socket()
            stop.set()
            return


#: How often a listener process checks that its daemon is still there.
PARENT_CHECK_S = 0.2


class ListenerStartError(RuntimeError):
    """A listener process could not bind or start; the message is one line."""


class ListenerPortBusy(ListenerStartError):
    """The port is in use, perhaps only until a predecessor's listener has exited."""


#: A listener process whose accept loop has not turned for this long (it turns at least
#: every 0.2 s) is hung: stopped (SIGSTOP), deadlocked, stuck in a system call. The kernel
#: still hands it its share of the associations, which wait unanswered until the peers time
#: out, so the daemon kills it and starts another.
UNRESPONSIVE_S = 30.0

#: How long a starting daemon waits for its port: after a crash (kill -9, OOM) the old
#: listener process needs a moment to see its parent gone and close the socket.
PORT_BUSY_WAIT_S = 10.0


class ListenerPool:
    """Starts, supervises and stops the listener processes of one daemon."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.count = config.dicom.listener_processes
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        # Per process (by pid): how its temp files begin, and its heartbeat.
        self._temp_prefixes: dict[int, str] = {}
        self._beats: dict[int, ctypes.c_double] = {}
        self.port = config.dicom.port
        # Dead processes whose death was logged and cleaned up: one that cannot be replaced
        # (its port taken meanwhile) is retried every second, but not mourned every second.
        self._mourned: set[int] = set()
        self._restarts = RepeatedFailure(log, "listener_restart_failed", "listener_restarted")

    def _spawn(self, timeout: float = 60.0) -> multiprocessing.process.BaseProcess:
        parent, child = self._context.Pipe(duplex=False)
        # Unique across the hosts that may share the spool (pids are not).
        prefix = f"rx-{uuid.uuid4().hex[:12]}-"
        beat = self._context.Value(ctypes.c_double, math.inf, lock=False)
        process = self._context.Process(
            target=run_listener_process,
            args=(self.config, child, self.count > 1, prefix, beat),
            name="triage-listener",
            # Daemonic: should the daemon end on an error it did not expect, the interpreter
            # SIGTERMs them at exit (they finish their associations) instead of waiting for
            # ever on processes that only stop when told to.
            daemon=True,
        )
        process.start()
        child.close()
        if not parent.poll(timeout):
            process.kill()
            raise ListenerStartError("listener process did not start in time")
        try:
            kind, value = parent.recv()
        except EOFError:
            process.join(5)
            raise ListenerStartError(
                f"listener process exited during start (exit code {process.exitcode})"
            ) from None
        if kind != "ready":
            process.join(5)
            raise (ListenerPortBusy if kind == "busy" else ListenerStartError)(str(value))
        self.port = int(value)
        assert process.pid is not None
        self._temp_prefixes[process.pid] = prefix
        beat.value = time.monotonic()  # judged from now on, even before its first turn
        self._beats[process.pid] = beat
        return process

    def _kill_if_hung(self, process: multiprocessing.process.BaseProcess) -> None:
        """SIGKILL *process* if its accept loop has not turned for :data:`UNRESPONSIVE_S`."""
        beat = self._beats.get(process.pid or 0)
        if beat is None:
            return
        silent_s = time.monotonic() - beat.value
        if silent_s < UNRESPONSIVE_S:
            return
        log.error("listener_process_unresponsive", pid=process.pid, silent_s=round(silent_s))
        process.kill()
        process.join(5)

    def _remove_temp_files(self, pid: int | None) -> None:
        """Remove what the dead process *pid* was receiving: nobody was answered for it, and
        the partial files would take spool space until the hourly sweep of old ones."""
        from triage.store.spool import Spool

        prefix = self._temp_prefixes.pop(pid or 0, "")
        self._beats.pop(pid or 0, None)
        if not prefix:
            return
        removed = Spool(self.config.spool_path).discard_staged(prefix, ".dcm")
        if removed:
            log.warning("listener_temp_files_removed", pid=pid, count=removed)

    def start(self, port_busy_wait_s: float = PORT_BUSY_WAIT_S) -> None:
        """Start every listener process; raises ListenerStartError (after cleaning up).

        A busy port is retried for *port_busy_wait_s*: a restart right after a crash must not
        fail because the dead daemon's listener is still closing its socket.
        """
        deadline = time.monotonic() + port_busy_wait_s
        try:
            while len(self._processes) < self.count:
                try:
                    self._processes.append(self._spawn())
                except ListenerPortBusy as exc:
                    if time.monotonic() >= deadline:
                        raise
                    log.warning("listen_port_busy_retrying", error=str(exc))
                    time.sleep(0.5)
        except ListenerStartError:
            self.stop(0)
            raise

    def supervise(self, on_died: Callable[[int], object] | None = None) -> None:
        """Restart any listener process that died (the daemon calls this every second);
        *on_died(pid)* first, for what the dead process left behind."""
        for index, process in enumerate(self._processes):
            if process.is_alive():
                self._kill_if_hung(process)
            if process.is_alive():
                continue
            pid = process.pid
            if pid not in self._mourned:
                log.error("listener_process_died", pid=pid, exitcode=process.exitcode)
                try:
                    self._remove_temp_files(pid)
                except OSError as exc:  # the restart matters more
                    log.error("listener_cleanup_failed", pid=pid, error=str(exc))
                if on_died is not None and pid is not None:
                    try:
                        on_died(pid)
                    except Exception as exc:  # the store may be down: the restart matters more
                        log.error("listener_cleanup_failed", pid=pid, error=str(exc))
                if pid is not None:
                    self._mourned.add(pid)
            try:
                self._processes[index] = self._spawn()
            except ListenerStartError as exc:
                self._restarts.failed(str(exc))
            else:
                self._mourned.discard(pid or 0)
                self._restarts.succeeded()

    def alive(self) -> bool:
        """True while every listener process runs."""
        return all(p.is_alive() for p in self._processes) and bool(self._processes)

    def stop(self, grace_s: float) -> None:
        """SIGTERM every process; they finish their associations for *grace_s*, then die."""
        for process in self._processes:
            if process.is_alive() and process.pid:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s + 5
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)
            if not process.is_alive():
                with contextlib.suppress(OSError):
                    self._remove_temp_files(process.pid)
        self._processes.clear()
