"""Periodic jobs of the daemon (APScheduler): study completion now; lease expiry, delivery
retries and purging join as those parts land."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from apscheduler.schedulers.background import BackgroundScheduler

from triage.config import Config
from triage.logs import get_logger
from triage.store.repository import Store

log = get_logger("triage.scheduler")


class Scheduler:
    """Runs the daemon's periodic jobs in background threads; a failing job logs and retries."""

    def __init__(self, config: Config, store: Store) -> None:
        self.config = config
        self.store = store
        self._scheduler = BackgroundScheduler(timezone=UTC)
        self.add_job("queue_quiet_studies", self.queue_quiet_studies, config.study.check_interval_s)

    def add_job(self, name: str, job: Callable[[], object], every_s: float) -> None:
        """Run *job* every *every_s* seconds, never two at once, starting now."""

        def guarded() -> None:
            try:
                job()
            except Exception as exc:  # the next run retries; the scheduler keeps going
                log.error("job_failed", job=name, error=f"{type(exc).__name__}: {exc}")

        self._scheduler.add_job(
            guarded,
            "interval",
            seconds=every_s,
            id=name,
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )

    def queue_quiet_studies(self) -> int:
        """RECEIVING → QUEUED for every study quiet for the configured period."""
        moved = self.store.queue_quiet_studies(self.config.study.quiet_period_s)
        for change in moved:
            log.info("study_queued", study_uid=change.study_uid, revision=change.revision)
        return len(moved)

    def start(self) -> None:
        """Start the jobs in the background."""
        self._scheduler.start()

    def stop(self) -> None:
        """Stop scheduling and wait for running jobs to finish."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)
