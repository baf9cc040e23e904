"""The store suite, on SQLite and on the PostgreSQL server."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from triage.store.db import current_revision, head_revision, make_engine, upgrade_schema
from triage.store.models import AssociationOutcome, Base, StudyState, utcnow
from triage.store.repository import InstanceMeta, Store

STUDY = "1.2.826.0.1.3680043.8.498.1"


def meta(sop: str, study: str = STUDY) -> InstanceMeta:
    return InstanceMeta(
        study_uid=study,
        series_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="CR",
        path=f"{study}/{sop}.dcm",
        size_bytes=1000,
    )


def test_upgrade_from_empty_reaches_head_and_matches_models(store_url: str) -> None:
    engine = make_engine(store_url)
    assert current_revision(engine) is None
    assert upgrade_schema(engine) == head_revision()
    assert upgrade_schema(engine) == head_revision()  # idempotent
    tables = set(inspect(engine).get_table_names())
    assert {"studies", "instances", "study_events", "associations"} <= tables
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    # The migrations create exactly what the models declare (types compared loosely).
    assert [d for d in diff if d[0] not in ("modify_type",)] == []
    engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()
    # The listener's engine: its rows are rebuilt from the durable spool after a power loss.
    listener = make_engine(f"sqlite:///{tmp_path / 'wal.db'}", spool_backed=True)
    with listener.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    listener.dispose()


def test_first_instance_opens_study_and_duplicates_are_idempotent(store: Store) -> None:
    first = store.record_instance(meta("1.2.3.1"), None)
    assert (first.duplicate, first.revision, first.study_change) == (False, 1, "opened")
    second = store.record_instance(meta("1.2.3.2"), None)
    assert (second.duplicate, second.study_change) == (False, "")
    again = store.record_instance(meta("1.2.3.1"), None)
    assert again.duplicate and again.revision == 1
    assert store.instance_exists("1.2.3.1")
    assert len(store.study_instances(STUDY)) == 2
    study = store.get_study(STUDY)
    assert study is not None and study.state is StudyState.RECEIVING


def test_held_path_answers_as_record_instance_would(store: Store) -> None:
    """The listener's answer on a full disk: a duplicate is still a success, but an instance
    of a cancelled study sent for another study would move there, so it is not held for it
    (acknowledged, that study would miss it)."""
    from triage.store.operations import cancel

    other = "1.2.826.0.1.3680043.8.498.2"
    assert store.held_path("1.2.3.1", STUDY) is None
    store.record_instance(meta("1.2.3.1"), None)
    path = store.instance_path("1.2.3.1")
    assert path is not None and store.held_path("1.2.3.1", STUDY) == path
    assert store.held_path("1.2.3.1", other) == path  # a duplicate there too (kept where it is)
    cancel(store, STUDY, "wrong patient")
    assert store.held_path("1.2.3.1", STUDY) == path
    assert store.held_path("1.2.3.1", other) is None
    assert not store.record_instance(meta("1.2.3.1", study=other), None).duplicate


@pytest.mark.postgres
def test_the_quiet_period_keeps_the_database_servers_time_whatever_each_hosts_clock_says(
    pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL one host's listener records an instance and any host's daemon runs the
    # quiet-period job: with each host's own clock, a listener 10 min behind (or a daemon
    # ahead) queued a study at its first instance, and every later instance opened and
    # scored one more revision; a listener ahead held its studies back as long.
    from triage.store import repository

    def host(offset_s: float) -> None:
        monkeypatch.setattr(repository, "utcnow", lambda: utcnow() + timedelta(seconds=offset_s))

    for offset_s, instance in ((-600, "1.2.3.1"), (600, "1.2.3.2"), (-600, "1.2.3.3")):
        host(offset_s)
        pg_store.record_instance(meta(instance), None)  # the listener's host
        for daemon_offset_s in (0, 600, -600):  # the daemons' hosts
            host(daemon_offset_s)
            assert pg_store.queue_quiet_studies(10.0) == []
    study = pg_store.get_study(STUDY)
    assert study.state is StudyState.RECEIVING and study.revision == 1
    host(0)
    moved = pg_store.queue_quiet_studies(10.0, now=utcnow() + timedelta(seconds=11))
    assert [(m.study_uid, m.to_state) for m in moved] == [(STUDY, StudyState.QUEUED)]


def test_quiet_period_queues_then_late_instance_opens_revision_2(store: Store) -> None:
    store.record_instance(meta("1.2.3.1"), None)
    assert store.queue_quiet_studies(10.0) == []  # not quiet yet
    moved = store.queue_quiet_studies(10.0, now=utcnow() + timedelta(seconds=11))
    assert [(m.study_uid, m.to_state) for m in moved] == [(STUDY, StudyState.QUEUED)]
    late = store.record_instance(meta("1.2.3.9"), None)
    assert (late.revision, late.study_change) == (2, "reopened")
    study = store.get_study(STUDY)
    assert study.state is StudyState.RECEIVING and study.revision == 2
    # A duplicate of an old instance does not reopen anything.
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    assert store.record_instance(meta("1.2.3.1"), None).duplicate
    assert store.get_study(STUDY).state is StudyState.QUEUED
    history = [(e.from_state, e.to_state, e.revision) for e in store.study_history(STUDY)]
    assert history == [
        (None, StudyState.RECEIVING, 1),
        (StudyState.RECEIVING, StudyState.QUEUED, 1),
        (StudyState.QUEUED, StudyState.RECEIVING, 2),
        (StudyState.RECEIVING, StudyState.QUEUED, 2),
    ]
    instances = store.study_instances(STUDY)
    assert [i.revision for i in instances] == [1, 2]


def test_keep_receiving_restarts_the_quiet_period_of_receiving_studies_only(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The listener's stamp for a study whose association is still sending a data set: a
    # study already queued (or past) is left as it is, and on PostgreSQL the stamp is the
    # server's time, as record_instance's is, whatever this host's clock says.
    from triage.store import repository

    queued = STUDY + ".2"
    store.record_instance(meta("1.2.3.1", queued), None)
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    store.record_instance(meta("1.2.3.2"), None)
    receiving_at = store.get_study(STUDY).last_instance_at
    queued_at = store.get_study(queued).last_instance_at
    assert store.keep_receiving([]) == 0
    if store.engine.dialect.name == "postgresql":
        monkeypatch.setattr(repository, "utcnow", lambda: utcnow() - timedelta(seconds=600))
    time.sleep(0.01)  # a stamp later than the instance's, on either clock
    assert store.keep_receiving([STUDY, queued, "1.2.3.404"]) == 1
    study = store.get_study(STUDY)
    assert study.state is StudyState.RECEIVING and study.last_instance_at > receiving_at
    assert study.last_instance_at - receiving_at < timedelta(seconds=60)
    assert store.get_study(queued).last_instance_at == queued_at
    assert store.get_study(queued).state is StudyState.QUEUED
    # The quiet period now counts from the new stamp.
    cutoff_now = receiving_at + timedelta(seconds=10, microseconds=5000)
    assert store.queue_quiet_studies(10.0, now=cutoff_now) == []


@pytest.mark.parametrize(
    "state", [StudyState.SCORING, StudyState.DONE, StudyState.FAILED, StudyState.SKIPPED]
)
def test_late_instance_reopens_every_completed_state(store: Store, state: StudyState) -> None:
    store.record_instance(meta("1.2.3.1"), None)
    with store.session() as session, session.begin():
        from sqlalchemy import update

        from triage.store.models import Study

        session.execute(update(Study).values(state=state))
    result = store.record_instance(meta("1.2.3.2"), None)
    assert result.revision == 2
    assert store.get_study(STUDY).state is StudyState.RECEIVING


def test_cancelled_study_keeps_instances_but_stays_cancelled(store: Store) -> None:
    store.record_instance(meta("1.2.3.1"), None)
    with store.session() as session, session.begin():
        from sqlalchemy import update

        from triage.store.models import Study

        session.execute(update(Study).values(state=StudyState.CANCELLED))
    result = store.record_instance(meta("1.2.3.2"), None)
    assert not result.duplicate and result.revision == 1
    assert store.get_study(STUDY).state is StudyState.CANCELLED
    assert len(store.study_instances(STUDY)) == 2


def test_an_instance_held_by_a_cancelled_study_moves_to_the_study_it_is_sent_for(
    store: Store,
) -> None:
    from triage.store.operations import cancel

    corrected = "1.2.826.0.1.3680043.8.498.2"
    store.record_instance(meta("1.2.3.1"), None)
    # Held by a study that is not cancelled: a duplicate, wherever it is sent.
    assert store.record_instance(meta("1.2.3.1", corrected), None).duplicate
    cancel(store, STUDY, "two patients")
    result = store.record_instance(meta("1.2.3.1", corrected), None)
    assert not result.duplicate and result.study_change == "opened"
    assert result.moved_from == f"{STUDY}/1.2.3.1.dcm" and result.moved_from_study == STUDY
    assert store.study_instances(STUDY) == []
    assert [i.sop_instance_uid for i in store.study_instances(corrected)] == ["1.2.3.1"]
    # The cancelled study says where its instance went; the move happens once.
    from triage.store.queries import study_detail

    reasons = [event["reason"] for event in study_detail(store, STUDY)["history"]]
    assert f"instance 1.2.3.1 moved to study {corrected}" in reasons
    assert store.record_instance(meta("1.2.3.1", corrected), None).duplicate
    assert store.get_study(STUDY).state is StudyState.CANCELLED


def test_concurrent_writers_race_on_one_study(store: Store) -> None:
    """Eight threads store the same 40 instances of one study at once: one study, 40 rows."""
    sops = [f"1.2.3.{n}" for n in range(40)]
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for sop in sops:
                store.record_instance(meta(sop), None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.study_instances(STUDY)) == 40
    assert store.counts_by_state() == {StudyState.RECEIVING: 1}
    assert len(store.study_history(STUDY)) == 1


def test_association_audit_rows(store: Store) -> None:
    record = store.open_association("PACS", "TRIAGE", "127.0.0.1", 40000, False, 123)
    store.record_instance(meta("1.2.3.1"), record)
    store.close_association(
        record, AssociationOutcome.RELEASED, stored=1, duplicate=2, bytes_stored=1000, echoes=1
    )
    other = store.open_association("PACS", "TRIAGE", "127.0.0.1", 40001, True, 456)
    assert store.close_abandoned_associations({456}) == 1
    rows = {row.id: row for row in store.associations()}
    assert rows[record].outcome is AssociationOutcome.RELEASED
    assert (rows[record].instances_stored, rows[record].instances_duplicate) == (1, 2)
    assert rows[other].outcome is AssociationOutcome.ABORTED and rows[other].tls
    assert store.study_instances(STUDY)[0].association_id == record


def test_migrations_downgrade_to_empty_and_up_again(store_url: str) -> None:
    from alembic import command
    from triage.store.db import _alembic_config

    engine = make_engine(store_url)
    upgrade_schema(engine)
    command.downgrade(_alembic_config(engine), "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    assert upgrade_schema(engine) == head_revision()
    engine.dispose()


def test_a_migration_down_and_up_keeps_every_study_instance_and_event(store_url: str) -> None:
    # On SQLite, 0002's downgrade rebuilds `studies`; with foreign keys enforced, dropping
    # the old table cascaded to every instance and history row.
    from sqlalchemy import text

    from alembic import command
    from triage.store.db import _alembic_config

    engine = make_engine(store_url)
    upgrade_schema(engine)
    store = Store(engine)
    for n in range(3):
        store.record_instance(meta(f"1.2.3.{n}"), None)

    def counts() -> dict[str, int]:
        with engine.connect() as connection:
            return {
                table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                for table in ("studies", "instances", "study_events")
            }

    before = counts()
    assert before == {"studies": 1, "instances": 3, "study_events": 1}
    command.downgrade(_alembic_config(engine), "0001")
    assert counts() == before
    upgrade_schema(engine)
    assert counts() == before
    if engine.dialect.name == "sqlite":  # enforced again on the connection the migrations used
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    engine.dispose()


def test_a_study_sent_again_after_its_purge_continues_at_the_next_revision(
    store: Store, tmp_path
) -> None:
    # Its outputs derive their UIDs from the revision: at revision 1 again, a new finding
    # would reuse the purged one's UIDs, and the PACS would keep the purged (stale) SR.
    from datetime import timedelta

    from triage.store.models import utcnow
    from triage.store.operations import cancel, purge
    from triage.store.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    for expected in (1, 2, 3):
        recorded = store.record_instance(meta("1.2.3.1"), None)
        assert (recorded.duplicate, recorded.revision) == (False, expected)
        cancel(store, STUDY, "finished")
        report = purge(store, spool, 0, now=utcnow() + timedelta(seconds=1))
        assert report.study_uids == [STUDY] and store.get_study(STUDY) is None
    store.record_instance(meta("1.2.3.2"), None)
    with store.read_session() as session:
        from sqlalchemy import select

        from triage.store.models import Study, StudyEvent

        events = session.scalars(
            select(StudyEvent.reason).join(Study).where(Study.study_uid == STUDY)
        ).all()
    assert list(events) == ["first instance received after revision 3 was purged"]


def test_the_association_audit_waits_a_second_for_a_locked_sqlite_store(tmp_path) -> None:
    # Written before an association is accepted: another process holding the write lock (a
    # backup, a long purge) must not keep a peer, C-ECHO included, waiting past its timeout.
    import sqlite3
    import time

    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    database = tmp_path / "triage.db"
    engine = make_engine(f"sqlite:///{database}")
    upgrade_schema(engine)
    store = Store(engine)
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError, match="locked"):
            store.open_association("PACS", "TRIAGE", "127.0.0.1", 1234, False, 1)
        assert time.monotonic() - started < 5
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.open_association("PACS", "TRIAGE", "127.0.0.1", 1234, False, 1)
    # Every other transaction, on the same pooled connection, waits as long as before.
    with store.session() as session, session.begin():
        assert session.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    engine.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("api", ["transaction", "core_transaction"])
def test_the_victim_of_a_deadlock_runs_again(pg_url: str, api: str) -> None:
    """PostgreSQL rolls back one of two deadlocked transactions; its work runs again (a
    C-STORE must not be answered 0xA701 because another writer took rows in another order)."""
    import threading
    from collections import Counter

    from sqlalchemy import select

    from triage.store.models import Study

    engine = make_engine(pg_url)
    upgrade_schema(engine)
    store = Store(engine)
    first, second = "1.2.3.100", "1.2.3.200"
    store.record_instance(meta(f"{first}.1", study=first), None)
    store.record_instance(meta(f"{second}.1", study=second), None)
    attempts: Counter[str] = Counter()
    barrier = threading.Barrier(2, timeout=10)
    finished: dict[str, object] = {}

    def locking(name: str, order: tuple[str, str]):  # type: ignore[no-untyped-def]
        def work(session_or_connection) -> str:  # type: ignore[no-untyped-def]
            attempts[name] += 1
            for n, uid in enumerate(order):
                session_or_connection.execute(
                    select(Study.id).where(Study.study_uid == uid).with_for_update()
                )
                if n == 0 and attempts[name] == 1:
                    barrier.wait()  # each holds one row and wants the other's
            return name

        return work

    def run(name: str, order: tuple[str, str]) -> None:
        try:
            finished[name] = getattr(store, api)(locking(name, order))
        except Exception as exc:
            finished[name] = exc

    threads = [
        threading.Thread(target=run, args=("a", (first, second))),
        threading.Thread(target=run, args=("b", (second, first))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert finished == {"a": "a", "b": "b"}
    # One of them ran again; a retry that wins the race for its first row can deadlock with
    # the survivor once more, and PostgreSQL then picks the other as the victim.
    assert sum(attempts.values()) >= 3 and max(attempts.values()) <= 3
    engine.dispose()


def test_purge_removes_outputs_no_row_names(store: Store, tmp_path) -> None:
    # A result discarded by a crash between its files and its row leaves files only the
    # study's outbox folder ties to it.
    from triage.store.operations import cancel, purge
    from triage.store.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    store.record_instance(meta("1.2.3.1"), None)
    cancel(store, STUDY, "finished")
    leftover = f"outbox/{STUDY}/2.25.1234.dcm"
    spool.write(leftover, [b"an SR no row names"])
    later = utcnow() + timedelta(seconds=1)
    dry = purge(store, spool, 0, dry_run=True, now=later)
    assert (dry.files, dry.bytes) == (1, 18) and spool.path(leftover).exists()
    done = purge(store, spool, 0, now=later)
    assert done.files == 1 and not spool.path(leftover).parent.exists()


def test_an_instance_sent_again_while_its_study_is_purged_opens_the_study_again(
    store: Store, tmp_path, monkeypatch
) -> None:
    # Acknowledged as already held while the purge removed it, it was lost (PostgreSQL read
    # the stored instance without waiting for the purge's lock).
    import time

    import triage.store.operations as operations
    from triage.store.operations import cancel, purge
    from triage.store.spool import Spool

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    for sop in ("1.2.3.0", "1.2.3.1"):
        spool.write(meta(sop).path, [b"an instance"])
        store.record_instance(meta(sop), None)
    cancel(store, STUDY, "finished")
    removing = threading.Event()
    remove_file = operations._remove_file

    def slowly(path, dry_run):  # type: ignore[no-untyped-def]
        removing.set()
        time.sleep(1.0)  # a big batch: its studies stay locked while their files go
        return remove_file(path, dry_run)

    monkeypatch.setattr(operations, "_remove_file", slowly)
    later = utcnow() + timedelta(seconds=1)
    purging = threading.Thread(target=purge, args=(store, spool, 0), kwargs={"now": later})
    purging.start()
    assert removing.wait(10)
    again = store.record_instance(meta("1.2.3.1"), None)
    purging.join(30)
    assert (again.duplicate, again.revision) == (False, 2)
    assert [i.sop_instance_uid for i in store.study_instances(STUDY)] == ["1.2.3.1"]


def test_a_dead_listeners_rows_are_closed_on_its_host_only(store: Store) -> None:
    # Several hosts' daemons share a PostgreSQL store: a pid names a process on one host.
    from sqlalchemy import update

    from triage.store.models import AssociationRecord

    here = store.open_association("PACS", "TRIAGE", "10.0.0.1", 1, False, 4242)
    there = store.open_association("PACS", "TRIAGE", "10.0.0.2", 2, False, 4242)
    with store.session() as session, session.begin():
        session.execute(
            update(AssociationRecord)
            .where(AssociationRecord.id == there)
            .values(listener_host="another-host")
        )
    assert store.close_abandoned_associations({4242}) == 1
    assert store.close_abandoned_associations(alive=lambda pid: False) == 0
    outcomes = {row.id: row.outcome for row in store.associations()}
    assert outcomes == {here: AssociationOutcome.ABORTED, there: AssociationOutcome.ACTIVE}


def test_a_new_sqlite_store_another_process_is_writing_waits_to_turn_to_wal(tmp_path) -> None:
    # Two processes starting on a new SQLite file at once (`triage serve` and `triage-admin
    # db upgrade`): switching a rollback-journal database to WAL does not wait for another
    # connection's write lock (SQLite does not call the busy handler there), and the loser
    # stopped at once with "cannot upgrade the store schema: database is locked".
    import sqlite3
    import time

    database = tmp_path / "triage.db"
    locked = threading.Event()

    def other_process() -> None:
        holder = sqlite3.connect(database, isolation_level=None)
        holder.execute("CREATE TABLE other (x)")
        holder.execute("BEGIN IMMEDIATE")
        holder.execute("INSERT INTO other VALUES (1)")
        locked.set()
        time.sleep(0.5)
        holder.execute("COMMIT")
        holder.close()

    thread = threading.Thread(target=other_process)
    thread.start()
    try:
        assert locked.wait(10)
        engine = make_engine(f"sqlite:///{database}")
        assert upgrade_schema(engine) == head_revision()
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        engine.dispose()
    finally:
        thread.join()
