"""Where the worker builds a study's outputs: in its decode processes, or in its own process
while its model has nothing to do."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from triage.config import load_config
from triage.procutil import WIDE_PIPE_BYTES
from triage.scoring.priority_pool import BACKGROUND
from triage.scoring.worker import Worker, load_configured_model
from triage.store.db import make_engine, upgrade_schema
from triage.store.models import Output, StudyState, utcnow
from triage.store.repository import Store
from triage.store.spool import Spool
from triage.testing.received import local_worker_config, received_store
from triage.testing.synth import write_benchmark_files

#: How long the pool's one process is kept busy.
_BUSY_S = 3.0


def build_reporting_pid(request: object) -> int:
    """An output builder that says which process ran it (top-level: the pool pickles it)."""
    return os.getpid()


@pytest.fixture(scope="module")
def shared_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    tmp_path = tmp_path_factory.mktemp("worker")
    base = load_config(None, env={}, base_dir=tmp_path)
    config = dataclasses.replace(
        base,
        store=dataclasses.replace(
            base.store, url=f"sqlite:///{tmp_path / 'triage.db'}", spool_dir=str(tmp_path / "spool")
        ),
        model=dataclasses.replace(base.model, device="cpu", allow_unvalidated=True),
        worker=dataclasses.replace(base.worker, decode_processes=1),
    )
    engine = make_engine(config.store.url)
    upgrade_schema(engine)
    spool = Spool(Path(config.store.spool_dir))
    spool.prepare()
    worker = Worker(config, Store(engine), spool, load_configured_model(config))
    # The one decode process starts (and imports) before anything is timed.
    assert worker._pool.submit(BACKGROUND, build_reporting_pid, None).result() != os.getpid()
    yield worker
    worker._pool.shutdown(wait=True)
    engine.dispose()


@pytest.fixture
def worker(shared_worker: Worker) -> Worker:
    """The shared worker with an idle pool and a model with nothing to score."""
    shared_worker._pool.submit(BACKGROUND, build_reporting_pid, None).result()
    shared_worker._unscored = 0
    shared_worker._starved = False
    return shared_worker


def _keep_the_pool_busy(worker: Worker) -> None:
    worker._pool.submit(BACKGROUND, time.sleep, _BUSY_S)
    time.sleep(0.2)  # handed to the process: what comes next waits in the queue


def test_outputs_waiting_for_a_busy_pool_are_built_here_while_the_model_is_idle(
    worker: Worker,
) -> None:
    _keep_the_pool_busy(worker)
    started = time.monotonic()
    assert worker._in_pool_or_here(build_reporting_pid, None) == os.getpid()
    assert time.monotonic() - started < _BUSY_S / 2


def test_outputs_wait_for_the_pool_while_the_model_has_views_to_score(worker: Worker) -> None:
    _keep_the_pool_busy(worker)
    worker._unscored = 1  # a view being decoded or waiting for the forward pass
    started = time.monotonic()
    assert worker._in_pool_or_here(build_reporting_pid, None) != os.getpid()
    assert time.monotonic() - started > _BUSY_S / 2


def test_outputs_waiting_for_the_pool_are_built_here_once_the_last_view_is_scored(
    worker: Worker,
) -> None:
    _keep_the_pool_busy(worker)
    worker._unscored = 2
    with ThreadPoolExecutor(1) as finisher:
        built = finisher.submit(worker._in_pool_or_here, build_reporting_pid, None)
        time.sleep(0.3)
        worker._views_scored(1)
        time.sleep(0.3)
        assert not built.done()  # one view still to score: the job waits for the pool
        worker._views_scored(1)
        assert built.result(timeout=_BUSY_S / 4) == os.getpid()


@pytest.mark.parametrize("cpu_model", [True, False])
def test_outputs_are_built_here_while_a_cpu_model_waits_for_decoded_views(
    worker: Worker, cpu_model: bool
) -> None:
    """Decoding is the limit (views are being decoded, none is ready for the model): a CPU
    model's cores are idle, so the job is taken back; a GPU model's are not this process's,
    whose GIL is the limit there, so the job waits for the pool."""
    assert worker.model.device.type == "cpu" and worker._build_while_starved
    worker._build_while_starved = cpu_model
    try:
        _keep_the_pool_busy(worker)
        worker._unscored = 3  # being decoded
        with ThreadPoolExecutor(1) as finisher:
            built = finisher.submit(worker._in_pool_or_here, build_reporting_pid, None)
            time.sleep(0.3)
            assert not built.done()  # the model has views to score
            worker._set_starved(True)  # the batch loop waits for the next decoded view
            where = built.result(timeout=_BUSY_S * 2)
        assert (where == os.getpid()) == cpu_model
    finally:
        worker._build_while_starved = True
        worker._set_starved(False)


def test_the_pool_pipes_carry_a_megabyte_at_once(worker: Worker) -> None:
    """Displays go to the decode process and overlays come back through 1 MB pipes."""
    executor = worker._pool._current.executor
    for queue in (executor._call_queue, executor._result_queue):  # type: ignore[attr-defined]
        size = fcntl.fcntl(queue._reader.fileno(), fcntl.F_GETPIPE_SZ)
        assert size == WIDE_PIPE_BYTES


def test_outputs_of_an_idle_pool_are_built_there(worker: Worker) -> None:
    assert worker._in_pool_or_here(build_reporting_pid, None) != os.getpid()


def test_a_build_that_fails_here_raises_its_error(worker: Worker) -> None:
    _keep_the_pool_busy(worker)
    with pytest.raises(TypeError):
        worker._in_pool_or_here(len, 5)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_japanese_study_without_an_accession_number_gets_its_sr_and_overlays(
    tmp_path: Path,
) -> None:
    """Headers highdicom refuses as they are (an empty first character set value, a missing
    Type 2 attribute) still give a study its outputs, not FAILED."""
    config = local_worker_config(
        tmp_path,
        model={"device": "cpu", "precision": "fp32", "batch_size": 2, "threads": 1},
        worker={"decode_processes": 1, "poll_interval_s": 0.05, "max_attempts": 1},
        overlays=True,
    )
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    files = write_benchmark_files(config.store.spool_dir, 2, size_mb=0.25, views_per_study=2)
    for path in files:
        source = pydicom.dcmread(path)
        source.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        source.PatientName = name
        del source.AccessionNumber
        source.save_as(path)
    engine, store, spool = received_store(config.store.url, Path(config.store.spool_dir), files)
    worker = Worker(config, store, spool, load_configured_model(config))
    try:
        worker.warm_up()
        store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
        worker.start()
        finished = (StudyState.DONE, StudyState.DELIVERING, StudyState.FAILED)
        deadline = time.monotonic() + 120
        while (study := store.get_study(files[0].parent.name)).state not in finished:
            assert time.monotonic() < deadline, f"still {study.state}"
            time.sleep(0.1)
        assert study.state in (StudyState.DONE, StudyState.DELIVERING), study.state_reason
        with store.read_session() as session:
            outputs = list(session.scalars(select(Output).where(Output.study_id == study.id)))
        assert sorted(output.kind for output in outputs) == ["sc", "sc", "sr"]
        for output in outputs:
            written = pydicom.dcmread(spool.root / output.path)
            assert written.SpecificCharacterSet == ["", "ISO 2022 IR 87"], output.kind
            assert str(written.PatientName) == name, output.kind
            assert written.AccessionNumber in (None, ""), output.kind
    finally:
        worker.stop(10)
        engine.dispose()
