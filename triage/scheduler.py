"""Periodic jobs of the daemon (APScheduler): study completion, worker-lease expiry and the
purge of finished studies past ``[store] retention_days``.

Several daemons on one PostgreSQL database may all run these jobs: each job is one transaction
that locks the rows it moves (SKIP LOCKED), so running it twice moves nothing twice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from triage.config import Config
from triage.logs import RepeatedFailure, get_logger
from triage.store.operations import purge
from triage.store.repository import Store
from triage.store.spool import Spool
from triage.store.work_queue import WorkQueue

log = get_logger("triage.scheduler")

#: How often finished studies past retention are purged (the first run is at start).
PURGE_EVERY_S = 3600.0
#: How long :meth:`Scheduler.stop` waits for the jobs in progress. One stuck on a store that
#: stops answering is left behind after this, so the daemon's stop stays well inside
#: systemd's TimeoutStopSec (the daemon then bounds its store waits, which ends the job); a
#: purge left behind is safe, each batch being one transaction (files go before rows).
STOP_WAIT_S = 10.0
#: A temp file not written to for this long belongs to no transfer or output in progress
#: (the network timeout ends a stalled transfer; outputs are committed within seconds).
STALE_TEMP_FILE_S = 3600.0


class Scheduler:
    """Runs the daemon's periodic jobs in background threads; a failing job logs and retries."""

    def __init__(
        self, config: Config, store: Store, on_queued: Callable[[], None] | None = None
    ) -> None:
        self.config = config
        self.store = store
        self.on_queued = on_queued
        self.work_queue = WorkQueue(store)
        self._scheduler = BackgroundScheduler(timezone=UTC)
        #: Names of the jobs running now (see stop()).
        self._running: set[str] = set()
        self._idle = threading.Condition()
        #: Set by stop(): a purge in progress ends after its current study batch's files.
        self._stopping = threading.Event()
        self.add_job("queue_quiet_studies", self.queue_quiet_studies, config.study.check_interval_s)
        self.add_job("expire_leases", self.expire_leases, max(1.0, config.worker.lease_s / 10))
        self.add_job("purge", self.purge_expired, PURGE_EVERY_S)

    def add_job(self, name: str, job: Callable[[], object], every_s: float) -> None:
        """Run *job* every *every_s* seconds, never two at once, starting now."""

        failures = RepeatedFailure(log, "job_failed", "job_recovered", job=name)

        def guarded() -> None:
            with self._idle:
                self._running.add(name)
            try:
                job()
                failures.succeeded()
            except Exception as exc:  # the next run retries; the scheduler keeps going
                failures.failed(f"{type(exc).__name__}: {exc}")
            finally:
                with self._idle:
                    self._running.discard(name)
                    self._idle.notify_all()

        self._scheduler.add_job(
            guarded,
            "interval",
            seconds=every_s,
            id=name,
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
            # However late the scheduler starts or a run comes (a busy host), the run is made:
            # APScheduler's default skips one more than 1 s late, and with it the purge at
            # start, then for an hour.
            misfire_grace_time=None,
        )

    def queue_quiet_studies(self) -> int:
        """RECEIVING → QUEUED for every study quiet for the configured period."""
        moved = self.store.queue_quiet_studies(self.config.study.quiet_period_s)
        for change in moved:
            log.info("study_queued", study_uid=change.study_uid, revision=change.revision)
        if moved and self.on_queued:
            self.on_queued()
        return len(moved)

    def expire_leases(self) -> int:
        """Studies whose worker died go back to QUEUED (or FAILED after max_attempts)."""
        moved = self.work_queue.expire_leases(self.config.worker.max_attempts)
        for change in moved:
            log.warning(
                "lease_expired",
                study_uid=change.study_uid,
                revision=change.revision,
                state=change.to_state.value,
            )
        if moved and self.on_queued:
            self.on_queued()
        return len(moved)

    def purge_expired(self) -> int:
        """Remove finished studies older than ``[store] retention_days`` (as `triage-admin
        purge` does); returns how many."""
        spool = Spool(self.config.spool_path)
        # A data set pynetdicom received but never handed to us (a peer's C-STORE naming a
        # service it is not, aborted) leaves its temp file; a peer that keeps retrying would
        # fill the disk before the next start cleans the folder. First, as it also makes the
        # folders again should a cleaner have removed them (a purge refuses a spool without).
        stale = spool.prepare(older_than_s=STALE_TEMP_FILE_S)
        if stale:
            log.warning("stale_temp_files_removed", count=stale)
        report = purge(
            self.store,
            spool,
            float(self.config.store.retention_days),
            stop=self._stopping,
            audit_older_than_days=float(self.config.store.audit_retention_days),
        )
        if report.study_uids or report.workers or report.associations:
            log.info(
                "purged",
                studies=len(report.study_uids),
                files=report.files,
                bytes=report.bytes,
                workers=report.workers,
                associations=report.associations,
                retention_days=self.config.store.retention_days,
            )
        if report.not_purged:
            log.warning(
                "studies_not_purged",
                count=len(report.not_purged),
                study_uids=list(report.not_purged)[:10],
                first_error=next(iter(report.not_purged.values())),
            )
        return len(report.study_uids)

    def alive(self) -> bool:
        """True while the scheduler's thread runs."""
        thread = getattr(self._scheduler, "_thread", None)
        return bool(self._scheduler.running) and (thread is None or thread.is_alive())

    def start(self) -> None:
        """Start the jobs in the background."""
        self._scheduler.start()

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Stop scheduling and wait up to *wait_s* for running jobs to finish; those still
        running then (a store that does not answer) are left to end on their own."""
        if not self._scheduler.running:
            return
        self._stopping.set()
        self._scheduler.shutdown(wait=False)
        deadline = time.monotonic() + wait_s
        with self._idle:
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._idle.wait(left)
            stuck = sorted(self._running)
        if stuck:
            log.warning("scheduler_jobs_left_running", jobs=stuck, waited_s=wait_s)
