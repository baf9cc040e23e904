"""Delivery bookkeeping on SQLite and PostgreSQL: claims, backoff, DONE only when all arrived."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from sqlalchemy import update

from triage.scoring.result import ModelInfo, StudyResult, ViewResult
from triage.store.models import Delivery, DeliveryState, StudyState, utcnow
from triage.store.outbox import Backoff, Outbox
from triage.store.repository import InstanceMeta, Store
from triage.store.work_queue import OutputFile, WorkQueue
from triage.study_types import StudyType

BACKOFF = Backoff(start_s=5, factor=2, max_s=30, max_attempts=3)


def delivering_study(store: Store, n: int = 1, destinations=("pacs", "archive")) -> str:
    study = f"1.2.826.0.1.3680043.8.498.{n}"
    sop = f"{study}.1"
    store.record_instance(
        InstanceMeta(
            study,
            study + ".9",
            sop,
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.840.10008.1.2.1",
            "CR",
            f"{study}/{sop}.dcm",
            10,
        ),
        None,
    )
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    queue = WorkQueue(store)
    [claim] = queue.claim("w", 1, 60)
    result = StudyResult(
        study,
        claim.revision,
        StudyType.HAND,
        0.8,
        0.5,
        (ViewResult(sop, 0.8, np.zeros((7, 7), np.float32)),),
    )
    outputs = [
        OutputFile(
            "sr",
            "1.2.840.10008.5.1.4.1.1.88.34",
            f"2.25.{n}{claim.revision}1",
            "2.25.1",
            None,
            "outbox/sr.dcm",
            10,
        ),
        OutputFile(
            "sc",
            "1.2.840.10008.5.1.4.1.1.7",
            f"2.25.{n}{claim.revision}2",
            "2.25.2",
            sop,
            "outbox/sc.dcm",
            10,
        ),
    ]
    assert queue.complete(
        claim, result, ModelInfo("demo", "1", False), outputs, list(destinations), 1.0
    )
    return study


def test_study_is_done_only_when_every_destination_has_every_object(store: Store) -> None:
    outbox = Outbox(store)
    study = delivering_study(store)
    pacs = outbox.claim_due("pacs", 10, lease_s=60)
    assert len(pacs) == 2 and {d.kind for d in pacs} == {"sr", "sc"}
    assert outbox.claim_due("pacs", 10, lease_s=60) == []  # leased
    assert [outbox.delivered(d.delivery_id) for d in pacs] == [None, None]
    assert store.get_study(study).state is StudyState.DELIVERING
    archive = outbox.claim_due("archive", 10, lease_s=60)
    assert outbox.delivered(archive[0].delivery_id) is None
    assert outbox.delivered(archive[1].delivery_id) == study
    assert store.get_study(study).state is StudyState.DONE
    assert outbox.delivered(archive[1].delivery_id) is None  # idempotent


def test_backoff_then_failed_then_admin_retry(store: Store) -> None:
    outbox = Outbox(store)
    study = delivering_study(store, destinations=("pacs",))
    [first, _] = outbox.claim_due("pacs", 10, lease_s=60)
    before = utcnow()
    assert outbox.failed(first.delivery_id, "cannot connect", BACKOFF) is DeliveryState.PENDING
    [(delivery, _output)] = [r for r in outbox.deliveries(study) if r[0].id == first.delivery_id]
    wait = (delivery.next_attempt_at - before).total_seconds()
    assert 4.5 <= wait <= 6  # first retry after backoff_start_s
    assert BACKOFF.delay(1) == 5 and BACKOFF.delay(2) == 10 and BACKOFF.delay(5) == 30
    for _ in range(2):
        with store.session() as session, session.begin():
            from sqlalchemy import update

            from triage.store.models import Delivery

            session.execute(update(Delivery).values(next_attempt_at=utcnow()))
        [again] = [
            d for d in outbox.claim_due("pacs", 10, 60) if d.delivery_id == first.delivery_id
        ]
        state = outbox.failed(again.delivery_id, "cannot connect", BACKOFF)
    assert state is DeliveryState.FAILED  # third attempt was the last
    row = store.get_study(study)
    assert row.state is StudyState.FAILED and "delivery to pacs failed" in row.state_reason
    assert len(outbox.retry(study_uid=study)) == 1
    assert store.get_study(study).state is StudyState.DELIVERING
    [retried] = [d for d in outbox.claim_due("pacs", 10, 60) if d.delivery_id == first.delivery_id]
    assert retried.attempt == 1


def test_permanent_failure_keeps_the_peer_status(store: Store) -> None:
    outbox = Outbox(store)
    study = delivering_study(store, destinations=("pacs",))
    [item, _] = outbox.claim_due("pacs", 10, 60)
    # A permanent failure is never retried: it needs no backoff.
    state = outbox.failed(item.delivery_id, "status 0xA900", status=0xA900, permanent=True)
    assert state is DeliveryState.FAILED
    [(delivery, _)] = [r for r in outbox.deliveries(study) if r[0].id == item.delivery_id]
    assert delivery.last_status == 0xA900 and delivery.last_error == "status 0xA900"


def test_a_failure_that_may_be_retried_needs_a_backoff(store: Store) -> None:
    outbox = Outbox(store)
    delivering_study(store, destinations=("pacs",))
    [item, _] = outbox.claim_due("pacs", 10, 60)
    with pytest.raises(ValueError, match="needs a backoff"):
        outbox.failed(item.delivery_id, "cannot connect")


def test_a_cancelled_study_has_nothing_to_retry(store: Store) -> None:
    from triage.store.operations import cancel

    outbox = Outbox(store)
    study = delivering_study(store, destinations=("pacs",))
    [item, _] = outbox.claim_due("pacs", 10, 60)
    outbox.failed(item.delivery_id, "status 0xC000", BACKOFF, status=0xC000, permanent=True)
    cancel(store, study, "wrong patient")
    # Nothing would send it: saying "1 delivery will be sent again" would be a lie.
    assert outbox.retry(study_uid=study) == []
    assert outbox.retry() == []
    # Nor is it a failure any more (listed, counted, alerted on for ever).
    states = {d.state for d, _ in outbox.deliveries(study)}
    assert states == {DeliveryState.CANCELLED}
    # One cancelled while its C-STORE ran: the PACS holds it, and the store says so.
    assert outbox.delivered(item.delivery_id, 0) is None
    [(late, _)] = [r for r in outbox.deliveries(study) if r[0].id == item.delivery_id]
    assert late.state is DeliveryState.CANCELLED and late.delivered_at is not None
    assert late.last_error.startswith("acknowledged after it was cancelled")
    assert not outbox.hold(item, 60)  # not to be sent any more
    assert outbox.delivered(item.delivery_id, 0) is None  # recorded once, not nested
    [(again, _)] = [r for r in outbox.deliveries(study) if r[0].id == item.delivery_id]
    assert again.last_error == late.last_error


def test_a_study_whose_other_deliveries_arrive_after_a_retry_stays_failed(store: Store) -> None:
    # One destination refused an object for good, another was retried and then took its
    # objects: the study stayed in DELIVERING for ever, out of every FAILED listing.
    outbox = Outbox(store)
    study = delivering_study(store)
    refused, other = outbox.claim_due("pacs", 10, 60)
    outbox.failed(refused.delivery_id, "status 0xC000: refused", status=0xC000, permanent=True)
    down = outbox.claim_due("archive", 10, 60)
    for item in down:
        outbox.failed(item.delivery_id, "cannot connect", status=None, permanent=True)
    assert store.get_study(study).state is StudyState.FAILED
    assert len(outbox.retry(study_uid=study, configured=["archive"])) == 2  # pacs: not configured
    assert store.get_study(study).state is StudyState.DELIVERING
    for item in [*outbox.claim_due("archive", 10, 60), other]:  # pacs took its other object
        assert outbox.delivered(item.delivery_id) is None
    row = store.get_study(study)
    assert row.state is StudyState.FAILED
    assert row.state_reason == "delivery to pacs failed: status 0xC000: refused"


def test_deliveries_to_a_destination_no_longer_configured_fail_with_the_reason(
    store: Store,
) -> None:
    # Renamed or removed in the config: nothing would send them; the study would wait in
    # DELIVERING for ever, with no reason, never purged.
    outbox = Outbox(store)
    study = delivering_study(store, destinations=("pacs", "archive"))
    assert outbox.fail_unconfigured(["pacs"]) == ["archive"]
    row = store.get_study(study)
    assert row.state is StudyState.FAILED
    assert (
        row.state_reason
        == "delivery to archive failed: destination archive is no longer configured"
    )
    assert {d.state for d, _ in outbox.deliveries(study) if d.destination == "archive"} == {
        DeliveryState.FAILED
    }
    assert len(outbox.claim_due("pacs", 10, 60)) == 2  # the configured one is still served
    assert outbox.fail_unconfigured(["pacs"]) == []


def test_late_instance_cancels_pending_deliveries_of_the_old_revision(store: Store) -> None:
    outbox = Outbox(store)
    study = delivering_study(store, destinations=("pacs",))
    store.record_instance(
        InstanceMeta(
            study,
            study + ".9",
            study + ".2",
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.840.10008.1.2.1",
            "CR",
            f"{study}/late.dcm",
            10,
        ),
        None,
    )
    assert outbox.claim_due("pacs", 10, 60) == []
    states = {d.state for d, _ in outbox.deliveries(study)}
    assert states == {DeliveryState.CANCELLED}


def test_restart_makes_leased_deliveries_due(store: Store) -> None:
    outbox = Outbox(store)
    delivering_study(store, destinations=("pacs",))
    claimed = outbox.claim_due("pacs", 10, lease_s=600)
    assert outbox.claim_due("pacs", 10, lease_s=600) == []
    assert outbox.release_leases() == len(claimed)
    assert len(outbox.claim_due("pacs", 10, lease_s=600)) == len(claimed)


@pytest.mark.postgres
@pytest.mark.parametrize("record", ["delivered", "failed"])
def test_recording_a_delivery_locks_the_study_before_the_delivery(pg_url: str, record: str):
    """A late instance locks the study, then cancels its pending deliveries; the sender
    recording one of them must take the rows in the same order, or PostgreSQL kills one of
    the two as a deadlock (a C-STORE answered 0xA701, or a lost acknowledgement)."""
    import threading

    from sqlalchemy import select, text, update

    from tests.peers import wait_until
    from triage.store.db import make_engine, upgrade_schema
    from triage.store.models import Delivery, Study

    engine = make_engine(pg_url)
    upgrade_schema(engine)
    store = Store(engine)
    outbox = Outbox(store)
    study = delivering_study(store, destinations=("pacs",))
    [item, _] = outbox.claim_due("pacs", 10, 60)
    outcome: dict[str, object] = {}

    def sender() -> None:
        try:
            if record == "delivered":
                outcome["sender"] = outbox.delivered(item.delivery_id)
            else:
                outcome["sender"] = outbox.failed(item.delivery_id, "refused", permanent=True)
        except Exception as exc:  # the deadlock's victim
            outcome["sender"] = exc

    with engine.connect() as late_instance:
        late_instance.execute(text("SET lock_timeout = '5s'"))
        late_instance.execute(select(Study.id).where(Study.study_uid == study).with_for_update())
        thread = threading.Thread(target=sender)
        thread.start()
        wait_until(
            lambda: late_instance.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            ).scalar_one(),
            message="the sender waits for the study's row",
        )
        # The sender holds nothing the late instance needs next (NOWAIT: no deadlock to
        # wait for; PostgreSQL's retry of a deadlock's victim would hide the wrong order).
        late_instance.execute(
            select(Delivery.id).where(Delivery.id == item.delivery_id).with_for_update(nowait=True)
        )
        late_instance.execute(
            update(Delivery).where(Delivery.id == item.delivery_id).values(state="CANCELLED")
        )
        late_instance.commit()
        thread.join(30)
    assert outcome["sender"] is None  # it saw the cancellation, and nothing failed
    engine.dispose()


def test_a_late_instance_supersedes_the_failed_deliveries_too(store: Store) -> None:
    # They belong to a revision no retry may send any more: no longer counted as failures.
    outbox = Outbox(store)
    study = delivering_study(store, destinations=("pacs",))
    refused, pending = outbox.claim_due("pacs", 10, 60)
    outbox.failed(refused.delivery_id, "status 0xC000", status=0xC000, permanent=True)
    late = f"{study}.2"
    store.record_instance(
        InstanceMeta(
            study, study + ".9", late, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1", "CR",
            f"{study}/{late}.dcm", 10,
        ),
        None,
    )  # fmt: skip
    states = {delivery.id: delivery for delivery, _ in outbox.deliveries(study)}
    for item in (refused, pending):
        assert states[item.delivery_id].state is DeliveryState.CANCELLED
        assert states[item.delivery_id].last_error.startswith("superseded by revision")


def test_a_daemon_says_which_destinations_deliveries_wait_for_that_it_does_not_send_to(
    store: Store, store_url: str, daemon_factory
) -> None:
    """Removed from the config: on SQLite (one daemon) their deliveries fail at start, with
    the reason; on PostgreSQL another host's daemon may still send to them, so they wait,
    and the start says so and what to do."""
    study = delivering_study(store, destinations=("gone",))
    store.engine.dispose()  # SQLite: the daemon is the one writer
    daemon = daemon_factory({"store": {"url": store_url}}).start()
    states = {d.state for d, _ in Outbox(store).deliveries(study)}
    log = daemon.log_text()
    if store_url.startswith("sqlite"):
        assert states == {DeliveryState.FAILED}
        assert '"event": "deliveries_to_unconfigured_destinations_failed"' in log
    else:
        assert states == {DeliveryState.PENDING}
        assert '"event": "deliveries_wait_for_destinations_not_configured_here"' in log
        assert '"destinations": ["gone"]' in log
    assert daemon.stop() == 0


@pytest.mark.parametrize("change", ["cancel", "late instance", "requeue"])
def test_a_retry_waits_for_a_change_committing_meanwhile_and_keeps_it(
    store: Store, change: str
) -> None:
    """retry read its studies unlocked: on PostgreSQL a cancel (or a late instance's new
    revision) committed meanwhile was overwritten, the cancelled study's results were sent
    and the superseded deliveries were PENDING again, their study DELIVERING for ever."""
    import threading
    import time

    from sqlalchemy import select, update

    from triage.store.models import Delivery, Output, Study

    outbox = Outbox(store)
    study_uid = delivering_study(store, destinations=("pacs",))
    for item in outbox.claim_due("pacs", 10, 60):
        outbox.failed(item.delivery_id, "status 0xC000", status=0xC000, permanent=True)
    assert store.get_study(study_uid).state is StudyState.FAILED
    restarted: list[list[int]] = []
    retry = threading.Thread(target=lambda: restarted.append(outbox.retry(study_uid=study_uid)))
    with store.session() as session, session.begin():
        study = session.scalar(select(Study).where(Study.study_uid == study_uid).with_for_update())
        assert study is not None
        if change == "cancel":
            study.state = StudyState.CANCELLED
        elif change == "requeue":  # scored again at this revision: its outputs supersede
            study.state = StudyState.QUEUED
        else:
            study.state, study.revision = StudyState.RECEIVING, study.revision + 1
        if change != "requeue":  # which leaves them to be superseded by its new outputs
            outputs = select(Output.id).where(Output.study_id == study.id).scalar_subquery()
            session.execute(
                update(Delivery)
                .where(Delivery.output_id.in_(outputs))
                .values(state=DeliveryState.CANCELLED)
            )
        session.flush()
        retry.start()
        time.sleep(1.0)  # retry is waiting on the lock (without it, it read FAILED and went on)
    retry.join(timeout=30)
    assert restarted == [[]]
    expected = {
        "cancel": StudyState.CANCELLED,
        "requeue": StudyState.QUEUED,
        "late instance": StudyState.RECEIVING,
    }[change]
    assert store.get_study(study_uid).state is expected
    left = DeliveryState.FAILED if change == "requeue" else DeliveryState.CANCELLED
    assert {d.state for d, _ in outbox.deliveries(study_uid)} == {left}


def test_a_claim_taken_over_after_its_lease_is_neither_held_nor_given_back(
    store: Store,
) -> None:
    """A batch that outlasted its lease: another daemon claimed the rest. The first sender
    must neither send those objects (hold) nor hand them back (not_tried), which would
    undo the other's claim and let a third sender take them while they are in flight."""
    outbox = Outbox(store)
    delivering_study(store, destinations=("pacs",))
    first = outbox.claim_due("pacs", 10, 60)
    assert outbox.hold(first[0], 60)
    with store.session() as session, session.begin():  # the first claim's lease ran out
        session.execute(update(Delivery).values(next_attempt_at=utcnow() - timedelta(seconds=1)))
    second = outbox.claim_due("pacs", 10, 60)
    assert {d.delivery_id for d in second} == {d.delivery_id for d in first}
    for item in first:
        assert not outbox.hold(item, 60)
        assert not outbox.not_tried(item.delivery_id, "association ended", 5, item.lease_until)
    for item in second:
        assert outbox.hold(item, 60)  # still the second sender's


@pytest.mark.postgres
def test_delivery_times_keep_the_database_servers_time_whatever_each_hosts_clock_says(
    pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL the daemons of several hosts share the outbox: one claims a delivery (a
    # lease), backs it off or retries it, and another compares its next attempt with its own
    # clock. With each host's own clock, a sender 10 min behind left its claims due to the
    # others at once (each object sent twice) and its backoffs too; a worker or an admin
    # host ahead held new or retried deliveries back as long.
    from triage.store import outbox as outbox_module
    from triage.store import work_queue

    def host(offset_s: float) -> None:  # what follows runs on a host this far off
        for module in (outbox_module, work_queue):
            monkeypatch.setattr(module, "utcnow", lambda: utcnow() + timedelta(seconds=offset_s))

    store = pg_store
    outbox = Outbox(store)
    host(600)  # the worker's host, ahead
    study = delivering_study(store, destinations=("pacs",))
    host(-600)  # a sender's host, behind: the deliveries are due
    first, second = outbox.claim_due("pacs", 10, lease_s=60)
    assert outbox.hold(first, 60)
    for offset_s in (0, 600):  # the other senders' hosts: claimed
        host(offset_s)
        assert outbox.claim_due("pacs", 10, lease_s=60) == []
    host(-600)
    assert outbox.failed(first.delivery_id, "refused", BACKOFF) is DeliveryState.PENDING
    assert outbox.not_tried(second.delivery_id, "association ended", 5, second.lease_until)
    for offset_s in (0, 600):  # backing off for 5 s
        host(offset_s)
        assert outbox.claim_due("pacs", 10, lease_s=60) == []
    for delivery, _output in outbox.deliveries(study):
        assert 0 < (delivery.next_attempt_at - utcnow()).total_seconds() <= 6
    with store.session() as session, session.begin():  # the backoffs are over
        session.execute(update(Delivery).values(next_attempt_at=utcnow()))
    for item in outbox.claim_due("pacs", 10, lease_s=60):
        outbox.failed(item.delivery_id, "status 0xC000", status=0xC000, permanent=True)
    host(600)  # the admin's host, ahead
    assert len(outbox.retry(study_uid=study)) == 2
    host(0)
    assert len(outbox.claim_due("pacs", 10, lease_s=60)) == 2  # due at once
