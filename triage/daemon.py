"""`triage serve`: listener processes, scheduler, worker and sender in one daemon, with a clean
shutdown on SIGTERM/SIGINT; and `triage worker`, the worker alone (GPU hosts sharing one
PostgreSQL store and spool)."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from sqlalchemy import Engine, make_url

from triage import metrics
from triage.config import Config
from triage.dicom.listener_process import ListenerPool, ListenerStartError
from triage.health import Health
from triage.httpd import HttpServer
from triage.logs import get_logger
from triage.notify import Notifier
from triage.procutil import stop_on_signals
from triage.scheduler import Scheduler
from triage.store.db import (
    bound_store_waits,
    is_sqlite,
    make_engine,
    normalise_url,
    upgrade_schema,
)
from triage.store.models import StudyState
from triage.store.repository import Store
from triage.store.spool import Spool
from triage.tls_expiry import certificates_in_use, report_expiry

log = get_logger("triage.daemon")
#: `triage worker`, and `triage serve` on PostgreSQL, remove only temp files older than this
#: at start (see Spool.prepare).
_FOREIGN_TEMP_AGE_S = 3600.0
#: Once stopping, no use of the store lasts longer than this (see bound_store_waits): a store
#: that stopped answering (a frozen server, a partition) must not hold the stop past systemd's
#: TimeoutStopSec (120 s); what is left waiting on it then fails as on a dropped connection.
_STOP_STORE_WAIT_S = 20.0


class StartupError(RuntimeError):
    """The daemon cannot start; the message is one line for the operator.

    *exit_code* 2 means the configuration must change (systemd does not restart on it:
    RestartPreventExitStatus=2); 1 means it may work later (a port in use, a database down).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def stop_event_on_signals() -> threading.Event:
    """An event set by the first SIGTERM, SIGINT or SIGHUP.

    SIGHUP (a terminal or SSH session that hangs up) stops cleanly too: its default action
    killed the daemon at once, claims and associations in flight with it. There is nothing
    to reload: a changed config takes a restart.
    """
    return stop_on_signals(
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGHUP,
        on_signal=lambda name: log.info("stop_requested", signal=name),
    )


class Daemon:
    """One `triage serve`: store, spool, listener processes and scheduler."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock: list[IO[bytes]] = []

    def run(self) -> int:
        """Start everything, serve until SIGTERM/SIGINT, stop cleanly; returns the exit code."""
        config = self.config
        stop = stop_event_on_signals()
        notifier = Notifier()
        # Before anything is touched: a second daemon on this spool would remove the first
        # one's files being received and take back its claims as a crash's leftovers.
        self._lock = _only_daemon_on(config)
        engine = _make_engine(config, "serve")
        revision = upgrade_schema(engine)
        log.info("store_ready", engine=engine.dialect.name, schema=revision)
        store = Store(engine)
        spool = Spool(config.spool_path, config.store.min_free_mb * 1024 * 1024)
        # On PostgreSQL, `triage worker` processes may share the spool (on this host or
        # another) and be staging outputs there now: only an old temp file is a leftover.
        removed = _prepare_spool(spool, 0.0 if is_sqlite(engine) else _FOREIGN_TEMP_AGE_S)
        if removed:
            log.warning("spool_temp_files_removed", count=removed)
        if is_sqlite(engine):
            # Only this daemon writes an SQLite store: whatever is still marked in progress was
            # left by a crash. Take it back now instead of waiting for leases to expire.
            _recover_after_crash(config, store)
            # The listener's SQLite commits do not wait for the disk: after a power loss its
            # last rows may be gone while their (durable) spool files are there.
            _record_spool_orphans(config, store, spool)
        else:
            # Other hosts' daemons share the store: only this host's dead processes' rows.
            closed = store.close_abandoned_associations(alive=_pid_alive)
            if closed:
                log.warning("recovered_after_crash", associations_closed=closed)
            _release_dead_claims(config, store, shared=True)
            _warn_of_destinations_sent_to_elsewhere(config, store)
            # A listener killed between its file and its row left an instance nobody
            # acknowledged and no purge removes; old enough, no other host is committing it.
            _record_spool_orphans(config, store, spool, older_than_s=_FOREIGN_TEMP_AGE_S)
        health = Health(store, spool)
        # Bound before anything else starts: a taken port stops start-up right here.
        http = _bind_http(config, health)
        metrics.register_store(store, spool)
        certificates = certificates_in_use(config)
        report_expiry(certificates)
        metrics.register_certificates(certificates)
        worker = sender = None
        if config.destinations:
            from triage.dicom.sender import Sender

            sender = Sender(config, store, spool)
            metrics.expect_destinations(d.name for d in config.destinations)
        if config.worker.enabled:
            worker = _make_worker(config, store, spool, sender.wake if sender else None)
            metrics.register_worker(worker.load)
        _publish_model(config, worker)
        listeners = ListenerPool(config)
        scheduler = Scheduler(config, store, on_queued=worker.wake if worker else None)
        _start_all(listeners, scheduler, worker, sender)
        if not spool.has_room():
            log.warning("spool_below_free_space_floor", free_bytes=spool.free_bytes())
        if not config.dicom.allowed_peers:
            log.warning("any_calling_ae_allowed", hint="set [dicom] allowed_peers")
        health.add("listener", listeners)
        health.listener_port = listeners.port
        health.add("scheduler", scheduler)
        if worker:
            health.add("worker", worker)
            health.worker_enabled = True
        if sender:
            health.add("sender", sender)
        if http:
            http.start()
            log.info("http_ready", bind=config.http.bind, port=http.port)
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
            http_port=http.port if http else None,
        )
        notifier.ready(f"ready: {config.dicom.ae_title} on port {listeners.port}")
        # The watchdog is fed only while every loop is alive (systemd restarts us otherwise).
        watchdog_s = notifier.watchdog_s
        tick = notifier.check_interval_s
        was_live = True

        def close_audit_rows_of(pid: int) -> None:
            # Its associations ended with it; left ACTIVE, they would count as active for
            # ever (and hold back the metrics' scan of the audit table).
            closed = store.close_abandoned_associations({pid})
            if closed:
                log.warning("associations_closed_for_dead_listener", pid=pid, count=closed)

        while not stop.wait(tick):
            listeners.supervise(close_audit_rows_of)
            live, loops = health.live()
            if live and watchdog_s is not None:
                notifier.watchdog()
            if live != was_live:
                if live:
                    log.info("loops_alive_again")
                else:
                    dead = sorted(name for name, ok in loops.items() if not ok)
                    log.error("loop_dead", loops=dead, watchdog=watchdog_s is not None)
                was_live = live
        notifier.stopping("stopping")
        health.begin_stop()
        log.info("stopping")
        bound_store_waits(engine, _STOP_STORE_WAIT_S)
        # The worker's grace runs alongside the listeners': one after the other, with the
        # sender's after them, came near systemd's TimeoutStopSec. The sender stops last,
        # so what the worker finishes meanwhile still reaches the PACS.
        stopping_at = time.monotonic()
        if worker:
            worker.begin_stop()
        listeners.stop(config.dicom.shutdown_grace_s)
        scheduler.stop()
        if worker:
            worker.stop(_left(stopping_at, config.dicom.shutdown_grace_s))
        if sender:
            sender.stop(config.delivery.timeout_s + 5)
        if http:
            http.stop()
        health.close()
        engine.dispose()
        log.info("stopped")
        return 0


def _left(since: float, bound_s: float) -> float:
    """What is left of *bound_s* seconds counted from the monotonic time *since*."""
    return max(0.0, since + bound_s - time.monotonic())


def _start_all(listeners, scheduler, worker, sender) -> None:  # type: ignore[no-untyped-def]
    """Start the listener processes, scheduler, worker and sender, in that order; if one
    cannot start, stop those that did (their processes and threads would keep the daemon
    running, accepting studies nothing scores) and raise :class:`StartupError`."""
    started: list[Callable[[], object]] = []
    try:
        try:
            listeners.start()
        except ListenerStartError as exc:
            raise StartupError(str(exc)) from exc
        started.append(lambda: listeners.stop(0))
        scheduler.start()
        started.append(scheduler.stop)
        if worker:
            _start_worker(worker)
        if sender:
            sender.start()
    except BaseException:
        for stop in reversed(started):
            try:
                stop()
            except Exception as exc:  # stop the rest all the same
                log.warning("stop_after_failed_start_failed", error=str(exc))
        raise


def _start_worker(worker) -> None:  # type: ignore[no-untyped-def]
    """``worker.start()`` (it warms up: decode processes, a first forward pass); when that
    fails, the worker is stopped and :class:`StartupError` says why in one line."""
    try:
        worker.start()
    except Exception as exc:
        worker.stop(0)
        raise StartupError(
            f"cannot start the worker: {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from exc


def _publish_model(config: Config, worker) -> None:  # type: ignore[no-untyped-def]
    """``triage_model_info``: the worker's model and device, else the card (device "none")."""
    if worker is not None:
        info = worker.model.info
        metrics.set_model(info.name, info.version, info.validated, str(worker.model.device))
        return
    try:
        from triage.scoring.card import load_card

        card = load_card(config.model.card, verify_weights=False)
    except Exception as exc:  # only a metric: the daemon runs without a worker anyway
        log.warning("model_card_unreadable", card=config.model.card, error=str(exc))
        return
    metrics.set_model(card.name, card.version, card.validated, "none")


def _make_worker(  # type: ignore[no-untyped-def]
    config: Config, store: Store, spool: Spool, on_scored
):
    # torch is imported here, not at module level: listener processes must never load it.
    from triage.scoring.worker import ModelRefused, Worker, load_configured_model

    try:
        model = load_configured_model(config)
    except ModelRefused as exc:
        raise StartupError(str(exc), exit_code=2) from exc
    except Exception as exc:  # CardError, a CUDA device that is not there …
        raise StartupError(f"cannot load the model: {exc}", exit_code=2) from exc
    return Worker(config, store, spool, model, on_scored=on_scored)


def run_worker(config: Config) -> int:
    """`triage worker`: only the worker, until SIGTERM/SIGINT; returns the exit code.

    Under systemd (``Type=notify``, see ``deploy/triage-worker@.service``) it says READY=1
    once the model is loaded and the decode processes are warm, pings the watchdog while
    its loops live and says STOPPING=1 on SIGTERM. A loop that died stops it with exit
    status 1, so systemd restarts it; its claimed studies come back when their leases
    expire. With ``[http]`` on it serves ``/healthz``, ``/readyz`` (store, worker, spool) and
    ``/metrics`` (its model's histograms and its ``triage_worker_*`` load; the site's study
    and delivery totals are ``triage serve``'s) on its own port."""
    stop = stop_event_on_signals()
    notifier = Notifier()
    engine = _make_engine(config, "worker")
    upgrade_schema(engine)
    store = Store(engine)
    _release_dead_claims(config, store, shared=not is_sqlite(engine))
    spool = Spool(config.spool_path, config.store.min_free_mb * 1024 * 1024)
    # A daemon on this host may be receiving into the same spool right now.
    _prepare_spool(spool, older_than_s=_FOREIGN_TEMP_AGE_S)
    health = Health(store, spool, listener=False)
    http = _bind_http(config, health, role="worker")
    worker = _make_worker(config, store, spool, None)
    metrics.register_worker(worker.load)
    _publish_model(config, worker)
    _start_worker(worker)
    health.add("worker", worker)
    health.worker_enabled = True
    if http:
        http.start()
        log.info("http_ready", bind=config.http.bind, port=http.port)
    log.info(
        "ready",
        role="worker",
        worker=worker.owner,
        decode_processes=worker.decode_processes,
        http_port=http.port if http else None,
    )
    notifier.ready(f"worker {worker.owner}: {worker.decode_processes} decode processes")
    watchdog_s = notifier.watchdog_s
    tick = notifier.check_interval_s
    exit_code = 0
    while not stop.wait(tick):
        if not worker.alive():
            log.error("worker_loop_died")
            exit_code = 1
            break
        if watchdog_s is not None:
            notifier.watchdog()
    notifier.stopping("stopping")
    health.begin_stop()
    bound_store_waits(engine, _STOP_STORE_WAIT_S)
    worker.stop(config.dicom.shutdown_grace_s)
    if http:
        http.stop()
    health.close()
    engine.dispose()
    log.info("stopped")
    return exit_code


def _pid_alive(pid: int) -> bool:
    """Whether a process *pid* runs on this host (a zombie, dead but not yet reaped by an
    init that reaps slowly, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass  # no /proc: ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve_lock_places(config: Config) -> list[tuple[Path, str, str, str]]:
    """The files `triage serve` keeps locked while it runs, as (folder, file name, what it
    guards, the folder described): one in the spool, one beside a SQLite store."""
    spool = config.spool_path
    places = [(spool, ".serve.lock", "spool", f"the spool folder {spool}")]
    url = make_url(normalise_url(config.store.url))
    if url.get_backend_name() == "sqlite" and url.database:
        database = Path(url.database)
        lock = f"{database.name}.serve.lock"
        places.append((database.parent, lock, "SQLite store", "the SQLite database's folder"))
    return places


def _only_daemon_on(config: Config) -> list[IO[bytes]]:
    """Hold an exclusive lock on the spool (and beside a SQLite store) for this process's
    life, or stop with one line when another `triage serve` holds it."""
    held: list[IO[bytes]] = []
    for folder, name, what, described in serve_lock_places(config):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle = open(folder / name, "ab")  # noqa: SIM115 - held until the process ends
        except OSError as exc:
            raise _folder_error(described, exc) from exc
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StartupError(
                f"another `triage serve` is running on this {what} ({folder}): stop it first"
                " (or a `triage-admin db downgrade` holds it: wait for it to end)"
            ) from None
        held.append(handle)
    return held


def _make_engine(config: Config, role: str) -> Engine:
    """The store's engine; a SQLite folder that cannot be created stops start-up in one line."""
    try:
        return make_engine(config.store.url, role=role)
    except OSError as exc:
        raise _folder_error("the SQLite database's folder", exc) from exc


def _prepare_spool(spool: Spool, older_than_s: float = 0.0) -> int:
    """``spool.prepare()``; a spool folder that cannot be created stops start-up in one line."""
    try:
        return spool.prepare(older_than_s=older_than_s)
    except OSError as exc:
        raise _folder_error(f"the spool folder {spool.root}", exc) from exc


def _folder_error(what: str, exc: OSError) -> StartupError:
    """:class:`StartupError` for a folder that cannot be made. A path that is a file, that we
    may not create or that is read-only needs the config or the host changed (exit 2: no
    restart); anything else (a full or failing disk) may pass (exit 1)."""
    lasting = isinstance(exc, PermissionError | NotADirectoryError | FileExistsError) or (
        exc.errno == errno.EROFS
    )
    where = f": {exc.filename}" if exc.filename else ""
    reason = exc.strerror or type(exc).__name__
    if isinstance(exc, NotADirectoryError | FileExistsError):
        reason = "a file is in the way"
    return StartupError(
        f"cannot create {what}: {reason}{where}",
        exit_code=2 if lasting else 1,
    )


def _bind_http(config: Config, health: Health, role: str = "serve") -> HttpServer | None:
    """The HTTP endpoints' server, bound (not yet serving); None when ``[http]`` is off."""
    if not config.http.enabled:
        return None
    try:
        return HttpServer(config.http, health)
    except OSError as exc:
        # Several `triage worker` instances (and `triage serve`) on one host need a port each.
        hint = (
            " (each `triage worker` on a host needs its own [http] port, e.g."
            " TRIAGE_HTTP_PORT in its unit, or [http] enabled = false)"
            if role == "worker"
            else ""
        )
        # An IPv6 address in brackets: "::1:8080" would not say which part is the port.
        host = f"[{config.http.bind}]" if ":" in config.http.bind else config.http.bind
        raise StartupError(
            f"cannot serve HTTP on {host}:{config.http.port}: {exc.strerror or exc}{hint}"
        ) from exc


def _record_spool_orphans(
    config: Config, store: Store, spool: Spool, older_than_s: float = 0.0
) -> None:
    from triage.dicom.sop import DEFAULT_STORAGE_CLASSES
    from triage.dicom.spool_recovery import record_orphans

    classes = frozenset(DEFAULT_STORAGE_CLASSES) | frozenset(config.dicom.extra_sop_classes)
    report = record_orphans(store, spool, classes, older_than_s)
    if report.recorded or report.unreadable or report.removed:
        log.warning(
            "spool_recovered",
            instances_recorded=report.recorded,
            studies=len(report.study_uids),
            files_left=report.unreadable,
            stale_copies_removed=report.removed,
        )


def _release_dead_claims(config: Config, store: Store, *, shared: bool) -> int:
    """Give back now the studies that workers which died were scoring (see
    :meth:`~triage.store.work_queue.WorkQueue.release_dead_claims`); returns how many.

    A claim's owner is ``host:pid:suffix`` (:func:`~triage.store.work_queue.worker_id`). On a
    *shared* (PostgreSQL) store only this host's dead processes' claims are known to be dead;
    others wait for their leases. An SQLite store has no other host: a claim from another
    host name (a container recreated) is as dead as one of a pid that is gone.
    """
    from triage.store.work_queue import WorkQueue, worker_host_pid

    here = socket.gethostname()

    def dead(owner: str) -> bool:
        host, pid = worker_host_pid(owner)
        if host != here:
            return not shared
        return pid is not None and pid != os.getpid() and not _pid_alive(pid)

    moved = WorkQueue(store).release_dead_claims(config.worker.max_attempts, dead)
    if moved:
        log.warning(
            "recovered_after_crash",
            studies_requeued=sum(1 for m in moved if m.to_state is StudyState.QUEUED),
            studies_failed=sum(1 for m in moved if m.to_state is StudyState.FAILED),
        )
    return len(moved)


def _warn_of_destinations_sent_to_elsewhere(config: Config, store: Store) -> None:
    """On a shared store, deliveries wait for destinations this daemon does not send to.

    Another host's daemon may (its config may name more), so they are not failed as on
    SQLite; but a destination removed from every config would keep its studies in
    DELIVERING without a word: said at start, with what to do.
    """
    from triage.store.outbox import Outbox

    configured = {d.name for d in config.destinations}
    elsewhere = [d for d in Outbox(store).pending_destinations() if d not in configured]
    if elsewhere:
        log.warning(
            "deliveries_wait_for_destinations_not_configured_here",
            destinations=elsewhere,
            hint="another daemon on this store must send to them; if none does, add them "
            "back to a config, or cancel or requeue their studies",
        )


def _recover_after_crash(config: Config, store: Store) -> None:
    """On an SQLite store (one daemon): close audit rows, give claimed studies back to the
    queue and make leased deliveries due, all left by a daemon that did not stop cleanly;
    and fail the deliveries to destinations the config no longer names."""
    from triage.store.outbox import Outbox

    closed = store.close_abandoned_associations()
    _release_dead_claims(config, store, shared=False)
    due = Outbox(store).release_leases()
    gone = Outbox(store).fail_unconfigured([d.name for d in config.destinations])
    if gone:
        # Their studies go FAILED with the reason; `triage-admin retry` cannot bring a
        # destination back, a config with it can (requeue then sends to the new ones).
        log.warning("deliveries_to_unconfigured_destinations_failed", destinations=gone)
    if closed or due:
        log.warning("recovered_after_crash", associations_closed=closed, deliveries_due=due)
