"""The scoring queue on SQLite and PostgreSQL: claims, leases, results, retries."""

from __future__ import annotations

import threading
from datetime import timedelta

import numpy as np
import pytest

from triage.scoring.result import ModelInfo, SkippedView, StudyResult, ViewResult
from triage.store.models import Delivery, DeliveryState, Output, Result, StudyState, utcnow
from triage.store.repository import InstanceMeta, Store
from triage.store.work_queue import OutputFile, WorkQueue
from triage.study_types import StudyType

MODEL = ModelInfo(name="demo", version="0.1", validated=False)


def queued_study(store: Store, n: int, views: int = 2) -> str:
    study = f"1.2.826.0.1.3680043.8.498.{n}"
    for v in range(views):
        sop = f"{study}.{v}"
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
    return study


def result_for(claim, probability: float = 0.7) -> StudyResult:
    views = tuple(
        ViewResult(i.sop_instance_uid, probability, np.zeros((7, 7), np.float32))
        for i in claim.instances[:-1]
    )
    skipped = (SkippedView(claim.instances[-1].sop_instance_uid, "undecodable: bad JPEG"),)
    return StudyResult(
        claim.study_uid, claim.revision, StudyType.WRIST, probability, 0.5, views, skipped
    )


def outputs_for(claim) -> list[OutputFile]:
    return [
        OutputFile(
            "sr",
            "1.2.840.10008.5.1.4.1.1.88.34",
            f"2.25.{claim.study_id}{claim.revision}1",
            "2.25.77",
            None,
            f"outbox/{claim.study_uid}/sr.dcm",
            100,
        ),
    ]


def test_claim_complete_and_deliveries(store: Store) -> None:
    queue = WorkQueue(store)
    study = queued_study(store, 1, views=3)
    [claim] = queue.claim("w1", limit=5, lease_s=60)
    assert claim.study_uid == study and claim.attempt == 1 and len(claim.instances) == 3
    assert queue.claim("w2", limit=5, lease_s=60) == []
    assert queue.complete(
        claim, result_for(claim), MODEL, outputs_for(claim), ["pacs", "archive"], 12.0
    )
    row = store.get_study(study)
    assert row.state is StudyState.DELIVERING and row.study_type == "XR_WRIST"
    assert row.lease_token is None
    with store.session() as session:
        result = session.query(Result).one()
        assert (result.probability, result.abnormal, result.views_scored, result.views_skipped) == (
            0.7,
            True,
            2,
            1,
        )
        assert [v.skipped for v in result.views] == [False, False, True]
        deliveries = session.query(Delivery).all()
        assert sorted(d.destination for d in deliveries) == ["archive", "pacs"]
        assert {d.state for d in deliveries} == {DeliveryState.PENDING}
    # Completing twice (a stale worker) is refused.
    assert not queue.complete(claim, result_for(claim), MODEL, outputs_for(claim), ["pacs"], 1.0)


def test_claims_and_results_write_every_row_they_should(store: Store) -> None:
    """What claim() and complete() write, column by column: several studies claimed at once,
    each with its own instances in arrival order, lease and history; a result rebuilt for the
    same revision moves its outputs' paths and sizes and keeps one row each."""
    from triage.store.models import Study, StudyEvent

    queue = WorkQueue(store)
    uids = [queued_study(store, n, views=n) for n in (11, 12, 13)]
    claims = queue.claim("w1", limit=5, lease_s=60)
    assert [c.study_uid for c in claims] == uids
    for claim, views in zip(claims, (11, 12, 13), strict=True):
        assert [i.sop_instance_uid for i in claim.instances] == [
            f"{claim.study_uid}.{v}" for v in range(views)
        ]
        assert claim.instances[0].path == f"{claim.study_uid}/{claim.study_uid}.0.dcm"
    assert len({c.token for c in claims}) == 3
    with store.session() as session:
        for claim in claims:
            study = session.get(Study, claim.study_id)
            assert study.state is StudyState.SCORING
            assert (study.lease_token, study.lease_owner, study.attempts) == (claim.token, "w1", 1)
            assert study.lease_expires_at > utcnow() + timedelta(seconds=50)
    first = claims[0]
    outputs = outputs_for(first)
    assert queue.complete(first, result_for(first), MODEL, outputs, ["pacs"], 3.5)
    with store.session() as session:
        study = session.get(Study, first.study_id)
        assert (study.state, study.state_reason, study.lease_owner) == (
            StudyState.DELIVERING,
            "",
            None,
        )
        events = (
            session.query(StudyEvent)
            .filter_by(study_id=first.study_id)
            .order_by(StudyEvent.id)
            .all()
        )
        assert [(e.from_state, e.to_state) for e in events][-2:] == [
            (StudyState.QUEUED, StudyState.SCORING),
            (StudyState.SCORING, StudyState.DELIVERING),
        ]
        assert events[-2].reason == "claimed by w1"
        assert events[-1].reason == "scored abnormal p=0.700"
        result = session.query(Result).one()
        assert (result.model_name, result.scoring_ms, result.study_type) == (
            "demo",
            3.5,
            "XR_WRIST",
        )
        assert [(v.sop_instance_uid, v.probability, v.note) for v in result.views] == [
            (f"{first.study_uid}.{v}", 0.7, "") for v in range(10)
        ] + [(f"{first.study_uid}.10", None, "undecodable: bad JPEG")]
    # Rebuilt after a requeue: same rows, new paths and sizes, delivered again.
    with store.session() as session, session.begin():
        session.get(Study, first.study_id).state = StudyState.QUEUED
        for delivery in session.query(Delivery):
            delivery.state, delivery.attempts = DeliveryState.FAILED, 3
    [again] = queue.claim("w1", 1, 60)
    assert again.attempt == 2
    moved = [
        OutputFile(o.kind, o.sop_class_uid, o.sop_instance_uid, o.series_uid, None, "outbox/x", 7)
        for o in outputs
    ]
    assert queue.complete(again, result_for(again), MODEL, moved, ["pacs"], 1.0)
    with store.session() as session:
        [output] = session.query(Output).all()
        assert (output.path, output.size_bytes) == ("outbox/x", 7)
        [delivery] = session.query(Delivery).all()
        assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 0)


def test_no_destination_means_done(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 2)
    [claim] = queue.claim("w1", 1, 60)
    assert queue.complete(claim, result_for(claim, 0.2), MODEL, outputs_for(claim), [], 5.0)
    assert store.get_study(claim.study_uid).state is StudyState.DONE


def test_skip_records_the_reason(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 3)
    [claim] = queue.claim("w1", 1, 60)
    assert queue.skip(claim, "not an upper-extremity radiograph: CHEST")
    study = store.get_study(claim.study_uid)
    assert study.state is StudyState.SKIPPED and "CHEST" in study.state_reason


def test_errors_retry_then_fail(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 4)
    for attempt in (1, 2):
        [claim] = queue.claim("w1", 1, 60)
        assert claim.attempt == attempt
        assert queue.fail_attempt(claim, "boom", max_attempts=3) is StudyState.QUEUED
    [claim] = queue.claim("w1", 1, 60)
    assert queue.fail_attempt(claim, "boom", max_attempts=3) is StudyState.FAILED
    assert "3 attempts: boom" in store.get_study(claim.study_uid).state_reason


def test_a_single_attempt_is_one_attempt_in_the_reason(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 5)
    [claim] = queue.claim("w1", 1, 60)
    assert queue.fail_attempt(claim, "boom", max_attempts=1) is StudyState.FAILED
    assert store.get_study(claim.study_uid).state_reason == "1 attempt: boom"


def test_expired_lease_is_claimed_again_and_the_old_holder_is_refused(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 5)
    [first] = queue.claim("crashed", 1, lease_s=30)
    assert queue.expire_leases(3) == []  # not expired yet
    moved = queue.expire_leases(3, now=utcnow() + timedelta(seconds=31))
    assert [(m.from_state, m.to_state) for m in moved] == [(StudyState.SCORING, StudyState.QUEUED)]
    [second] = queue.claim("w2", 1, 30)
    assert second.attempt == 2 and second.token != first.token
    assert not queue.complete(first, result_for(first), MODEL, [], [], 1.0)
    assert queue.renew([first], 30) == 0 and queue.renew([second], 30) == 1
    assert queue.complete(second, result_for(second), MODEL, [], [], 1.0)


def test_late_instance_during_scoring_discards_the_old_result(store: Store) -> None:
    queue = WorkQueue(store)
    study = queued_study(store, 6)
    [claim] = queue.claim("w1", 1, 60)
    late = InstanceMeta(
        study,
        study + ".9",
        study + ".77",
        "1.2.840.10008.5.1.4.1.1.1",
        "1.2.840.10008.1.2.1",
        "CR",
        f"{study}/late.dcm",
        10,
    )
    assert store.record_instance(late, None).revision == 2
    assert not queue.complete(claim, result_for(claim), MODEL, outputs_for(claim), ["pacs"], 1.0)
    row = store.get_study(study)
    assert row.state is StudyState.RECEIVING and row.revision == 2 and row.attempts == 0


def test_rescoring_a_revision_reuses_output_rows(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 7)
    [claim] = queue.claim("w1", 1, 60)
    queue.complete(claim, result_for(claim), MODEL, outputs_for(claim), ["pacs"], 1.0)
    with store.session() as session, session.begin():
        from sqlalchemy import update

        from triage.store.models import Study

        session.execute(update(Study).values(state=StudyState.QUEUED))
    [again] = queue.claim("w1", 1, 60)
    assert queue.complete(again, result_for(again, 0.3), MODEL, outputs_for(claim), ["pacs"], 1.0)
    with store.session() as session:
        assert session.query(Output).count() == 1
        assert session.query(Delivery).count() == 1
        assert session.query(Result).one().probability == 0.3


def test_rescoring_by_another_model_supersedes_the_old_outputs_still_to_deliver(
    store: Store,
) -> None:
    # A requeue after a model upgrade: the same revision, outputs with other UIDs. The old
    # SR still waiting for a PACS that is down must not reach it after the new one.
    from triage.store.operations import requeue
    from triage.store.outbox import Outbox

    queue, outbox = WorkQueue(store), Outbox(store)
    study_uid = queued_study(store, 8)
    [claim] = queue.claim("w1", 1, 60)
    old = outputs_for(claim)
    assert queue.complete(claim, result_for(claim, 0.9), MODEL, old, ["pacs"], 1.0)
    assert queue.previous_sr(claim, old[0].sop_instance_uid) is None  # itself, rebuilt
    requeue(store, study_uid, actor="test")
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    [again] = queue.claim("w1", 1, 60)
    assert again.revision == claim.revision
    new = [
        OutputFile("sr", o.sop_class_uid, o.sop_instance_uid + "2", o.series_uid, None, o.path, 9)
        for o in old
    ]
    # The new SR names the old one as its predecessor once a PACS holds it, not before: an
    # SR superseded while its PACS was down never reaches it.
    assert queue.previous_sr(again, new[0].sop_instance_uid) is None
    with store.session() as session, session.begin():
        from sqlalchemy import select, update

        sr_output = select(Output.id).where(Output.sop_instance_uid == old[0].sop_instance_uid)
        session.execute(
            update(Delivery)
            .where(Delivery.output_id.in_(sr_output.scalar_subquery()))
            .values(delivered_at=utcnow())
        )
    assert queue.previous_sr(again, new[0].sop_instance_uid) == old[0].path
    upgraded = ModelInfo(name="demo", version="0.2", validated=False)
    assert queue.complete(again, result_for(again, 0.2), upgraded, new, ["pacs"], 1.0)
    rows = {o.sop_instance_uid: d for d, o in outbox.deliveries(study_uid)}
    stale = rows[old[0].sop_instance_uid]
    assert stale.state is DeliveryState.CANCELLED and "superseded" in stale.last_error
    [due] = outbox.claim_due("pacs", 10, 60)
    assert due.sop_instance_uid == new[0].sop_instance_uid
    assert outbox.delivered(due.delivery_id) == study_uid  # DONE: the stale one is not awaited


def test_a_study_with_several_outputs_and_destinations_gets_every_delivery(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 8, views=3)
    [claim] = queue.claim("w1", 1, 60)
    sr = outputs_for(claim)[0]
    overlays = [
        OutputFile(
            "sc",
            "1.2.840.10008.5.1.4.1.1.7",
            f"2.25.{claim.study_id}{claim.revision}{n}9",
            "2.25.78",
            instance.sop_instance_uid,
            f"outbox/{claim.study_uid}/sc{n}.dcm",
            2000,
        )
        for n, instance in enumerate(claim.instances[:-1])
    ]
    outputs = [sr, *overlays]
    assert queue.complete(claim, result_for(claim), MODEL, outputs, ["pacs", "archive"], 1.0)
    with store.session() as session, session.begin():
        from sqlalchemy import update

        from triage.store.models import Study

        for delivery in session.query(Delivery):
            delivery.state, delivery.attempts = DeliveryState.DONE, 1
        session.execute(update(Study).values(state=StudyState.QUEUED))
    [again] = queue.claim("w1", 1, 60)
    assert queue.complete(again, result_for(again), MODEL, outputs, ["pacs", "archive"], 1.0)
    with store.session() as session:
        assert session.query(Output).count() == 3
        deliveries = session.query(Delivery).all()
        assert sorted((d.output_id, d.destination) for d in deliveries) == sorted(
            (o.id, name) for o in session.query(Output) for name in ("pacs", "archive")
        )
        # Rebuilt outputs are sent again, to every destination.
        assert {(d.state, d.attempts) for d in deliveries} == {(DeliveryState.PENDING, 0)}


def test_concurrent_workers_never_claim_the_same_study(store: Store) -> None:
    queue = WorkQueue(store)
    for n in range(40):
        queued_study(store, 100 + n, views=1)
    claimed: dict[str, list[str]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        mine = claimed.setdefault(name, [])
        try:
            while True:
                claims = queue.claim(name, limit=3, lease_s=60)
                if not claims:
                    return
                mine.extend(c.study_uid for c in claims)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    everything = [uid for uids in claimed.values() for uid in uids]
    assert len(everything) == 40 and len(set(everything)) == 40


def test_worker_heartbeats(store: Store) -> None:
    queue = WorkQueue(store)
    queue.heartbeat("host:1:abc", "cpu", "0.1")
    queue.heartbeat("host:1:abc", "cpu", "0.1")
    queue.worker_stopped("host:1:abc")
    from triage.store.models import WorkerRecord

    with store.session() as session:
        record = session.get(WorkerRecord, "host:1:abc")
        assert record.device == "cpu" and record.stopped_at is not None


@pytest.mark.postgres
def test_a_worker_on_a_host_whose_clock_lags_is_alive_in_the_status(
    pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's host wrote its heartbeat by its own clock and `triage-admin status` on
    # another host judged its age by its own: 10 min behind, a live worker read "stale".
    from triage.store import queries, work_queue

    monkeypatch.setattr(work_queue, "utcnow", lambda: utcnow() - timedelta(seconds=600))
    WorkQueue(pg_store).heartbeat("behind:1:abc", "cuda", "0.1")
    monkeypatch.setattr(queries, "utcnow", lambda: utcnow() + timedelta(seconds=600))
    [worker] = queries.status(pg_store)["workers"]
    assert worker["state"] == "alive" and worker["heartbeat_age_s"] < 5


def test_restart_releases_stale_claims_keeping_the_attempt(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 8)
    [claim] = queue.claim("dead", 1, lease_s=600)
    [moved] = queue.release_dead_claims(max_attempts=3)
    assert (moved.from_state, moved.to_state) == (StudyState.SCORING, StudyState.QUEUED)
    study = store.get_study(claim.study_uid)
    assert study.state is StudyState.QUEUED and study.attempts == 1 and study.lease_token is None
    assert "claim of dead released at restart" in study.state_reason
    [again] = queue.claim("alive", 1, 600)
    assert again.attempt == 2


def test_restart_releases_only_the_claims_of_workers_that_are_gone(store: Store) -> None:
    queue = WorkQueue(store)
    queued_study(store, 9)
    queued_study(store, 10)
    [first] = queue.claim("host:1:gone", 1, lease_s=600)
    [second] = queue.claim("host:2:alive", 1, lease_s=600)
    moved = queue.release_dead_claims(3, dead=lambda owner: owner == "host:1:gone")
    assert [m.study_uid for m in moved] == [first.study_uid]
    assert store.get_study(second.study_uid).state is StudyState.SCORING
    assert queue.renew([second], 600) == 1 and queue.renew([first], 600) == 0


def test_a_study_whose_worker_dies_every_time_fails_after_max_attempts(store: Store) -> None:
    # A study that kills its worker (out of memory) must not do so at every systemd restart.
    queue = WorkQueue(store)
    queued_study(store, 11)
    for attempt in (1, 2):
        [claim] = queue.claim(f"host:{attempt}:x", 1, 600)
        [moved] = queue.release_dead_claims(max_attempts=3)
        assert moved.to_state is StudyState.QUEUED and claim.attempt == attempt
    [claim] = queue.claim("host:3:x", 1, 600)
    [moved] = queue.release_dead_claims(max_attempts=3)
    assert moved.to_state is StudyState.FAILED
    reason = store.get_study(claim.study_uid).state_reason
    assert "released at restart after 3 attempts" in reason


def test_study_latency_counts_from_the_first_instance_of_the_current_revision(
    store: Store,
) -> None:
    from sqlalchemy import update

    from triage.store.models import Instance, Study
    from triage.store.queries import study_latency_s

    queue = WorkQueue(store)
    uid = queued_study(store, 21, views=2)
    assert study_latency_s(store, uid) is None  # not DONE
    [claim] = queue.claim("w1", 1, 60)
    queue.complete(claim, result_for(claim), MODEL, outputs_for(claim), [], 1.0)
    study = store.get_study(uid)
    with store.session() as session, session.begin():
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == f"{uid}.0")
            .values(received_at=study.state_changed_at - timedelta(seconds=30))
        )
        session.execute(
            update(Instance)
            .where(Instance.sop_instance_uid == f"{uid}.1")
            .values(received_at=study.state_changed_at - timedelta(seconds=12))
        )
    assert abs(study_latency_s(store, uid) - 30.0) < 1e-6
    # Revision 2 (a late instance after DONE): only its own instances count.
    with store.session() as session, session.begin():
        session.execute(update(Instance).values(revision=1))
        session.execute(update(Study).values(revision=2))
        session.execute(
            update(Instance).where(Instance.sop_instance_uid == f"{uid}.1").values(revision=2)
        )
    assert abs(study_latency_s(store, uid) - 12.0) < 1e-6
    assert study_latency_s(store, "1.2.3.4.5.6.404") is None


def test_a_discarded_results_files_go_only_once_the_study_moved_to_another_revision(
    store: Store,
) -> None:
    # Another claim of the same revision (a forced requeue, an expired lease) writes the
    # same outbox files and may not have recorded them yet: they stay for the purge.
    from triage.store.operations import requeue

    queue = WorkQueue(store)
    study = queued_study(store, 41)
    [claim] = queue.claim("w1", 1, 60)
    paths = [o.path for o in outputs_for(claim)]
    requeue(store, study, force=True)
    assert queue.discardable_outputs(claim, paths) == []
    store.record_instance(  # a late instance: revision 2 writes other files
        InstanceMeta(
            study,
            study + ".9",
            study + ".late",
            "1.2.840.10008.5.1.4.1.1.1",
            "1.2.840.10008.1.2.1",
            "CR",
            f"{study}/{study}.late.dcm",
            10,
        ),
        None,
    )
    assert queue.discardable_outputs(claim, paths) == paths


def test_a_requeued_study_that_is_skipped_or_fails_sends_none_of_its_old_outputs(
    store: Store,
) -> None:
    from triage.store.operations import requeue
    from triage.store.outbox import Outbox

    queue, outbox = WorkQueue(store), Outbox(store)
    skipped, failed = queued_study(store, 1), queued_study(store, 2)
    for claim in queue.claim("w1", limit=5, lease_s=60):
        assert queue.complete(claim, result_for(claim), MODEL, outputs_for(claim), ["pacs"], 1.0)
    # The operator requeues both (a new model card) before the PACS took the results.
    requeue(store, skipped)
    requeue(store, failed)
    for claim in queue.claim("w1", limit=5, lease_s=60):
        if claim.study_uid == skipped:
            assert queue.skip(claim, "not an upper-extremity radiograph")
        else:
            assert queue.fail_attempt(claim, "model error", max_attempts=1) is StudyState.FAILED
    assert store.get_study(skipped).state is StudyState.SKIPPED
    assert store.get_study(failed).state is StudyState.FAILED
    # Nothing the requeue meant to replace goes out, and nothing waits for ever.
    sent = [d.study_uid for d in outbox.claim_due("pacs", 10, 60)]
    assert sent == []
    assert outbox.pending_destinations() == []
    states = {d.state for uid in (skipped, failed) for d, _ in outbox.deliveries(uid)}
    assert states == {DeliveryState.CANCELLED}


@pytest.mark.postgres
def test_leases_keep_the_database_servers_time_whatever_each_hosts_clock_says(
    pg_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On PostgreSQL a worker sets its leases on one host and a daemon on another expires
    # them: with each host's own clock, a worker host 10 min behind lost every claim at the
    # daemon's next expiry run (each study scored twice, FAILED after max_attempts), and a
    # daemon host ahead expired every worker's claims alike.
    from triage.store import work_queue

    def host(offset_s: float) -> None:
        monkeypatch.setattr(work_queue, "utcnow", lambda: utcnow() + timedelta(seconds=offset_s))

    queue = WorkQueue(pg_store)
    queued_study(pg_store, 51)
    host(-600)  # the worker's
    [claim] = queue.claim("behind:1:x", 1, lease_s=60)
    assert queue.renew([claim], 60) == 1
    host(0)  # the daemon's
    assert queue.expire_leases(3) == []
    host(600)  # a daemon's ahead
    assert queue.expire_leases(3) == []
    assert pg_store.get_study(claim.study_uid).state is StudyState.SCORING
    host(0)
    assert queue.complete(claim, result_for(claim), MODEL, [], [], 1.0)
