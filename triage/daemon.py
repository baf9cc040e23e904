"""`triage serve`: listener processes, scheduler, worker and sender in one daemon, with a clean
shutdown on SIGTERM/SIGINT; and `triage worker`, the worker alone (GPU hosts sharing one
PostgreSQL store and spool)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from triage.config import Config
from triage.dicom.listener_process import ListenerPool, ListenerStartError
from triage.logs import get_logger
from triage.scheduler import Scheduler
from triage.store.db import is_sqlite, make_engine, upgrade_schema
from triage.store.repository import Store
from triage.store.spool import Spool

log = get_logger("triage.daemon")


class StartupError(RuntimeError):
    """The daemon cannot start; the message is one line for the operator."""


def stop_event_on_signals() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


class Daemon:
    """One `triage serve`: store, spool, listener processes and scheduler."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, stop cleanly; returns the exit code."""
        config = self.config
        stop = stop_event_on_signals()
        engine = make_engine(config.store.url)
        revision = upgrade_schema(engine)
        log.info("store_ready", engine=engine.dialect.name, schema=revision)
        store = Store(engine)
        spool = Spool(config.spool_path, config.store.min_free_mb * 1024 * 1024)
        removed = spool.prepare()
        if removed:
            log.warning("spool_temp_files_removed", count=removed)
        if is_sqlite(engine):
            # Only this host writes an SQLite store: ACTIVE rows were left by a crash.
            closed = store.close_abandoned_associations()
            if closed:
                log.warning("abandoned_associations_closed", count=closed)
        worker = sender = None
        if config.destinations:
            from triage.dicom.sender import Sender

            sender = Sender(config, store, spool)
        if config.worker.enabled:
            worker = _make_worker(config, store, spool, sender.wake if sender else None)
        listeners = ListenerPool(config)
        try:
            listeners.start()
        except ListenerStartError as exc:
            raise StartupError(str(exc)) from exc
        scheduler = Scheduler(config, store, on_queued=worker.wake if worker else None)
        scheduler.start()
        if worker:
            worker.start()
        if sender:
            sender.start()
        if not spool.has_room():
            log.warning("spool_below_free_space_floor", free_bytes=spool.free_bytes())
        if not config.dicom.allowed_peers:
            log.warning("any_calling_ae_allowed", hint="set [dicom] allowed_peers")
        log.info(
            "ready",
            worker=bool(worker),
            destinations=[d.name for d in config.destinations],
            ae_title=config.dicom.ae_title,
            bind=config.dicom.bind,
            port=listeners.port,
            listener_processes=listeners.count,
            tls=config.dicom.tls,
            spool=str(spool.root),
        )
        while not stop.wait(1.0):
            listeners.supervise()
        log.info("stopping")
        listeners.stop(config.dicom.shutdown_grace_s)
        scheduler.stop()
        if worker:
            worker.stop(config.dicom.shutdown_grace_s)
        if sender:
            sender.stop(config.delivery.timeout_s + 5)
        engine.dispose()
        log.info("stopped")
        return 0


def _make_worker(config: Config, store: Store, spool: Spool, on_scored):  # type: ignore[no-untyped-def]
    # torch is imported here, not at module level: listener processes must never load it.
    from triage.scoring.worker import ModelRefused, Worker, load_configured_model

    try:
        model = load_configured_model(config)
    except ModelRefused as exc:
        raise StartupError(str(exc)) from exc
    except Exception as exc:  # CardError, a CUDA device that is not there …
        raise StartupError(f"cannot load the model: {exc}") from exc
    return Worker(config, store, spool, model, on_scored=on_scored)


def run_worker(config: Config) -> int:
    """`triage worker`: only the worker, until SIGTERM/SIGINT; returns the exit code."""
    stop = stop_event_on_signals()
    engine = make_engine(config.store.url)
    upgrade_schema(engine)
    store = Store(engine)
    spool = Spool(config.spool_path, config.store.min_free_mb * 1024 * 1024)
    spool.prepare()
    worker = _make_worker(config, store, spool, None)
    worker.start()
    log.info("ready", role="worker", worker=worker.owner)
    while not stop.wait(1.0):
        if not worker.alive():
            log.error("worker_loop_died")
            break
    worker.stop(config.dicom.shutdown_grace_s)
    engine.dispose()
    log.info("stopped")
    return 0
