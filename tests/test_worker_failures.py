"""The worker when things break around a study: a decode or build process that dies, a claim
it cannot begin, a study's next revision claimed while the last one is still scored.

Each runs the real worker (demo model on the CPU, one decode process, SQLite) on synthetic
studies recorded as received; a dying process is a real one, killed by ``os._exit`` in a
pool job (:mod:`tests.crashing_jobs`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select

from tests import crashing_jobs
from triage.config import Config
from triage.scoring import worker as worker_module
from triage.scoring.worker import Worker, load_configured_model
from triage.store.models import Output, Study, StudyState, utcnow
from triage.store.repository import Store
from triage.store.spool import Spool
from triage.store.work_queue import WorkQueue
from triage.testing.received import local_worker_config, received_store, record_received
from triage.testing.synth import write_benchmark_files

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, **worker: Any) -> Config:
    return local_worker_config(
        tmp_path,
        model={"device": "cpu", "precision": "fp32", "batch_size": 2, "threads": 1},
        worker={"decode_processes": 1, "poll_interval_s": 0.05, **worker},
    )


@contextmanager
def _running(config: Config, files: list[Path]) -> Iterator[tuple[Store, Spool, Worker]]:
    """A started worker over a store with *files* received, and queued."""
    spool_dir = Path(config.store.spool_dir)
    engine, store, spool = received_store(config.store.url, spool_dir, files)
    worker = Worker(config, store, spool, load_configured_model(config))
    worker.warm_up()
    _queue(store)
    worker.start()
    try:
        yield store, spool, worker
    finally:
        worker.stop(10)
        engine.dispose()


def _queue(store: Store) -> None:
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))


def _study(store: Store, path: Path) -> Study:
    study = store.get_study(path.parent.name)
    assert study is not None
    return study


def _wait(what: str, check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _finished(store: Store, expected: dict[StudyState, int]) -> Callable[[], bool]:
    return lambda: store.counts_by_state() == expected


def test_a_decode_process_that_dies_fails_its_study_and_not_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, max_attempts=2)
    files = write_benchmark_files(config.store.spool_dir, 6, size_mb=0.25, views_per_study=2)
    poisoned = files[0]
    monkeypatch.setenv(crashing_jobs.DIE_DECODING, poisoned.parent.name)
    monkeypatch.setattr(worker_module, "decode_view", crashing_jobs.decode_view)
    with _running(config, files) as (store, _spool, _worker):
        _wait("every study to finish", _finished(store, {StudyState.DONE: 2, StudyState.FAILED: 1}))
        culprit = _study(store, poisoned)
        assert culprit.attempts == 2 and "decode process died" in culprit.state_reason
        for path in files[2::2]:
            # Their views waited behind the one that killed the process: never run, so given
            # back uncounted, and scored on the next claim.
            assert _study(store, path).attempts == 1


def test_with_several_decode_processes_only_the_culprit_is_charged_for_a_dead_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The views decoding beside the one that killed a process died with the pool: each is
    decoded again alone, and only the culprit's study counts the attempt."""
    config = _config(tmp_path, max_attempts=2, decode_processes=3, claim_batch=8)
    files = write_benchmark_files(config.store.spool_dir, 5, size_mb=0.25, views_per_study=1)
    poisoned = files[2]
    monkeypatch.setenv(crashing_jobs.DIE_DECODING, poisoned.parent.name)
    # The other views take their time, so that some are in their processes when it dies.
    monkeypatch.setenv(crashing_jobs.SLOW_DECODING_S, "1.0")
    monkeypatch.setattr(worker_module, "decode_view", crashing_jobs.decode_view)
    with _running(config, files) as (store, _spool, worker):
        _wait("every study to finish", _finished(store, {StudyState.DONE: 4, StudyState.FAILED: 1}))
        culprit = _study(store, poisoned)
        assert culprit.attempts == 2 and "decode process died" in culprit.state_reason
        for path in files[:2] + files[3:]:
            assert _study(store, path).attempts == 1
        assert worker._pool.restarts >= 2  # one per attempt of the culprit


def test_a_process_that_dies_building_outputs_is_replaced_before_the_next_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, max_attempts=1)
    spool_dir = Path(config.store.spool_dir)
    files = write_benchmark_files(spool_dir, 2, size_mb=0.25, views_per_study=1)
    poisoned, later = files
    monkeypatch.setenv(crashing_jobs.DIE_BUILDING, poisoned.parent.name)
    monkeypatch.setattr(worker_module, "encode_outputs", crashing_jobs.encode_outputs)
    with _running(config, [poisoned]) as (store, _spool, _worker):
        _wait("the poisoned study to fail", _finished(store, {StudyState.FAILED: 1}))
        assert "BrokenProcessPool" in _study(store, poisoned).state_reason
        # A study claimed after the crash is decoded by new processes, not failed by the
        # broken pool.
        record_received(store, spool_dir, [later])
        _queue(store)
        _wait("the later study", lambda: _study(store, later).state != StudyState.QUEUED)
        _wait(
            "the later study to be scored",
            _finished(store, {StudyState.FAILED: 1, StudyState.DONE: 1}),
        )
        assert _study(store, later).attempts == 1


def test_a_claim_that_cannot_be_begun_goes_back_and_the_rest_are_scored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default lease (120 s): a claim left out would wait that long; the test would not.
    config = _config(tmp_path)
    files = write_benchmark_files(config.store.spool_dir, 3, size_mb=0.25, views_per_study=1)
    decide = worker_module.decide_study
    calls: list[int] = []

    def fails_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:  # e.g. the store was gone for a moment
            raise OSError("the first claim cannot be begun")
        return decide(*args, **kwargs)

    monkeypatch.setattr(worker_module, "decide_study", fails_once)
    with _running(config, files) as (store, _spool, _worker):
        _wait("every study to be scored", _finished(store, {StudyState.DONE: 3}), timeout=60)
        attempts = sorted(_study(store, path).attempts for path in files)
        assert attempts == [1, 1, 2]  # the one that failed to begin counted its attempt


def test_the_next_revision_keeps_its_lease_when_the_last_one_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, lease_s=3.0)  # renewed every second
    spool_dir = Path(config.store.spool_dir)
    files = write_benchmark_files(spool_dir, 3, size_mb=0.25, views_per_study=3)
    first, late = files[:2], files[2:]
    with _running(config, first) as (store, _spool, worker):
        gates = [threading.Event(), threading.Event()]
        passes: list[int] = []
        start = worker.model.start

        def held(views: Any) -> Any:  # each forward pass waits for the test's word
            passes.append(len(views))
            gates[min(len(passes), 2) - 1].wait(60)
            return start(views)

        monkeypatch.setattr(worker.model, "start", held)
        _wait("revision 1's forward pass", lambda: passes)
        record_received(store, spool_dir, late)  # a late instance: revision 2
        _queue(store)
        worker.wake()
        _wait(
            "revision 2 claimed",
            lambda: (
                _study(store, late[0]).revision == 2
                and _study(store, late[0]).state == StudyState.SCORING
            ),
        )
        gates[0].set()  # revision 1 is scored, and its result discarded
        _wait("revision 2's forward pass", lambda: len(passes) >= 2)
        held_until = _study(store, late[0]).lease_expires_at
        time.sleep(2 * config.worker.lease_s)  # while revision 2 is still being scored
        assert WorkQueue(store).expire_leases(config.worker.max_attempts) == []
        assert _study(store, late[0]).lease_expires_at > held_until
        gates[1].set()
        _wait("revision 2 scored", _finished(store, {StudyState.DONE: 1}))
        study = _study(store, late[0])
        assert (study.revision, study.attempts) == (2, 1)
        # Revision 1's outputs went with its result: no row names them, nothing would ever
        # send or purge them.
        with store.read_session() as session:
            recorded = set(session.scalars(select(Output.path)))
        written = {str(p.relative_to(_spool.root)) for p in _spool.root.glob("outbox/*/*")}
        assert recorded and written == recorded


def test_a_stop_does_not_wait_for_the_decodes_of_the_studies_it_gives_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A GPU host's policy (outputs are built in the pool, never by the worker while the
    # model waits): the quick study's output job waits behind eight slow decodes when the
    # stop comes. Those studies are given back at the end of the grace; waiting for their
    # decodes too took the stop from 0.5 s of grace to about 12 s (minutes on a real host
    # with a full claim), past systemd's TimeoutStopSec.
    config = _config(tmp_path, claim_batch=8)
    spool_dir = Path(config.store.spool_dir)
    quick = write_benchmark_files(spool_dir, 1, size_mb=0.25, seed=1)
    slow = write_benchmark_files(spool_dir, 8, size_mb=0.25, views_per_study=2)
    monkeypatch.setenv(crashing_jobs.SLOW_DECODING_S, "1.5")
    monkeypatch.setenv(crashing_jobs.QUICK_STUDY, quick[0].parent.name)
    monkeypatch.setattr(worker_module, "decode_view", crashing_jobs.decode_view)
    engine, store, spool = received_store(config.store.url, spool_dir, quick + slow)
    try:
        worker = Worker(config, store, spool, load_configured_model(config))
        worker._build_while_starved = False
        worker.warm_up()
        _queue(store)  # the quick study is claimed, and decoded, first
        worker.start()
        _wait(
            "the quick study's outputs to wait for the pool", lambda: worker.load().outputs_waiting
        )
        started = time.monotonic()
        worker.stop(0.5)
        stopped_in = time.monotonic() - started
        assert stopped_in < 6, f"the stop took {stopped_in:.1f} s"
        for path in quick + slow[::2]:
            study = _study(store, path)
            assert (study.state, study.attempts) == (StudyState.QUEUED, 0)
    finally:
        engine.dispose()


@pytest.mark.parametrize("ends", ["while_the_pool_stops", "after_the_finishers_stop"])
def test_a_forward_that_outlasts_the_stop_neither_builds_outputs_nor_kills_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ends: str
) -> None:
    """SIGTERM during a forward pass longer than the grace: the stop gives its studies back.
    Ending while the pool stopped, the pass had their outputs built in the worker's process
    (the pool refused the jobs), one study at a time, holding the stop up for results the
    store refuses; ending after the finishers were shut down, it killed the batch thread."""
    from triage import metrics
    from triage.scoring.model import ScoringModel

    config = _config(tmp_path)
    config = replace(
        config,
        model=replace(config.model, batch_size=4, batch_wait_ms=2000),
        outputs=replace(config.outputs, overlays=True),
    )
    files = write_benchmark_files(config.store.spool_dir, 4, size_mb=0.25, views_per_study=1)
    engine, store, spool = received_store(config.store.url, Path(config.store.spool_dir), files)
    worker = Worker(config, store, spool, load_configured_model(config))
    start, pool_stop = ScoringModel.start, worker._pool.stop
    in_forward, delivered = threading.Event(), threading.Event()

    def long_forward(model: ScoringModel, views: Any) -> Any:
        in_forward.set()
        if ends == "while_the_pool_stops":
            _wait("the stop to give the studies back", worker._abandoned.is_set, 60)
        else:
            _wait("the finishers to stop", lambda: worker._finisher._shutdown, 60)
        try:
            return start(model, views)
        finally:
            delivered.set()

    def stop_pool(timeout: float) -> int:
        killed = pool_stop(timeout)
        if ends == "while_the_pool_stops":
            delivered.wait(60)
            time.sleep(0.5)  # its views are recorded, and the studies go to the finishers
        return killed

    def built_here() -> float:
        sample = ("triage_worker_outputs_built_total", {"where": "worker"})
        return metrics.REGISTRY.get_sample_value(*sample) or 0.0

    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    stopped = False
    try:
        worker.warm_up()
        monkeypatch.setattr(ScoringModel, "start", long_forward)
        monkeypatch.setattr(worker._pool, "stop", stop_pool)
        built_before = built_here()
        _queue(store)
        worker.start()
        assert in_forward.wait(60)
        worker.stop(0.5)
        stopped = True
        assert delivered.wait(60)
        for thread in worker._threads:
            thread.join(30)
        assert not died, died
        assert built_here() == built_before  # for studies given back
        for path in files:
            study = _study(store, path)
            assert (study.state, study.attempts) == (StudyState.QUEUED, 0)
    finally:
        if not stopped:  # no decode process left behind
            delivered.set()
            worker.stop(0)
        engine.dispose()


def test_a_study_uid_reused_for_another_patient_is_failed_not_scored(tmp_path: Path) -> None:
    # A modality or RIS that reuses a StudyInstanceUID: one result would mix two patients'
    # images under one patient's name. The operator is told; nothing is scored or sent.
    import pydicom

    config = _config(tmp_path)
    files = write_benchmark_files(config.store.spool_dir, 4, size_mb=0.25, views_per_study=2)
    other = pydicom.dcmread(files[1])
    other.PatientID = f"{other.PatientID}-OTHER"
    other.save_as(files[1])
    with _running(config, files) as (store, _spool, _worker):
        _wait("both studies", _finished(store, {StudyState.DONE: 1, StudyState.FAILED: 1}))
        mixed = _study(store, files[0])
        assert mixed.state is StudyState.FAILED and mixed.attempts == 1
        assert (
            "instances of 2 patients under one StudyInstanceUID (PatientID differs)"
            in mixed.state_reason
        )
        assert other.PatientID not in mixed.state_reason  # no identity in the reason either


def test_a_study_whose_files_cannot_be_read_is_failed_after_its_attempts_not_skipped(
    tmp_path: Path,
) -> None:
    # Deleted by hand, or on a disk that failed: "no views" (SKIPPED) filed it as out of
    # scope, with no word of the files; the operator must see it failed and why.
    config = _config(tmp_path, max_attempts=2)
    files = write_benchmark_files(config.store.spool_dir, 4, size_mb=0.25, views_per_study=2)
    spool_dir = Path(config.store.spool_dir)
    engine, store, spool = received_store(config.store.url, spool_dir, files)
    for path in files[:2]:
        path.unlink()
    worker = Worker(config, store, spool, load_configured_model(config))
    _queue(store)
    worker.start()
    try:
        _wait("both studies", _finished(store, {StudyState.DONE: 1, StudyState.FAILED: 1}))
    finally:
        worker.stop(10)
        engine.dispose()
    gone = _study(store, files[0])
    assert gone.attempts == 2
    assert "no instance could be read (2): unreadable: FileNotFoundError" in gone.state_reason


def test_a_decode_process_outlives_ctrl_c() -> None:
    # Ctrl-C in a terminal signals the whole process group; the worker then gives its
    # studies back without charging an attempt, which a decode process killed by the
    # KeyboardInterrupt would (a broken pool fails the studies it ran).
    import subprocess
    import sys

    script = (
        "import os, signal\n"
        "from triage.scoring.worker import _init_decode_process\n"
        "_init_decode_process()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('still decoding')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0 and "still decoding" in run.stdout, run.stderr


def test_outputs_without_room_give_the_study_back_uncounted_and_pause_claims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full (or read-only) outbox failed each study's attempts at once: three in a
    second, FAILED, for an operator to requeue when space was back. Now the study goes back
    to the queue without an attempt counted, and claims stop for a while."""
    import errno
    import os

    config = _config(tmp_path, max_attempts=2)
    files = write_benchmark_files(config.store.spool_dir, 1, size_mb=0.25, views_per_study=1)
    monkeypatch.setattr(worker_module, "_FIRST_CLAIM_PAUSE_S", 1.0)
    write = worker_module.write_outputs
    attempts: list[float] = []

    def full_disk_twice(*args: Any, **kwargs: Any) -> Any:
        attempts.append(time.monotonic())
        if len(attempts) <= 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(*args, **kwargs)

    monkeypatch.setattr(worker_module, "write_outputs", full_disk_twice)
    with _running(config, files) as (store, _spool, _worker):
        _wait("the study to be scored", _finished(store, {StudyState.DONE: 1}))
        assert _study(store, files[0]).attempts == 1  # the two without room did not count
    assert len(attempts) == 3
    # Claims paused 1 s after the first failure, then 2 s after the second.
    assert attempts[1] - attempts[0] >= 1.0 and attempts[2] - attempts[1] >= 2.0


def test_a_store_error_at_the_end_gives_the_study_back_once_the_store_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store failed as the result was written and again as the claim was given back:
    the study stayed SCORING for the whole lease (120 s), whose expiry counted an attempt.
    Three such blips FAILED a good study."""
    from sqlalchemy.exc import OperationalError

    config = _config(tmp_path, max_attempts=2)
    files = write_benchmark_files(config.store.spool_dir, 1, size_mb=0.25, views_per_study=1)
    complete, release = WorkQueue.complete, WorkQueue.release
    down = {"complete": 1, "release": 2}

    def blip(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if down[name] > 0:
                down[name] -= 1
                raise OperationalError("SELECT 1", {}, Exception("connection refused"))
            return original(*args, **kwargs)

        return call

    monkeypatch.setattr(WorkQueue, "complete", blip("complete", complete))
    monkeypatch.setattr(WorkQueue, "release", blip("release", release))
    started = time.monotonic()
    with _running(config, files) as (store, _spool, _worker):
        _wait("the study to be scored", _finished(store, {StudyState.DONE: 1}), timeout=60)
        assert _study(store, files[0]).attempts == 1
    assert time.monotonic() - started < 60  # not the lease's 120 s
    assert down == {"complete": 0, "release": 0}


def test_a_batch_the_device_has_no_memory_for_is_scored_in_halves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory for a whole batch (other processes on the GPU, a fragmented cache) is
    not the studies' fault: the batch is scored again in halves, down to single views."""
    from triage.scoring.model import ScoringModel

    config = local_worker_config(
        tmp_path,
        model={"device": "cpu", "precision": "fp32", "batch_size": 4, "threads": 1},
        worker={"decode_processes": 1, "poll_interval_s": 0.05},
    )
    config = replace(config, model=replace(config.model, batch_wait_ms=2000))
    files = write_benchmark_files(config.store.spool_dir, 6, size_mb=0.25, views_per_study=2)
    start = ScoringModel.start
    sizes: list[int] = []

    def short_of_memory(model: ScoringModel, views: Any) -> Any:
        sizes.append(len(views))
        if len(views) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return start(model, views)

    monkeypatch.setattr(ScoringModel, "start", short_of_memory)
    with _running(config, files) as (store, _spool, _worker):
        _wait("every study to be scored", _finished(store, {StudyState.DONE: 3}))
        assert all(_study(store, path).attempts == 1 for path in files[::2])
    assert max(sizes) > 2 and sizes.count(1) == 6


def test_a_single_view_the_device_has_no_memory_for_fails_its_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from triage.scoring.model import ScoringModel

    config = _config(tmp_path, max_attempts=1)
    files = write_benchmark_files(config.store.spool_dir, 1, size_mb=0.25, views_per_study=1)

    def no_memory(model: ScoringModel, views: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(ScoringModel, "start", no_memory)
    with _running(config, files) as (store, _spool, _worker):
        _wait("the study to fail", _finished(store, {StudyState.FAILED: 1}))
        assert "out of memory" in _study(store, files[0]).state_reason


def test_a_claim_the_store_answers_after_the_stop_goes_back_to_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow store can answer a claim after the stop has given the studies in flight back:
    that claim is given back too, not left SCORING until its lease expires."""
    config = _config(tmp_path)
    files = write_benchmark_files(config.store.spool_dir, 1, size_mb=0.25, views_per_study=1)
    claim = WorkQueue.claim
    in_the_store, answer = threading.Event(), threading.Event()

    def slow_claim(queue: WorkQueue, *args: Any, **kwargs: Any) -> Any:
        claims = claim(queue, *args, **kwargs)
        if claims:
            in_the_store.set()
            answer.wait(60)
        return claims

    monkeypatch.setattr(WorkQueue, "claim", slow_claim)
    engine, store, spool = received_store(config.store.url, Path(config.store.spool_dir), files)
    try:
        worker = Worker(config, store, spool, load_configured_model(config))
        worker.warm_up()
        _queue(store)
        worker.start()
        assert in_the_store.wait(60)
        worker.stop(0.5)
        answer.set()
        for thread in worker._threads:
            thread.join(30)
        study = _study(store, files[0])
        assert study.state == StudyState.QUEUED
        assert study.attempts == 0 and study.lease_owner is None  # given back, not expired
    finally:
        answer.set()
        engine.dispose()
