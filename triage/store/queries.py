"""Read-only queries for operators (`triage-admin`) and for the metrics endpoint.

Every function opens a read session (no write lock on SQLite, so it runs beside a busy daemon)
and returns plain, JSON-ready data: strings, numbers, booleans, ``None``, lists and dicts, with
times as ISO 8601 UTC strings (``2025-11-26T10:00:00Z``) and ages in seconds. The keys are the
documented ``triage-admin --json`` schema: add keys, never rename or remove one.

Patient identity is not in the store, so nothing here can return any.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, select
from sqlalchemy.orm import Session

from triage.store.models import (
    AssociationOutcome,
    AssociationRecord,
    Delivery,
    DeliveryState,
    Instance,
    Output,
    Result,
    Study,
    StudyEvent,
    StudyState,
    ViewScore,
    WorkerRecord,
    utcnow,
)
from triage.store.repository import Store

#: States a study does not leave by itself: the only ones `purge` may remove.
FINISHED_STATES = (StudyState.DONE, StudyState.SKIPPED, StudyState.CANCELLED, StudyState.FAILED)
#: A worker whose heartbeat is older than this is reported "stale" (it beats every 10 s).
WORKER_STALE_AFTER_S = 60.0


def iso(moment: datetime | None) -> str | None:
    """A naive-UTC timestamp as ``YYYY-MM-DDTHH:MM:SSZ`` (``None`` stays ``None``)."""
    return None if moment is None else moment.replace(microsecond=0).isoformat() + "Z"


def seconds_since(moment: datetime | None, now: datetime) -> float | None:
    """Seconds from *moment* to *now*, one decimal, never negative (hosts sharing a database
    may disagree on the time by a little); ``None`` stays ``None``."""
    return None if moment is None else max(0.0, round((now - moment).total_seconds(), 1))


def finding(abnormal: bool | None) -> str | None:
    """``"abnormal"``, ``"normal"`` or ``None`` (not scored)."""
    return None if abnormal is None else ("abnormal" if abnormal else "normal")


# --- counts --------------------------------------------------------------------------------


def study_counts(session: Session) -> dict[str, int]:
    """Studies per state; every state is present (0 when none)."""
    counts = {state.value: 0 for state in StudyState}
    for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state)):
        counts[StudyState(state).value] = int(count)
    return counts


def delivery_counts(session: Session) -> dict[str, int]:
    """Deliveries per state; every state is present."""
    counts = {state.value: 0 for state in DeliveryState}
    rows = session.execute(select(Delivery.state, func.count()).group_by(Delivery.state))
    for state, count in rows:
        counts[DeliveryState(state).value] = int(count)
    return counts


def oldest_queued_at(session: Session) -> datetime | None:
    """When the study waiting longest in QUEUED got there (``None`` when none waits)."""
    return session.scalar(
        select(func.min(Study.state_changed_at)).where(Study.state == StudyState.QUEUED)
    )


# --- status --------------------------------------------------------------------------------


def workers(session: Session, now: datetime, limit: int = 50) -> list[dict[str, Any]]:
    """Worker heartbeats, newest first: running ones and those stopped in the last day."""
    rows = session.scalars(
        select(WorkerRecord)
        .where(
            (WorkerRecord.stopped_at.is_(None))
            | (WorkerRecord.stopped_at > now - timedelta(days=1))
        )
        .order_by(WorkerRecord.heartbeat_at.desc())
        .limit(limit)
    )
    out = []
    for worker in rows:
        age = seconds_since(worker.heartbeat_at, now)
        if worker.stopped_at is not None:
            state = "stopped"
        elif age is not None and age > WORKER_STALE_AFTER_S:
            state = "stale"
        else:
            state = "alive"
        out.append(
            {
                "id": worker.id,
                "host": worker.host,
                "pid": worker.pid,
                "device": worker.device,
                "model_version": worker.model_version,
                "state": state,
                "started_at": iso(worker.started_at),
                "heartbeat_at": iso(worker.heartbeat_at),
                "heartbeat_age_s": age,
                "stopped_at": iso(worker.stopped_at),
            }
        )
    return out


def failed_deliveries(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    """The newest FAILED deliveries with their study and last error."""
    rows = session.execute(
        select(Delivery, Output, Study)
        .join(Output, Delivery.output_id == Output.id)
        .join(Study, Output.study_id == Study.id)
        .where(Delivery.state == DeliveryState.FAILED)
        .order_by(Delivery.updated_at.desc(), Delivery.id.desc())
        .limit(limit)
    ).all()
    return [_delivery(delivery, output, study.study_uid) for delivery, output, study in rows]


def status(store: Store, now: datetime | None = None) -> dict[str, Any]:
    """Counts per state, oldest queued age, workers, deliveries (the store half of `status`)."""
    with store.read_session() as session:
        # On the database's clock: heartbeats are, and workers may run on other hosts.
        now = now or store.database_now(session.connection())
        oldest = oldest_queued_at(session)
        return {
            "studies": study_counts(session),
            "oldest_queued_at": iso(oldest),
            "oldest_queued_age_s": seconds_since(oldest, now),
            "workers": workers(session, now),
            "deliveries": delivery_counts(session),
            "failed_deliveries": failed_deliveries(session),
        }


# --- studies -------------------------------------------------------------------------------


def _current_result():  # type: ignore[no-untyped-def]
    """Join condition: the result of the study's current revision."""
    return and_(Result.study_id == Study.id, Result.revision == Study.revision)


def _study_row(study: Study, result: Result | None, instances: int, now: datetime) -> dict:
    return {
        "study_uid": study.study_uid,
        "state": study.state.value,
        "revision": study.revision,
        "study_type": study.study_type,
        "instances": int(instances),
        "probability": None if result is None else round(result.probability, 6),
        "finding": finding(None if result is None else result.abnormal),
        "reason": study.state_reason or "",
        "created_at": iso(study.created_at),
        "last_instance_at": iso(study.last_instance_at),
        "state_changed_at": iso(study.state_changed_at),
        "age_s": seconds_since(study.created_at, now),
        "in_state_s": seconds_since(study.state_changed_at, now),
    }


@dataclass(frozen=True)
class StudyFilter:
    """What `triage-admin studies` asks for; ages are measured from the first instance."""

    states: tuple[StudyState, ...] = ()
    older_than_s: float | None = None
    newer_than_s: float | None = None
    study_types: tuple[str, ...] = field(default_factory=tuple)
    limit: int = 50


def list_studies(
    store: Store, wanted: StudyFilter, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Studies matching *wanted*, newest first."""
    now = now or utcnow()
    counts = (
        select(Instance.study_id, func.count().label("n")).group_by(Instance.study_id).subquery()
    )
    statement = (
        select(Study, Result, func.coalesce(counts.c.n, 0))
        .outerjoin(Result, _current_result())
        .outerjoin(counts, counts.c.study_id == Study.id)
    )
    if wanted.states:
        statement = statement.where(Study.state.in_(wanted.states))
    if wanted.older_than_s is not None:
        statement = statement.where(
            Study.created_at <= now - timedelta(seconds=wanted.older_than_s)
        )
    if wanted.newer_than_s is not None:
        statement = statement.where(
            Study.created_at >= now - timedelta(seconds=wanted.newer_than_s)
        )
    if wanted.study_types:
        statement = statement.where(Study.study_type.in_(wanted.study_types))
    statement = statement.order_by(Study.created_at.desc(), Study.id.desc()).limit(wanted.limit)
    with store.read_session() as session:
        return [
            _study_row(study, result, n, now) for study, result, n in session.execute(statement)
        ]


@dataclass(frozen=True)
class AssociationFilter:
    """What `triage-admin associations` asks for."""

    outcomes: tuple[AssociationOutcome, ...] = ()
    newer_than_s: float | None = None
    calling_ae: str | None = None
    peer_host: str | None = None
    limit: int = 50


def list_associations(
    store: Store, wanted: AssociationFilter, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Rows of the association audit matching *wanted*, newest first."""
    now = now or utcnow()
    statement = select(AssociationRecord)
    if wanted.outcomes:
        statement = statement.where(AssociationRecord.outcome.in_(wanted.outcomes))
    if wanted.newer_than_s is not None:
        statement = statement.where(
            AssociationRecord.started_at >= now - timedelta(seconds=wanted.newer_than_s)
        )
    if wanted.calling_ae is not None:
        statement = statement.where(AssociationRecord.calling_ae == wanted.calling_ae.strip())
    if wanted.peer_host is not None:
        statement = statement.where(AssociationRecord.peer_host == wanted.peer_host)
    statement = statement.order_by(AssociationRecord.id.desc()).limit(wanted.limit)
    with store.read_session() as session:
        return [_association_row(record, now) for record in session.scalars(statement)]


def _association_row(record: AssociationRecord, now: datetime) -> dict[str, Any]:
    return {
        "id": record.id,
        "started_at": iso(record.started_at),
        "ended_at": iso(record.ended_at),
        "age_s": seconds_since(record.started_at, now),
        "calling_ae": record.calling_ae,
        "called_ae": record.called_ae,
        "peer_host": record.peer_host,
        "peer_port": record.peer_port,
        "tls": record.tls,
        "outcome": AssociationOutcome(record.outcome).value,
        "stored": record.instances_stored,
        "duplicate": record.instances_duplicate,
        "failed": record.instances_failed,
        "bytes_stored": record.bytes_stored,
        "echoes": record.echoes,
        "reason": record.reason or "",
        "listener_host": record.listener_host,
        "listener_pid": record.listener_pid,
    }


def _delivery(delivery: Delivery, output: Output, study_uid: str) -> dict[str, Any]:
    return {
        "id": delivery.id,
        "study_uid": study_uid,
        "revision": output.revision,
        "destination": delivery.destination,
        "kind": output.kind,
        "sop_instance_uid": output.sop_instance_uid,
        "state": delivery.state.value,
        "attempts": delivery.attempts,
        "last_status": delivery.last_status,
        "last_error": delivery.last_error or "",
        "next_attempt_at": iso(delivery.next_attempt_at),
        "delivered_at": iso(delivery.delivered_at),
        "updated_at": iso(delivery.updated_at),
    }


def study_detail(store: Store, study_uid: str, now: datetime | None = None) -> dict | None:
    """Everything about one study, or ``None`` when the store does not know it.

    The result (and its views) is the newest one, which is the current revision's once the
    study is scored again after a late instance.
    """
    now = now or utcnow()
    with store.read_session() as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            return None
        instances = list(
            session.scalars(
                select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
            )
        )
        result = session.scalar(
            select(Result)
            .where(Result.study_id == study.id)
            .order_by(Result.revision.desc())
            .limit(1)
        )
        current = result if result is not None and result.revision == study.revision else None
        views = (
            []
            if result is None
            else list(
                session.scalars(
                    select(ViewScore).where(ViewScore.result_id == result.id).order_by(ViewScore.id)
                )
            )
        )
        deliveries = session.execute(
            select(Delivery, Output)
            .join(Output, Delivery.output_id == Output.id)
            .where(Output.study_id == study.id)
            .order_by(Output.revision, Output.id, Delivery.destination)
        ).all()
        history = list(
            session.scalars(
                select(StudyEvent).where(StudyEvent.study_id == study.id).order_by(StudyEvent.id)
            )
        )
        row = _study_row(study, current, len(instances), now)
        row.update(
            attempts=study.attempts,
            lease_owner=study.lease_owner,
            lease_expires_at=iso(study.lease_expires_at),
        )
        return {
            "study": row,
            "instances": [
                {
                    "sop_instance_uid": i.sop_instance_uid,
                    "series_uid": i.series_uid,
                    "sop_class_uid": i.sop_class_uid,
                    "modality": i.modality,
                    "transfer_syntax_uid": i.transfer_syntax_uid,
                    "size_bytes": i.size_bytes,
                    "revision": i.revision,
                    "received_at": iso(i.received_at),
                    "path": i.path,
                }
                for i in instances
            ],
            "result": None if result is None else _result(result),
            "views": [
                {
                    "sop_instance_uid": v.sop_instance_uid,
                    "probability": None if v.probability is None else round(v.probability, 6),
                    "skipped": v.skipped,
                    "note": v.note or "",
                }
                for v in views
            ],
            "deliveries": [_delivery(d, o, study.study_uid) for d, o in deliveries],
            "history": [
                {
                    "at": iso(e.at),
                    "from_state": None if e.from_state is None else e.from_state.value,
                    "to_state": e.to_state.value,
                    "revision": e.revision,
                    "reason": e.reason or "",
                }
                for e in history
            ],
        }


def _result(result: Result) -> dict[str, Any]:
    return {
        "revision": result.revision,
        "study_type": result.study_type,
        "probability": round(result.probability, 6),
        "threshold": result.threshold,
        "finding": finding(result.abnormal),
        "model_name": result.model_name,
        "model_version": result.model_version,
        "model_validated": result.model_validated,
        "views_scored": result.views_scored,
        "views_skipped": result.views_skipped,
        "scoring_ms": round(result.scoring_ms, 1),
        "scored_at": iso(result.scored_at),
    }


def instance_paths(store: Store, study_uid: str) -> list[str]:
    """Spool paths (relative) of a study's instances, oldest first."""
    with store.read_session() as session:
        return list(
            session.scalars(
                select(Instance.path)
                .join(Study, Instance.study_id == Study.id)
                .where(Study.study_uid == study_uid)
                .order_by(Instance.id)
            )
        )


# --- worklist ------------------------------------------------------------------------------


def worklist(
    store: Store,
    *,
    limit: int = 50,
    study_types: Iterable[str] = (),
    newer_than_s: float | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Scored studies (a result for their current revision, not cancelled), most likely
    abnormal first; ages from the first instance."""
    now = now or utcnow()
    statement = (
        select(Study, Result)
        .join(Result, _current_result())
        .where(Study.state != StudyState.CANCELLED)
    )
    types = tuple(study_types)
    if types:
        statement = statement.where(Study.study_type.in_(types))
    if newer_than_s is not None:
        statement = statement.where(Study.created_at >= now - timedelta(seconds=newer_than_s))
    statement = statement.order_by(
        Result.probability.desc(), Result.scored_at.asc(), Study.id
    ).limit(limit)
    with store.read_session() as session:
        return [
            {
                "rank": rank,
                "study_uid": study.study_uid,
                "study_type": result.study_type,
                "probability": round(result.probability, 6),
                "threshold": result.threshold,
                "finding": finding(result.abnormal),
                "state": study.state.value,
                "revision": study.revision,
                "model_version": result.model_version,
                "model_validated": result.model_validated,
                "scored_at": iso(result.scored_at),
                "created_at": iso(study.created_at),
                "age_s": seconds_since(study.created_at, now),
            }
            for rank, (study, result) in enumerate(session.execute(statement), start=1)
        ]


# --- metrics -------------------------------------------------------------------------------


@dataclass
class AssociationTotals:
    """Sums over association audit rows."""

    by_outcome: dict[str, int] = field(
        default_factory=lambda: {o.value: 0 for o in AssociationOutcome}
    )
    stored: int = 0
    duplicate: int = 0
    failed: int = 0
    bytes_stored: int = 0
    echoes: int = 0

    def add(self, other: AssociationTotals) -> AssociationTotals:
        """The element-wise sum with *other* (a new object)."""
        total = AssociationTotals()
        for key in total.by_outcome:
            total.by_outcome[key] = self.by_outcome[key] + other.by_outcome[key]
        for name in ("stored", "duplicate", "failed", "bytes_stored", "echoes"):
            setattr(total, name, getattr(self, name) + getattr(other, name))
        return total


class AssociationCounter:
    """Totals over the ``associations`` audit table, read incrementally.

    A row is final once its association ended (only ACTIVE rows still change), so the totals
    of every row below the oldest ACTIVE one are kept in memory and each call reads only the
    rows from there on: a scrape costs a handful of rows, not the whole audit history. Rows of
    the last minute never move the watermark: on PostgreSQL a row with a smaller id can become
    visible after a larger one (concurrent inserts commit in any order).
    """

    #: Rows younger than this are re-read on every call (see above).
    SETTLE_S = 60.0

    def __init__(self) -> None:
        self._final = AssociationTotals()
        self._watermark = 0  # every row with id <= this is final and in self._final
        #: Final rows above the watermark (after a row still ACTIVE or recent) that are
        #: already in self._final: counted once, and still counted once the audit purge
        #: (``[store] audit_retention_days``) removes them, so the counters never go back.
        self._counted: set[int] = set()

    def totals(self, session: Session, now: datetime | None = None) -> AssociationTotals:
        """Totals over every row, ACTIVE ones included (their counts arrive when they end)."""
        settled = (now or utcnow()) - timedelta(seconds=self.SETTLE_S)
        rows = session.execute(
            select(
                AssociationRecord.id,
                AssociationRecord.started_at,
                AssociationRecord.outcome,
                AssociationRecord.instances_stored,
                AssociationRecord.instances_duplicate,
                AssociationRecord.instances_failed,
                AssociationRecord.bytes_stored,
                AssociationRecord.echoes,
            )
            .where(AssociationRecord.id > self._watermark)
            .order_by(AssociationRecord.id)
        ).all()
        final, pending = AssociationTotals(), AssociationTotals()
        still_final = True
        watermark = self._watermark
        counted = set(self._counted)
        for row_id, started_at, outcome, stored, duplicate, failed, size, echoes in rows:
            outcome = AssociationOutcome(outcome)
            is_final = outcome is not AssociationOutcome.ACTIVE and started_at <= settled
            still_final = still_final and is_final
            if still_final:
                watermark = row_id
            if is_final:
                if row_id in counted:
                    continue
                counted.add(row_id)
            target = final if is_final else pending
            target.by_outcome[outcome.value] += 1
            target.stored += stored or 0
            target.duplicate += duplicate or 0
            target.failed += failed or 0
            target.bytes_stored += size or 0
            target.echoes += echoes or 0
        self._final = self._final.add(final)
        self._watermark = watermark
        self._counted = {row_id for row_id in counted if row_id > watermark}
        return self._final.add(pending)


_LATENCY = (
    select(Study.__table__.c.state_changed_at, func.min(Instance.__table__.c.received_at))
    .select_from(
        Study.__table__.join(
            Instance.__table__,
            (Instance.__table__.c.study_id == Study.__table__.c.id)
            & (Instance.__table__.c.revision == Study.__table__.c.revision),
        )
    )
    .where(
        Study.__table__.c.study_uid == bindparam("study_uid"),
        Study.__table__.c.state == StudyState.DONE,
    )
    .group_by(Study.__table__.c.id)
)


def study_latency_s(store: Store, study_uid: str) -> float | None:
    """For a DONE study: seconds from the first instance of its current revision to DONE.

    One prebuilt statement: it runs for every study that finishes, on the process that
    scores or sends them."""
    with store.engine.connect() as connection:
        row = connection.execute(_LATENCY, {"study_uid": study_uid}).first()
    if row is None or row[1] is None:
        return None
    done_at, first = row
    return max(0.0, (done_at - first).total_seconds())


__all__ = [
    "FINISHED_STATES",
    "AssociationCounter",
    "AssociationTotals",
    "StudyFilter",
    "delivery_counts",
    "instance_paths",
    "iso",
    "list_studies",
    "oldest_queued_at",
    "status",
    "study_counts",
    "study_detail",
    "study_latency_s",
    "worklist",
]
