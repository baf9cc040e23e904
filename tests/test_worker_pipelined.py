"""The worker's batch loop with one batch in flight, as it runs on a GPU, driven on the CPU.

On CUDA :meth:`ScoringModel.start` returns once a forward pass is queued, and the batch loop
stages the next batch before it takes the last one's results. The order of that loop (which
batch's results go to which views; the last batch delivered although none follows it; views
that do not decode) does not depend on the device, so it is checked here with the
pipelining turned on over a CPU model, against each view's own forward pass.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from triage import metrics
from triage.scoring.preprocess import decode_view
from triage.scoring.worker import Worker, load_configured_model
from triage.store.models import Result, StudyState, utcnow
from triage.testing.received import local_worker_config, received_store
from triage.testing.synth import write_benchmark_files

#: fp32, one view at a time against batches of three: only the summation order differs.
_BATCH_TOLERANCE = 1e-5


@pytest.mark.slow
def test_batches_in_flight_give_each_view_its_own_result(tmp_path: Path) -> None:
    # Batches of three across two-view studies: every batch but the first holds views of two
    # studies, and each starts while the one before is still to be delivered.
    config = local_worker_config(
        tmp_path,
        model={"device": "cpu", "precision": "fp32", "batch_size": 3},
        worker={"decode_processes": 1, "poll_interval_s": 0.05},
    )
    spool_dir = Path(config.store.spool_dir)
    files = write_benchmark_files(spool_dir, 10, size_mb=0.25, views_per_study=2, seed=5)
    undecodable = files[3]
    undecodable.write_bytes(undecodable.read_bytes()[:-20_000])  # pixel data cut short
    engine, store, spool = received_store(config.store.url, spool_dir, files)
    model = load_configured_model(config)
    studies = len(files) // 2
    finished = threading.Semaphore(0)
    worker = Worker(config, store, spool, model, on_scored=finished.release)
    worker._pipelined = True
    worker.warm_up()
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    model_seconds_before = _model_seconds()
    began = time.monotonic()
    worker.start()
    try:
        for _ in range(studies):
            # The last batch has none after it: it must be delivered all the same.
            assert finished.acquire(timeout=60), store.counts_by_state()
        elapsed = time.monotonic() - began
    finally:
        worker.stop(30)
    # Each batch's time is counted from the last one's delivery when that came after its
    # start: the model's busy time, once, however the passes overlap.
    assert 0 < _model_seconds() - model_seconds_before <= elapsed
    assert store.counts_by_state() == {StudyState.DONE: studies}
    assert worker._unscored == 0

    expected = {}
    for path in files:
        if path == undecodable:
            continue
        view = decode_view(str(path), model.input_size, model.mean, model.std, display_max_side=0)
        logits, _ = model.forward(model.make_batch([view.grey]))
        expected[view.sop_instance_uid] = float(logits.sigmoid()[0])
    with store.read_session() as session:
        scored = {
            score.sop_instance_uid: score
            for result in session.query(Result).all()
            for score in result.views
        }
    assert set(scored) == {path.stem for path in files}
    assert scored[undecodable.stem].skipped and "undecodable" in scored[undecodable.stem].note
    for uid, probability in expected.items():
        assert scored[uid].probability == pytest.approx(probability, abs=_BATCH_TOLERANCE), uid
    engine.dispose()


def _model_seconds() -> float:
    """The sum of ``triage_view_scoring_seconds`` so far (this process)."""
    return metrics.REGISTRY.get_sample_value("triage_view_scoring_seconds_sum") or 0.0
