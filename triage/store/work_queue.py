"""The scoring queue: claims with leases, results in one transaction, retries, lease expiry.

A worker claims QUEUED studies (PostgreSQL: ``SELECT … FOR UPDATE SKIP LOCKED``, so workers on
several hosts never claim the same study; SQLite: the claim runs under ``BEGIN IMMEDIATE``,
one writer at a time). Each claim gets a fresh token; every later write checks the token, the
state and the revision, so a result for a study that a late instance re-opened, or that another
worker took over after this one's lease expired, is discarded instead of overwriting anything.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from triage.scoring.result import ModelInfo, StudyResult
from triage.store.models import (
    Delivery,
    DeliveryState,
    Instance,
    Output,
    Result,
    Study,
    StudyState,
    ViewScore,
    WorkerRecord,
    utcnow,
)
from triage.store.repository import Store, Transition, add_event


@dataclass(frozen=True)
class ClaimedInstance:
    """One instance of a claimed study."""

    sop_instance_uid: str
    sop_class_uid: str
    path: str


@dataclass(frozen=True)
class Claim:
    """A study this worker holds until its lease expires."""

    study_id: int
    study_uid: str
    revision: int
    token: str
    attempt: int
    instances: tuple[ClaimedInstance, ...]


@dataclass(frozen=True)
class OutputFile:
    """An output object written to the outbox, to be recorded with the result."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    source_sop_instance_uid: str | None
    path: str
    size_bytes: int


def worker_id() -> str:
    """A name for this worker process: host, pid and a random suffix."""
    import os

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class WorkQueue:
    """Scoring-queue operations on a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._postgres = store.engine.dialect.name == "postgresql"

    def claim(self, owner: str, limit: int, lease_s: float) -> list[Claim]:
        """Take up to *limit* QUEUED studies, oldest first, and move them to SCORING."""

        def work(session: Session) -> list[Claim]:
            statement = (
                select(Study)
                .where(Study.state == StudyState.QUEUED)
                .order_by(Study.state_changed_at, Study.id)
                .limit(limit)
            )
            if self._postgres:
                statement = statement.with_for_update(skip_locked=True)
            now = utcnow()
            claims = []
            for study in session.scalars(statement).all():
                token = str(uuid.uuid4())
                study.lease_token = token
                study.lease_owner = owner
                study.lease_expires_at = now + timedelta(seconds=lease_s)
                study.attempts += 1
                previous = study.state
                study.state = StudyState.SCORING
                study.state_changed_at = now
                add_event(session, study, previous, f"claimed by {owner}", now)
                instances = session.execute(
                    select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.path)
                    .where(Instance.study_id == study.id)
                    .order_by(Instance.id)
                ).all()
                claims.append(
                    Claim(
                        study_id=study.id,
                        study_uid=study.study_uid,
                        revision=study.revision,
                        token=token,
                        attempt=study.attempts,
                        instances=tuple(ClaimedInstance(*row) for row in instances),
                    )
                )
            return claims

        return self.store.transaction(work)

    def _held(self, session: Session, claim: Claim) -> Study | None:
        statement = select(Study).where(
            Study.id == claim.study_id,
            Study.lease_token == claim.token,
            Study.state == StudyState.SCORING,
            Study.revision == claim.revision,
        )
        if self._postgres:
            statement = statement.with_for_update()
        return session.scalar(statement)

    def renew(self, claims: Sequence[Claim], lease_s: float) -> int:
        """Extend the leases this worker still holds; returns how many."""
        if not claims:
            return 0

        def work(session: Session) -> int:
            renewed = 0
            expires = utcnow() + timedelta(seconds=lease_s)
            for claim in claims:
                result = session.execute(
                    update(Study)
                    .where(
                        Study.id == claim.study_id,
                        Study.lease_token == claim.token,
                        Study.state == StudyState.SCORING,
                    )
                    .values(lease_expires_at=expires)
                )
                renewed += result.rowcount
            return renewed

        return self.store.transaction(work)

    def skip(self, claim: Claim, reason: str, study_type: str | None = None) -> bool:
        """SCORING → SKIPPED (not an upper-extremity radiograph …); False if no longer held."""

        def work(session: Session) -> bool:
            study = self._held(session, claim)
            if study is None:
                return False
            study.study_type = study_type
            _release(study, reason)
            self._move(session, study, StudyState.SKIPPED, reason)
            return True

        return self.store.transaction(work)

    def complete(
        self,
        claim: Claim,
        result: StudyResult,
        model: ModelInfo,
        outputs: Sequence[OutputFile],
        destinations: Sequence[str],
        scoring_ms: float,
    ) -> bool:
        """Write the result, its outputs and their deliveries in one transaction.

        SCORING → DELIVERING (DONE when no destination is configured). Outputs keep their
        deterministic SOP Instance UIDs: scoring the same revision again (after a requeue)
        updates the same rows and sends the same instances. False if no longer held.
        """

        def work(session: Session) -> bool:
            study = self._held(session, claim)
            if study is None:
                return False
            session.execute(
                delete(Result).where(Result.study_id == study.id, Result.revision == claim.revision)
            )
            row = Result(
                study_id=study.id,
                revision=claim.revision,
                study_type=result.study_type.value,
                probability=result.probability,
                threshold=result.threshold,
                abnormal=result.abnormal,
                model_name=model.name,
                model_version=model.version,
                model_validated=model.validated,
                views_scored=len(result.views),
                views_skipped=len(result.skipped_views),
                scoring_ms=scoring_ms,
                scored_at=utcnow(),
            )
            session.add(row)
            session.flush()
            for view in result.views:
                session.add(
                    ViewScore(
                        result_id=row.id,
                        sop_instance_uid=view.sop_instance_uid,
                        probability=view.probability,
                        note=view.note,
                        skipped=False,
                    )
                )
            for skipped in result.skipped_views:
                session.add(
                    ViewScore(
                        result_id=row.id,
                        sop_instance_uid=skipped.sop_instance_uid,
                        probability=None,
                        note=skipped.reason,
                        skipped=True,
                    )
                )
            self._record_outputs(session, study, claim.revision, outputs, destinations)
            study.study_type = result.study_type.value
            _release(study, "")
            verdict = "abnormal" if result.abnormal else "normal"
            reason = f"scored {verdict} p={result.probability:.3f}"
            if outputs and destinations:
                self._move(session, study, StudyState.DELIVERING, reason)
            else:
                self._move(session, study, StudyState.DONE, reason + "; nothing to deliver")
            return True

        return self.store.transaction(work)

    def _record_outputs(
        self,
        session: Session,
        study: Study,
        revision: int,
        outputs: Sequence[OutputFile],
        destinations: Sequence[str],
    ) -> None:
        """Insert (or, rebuilt after a requeue, update) the output rows and a pending delivery
        of each to every destination: two queries and one flush for the whole study, not
        two queries and a flush per output (each a round trip on PostgreSQL)."""
        if not outputs:
            return
        rows = {
            row.sop_instance_uid: row
            for row in session.scalars(
                select(Output).where(
                    Output.sop_instance_uid.in_([o.sop_instance_uid for o in outputs])
                )
            )
        }
        now = utcnow()
        for output in outputs:
            row = rows.get(output.sop_instance_uid)
            if row is None:
                rows[output.sop_instance_uid] = Output(
                    study_id=study.id,
                    revision=revision,
                    kind=output.kind,
                    sop_class_uid=output.sop_class_uid,
                    sop_instance_uid=output.sop_instance_uid,
                    series_uid=output.series_uid,
                    source_sop_instance_uid=output.source_sop_instance_uid,
                    path=output.path,
                    size_bytes=output.size_bytes,
                    created_at=now,
                )
                session.add(rows[output.sop_instance_uid])
            else:
                row.path, row.size_bytes = output.path, output.size_bytes
        if not destinations:
            return
        session.flush()  # the new rows' ids
        existing = {
            (d.output_id, d.destination): d
            for d in session.scalars(
                select(Delivery).where(Delivery.output_id.in_([r.id for r in rows.values()]))
            )
        }
        for row in rows.values():
            for name in destinations:
                delivery = existing.get((row.id, name))
                if delivery is None:
                    session.add(
                        Delivery(
                            output_id=row.id,
                            destination=name,
                            state=DeliveryState.PENDING,
                            attempts=0,
                            next_attempt_at=now,
                            last_error="",
                            updated_at=now,
                        )
                    )
                else:
                    delivery.state = DeliveryState.PENDING
                    delivery.attempts = 0
                    delivery.next_attempt_at = now

    def fail_attempt(self, claim: Claim, error: str, max_attempts: int) -> StudyState | None:
        """Give the study back after an error: QUEUED again, or FAILED after *max_attempts*."""

        def work(session: Session) -> StudyState | None:
            study = self._held(session, claim)
            if study is None:
                return None
            _release(study, error)
            if study.attempts >= max_attempts:
                self._move(session, study, StudyState.FAILED, f"{study.attempts} attempts: {error}")
            else:
                self._move(session, study, StudyState.QUEUED, f"retry after error: {error}")
            return study.state

        return self.store.transaction(work)

    def release(self, claim: Claim, reason: str) -> bool:
        """Give a claimed study back to the queue without counting the attempt (clean stop)."""

        def work(session: Session) -> bool:
            study = self._held(session, claim)
            if study is None:
                return False
            _release(study, "")
            study.attempts = max(0, study.attempts - 1)
            self._move(session, study, StudyState.QUEUED, reason)
            return True

        return self.store.transaction(work)

    def release_stale_claims(self, reason: str) -> int:
        """Every SCORING study back to QUEUED (the attempt still counts): for a restart of the
        only worker, whose claims all died with it. Returns how many."""

        def work(session: Session) -> int:
            studies = session.scalars(select(Study).where(Study.state == StudyState.SCORING)).all()
            for study in studies:
                _release(study, reason)
                self._move(session, study, StudyState.QUEUED, reason)
            return len(studies)

        return self.store.transaction(work)

    def expire_leases(self, max_attempts: int, now: datetime | None = None) -> list[Transition]:
        """Studies whose worker stopped renewing go back to QUEUED (or FAILED)."""
        now = now or utcnow()

        def work(session: Session) -> list[Transition]:
            statement = select(Study).where(
                Study.state == StudyState.SCORING, Study.lease_expires_at < now
            )
            if self._postgres:
                statement = statement.with_for_update(skip_locked=True)
            moved = []
            for study in session.scalars(statement).all():
                owner = study.lease_owner
                _release(study, f"lease of {owner} expired")
                if study.attempts >= max_attempts:
                    target = StudyState.FAILED
                    reason = f"lease of {owner} expired after {study.attempts} attempts"
                else:
                    target, reason = StudyState.QUEUED, f"lease of {owner} expired"
                moved.append(self._move(session, study, target, reason))
            return moved

        return self.store.transaction(work)

    def _move(self, session: Session, study: Study, state: StudyState, reason: str) -> Transition:
        now = utcnow()
        previous = study.state
        study.state = state
        study.state_changed_at = now
        if state in (StudyState.SKIPPED, StudyState.FAILED):
            study.state_reason = reason
        add_event(session, study, previous, reason, now)
        return Transition(study.study_uid, study.revision, previous, state)

    def previous_sr(self, claim: Claim) -> str | None:
        """The outbox path of the newest SR of an earlier revision (the new SR's predecessor)."""
        with self.store.read_session() as session:
            return session.scalar(
                select(Output.path)
                .where(
                    Output.study_id == claim.study_id,
                    Output.kind == "sr",
                    Output.revision < claim.revision,
                )
                .order_by(Output.revision.desc(), Output.id.desc())
                .limit(1)
            )

    # --- worker heartbeats -------------------------------------------------------------

    def heartbeat(self, worker: str, device: str, model_version: str) -> None:
        """Record that *worker* is alive (inserted on first call)."""
        import os

        def work(session: Session) -> None:
            now = utcnow()
            record = session.get(WorkerRecord, worker)
            if record is None:
                session.add(
                    WorkerRecord(
                        id=worker,
                        host=socket.gethostname(),
                        pid=os.getpid(),
                        device=device,
                        model_version=model_version,
                        started_at=now,
                        heartbeat_at=now,
                    )
                )
            else:
                record.heartbeat_at = now
                record.stopped_at = None

        self.store.transaction(work)

    def worker_stopped(self, worker: str) -> None:
        """Mark a worker as stopped cleanly."""

        def work(session: Session) -> None:
            record = session.get(WorkerRecord, worker)
            if record is not None:
                record.stopped_at = utcnow()

        self.store.transaction(work)


def _release(study: Study, reason: str) -> None:
    study.lease_token = None
    study.lease_owner = None
    study.lease_expires_at = None
    study.state_reason = reason
