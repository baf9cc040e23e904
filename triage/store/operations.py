"""Operator actions on studies: requeue, cancel, purge. Each change is one transaction and
leaves a history row saying who did it and why.

They are safe while the daemon runs: the study row is locked (PostgreSQL ``FOR UPDATE``;
SQLite ``BEGIN IMMEDIATE``), and a worker that held a study it no longer owns finds its lease
token gone and discards its result (see :mod:`triage.store.work_queue`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from triage.store.models import (
    AssociationRecord,
    Delivery,
    DeliveryState,
    Instance,
    Output,
    PurgedStudy,
    Study,
    StudyState,
    WorkerRecord,
    utcnow,
)
from triage.store.queries import FINISHED_STATES, iso
from triage.store.repository import Store, add_event
from triage.store.spool import Spool, SpoolError


class StudyNotFound(LookupError):
    """The store has no study with that StudyInstanceUID."""


class NotAllowed(ValueError):
    """The action does not apply to the study in its current state (the message says why)."""


@dataclass(frozen=True)
class Change:
    """What an action did to one study."""

    study_uid: str
    from_state: str
    to_state: str
    changed: bool
    revision: int

    def as_dict(self) -> dict[str, object]:
        """The JSON form (`triage-admin requeue/cancel --json`)."""
        return {
            "study_uid": self.study_uid,
            "from_state": self.from_state,
            "to_state": self.to_state,
            "changed": self.changed,
            "revision": self.revision,
        }


def _locked_study(store: Store, session: Session, study_uid: str) -> Study:
    statement = select(Study).where(Study.study_uid == study_uid)
    if store.engine.dialect.name == "postgresql":
        statement = statement.with_for_update()
    study = session.scalar(statement)
    if study is None:
        raise StudyNotFound(f"no study {study_uid}")
    return study


def _move(session: Session, study: Study, state: StudyState, reason: str) -> None:
    now = utcnow()
    previous = study.state
    study.state = state
    study.state_changed_at = now
    # Any worker holding it loses the claim: its token no longer matches.
    study.lease_token = study.lease_owner = study.lease_expires_at = None
    add_event(session, study, previous, reason, now)


def requeue(store: Store, study_uid: str, *, force: bool = False, actor: str = "") -> Change:
    """Put a study back in QUEUED, to be scored (and delivered) again in the same revision.

    A study in SCORING is refused unless *force*: its worker is then told, by its lost lease,
    to discard what it was doing. An already QUEUED study is left as it is.
    """

    def work(session: Session) -> Change:
        study = _locked_study(store, session, study_uid)
        previous = study.state
        if previous is StudyState.QUEUED:
            return Change(study_uid, previous.value, previous.value, False, study.revision)
        if previous is StudyState.SCORING and not force:
            raise NotAllowed(
                f"study {study_uid} is being scored by {study.lease_owner or 'a worker'};"
                " use --force to requeue it anyway"
            )
        study.attempts = 0
        study.state_reason = ""
        _move(session, study, StudyState.QUEUED, f"requeued by {actor or 'operator'}")
        # The scoring to come supersedes what is still to send: if it makes the same objects
        # again, their deliveries start again; if it skips or fails, the old ones must not go.
        _cancel_deliveries(session, study, "superseded: the study was requeued")
        return Change(study_uid, previous.value, StudyState.QUEUED.value, True, study.revision)

    return store.transaction(work)


def cancel(store: Store, study_uid: str, reason: str, *, actor: str = "") -> Change:
    """Move a study to CANCELLED with *reason*; its pending deliveries stop.

    A cancelled study stays cancelled when more instances arrive; `requeue` revives it.
    """

    def work(session: Session) -> Change:
        study = _locked_study(store, session, study_uid)
        previous = study.state
        if previous is StudyState.CANCELLED:
            return Change(study_uid, previous.value, previous.value, False, study.revision)
        text = f"cancelled by {actor or 'operator'}: {reason}"
        study.state_reason = text
        _move(session, study, StudyState.CANCELLED, text)
        _cancel_deliveries(session, study, "study cancelled")
        return Change(study_uid, previous.value, StudyState.CANCELLED.value, True, study.revision)

    return store.transaction(work)


def _cancel_deliveries(session: Session, study: Study, why: str) -> None:
    session.execute(
        update(Delivery)
        .where(
            # FAILED ones too: they could not be retried any more, yet were listed and
            # counted as failures (an alert on them never cleared).
            Delivery.state.in_((DeliveryState.PENDING, DeliveryState.FAILED)),
            Delivery.output_id.in_(select(Output.id).where(Output.study_id == study.id)),
        )
        .values(state=DeliveryState.CANCELLED, last_error=why)
    )


# --- purge ---------------------------------------------------------------------------------


@dataclass
class PurgeReport:
    """What a purge removed (or, with ``dry_run``, would remove)."""

    cutoff: datetime
    older_than_days: float
    dry_run: bool
    study_uids: list[str] = field(default_factory=list)
    instances: int = 0
    outputs: int = 0
    files: int = 0
    bytes: int = 0
    workers: int = 0
    associations: int = 0
    #: Studies a file of which could not be removed (kept, rows and all, for the next
    #: purge), with the error.
    not_purged: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """The JSON form (`triage-admin purge --json`)."""
        return {
            "dry_run": self.dry_run,
            "older_than_days": self.older_than_days,
            "cutoff": iso(self.cutoff),
            "studies": len(self.study_uids),
            "study_uids": list(self.study_uids),
            "instances": self.instances,
            "outputs": self.outputs,
            "files": self.files,
            "bytes": self.bytes,
            "workers": self.workers,
            "associations": self.associations,
            "not_purged": [
                {"study_uid": uid, "error": error} for uid, error in self.not_purged.items()
            ],
        }


def _remove_file(path: Path, dry_run: bool) -> int:
    """Size of the file removed (or that would be), -1 when it is not there."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return -1
    if not dry_run:
        try:
            path.unlink()
        except FileNotFoundError:
            return -1
        # The study folder goes when it is empty; a file the listener is adding keeps it.
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    return size


class _Stopped(Exception):
    """The purge was asked to stop in the middle of a batch."""


def purge(
    store: Store,
    spool: Spool,
    older_than_days: float,
    *,
    dry_run: bool = False,
    batch: int = 25,
    now: datetime | None = None,
    stop: threading.Event | None = None,
    audit_older_than_days: float = 0.0,
) -> PurgeReport:
    """Remove studies that finished (DONE, SKIPPED, CANCELLED, FAILED) more than
    *older_than_days* ago: their spooled instances, their outbox files and every row of
    theirs (instances, history, results, views, outputs, deliveries); and worker rows stopped
    before then. A study in any other state is never touched.

    Each batch is one transaction that locks its studies while their files go, so a late
    instance for one of them waits and then opens a new study instead of re-opening a study
    whose files are half gone. Batches are small (*batch* studies) so that this wait stays
    well under the 10 s a listener's statement may take on PostgreSQL (past it the PACS is
    answered 0xA701 and sends again), also on slow network storage. Only files the store
    lists are removed: a file the listener is writing for such a late instance stays. Files
    go before rows, so a crash in between leaves rows that the next purge finishes; so does
    a *stop* set meanwhile (the daemon stopping): the batch in progress ends at its next
    file, its rows stay, and the purge returns what it did before.

    With *audit_older_than_days* (0: never), association audit rows that ended more than
    that long ago go too.
    """
    if not spool.is_prepared():
        # Rows purged while their files stay: SQLite's spool recovery would bring the
        # studies back at the next start, and nothing would ever remove the files.
        raise SpoolError(f"no spool at {spool.root}: nothing purged")
    now = now or utcnow()
    cutoff = now - timedelta(days=older_than_days)
    report = PurgeReport(cutoff=cutoff, older_than_days=older_than_days, dry_run=dry_run)
    postgres = store.engine.dialect.name == "postgresql"
    after_id = 0

    def one_batch(session: Session) -> int:
        nonlocal after_id
        statement = (
            select(Study.id, Study.study_uid)
            .where(
                Study.state.in_(FINISHED_STATES),
                Study.state_changed_at < cutoff,
                # A cancelled study keeps the late instances it is sent (a requeue may want
                # them): each is kept for the retention period like any other.
                Study.last_instance_at < cutoff,
                Study.id > after_id,
            )
            .order_by(Study.id)
            .limit(batch)
        )
        if postgres and not dry_run:
            # Another daemon's purge takes other studies instead of waiting for these.
            statement = statement.with_for_update(skip_locked=True)
        rows = session.execute(statement).all()
        if not rows:
            return 0
        after_id = rows[-1][0]
        all_ids = [row_id for row_id, _ in rows]
        paths: dict[int, list[str]] = {row_id: [] for row_id in all_ids}
        outputs: dict[int, list[str]] = {row_id: [] for row_id in all_ids}
        for table, found in ((Instance, paths), (Output, outputs)):
            for study_id, path in session.execute(
                select(table.study_id, table.path).where(table.study_id.in_(all_ids))
            ):
                found[study_id].append(path)
        purged: list[tuple[int, str]] = []
        for row_id, uid in rows:
            try:
                _remove_study_files(uid, paths[row_id], outputs[row_id])
            except OSError as exc:
                # Its rows stay and the next purge tries it again; the studies after it go on
                # (one file the daemon may not remove stopped every purge after it for good).
                report.not_purged[uid] = f"{exc.filename or uid}: {exc.strerror or exc}"
                continue
            report.instances += len(paths[row_id])
            report.outputs += len(outputs[row_id])
            purged.append((row_id, uid))
        ids = [row_id for row_id, _ in purged]
        if not dry_run and ids:
            revisions = {
                uid: revision
                for uid, revision in session.execute(
                    select(Study.study_uid, Study.revision).where(Study.id.in_(ids))
                )
            }
            session.execute(delete(PurgedStudy).where(PurgedStudy.study_uid.in_(revisions)))
            session.add_all(
                PurgedStudy(study_uid=uid, last_revision=revision, purged_at=now)
                for uid, revision in revisions.items()
            )
            # ON DELETE CASCADE takes instances, events, results, views, outputs, deliveries.
            session.execute(delete(Study).where(Study.id.in_(ids)))
        report.study_uids.extend(uid for _, uid in purged)
        return len(rows)

    def _remove_study_files(uid: str, paths: list[str], outputs: list[str]) -> None:
        for relative in (*paths, *outputs):
            if stop is not None and stop.is_set():
                raise _Stopped
            _count_removed(spool.path(relative))
        listed = set(outputs)
        # Outputs no row names: a result discarded by a crash between the files and its
        # row. They belong to this study as surely as its listed ones.
        folder = spool.path(f"outbox/{uid}")
        for leftover in sorted(folder.glob("*.dcm")) if folder.is_dir() else ():
            if f"outbox/{uid}/{leftover.name}" not in listed:  # listed: counted above
                _count_removed(leftover)

    def _count_removed(path: Path) -> None:
        size = _remove_file(path, dry_run)
        if size >= 0:
            report.files += 1
            report.bytes += size

    while True:
        counted = (report.instances, report.outputs)
        try:
            if dry_run:
                with store.read_session() as session:
                    done = one_batch(session)
            else:
                done = store.transaction(one_batch, retries=1)
        except _Stopped:
            # The rows of that batch stay (rolled back) for the next purge; the files it
            # removed are gone and counted.
            report.instances, report.outputs = counted
            return report
        if done < batch or (stop is not None and stop.is_set()):
            break

    def old_workers(session: Session) -> int:
        condition = WorkerRecord.stopped_at.is_not(None) & (WorkerRecord.stopped_at < cutoff)
        if dry_run:
            return len(session.scalars(select(WorkerRecord.id).where(condition)).all())
        return int(session.execute(delete(WorkerRecord).where(condition)).rowcount or 0)

    if dry_run:
        with store.read_session() as session:
            report.workers = old_workers(session)
    else:
        report.workers = store.transaction(old_workers)
    if audit_older_than_days > 0:
        report.associations = _purge_audit(
            store, now - timedelta(days=audit_older_than_days), dry_run, stop
        )
    return report


#: Audit rows removed per transaction: the first purge of a large audit must not hold the
#: SQLite write lock, which every C-STORE's row waits for, for long.
_AUDIT_BATCH = 5000


def _purge_audit(
    store: Store, cutoff: datetime, dry_run: bool, stop: threading.Event | None
) -> int:
    """Remove the association audit rows of associations started before *cutoff* that
    ended (an ACTIVE row is never removed); returns how many."""
    old = AssociationRecord.started_at < cutoff, AssociationRecord.ended_at.is_not(None)
    if dry_run:
        with store.read_session() as session:
            counted = select(func.count(AssociationRecord.id)).where(*old)
            return int(session.scalar(counted) or 0)

    def one_batch(session: Session) -> int:
        ids = list(session.scalars(select(AssociationRecord.id).where(*old).limit(_AUDIT_BATCH)))
        if ids:
            session.execute(delete(AssociationRecord).where(AssociationRecord.id.in_(ids)))
        return len(ids)

    removed = 0
    while not (stop is not None and stop.is_set()):
        done = store.transaction(one_batch)
        removed += done
        if done < _AUDIT_BATCH:
            break
    return removed


def spool_free_bytes(spool: Spool) -> int | None:
    """Free bytes on the spool's filesystem, ``None`` when the folder is not there."""
    try:
        return spool.free_bytes()
    except OSError:
        return None


def _os_user() -> str:
    with contextlib.suppress(Exception):
        import getpass

        return getpass.getuser()
    return str(os.getuid())


def operator_name() -> str:
    """Who runs `triage-admin`, for the history rows (``admin:alice``)."""
    return f"admin:{_os_user()}"


__all__ = [
    "Change",
    "NotAllowed",
    "PurgeReport",
    "StudyNotFound",
    "cancel",
    "operator_name",
    "purge",
    "requeue",
    "spool_free_bytes",
]
