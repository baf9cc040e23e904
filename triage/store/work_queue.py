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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from triage.scoring.result import ModelInfo, StudyResult
from triage.store.models import (
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


def worker_host_pid(owner: str) -> tuple[str, int | None]:
    """The host and pid in a :func:`worker_id` (pid None where it has none)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return host, int(pid) if pid.isdigit() else None


class WorkQueue:
    """Scoring-queue operations on a :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._postgres = store.engine.dialect.name == "postgresql"

    def claim(self, owner: str, limit: int, lease_s: float) -> list[Claim]:
        """Take up to *limit* QUEUED studies, oldest first, and move them to SCORING."""
        sql = _STATEMENTS
        statement = sql.queued_locked if self._postgres else sql.queued

        def work(session: Session) -> list[Claim]:
            connection = session.connection()
            studies = connection.execute(statement, {"limit": limit}).all()
            if not studies:
                return []
            now = utcnow()
            # On the clock expire_leases reads, maybe on another host (Store.database_now).
            expires = self.store.database_now(connection) + timedelta(seconds=lease_s)
            tokens = [str(uuid.uuid4()) for _ in studies]
            reason = f"claimed by {owner}"
            connection.execute(
                sql.claim_study,
                [
                    {
                        "study_id": study_id,
                        "lease_token": token,
                        "lease_owner": owner,
                        "lease_expires_at": expires,
                        "attempts": attempts + 1,
                        "state": StudyState.SCORING,
                        "state_changed_at": now,
                        "updated_at": now,
                    }
                    for (study_id, _uid, _revision, attempts), token in zip(
                        studies, tokens, strict=True
                    )
                ],
            )
            connection.execute(
                sql.insert_event,
                [
                    {
                        "study_id": study_id,
                        "at": now,
                        "from_state": StudyState.QUEUED,
                        "to_state": StudyState.SCORING,
                        "revision": revision,
                        "reason": reason,
                    }
                    for study_id, _uid, revision, _attempts in studies
                ],
            )
            instances: dict[int, list[ClaimedInstance]] = {row[0]: [] for row in studies}
            for study_id, *instance in connection.execute(
                sql.instances_of, {"ids": list(instances)}
            ):
                instances[study_id].append(ClaimedInstance(*instance))
            return [
                Claim(
                    study_id=study_id,
                    study_uid=study_uid,
                    revision=revision,
                    token=token,
                    attempt=attempts + 1,
                    instances=tuple(instances[study_id]),
                )
                for (study_id, study_uid, revision, attempts), token in zip(
                    studies, tokens, strict=True
                )
            ]

        return self.store.transaction(work)

    def _held_id(self, session: Session, claim: Claim) -> int | None:
        """The study's id if this claim still holds it (its row locked on PostgreSQL)."""
        statement = _STATEMENTS.held_locked if self._postgres else _STATEMENTS.held
        return (
            session.connection()
            .execute(
                statement, {"id": claim.study_id, "token": claim.token, "revision": claim.revision}
            )
            .scalar()
        )

    def _held(self, session: Session, claim: Claim) -> Study | None:
        held = self._held_id(session, claim)
        return None if held is None else session.get(Study, held)

    def renew(self, claims: Sequence[Claim], lease_s: float) -> int:
        """Extend the leases this worker still holds; returns how many."""
        if not claims:
            return 0

        def work(session: Session) -> int:
            renewed = 0
            expires = self.store.database_now(session.connection()) + timedelta(seconds=lease_s)
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

        # Statements built once (see _Statements), not ORM objects: this runs once per study
        # on the worker's process, whose CPU the forward and the feeding of the decode
        # processes share. Building the statements and their cache keys, and the unit of
        # work's bookkeeping, cost several times what executing them does.
        sql = _STATEMENTS

        def work(session: Session) -> bool:
            held = self._held_id(session, claim)
            if held is None:
                return False
            connection = session.connection()
            now = utcnow()
            connection.execute(sql.delete_result, {"study_id": held, "revision": claim.revision})
            result_id = connection.execute(
                sql.insert_result,
                {
                    "study_id": held,
                    "revision": claim.revision,
                    "study_type": result.study_type.value,
                    "probability": result.probability,
                    "threshold": result.threshold,
                    "abnormal": result.abnormal,
                    "model_name": model.name,
                    "model_version": model.version,
                    "model_validated": model.validated,
                    "views_scored": len(result.views),
                    "views_skipped": len(result.skipped_views),
                    "scoring_ms": scoring_ms,
                    "scored_at": now,
                },
            ).scalar_one()
            views = [
                {
                    "result_id": result_id,
                    "sop_instance_uid": view.sop_instance_uid,
                    "probability": view.probability,
                    "note": view.note,
                    "skipped": False,
                }
                for view in result.views
            ] + [
                {
                    "result_id": result_id,
                    "sop_instance_uid": skipped.sop_instance_uid,
                    "probability": None,
                    "note": skipped.reason,
                    "skipped": True,
                }
                for skipped in result.skipped_views
            ]
            if views:
                connection.execute(sql.insert_view, views)
            # When the deliveries are due, on the clock of the senders that compare it, maybe
            # on other hosts (see triage.store.outbox); no extra query when there are none.
            due = self.store.database_now(connection) if outputs and destinations else now
            _record_outputs(connection, held, claim.revision, outputs, destinations, now, due)
            verdict = "abnormal" if result.abnormal else "normal"
            reason = f"scored {verdict} p={result.probability:.3f}"
            if outputs and destinations:
                target = StudyState.DELIVERING
            else:
                target, reason = StudyState.DONE, reason + "; nothing to deliver"
            connection.execute(
                sql.finish_study,
                {
                    "study_id": held,
                    "study_type": result.study_type.value,
                    "state": target,
                    "state_changed_at": now,
                    "updated_at": now,
                },
            )
            connection.execute(
                sql.insert_event,
                {
                    "study_id": held,
                    "at": now,
                    "from_state": StudyState.SCORING,
                    "to_state": target,
                    "revision": claim.revision,
                    "reason": reason,
                },
            )
            return True

        return self.store.transaction(work)

    def fail_attempt(self, claim: Claim, error: str, max_attempts: int) -> StudyState | None:
        """Give the study back after an error: QUEUED again, or FAILED after *max_attempts*."""

        def work(session: Session) -> StudyState | None:
            study = self._held(session, claim)
            if study is None:
                return None
            _release(study, error)
            if study.attempts >= max_attempts:
                reason = f"{_attempts(study.attempts)}: {error}"
                self._move(session, study, StudyState.FAILED, reason)
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

    def release_dead_claims(
        self, max_attempts: int, dead: Callable[[str], bool] | None = None
    ) -> list[Transition]:
        """At start: the studies a crashed worker was scoring back to QUEUED now, not when
        their leases expire — every SCORING study when *dead* is None (an SQLite store, whose
        one worker was this daemon's), else those whose lease owner *dead* says is gone. The
        attempt counts, and after *max_attempts* the study is FAILED: one that kills its
        worker each time (out of memory) must not do so for ever under systemd's restarts."""

        def work(session: Session) -> list[Transition]:
            statement = select(Study).where(Study.state == StudyState.SCORING)
            if self._postgres:
                statement = statement.with_for_update(skip_locked=True)
            return [
                self._give_back(
                    session,
                    study,
                    f"claim of {study.lease_owner} released at restart",
                    max_attempts,
                )
                for study in session.scalars(statement).all()
                if dead is None or dead(study.lease_owner or "")
            ]

        return self.store.transaction(work)

    def expire_leases(self, max_attempts: int, now: datetime | None = None) -> list[Transition]:
        """Studies whose worker stopped renewing go back to QUEUED (or FAILED); expired as of
        *now*, by default the clock workers set leases by (:meth:`Store.database_now`): on
        PostgreSQL the server's, not this host's, which may differ from the worker's."""

        def work(session: Session) -> list[Transition]:
            expired_at = now or self.store.database_now(session.connection())
            statement = select(Study).where(
                Study.state == StudyState.SCORING, Study.lease_expires_at < expired_at
            )
            if self._postgres:
                statement = statement.with_for_update(skip_locked=True)
            return [
                self._give_back(
                    session, study, f"lease of {study.lease_owner} expired", max_attempts
                )
                for study in session.scalars(statement).all()
            ]

        return self.store.transaction(work)

    def _give_back(self, session: Session, study: Study, why: str, max_attempts: int) -> Transition:
        """A claimed study whose worker is gone: QUEUED, or FAILED after *max_attempts*."""
        _release(study, why)
        if study.attempts >= max_attempts:
            reason = f"{why} after {_attempts(study.attempts)}"
            return self._move(session, study, StudyState.FAILED, reason)
        return self._move(session, study, StudyState.QUEUED, why)

    def _move(self, session: Session, study: Study, state: StudyState, reason: str) -> Transition:
        now = utcnow()
        previous = study.state
        study.state = state
        study.state_changed_at = now
        if state in (StudyState.SKIPPED, StudyState.FAILED):
            study.state_reason = reason
        add_event(session, study, previous, reason, now)
        return Transition(study.study_uid, study.revision, previous, state)

    def discardable_outputs(self, claim: Claim, paths: Sequence[str]) -> list[str]:
        """Those of *paths* (the outbox files of *claim*'s discarded result) that may go now:
        none while the study is still at the claim's revision, since another claim of it (a
        forced requeue, an expired lease) writes the same files and may not have recorded
        them yet; the purge takes what is left with the study. Else those no row names."""
        if not paths:
            return []
        with self.store.read_session() as session:
            revision = session.scalar(select(Study.revision).where(Study.id == claim.study_id))
            if revision is None or revision == claim.revision:
                return []
            recorded = set(session.scalars(select(Output.path).where(Output.path.in_(paths))))
        return [path for path in paths if path not in recorded]

    def previous_sr(self, claim: Claim, new_sr_uid: str = "") -> str | None:
        """The outbox path of the SR the new one (*new_sr_uid*) replaces: the newest of an
        earlier revision, or of this one by another model (a requeue after an upgrade), that
        a destination acknowledged. None when there is none (the same SR rebuilt replaces
        nothing; one never delivered, superseded while its PACS was down, is not in the
        PACS for the new one to name)."""
        acknowledged = (
            select(Delivery.id)
            .where(Delivery.output_id == Output.id, Delivery.delivered_at.is_not(None))
            .exists()
        )
        with self.store.read_session() as session:
            return session.scalar(
                select(Output.path)
                .where(
                    Output.study_id == claim.study_id,
                    Output.kind == "sr",
                    (Output.revision < claim.revision)
                    | (
                        (Output.revision == claim.revision)
                        & (Output.sop_instance_uid != new_sr_uid)
                    ),
                    acknowledged,
                )
                .order_by(Output.revision.desc(), Output.id.desc())
                .limit(1)
            )

    # --- worker heartbeats -------------------------------------------------------------

    def heartbeat(self, worker: str, device: str, model_version: str) -> None:
        """Record that *worker* is alive (inserted on first call)."""
        import os

        def work(session: Session) -> None:
            # On the database's clock: `triage-admin status` on another host judges its age.
            now = self.store.database_now(session.connection())
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


class _Statements:
    """The statements :meth:`WorkQueue.claim` and :meth:`WorkQueue.complete` run, built
    once: constructing a statement and its cache key costs more than SQLite takes to run
    it, and both run once per study on the worker's process."""

    def __init__(self) -> None:
        studies = Study.__table__
        results = Result.__table__
        outputs = Output.__table__
        deliveries = Delivery.__table__
        instances = Instance.__table__
        self.queued = (
            select(studies.c.id, studies.c.study_uid, studies.c.revision, studies.c.attempts)
            .where(studies.c.state == StudyState.QUEUED)
            .order_by(studies.c.state_changed_at, studies.c.id)
            .limit(bindparam("limit"))
        )
        self.queued_locked = self.queued.with_for_update(skip_locked=True)
        self.claim_study = update(studies).where(studies.c.id == bindparam("study_id"))
        self.instances_of = (
            select(
                instances.c.study_id,
                instances.c.sop_instance_uid,
                instances.c.sop_class_uid,
                instances.c.path,
            )
            .where(instances.c.study_id.in_(bindparam("ids", expanding=True)))
            .order_by(instances.c.id)
        )
        self.held = select(studies.c.id).where(
            studies.c.id == bindparam("id"),
            studies.c.lease_token == bindparam("token"),
            studies.c.state == StudyState.SCORING,
            studies.c.revision == bindparam("revision"),
        )
        self.held_locked = self.held.with_for_update()
        self.delete_result = delete(results).where(
            results.c.study_id == bindparam("study_id"),
            results.c.revision == bindparam("revision"),
        )
        self.insert_result = insert(results).returning(results.c.id)
        self.insert_view = insert(ViewScore.__table__)
        self.finish_study = (
            update(studies)
            .where(studies.c.id == bindparam("study_id"))
            .values(
                lease_token=None,
                lease_owner=None,
                lease_expires_at=None,
                state_reason="",
            )
        )
        self.insert_event = insert(StudyEvent.__table__)
        self.outputs_by_uid = select(outputs.c.sop_instance_uid, outputs.c.id).where(
            outputs.c.sop_instance_uid.in_(bindparam("uids", expanding=True))
        )
        self.insert_output = insert(outputs).returning(
            outputs.c.sop_instance_uid, outputs.c.id, sort_by_parameter_order=True
        )
        self.rebuild_output = (
            update(outputs)
            .where(outputs.c.id == bindparam("output_id"))
            .values(path=bindparam("new_path"), size_bytes=bindparam("new_size"))
        )
        # Deliveries still to make of this revision's outputs that a rescoring did not make
        # again (another model version: other UIDs): the PACS must not get them after the
        # new ones.
        self.supersede_deliveries = (
            update(deliveries)
            .where(
                deliveries.c.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)),
                deliveries.c.output_id.in_(
                    select(outputs.c.id).where(
                        outputs.c.study_id == bindparam("study_id"),
                        outputs.c.revision == bindparam("revision"),
                        outputs.c.sop_instance_uid.not_in(bindparam("uids", expanding=True)),
                    )
                ),
            )
            .values(
                state=DeliveryState.CANCELLED,
                last_error="superseded: the study was scored again",
                updated_at=bindparam("now"),
            )
        )
        self.deliveries_of = select(
            deliveries.c.id, deliveries.c.output_id, deliveries.c.destination
        ).where(deliveries.c.output_id.in_(bindparam("ids", expanding=True)))
        self.insert_delivery = insert(deliveries)
        self.redeliver = (
            update(deliveries)
            .where(deliveries.c.id == bindparam("delivery_id"))
            .values(
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=bindparam("due"),
                updated_at=bindparam("now"),
            )
        )


_STATEMENTS = _Statements()


def _record_outputs(
    connection: Connection,
    study_id: int,
    revision: int,
    outputs: Sequence[OutputFile],
    destinations: Sequence[str],
    now: datetime,
    due: datetime,
) -> None:
    """Insert (or, rebuilt after a requeue, update) a study's output rows and a pending
    delivery of each to every destination, due at *due*: a few statements for the whole
    study, each output or delivery a row of one executemany (not a query and a flush per
    output, each a round trip on PostgreSQL)."""
    if not outputs:
        return
    sql = _STATEMENTS
    connection.execute(
        sql.supersede_deliveries,
        {
            "study_id": study_id,
            "revision": revision,
            "uids": [o.sop_instance_uid for o in outputs],
            "now": now,
        },
    )
    ids = dict(
        connection.execute(
            sql.outputs_by_uid, {"uids": [o.sop_instance_uid for o in outputs]}
        ).all()
    )
    new = [o for o in outputs if o.sop_instance_uid not in ids]
    rebuilt = [o for o in outputs if o.sop_instance_uid in ids]
    if new:
        inserted = connection.execute(
            sql.insert_output,
            [
                {
                    "study_id": study_id,
                    "revision": revision,
                    "kind": o.kind,
                    "sop_class_uid": o.sop_class_uid,
                    "sop_instance_uid": o.sop_instance_uid,
                    "series_uid": o.series_uid,
                    "source_sop_instance_uid": o.source_sop_instance_uid,
                    "path": o.path,
                    "size_bytes": o.size_bytes,
                    "created_at": now,
                }
                for o in new
            ],
        )
        ids.update(dict(inserted.all()))
    if rebuilt:
        connection.execute(
            sql.rebuild_output,
            [
                {"output_id": ids[o.sop_instance_uid], "new_path": o.path, "new_size": o.size_bytes}
                for o in rebuilt
            ],
        )
    if not destinations:
        return
    output_ids = [ids[o.sop_instance_uid] for o in outputs]
    existing = {
        (output_id, name): delivery_id
        for delivery_id, output_id, name in connection.execute(
            sql.deliveries_of, {"ids": output_ids}
        )
    }
    wanted = [(output_id, name) for output_id in output_ids for name in destinations]
    fresh = [
        {
            "output_id": output_id,
            "destination": name,
            "state": DeliveryState.PENDING,
            "attempts": 0,
            "next_attempt_at": due,
            "last_error": "",
            "updated_at": now,
        }
        for output_id, name in wanted
        if (output_id, name) not in existing
    ]
    if fresh:
        connection.execute(sql.insert_delivery, fresh)
    again = [
        {"delivery_id": existing[key], "now": now, "due": due} for key in wanted if key in existing
    ]
    if again:
        connection.execute(sql.redeliver, again)


def _release(study: Study, reason: str) -> None:
    study.lease_token = None
    study.lease_owner = None
    study.lease_expires_at = None
    study.state_reason = reason


def _attempts(count: int) -> str:
    """ "1 attempt", "3 attempts": a reason is read by people (max_attempts may be 1)."""
    return f"{count} attempt{'' if count == 1 else 's'}"
