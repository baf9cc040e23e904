"""Scale-out on PostgreSQL: a daemon and a second worker process share one database and spool.

40 studies; every study is scored exactly once and delivered exactly once, even when one worker
is killed with SIGKILL in the middle of the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.peers import Storescp, storescu, wait_until
from tests.test_end_to_end import SC_CLASS, SR_CLASS, scoring_config
from triage.store.models import Result, Study, StudyState
from triage.testing.synth import make_study, write_study

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow, pytest.mark.postgres]

BODY_PARTS = ["WRIST", "HAND", "ELBOW", "FINGER", "FOREARM", "HUMERUS", "SHOULDER"]


def test_two_workers_on_postgresql_score_and_deliver_every_study_once(
    daemon_factory, pg_url, tmp_path
) -> None:
    pacs = Storescp(tmp_path / "pacs").start()
    spool = tmp_path / "shared-spool"
    config = scoring_config(
        pacs.destination(),
        store={"url": pg_url, "spool_dir": str(spool)},
        worker={"lease_s": 5.0, "claim_batch": 4},
        model={"batch_size": 8},
    )
    daemon = daemon_factory(config, name="daemon").start()
    second = daemon_factory(
        {**config, "dicom": {**config.get("dicom", {}), "port": daemon.port}},
        name="worker",
        command="worker",
    ).start()
    files: list[Path] = []
    uids = []
    for n in range(40):
        datasets = make_study(
            body_part=BODY_PARTS[n % len(BODY_PARTS)], views=1, rows=160, cols=128, seed=500 + n
        )
        uids.append(str(datasets[0].StudyInstanceUID))
        files += write_study(datasets, tmp_path / "in" / str(n))
    assert storescu(daemon.port, files).acknowledged == 40
    store = daemon.store()

    def claimed_by_second() -> bool:
        with store.read_session() as session:
            owners = session.query(Study.lease_owner).filter(Study.lease_owner.isnot(None)).all()
        return any(f":{second.process.pid}:" in (owner or "") for (owner,) in owners)

    wait_until(claimed_by_second, 240, 0.05, "the second worker claimed a study")
    second.kill()  # mid-run, holding a lease
    killed_at = time.monotonic()

    def all_done() -> bool:
        counts = store.counts_by_state()
        return counts.get(StudyState.DONE, 0) == 40

    wait_until(all_done, 420, 0.5, f"all 40 DONE: {store.counts_by_state()}")
    assert time.monotonic() - killed_at > 0
    with store.read_session() as session:
        results = session.query(Result).all()
        assert sorted(r.study_id for r in results) == sorted({r.study_id for r in results})
        assert len(results) == 40  # scored exactly once (one result per study revision)
        expired = session.query(Study).filter(Study.attempts > 1).count()
    assert expired >= 1  # the killed worker's study was claimed again after its lease expired
    received = pacs.received()
    sop_uids = [str(ds.SOPInstanceUID) for ds in received]
    assert len(sop_uids) == len(set(sop_uids)) == 80  # one SR and one overlay per study
    assert sorted(str(ds.SOPClassUID) for ds in received) == sorted([SR_CLASS, SC_CLASS] * 40)
    assert {str(ds.StudyInstanceUID) for ds in received} == set(uids)
    deliveries = pacs.log_text().count("Received Store Request")
    assert deliveries == 80, "every object delivered exactly once"
    assert daemon.stop() == 0
