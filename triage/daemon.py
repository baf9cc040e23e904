"""`triage serve`: the listener(s) and the scheduler in one daemon, with a clean shutdown.

With ``[dicom] listener_processes = N > 1`` the daemon runs N-1 extra listener processes that
share the port with SO_REUSEPORT, so ingest is not capped by one interpreter's GIL. The kernel
spreads new associations over the processes; each writes to the same spool and store.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from types import FrameType

from triage.config import Config
from triage.dicom.listener import Listener
from triage.logs import configure_logging, get_logger
from triage.scheduler import Scheduler
from triage.store.db import is_sqlite, make_engine, upgrade_schema
from triage.store.repository import Store
from triage.store.spool import Spool

log = get_logger("triage.daemon")


class StartupError(RuntimeError):
    """The daemon cannot start; the message is one line for the operator."""


def _stop_event_on_signals() -> threading.Event:
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def _open_store(config: Config, migrate: bool) -> tuple[Store, Spool]:
    engine = make_engine(config.store.url)
    if migrate:
        revision = upgrade_schema(engine)
        log.info("store_ready", engine=engine.dialect.name, schema=revision)
    spool = Spool(config.spool_path, config.store.min_free_mb * 1024 * 1024)
    return Store(engine), spool


def _start_listener(config: Config, store: Store, spool: Spool) -> Listener:
    listener = Listener(config.dicom, store, spool, reuse_port=config.dicom.listener_processes > 1)
    try:
        listener.start()
    except OSError as exc:
        raise StartupError(
            f"cannot listen on {config.dicom.bind}:{config.dicom.port}: {exc.strerror or exc}"
        ) from exc
    return listener


def listener_process_main(config: Config) -> None:
    """Entry point of an extra listener process (spawned; never imports torch)."""
    configure_logging(config.log.level, config.log.format)
    stop = _stop_event_on_signals()
    store, spool = _open_store(config, migrate=False)
    listener = _start_listener(config, store, spool)
    log.info("listener_started", pid=os.getpid(), port=listener.port)
    stop.wait()
    listener.stop(config.dicom.shutdown_grace_s)
    store.engine.dispose()


class Daemon:
    """One `triage serve`: store, spool, listener(s) and scheduler."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._children: list[multiprocessing.process.BaseProcess] = []
        self._spawn = multiprocessing.get_context("spawn")

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, stop cleanly; returns the exit code."""
        config = self.config
        stop = _stop_event_on_signals()
        store, spool = _open_store(config, migrate=True)
        removed = spool.prepare()
        if removed:
            log.warning("spool_temp_files_removed", count=removed)
        if is_sqlite(store.engine):
            # Only this host writes an SQLite store: ACTIVE rows are left by a crash.
            store.close_abandoned_associations()
        listener = _start_listener(config, store, spool)
        for _ in range(config.dicom.listener_processes - 1):
            self._start_child()
        scheduler = Scheduler(config, store)
        scheduler.start()
        if not spool.has_room():
            log.warning("spool_below_free_space_floor", free_bytes=spool.free_bytes())
        if config.dicom.allowed_peers == ():
            log.warning("any_calling_ae_allowed", hint="set [dicom] allowed_peers")
        log.info(
            "ready",
            ae_title=config.dicom.ae_title,
            bind=config.dicom.bind,
            port=listener.port,
            listener_processes=config.dicom.listener_processes,
            tls=config.dicom.tls,
            spool=str(spool.root),
        )
        while not stop.wait(1.0):
            self._supervise_children()
        log.info("stopping", associations_in_flight=listener.active_associations())
        for child in self._children:
            if child.is_alive() and child.pid:
                os.kill(child.pid, signal.SIGTERM)
        listener.stop(config.dicom.shutdown_grace_s)
        for child in self._children:
            child.join(config.dicom.shutdown_grace_s + 5)
            if child.is_alive():
                child.kill()
        scheduler.stop()
        store.engine.dispose()
        log.info("stopped")
        return 0

    def _start_child(self) -> None:
        child = self._spawn.Process(
            target=listener_process_main, args=(self.config,), name="triage-listener"
        )
        child.start()
        self._children.append(child)

    def _supervise_children(self) -> None:
        for index, child in enumerate(self._children):
            if not child.is_alive():
                log.error("listener_process_died", pid=child.pid, exitcode=child.exitcode)
                replacement = self._spawn.Process(
                    target=listener_process_main, args=(self.config,), name="triage-listener"
                )
                replacement.start()
                self._children[index] = replacement
