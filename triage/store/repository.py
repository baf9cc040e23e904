"""Store operations: each method is one transaction, safe from many threads and processes."""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    Connection,
    Engine,
    Update,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from triage.store.db import LOCK_WAIT_MS, READ_ONLY
from triage.store.models import (
    REOPENED_BY_LATE_INSTANCE,
    AssociationOutcome,
    AssociationRecord,
    Delivery,
    DeliveryState,
    Instance,
    Output,
    PurgedStudy,
    Study,
    StudyEvent,
    StudyState,
    utcnow,
)

T = TypeVar("T")


@dataclass(frozen=True)
class InstanceMeta:
    """What the listener knows about a received instance (no patient identity)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str | None
    path: str
    size_bytes: int


@dataclass(frozen=True)
class RecordResult:
    """The outcome of :meth:`Store.record_instance`."""

    duplicate: bool
    study_uid: str
    revision: int
    #: ``"opened"``, ``"reopened"`` (a late instance started a new revision), or ``""``.
    study_change: str = ""
    #: The spool path of the instance's earlier copy when it moved here from a cancelled
    #: study (its row went with the move; the caller removes the file once committed).
    moved_from: str | None = None
    #: That cancelled study's UID.
    moved_from_study: str | None = None


@dataclass(frozen=True)
class Transition:
    """One study state change that a job made."""

    study_uid: str
    revision: int
    from_state: StudyState
    to_state: StudyState


#: How long (ms) the association audit waits for another process's write lock (SQLite).
AUDIT_LOCK_WAIT_MS = 1000


class Store:
    """The study store on one engine (SQLite or PostgreSQL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._readers = sessionmaker(
            engine.execution_options(**{READ_ONLY: True}), expire_on_commit=False
        )
        # The association audit is written before an association is accepted: on a store
        # another process holds locked (a backup, a long purge) it gives up after 1 s rather
        # than keep every peer, C-ECHO included, waiting past its own timeout.
        self._audits = sessionmaker(
            engine.execution_options(**{LOCK_WAIT_MS: AUDIT_LOCK_WAIT_MS}), expire_on_commit=False
        )
        self._postgres = engine.dialect.name == "postgresql"
        # SQLite takes one writer at a time; a second thread of this process waiting inside
        # SQLite's busy handler sleeps in steps of up to 100 ms. Queue writers here instead.
        self._writer_lock: threading.Lock | contextlib.nullcontext[None] = (
            contextlib.nullcontext() if self._postgres else threading.Lock()
        )

    def session(self) -> Session:
        """A new session for writing (``with store.session() as s, s.begin(): …``)."""
        return self._sessions()

    def read_session(self) -> Session:
        """A new session for reading only (no write lock on SQLite)."""
        return self._readers()

    def transaction(
        self, work: Callable[[Session], T], retries: int = 3, *, sessions: Any = None
    ) -> T:
        """Run *work(session)* in one transaction; retried when a concurrent insert wins a
        unique-key race (the retry then sees the winner's row), or when PostgreSQL chose it
        as a deadlock's or serialisation conflict's victim."""
        for attempt in range(retries):
            with self._writer_lock, (sessions or self._sessions)() as session:
                try:
                    with session.begin():
                        return work(session)
                except (IntegrityError, OperationalError) as exc:
                    if attempt == retries - 1 or not _worth_retrying(exc):
                        raise
                    conflict = exc
            _pause_after(conflict, attempt)
        raise AssertionError("unreachable")

    def core_transaction(self, work: Callable[[Connection], T], retries: int = 3) -> T:
        """:meth:`transaction` for SQLAlchemy Core: *work(connection)* in one transaction."""
        for attempt in range(retries):
            try:
                with self._writer_lock, self.engine.begin() as connection:
                    return work(connection)
            except (IntegrityError, OperationalError) as exc:
                if attempt == retries - 1 or not _worth_retrying(exc):
                    raise
                _pause_after(exc, attempt)
        raise AssertionError("unreachable")

    def database_now(self, connection: Connection) -> datetime:
        """Now (naive UTC) by the clock that times shared by several hosts are kept on (the
        quiet period, leases). On PostgreSQL the server's: one host records an instance or
        sets a lease and another host's daemon compares it with its own "now": a clock that
        differed by the quiet period (10 s by default) queued every study at its first
        instance (each later one a new revision, scored and sent again) or held them back,
        and one behind by a lease's last third lost every claim it made while it scored.
        An SQLite store has one host: its clock."""
        if self._postgres:
            return connection.execute(_SERVER_NOW).scalar_one()
        return utcnow()

    def _lock(self, statement):  # type: ignore[no-untyped-def]
        # SQLite has BEGIN IMMEDIATE (one writer at a time); PostgreSQL needs row locks.
        return statement.with_for_update() if self._postgres else statement

    # --- ingest -------------------------------------------------------------------------

    def held_path(self, sop_instance_uid: str, study_uid: str) -> str | None:
        """The spool path of this instance if a C-STORE of it for *study_uid* would be a
        duplicate (see :meth:`record_instance`): held in that study, or in another that is
        not cancelled. None otherwise (one held by a cancelled study would move to
        *study_uid*: not held for it)."""
        with self._readers() as session:
            found = session.execute(
                select(Study.study_uid, Study.state, Instance.path)
                .join(Instance, Instance.study_id == Study.id)
                .where(Instance.sop_instance_uid == sop_instance_uid)
            ).first()
        if found is None:
            return None
        held_in, state, path = found
        if held_in == study_uid or StudyState(state) is not StudyState.CANCELLED:
            return str(path)
        return None

    def instance_path(self, sop_instance_uid: str) -> str | None:
        """The spool path the store records for this SOP instance, or None."""
        with self._readers() as session:
            found = session.scalar(
                select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
            )
            return None if found is None else str(found)

    def instance_exists(self, sop_instance_uid: str) -> bool:
        """True if this SOP instance is already stored (duplicates are idempotent)."""
        with self._readers() as session:
            found = session.scalar(
                select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid)
            )
            return found is not None

    def instance_paths(self, study_uid: str) -> set[str]:
        """The spool paths of the instances recorded for *study_uid* (any revision)."""
        with self._readers() as session:
            return set(
                session.scalars(
                    select(Instance.path)
                    .join(Study, Study.id == Instance.study_id)
                    .where(Study.study_uid == study_uid)
                )
            )

    def record_instance(self, meta: InstanceMeta, association_id: int | None) -> RecordResult:
        """Record a spooled instance and move its study as DESIGN.md says.

        A new study starts RECEIVING at revision 1; an instance for a study past RECEIVING
        (queued, scored, delivered, failed or skipped) opens revision n+1 and returns it to
        RECEIVING; a cancelled study keeps the instance but stays cancelled.

        An instance already held is a duplicate, in this study or another, except one held by
        a cancelled study and now sent for another: it moves there. That is how a study
        corrected at the PACS comes back (a mix of patients split, the images keeping their
        SOP Instance UIDs, once the mixed study was cancelled here): dropped as duplicates,
        the corrected study was never scored.

        This runs before every C-STORE answer, so it is written with SQLAlchemy Core on
        prepared statements: the ORM's unit of work cost ~3 ms per call here against ~1 ms
        for the same SQL (bench/RESULTS.md).
        """

        def work(connection: Connection) -> RecordResult:
            found = connection.execute(
                _FIND_STORED_INSTANCE_SHARED if self._postgres else _FIND_STORED_INSTANCE,
                {"sop_uid": meta.sop_instance_uid},
            )
            stored = found.first()
            now = utcnow()
            moved_from = moved_from_study = None
            if stored is not None:
                if stored.study_uid == meta.study_uid or stored.state is not StudyState.CANCELLED:
                    return RecordResult(True, stored.study_uid, stored.revision)
                connection.execute(delete(_INSTANCES).where(_INSTANCES.c.id == stored.id))
                _insert_event(
                    connection,
                    stored.study_id,
                    StudyState.CANCELLED,
                    StudyState.CANCELLED,
                    stored.revision,
                    now,
                    f"instance {meta.sop_instance_uid} moved to study {meta.study_uid}",
                )
                moved_from, moved_from_study = stored.path, stored.study_uid
            study = connection.execute(
                _FIND_STUDY_FOR_UPDATE if self._postgres else _FIND_STUDY,
                {"study_uid": meta.study_uid},
            ).first()
            change = ""
            if study is None:
                purged = connection.execute(
                    _FIND_PURGED_REVISION, {"study_uid": meta.study_uid}
                ).scalar()
                revision = 1 if purged is None else purged + 1
                study_id = connection.execute(
                    _INSERT_STUDY,
                    {
                        "study_uid": meta.study_uid,
                        "state": StudyState.RECEIVING,
                        "revision": revision,
                        "created_at": now,
                        "state_changed_at": now,
                        "last_instance_at": now,
                    },
                ).inserted_primary_key[0]
                _insert_event(
                    connection,
                    study_id,
                    None,
                    StudyState.RECEIVING,
                    revision,
                    now,
                    "first instance received"
                    if purged is None
                    else f"first instance received after revision {purged} was purged",
                )
                change = "opened"
            elif study.state in REOPENED_BY_LATE_INSTANCE:
                study_id, revision = study.id, study.revision + 1
                connection.execute(
                    update(_STUDIES)
                    .where(_STUDIES.c.id == study_id)
                    .values(
                        revision=revision,
                        state=StudyState.RECEIVING,
                        state_changed_at=now,
                        last_instance_at=now,
                        # A worker still scoring the old revision loses its claim with the token.
                        attempts=0,
                        lease_token=None,
                        lease_owner=None,
                        lease_expires_at=None,
                        state_reason="",
                    )
                )
                connection.execute(_cancel_pending_deliveries_statement(study_id, revision))
                _insert_event(
                    connection,
                    study_id,
                    study.state,
                    StudyState.RECEIVING,
                    revision,
                    now,
                    "late instance: new revision",
                )
                change = "reopened"
            else:
                study_id, revision = study.id, study.revision
                if not self._postgres:
                    connection.execute(_TOUCH_STUDY, {"study_id": study_id, "now": now})
            if self._postgres:
                # The quiet period runs on the server's clock (see database_now): this
                # touch, an extra statement only for a new study or revision.
                connection.execute(_TOUCH_STUDY_BY_SERVER, {"study_id": study_id})
            connection.execute(
                _INSERT_INSTANCE,
                {
                    "study_id": study_id,
                    "sop_instance_uid": meta.sop_instance_uid,
                    "sop_class_uid": meta.sop_class_uid,
                    "series_uid": meta.series_uid,
                    "transfer_syntax_uid": meta.transfer_syntax_uid,
                    "modality": meta.modality,
                    "path": meta.path,
                    "size_bytes": meta.size_bytes,
                    "revision": revision,
                    "received_at": now,
                    "association_id": association_id,
                },
            )
            return RecordResult(
                False, meta.study_uid, revision, change, moved_from, moved_from_study
            )

        return self.core_transaction(work)

    def keep_receiving(self, study_uids: Collection[str]) -> int:
        """Restart the quiet period of those of *study_uids* still RECEIVING, as an instance
        recorded now would; returns how many.

        The listener calls this, at most every third of the quiet period, for the study an
        association is still sending a data set of (see ``Listener``): one instance slower
        to arrive than the quiet period (a large view over a slow link) let the study be
        queued and scored while it was still arriving, and the rest opened a new revision,
        scored and sent again. One statement for every such study of the process, stamped
        by the clock :meth:`queue_quiet_studies` compares with (see :meth:`database_now`).
        """
        if not study_uids:
            return 0
        uids = sorted(set(study_uids))  # one lock order, whoever else updates several rows

        def work(connection: Connection) -> int:
            if self._postgres:
                result = connection.execute(_KEEP_RECEIVING_BY_SERVER, {"study_uids": uids})
            else:
                result = connection.execute(_KEEP_RECEIVING, {"study_uids": uids, "now": utcnow()})
            return int(result.rowcount)

        return self.core_transaction(work)

    # --- study completion ---------------------------------------------------------------

    def queue_quiet_studies(
        self, quiet_period_s: float, now: datetime | None = None
    ) -> list[Transition]:
        """Move every RECEIVING study with no instance for *quiet_period_s* to QUEUED."""

        def work(session: Session) -> list[Transition]:
            # The clock the listeners stamp last_instance_at by (see database_now).
            current = now or self.database_now(session.connection())
            cutoff = current - timedelta(seconds=quiet_period_s)
            statement = select(Study).where(
                Study.state == StudyState.RECEIVING, Study.last_instance_at <= cutoff
            )
            if self._postgres:
                statement = statement.with_for_update(skip_locked=True)
            moved = []
            for study in session.scalars(statement):
                moved.append(
                    self._move(session, study, StudyState.QUEUED, "quiet period over", current)
                )
            return moved

        return self.transaction(work)

    def _move(
        self, session: Session, study: Study, to_state: StudyState, reason: str, now: datetime
    ) -> Transition:
        previous = study.state
        study.state = to_state
        study.state_changed_at = now
        add_event(session, study, previous, reason, now)
        return Transition(study.study_uid, study.revision, previous, to_state)

    # --- associations (audit) -----------------------------------------------------------

    def open_association(
        self,
        calling_ae: str,
        called_ae: str,
        peer_host: str,
        peer_port: int,
        tls: bool,
        listener_pid: int,
    ) -> int:
        """Insert the audit row of a new association; returns its id."""
        record = _audit_row(calling_ae, called_ae, peer_host, peer_port, tls, listener_pid)
        return self._insert_audit_row(record)

    def record_refused_connection(
        self, called_ae: str, peer_host: str, peer_port: int, listener_pid: int, reason: str
    ) -> int:
        """Insert the finished audit row of a TLS connection refused before any DICOM
        (a failed handshake): REJECTED, with no calling AE title; returns its id."""
        record = _audit_row("", called_ae, peer_host, peer_port, True, listener_pid)
        record.ended_at = record.started_at
        record.outcome = AssociationOutcome.REJECTED
        record.reason = reason
        return self._insert_audit_row(record)

    def _insert_audit_row(self, record: AssociationRecord) -> int:
        def work(session: Session) -> int:
            session.add(record)
            session.flush()
            return record.id

        return self.transaction(work, sessions=self._audits)

    def close_association(
        self,
        association_id: int,
        outcome: AssociationOutcome,
        *,
        stored: int = 0,
        duplicate: int = 0,
        failed: int = 0,
        bytes_stored: int = 0,
        echoes: int = 0,
        reason: str = "",
    ) -> None:
        """Complete the audit row when the association ends."""

        def work(session: Session) -> None:
            record = session.get(AssociationRecord, association_id)
            if record is None:
                return
            record.ended_at = utcnow()
            record.outcome = outcome
            record.instances_stored = stored
            record.instances_duplicate = duplicate
            record.instances_failed = failed
            record.bytes_stored = bytes_stored
            record.echoes = echoes
            record.reason = reason

        self.transaction(work)

    def close_abandoned_associations(
        self,
        listener_pids: set[int] | None = None,
        *,
        alive: Callable[[int], bool] | None = None,
    ) -> int:
        """Mark ACTIVE audit rows left by a crashed process as ABORTED; returns how many.

        All of them (an SQLite store has one daemon), or only those of this host's listener
        processes in *listener_pids*, or (with *alive*) those of this host's listeners that
        are not alive: a PostgreSQL store is shared by the daemons of several hosts.
        """
        host = socket.gethostname()[:128]

        def work(session: Session) -> int:
            statement = select(AssociationRecord).where(
                AssociationRecord.outcome == AssociationOutcome.ACTIVE
            )
            if listener_pids is not None or alive is not None:
                statement = statement.where(AssociationRecord.listener_host == host)
            if listener_pids is not None:
                statement = statement.where(AssociationRecord.listener_pid.in_(listener_pids))
            count = 0
            for record in session.scalars(statement):
                if alive is not None and alive(record.listener_pid):
                    continue
                record.outcome = AssociationOutcome.ABORTED
                record.ended_at = utcnow()
                record.reason = "listener stopped before the association ended"
                count += 1
            return count

        return self.transaction(work)

    # --- reading ------------------------------------------------------------------------

    def get_study(self, study_uid: str) -> Study | None:
        """The study row, or ``None``."""
        with self._readers() as session:
            return session.scalar(select(Study).where(Study.study_uid == study_uid))

    def study_instances(self, study_uid: str) -> list[Instance]:
        """The instances of a study, oldest first."""
        with self._readers() as session:
            return list(
                session.scalars(
                    select(Instance)
                    .join(Study)
                    .where(Study.study_uid == study_uid)
                    .order_by(Instance.id)
                )
            )

    def study_history(self, study_uid: str) -> list[StudyEvent]:
        """The state changes of a study, oldest first."""
        with self._readers() as session:
            return list(
                session.scalars(
                    select(StudyEvent)
                    .join(Study)
                    .where(Study.study_uid == study_uid)
                    .order_by(StudyEvent.id)
                )
            )

    def counts_by_state(self) -> dict[StudyState, int]:
        """How many studies are in each state."""
        with self._readers() as session:
            rows = session.execute(select(Study.state, func.count()).group_by(Study.state))
            return {state: count for state, count in rows}

    def associations(self, limit: int = 100) -> list[AssociationRecord]:
        """The newest association audit rows."""
        with self._readers() as session:
            return list(
                session.scalars(
                    select(AssociationRecord).order_by(AssociationRecord.id.desc()).limit(limit)
                )
            )


def _cancel_pending_deliveries_statement(study_id: int, revision: int) -> Update:
    """Outputs of older revisions are superseded: stop sending them (and stop counting the
    failed ones, which no retry may send any more, as failures)."""
    older_outputs = select(Output.id).where(Output.study_id == study_id, Output.revision < revision)
    return (
        update(Delivery)
        .where(
            Delivery.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)),
            Delivery.output_id.in_(older_outputs),
        )
        .values(state=DeliveryState.CANCELLED, last_error=f"superseded by revision {revision}")
    )


_STUDIES = Study.__table__
_INSTANCES = Instance.__table__
_FIND_STORED_INSTANCE = (
    select(
        _STUDIES.c.study_uid,
        _STUDIES.c.revision,
        _STUDIES.c.state,
        _INSTANCES.c.study_id,
        _INSTANCES.c.id,
        _INSTANCES.c.path,
    )
    .select_from(_INSTANCES.join(_STUDIES, _STUDIES.c.id == _INSTANCES.c.study_id))
    .where(_INSTANCES.c.sop_instance_uid == bindparam("sop_uid"))
)
# A purge holds its studies FOR UPDATE while their files go: a stored instance's study is
# read FOR SHARE, so a re-sent instance waits, then finds its row gone and opens the study
# again, instead of being acknowledged as held while its file is being removed.
_FIND_STORED_INSTANCE_SHARED = _FIND_STORED_INSTANCE.with_for_update(read=True, of=_STUDIES)
_FIND_STUDY = select(_STUDIES.c.id, _STUDIES.c.state, _STUDIES.c.revision).where(
    _STUDIES.c.study_uid == bindparam("study_uid")
)
# SQLite serialises writers with BEGIN IMMEDIATE; PostgreSQL needs the row lock.
_FIND_STUDY_FOR_UPDATE = _FIND_STUDY.with_for_update()
_TOUCH_STUDY = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("study_id"))
    .values(last_instance_at=bindparam("now"))
)
#: PostgreSQL's clock, in the naive UTC every timestamp column holds.
_SERVER_NOW_SQL = func.timezone("UTC", func.now())
_SERVER_NOW = select(_SERVER_NOW_SQL)
_TOUCH_STUDY_BY_SERVER = (
    update(_STUDIES)
    .where(_STUDIES.c.id == bindparam("study_id"))
    .values(last_instance_at=_SERVER_NOW_SQL)
)
_STILL_RECEIVING = (
    _STUDIES.c.study_uid.in_(bindparam("study_uids", expanding=True)),
    _STUDIES.c.state == StudyState.RECEIVING,
)
_KEEP_RECEIVING = (
    update(_STUDIES).where(*_STILL_RECEIVING).values(last_instance_at=bindparam("now"))
)
_KEEP_RECEIVING_BY_SERVER = (
    update(_STUDIES).where(*_STILL_RECEIVING).values(last_instance_at=_SERVER_NOW_SQL)
)
#: PostgreSQL's deadlock_detected and serialization_failure: the transaction was rolled back
#: and may simply run again.
_CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})


def _worth_retrying(exc: Exception) -> bool:
    """Whether a failed transaction may run again: a lost unique-key race or a conflict."""
    if isinstance(exc, IntegrityError):
        return True
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in _CONFLICT_SQLSTATES


def _pause_after(exc: Exception, attempt: int) -> None:
    """Before a deadlock's victim runs again, wait a random moment: run at once, it races
    the survivor for its first row and, winning, deadlocks with it once more."""
    if not isinstance(exc, IntegrityError):
        time.sleep(random.uniform(0.0, 0.05 * (attempt + 1)))


def _audit_row(
    calling_ae: str, called_ae: str, peer_host: str, peer_port: int, tls: bool, listener_pid: int
) -> AssociationRecord:
    """A new association's audit row: ACTIVE, nothing counted yet."""
    return AssociationRecord(
        calling_ae=calling_ae[:16],
        called_ae=called_ae[:16],
        peer_host=peer_host[:64],
        peer_port=peer_port,
        tls=tls,
        listener_pid=listener_pid,
        listener_host=socket.gethostname()[:128],
        started_at=utcnow(),
        outcome=AssociationOutcome.ACTIVE,
        instances_stored=0,
        instances_duplicate=0,
        instances_failed=0,
        bytes_stored=0,
        echoes=0,
        reason="",
    )


_FIND_PURGED_REVISION = select(PurgedStudy.__table__.c.last_revision).where(
    PurgedStudy.__table__.c.study_uid == bindparam("study_uid")
)
_INSERT_STUDY = insert(_STUDIES)
_INSERT_INSTANCE = insert(_INSTANCES)
_INSERT_EVENT = insert(StudyEvent.__table__)


def _insert_event(
    connection: Connection,
    study_id: int,
    previous: StudyState | None,
    state: StudyState,
    revision: int,
    now: datetime,
    reason: str,
) -> None:
    """:func:`add_event` for a Core transaction."""
    connection.execute(
        _INSERT_EVENT,
        {
            "study_id": study_id,
            "at": now,
            "from_state": previous,
            "to_state": state,
            "revision": revision,
            "reason": reason,
        },
    )


def add_event(
    session: Session, study: Study, previous: StudyState | None, reason: str, now: datetime
) -> None:
    """Append a history row: *study* moved from *previous* to its current state."""
    session.add(
        StudyEvent(
            study_id=study.id,
            at=now,
            from_state=previous,
            to_state=study.state,
            revision=study.revision,
            reason=reason,
        )
    )
