"""The worker: QUEUED studies → decoded views → batched forward passes → results and outputs.

Three stages run concurrently:

- the **claim loop** claims studies (with a lease), reads their headers, decides the study type
  (SKIPPED when it is not an upper-extremity radiograph) and hands every scorable view to a
  pool of decode **processes** (the GIL must not serialise decoding);
- the **batch loop** gathers decoded views of *any* studies into one batch (up to
  ``[model] batch_size``, waiting at most ``batch_wait_ms`` for a partial one) and takes each
  view's probability and CAM from the same forward pass (on a GPU, the next batch is staged
  and started before the last one's results are taken back);
- the **finisher** averages a study's views, builds the SR and overlays (in the pool, or in
  this process while the model has no view to score or, on the CPU, waits for one), and
  writes result, outputs and deliveries in one transaction. A failure is retried
  (``max_attempts``) and then the study is FAILED with the reason.
"""

from __future__ import annotations

import errno
import multiprocessing
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from queue import Empty, Queue
from typing import Any

import numpy as np
import torch
from pydicom import Dataset, dcmread
from sqlalchemy.exc import InterfaceError, OperationalError

from triage import failpoints, metrics
from triage.config import Config
from triage.dicom.sc import OverlayBox
from triage.dicom.sr import sr_sop_instance_uid
from triage.dicom.study_type import decide_study, patients_in, view_order
from triage.logs import (
    RepeatedFailure,
    configure_logging,
    error_text,
    get_logger,
    identity_values,
)
from triage.procutil import (
    die_with_parent,
    retain_freed_memory,
    size_primitive_cache,
    skip_collection_at_exit,
)
from triage.scoring.model import PendingForward, ScoringModel, resolve_device
from triage.scoring.outputs import (
    EncodedOutput,
    OutputRequest,
    StagedOutput,
    ViewPixels,
    commit_outputs,
    encode_outputs,
    stage_outputs,
    warm_up_builders,
    write_outputs,
)
from triage.scoring.pipe_reader import read_results_in_place, widen_pool_pipes
from triage.scoring.preprocess import DecodedView, UndecodableView, decode_view, init_decode_worker
from triage.scoring.priority_pool import BACKGROUND, URGENT, JobNotRun, PriorityPool
from triage.scoring.result import ModelInfo, SkippedView, StudyResult, ViewResult
from triage.store.repository import Store
from triage.store.spool import Spool
from triage.store.work_queue import Claim, OutputFile, WorkQueue, worker_id
from triage.study_types import StudyType

log = get_logger("triage.worker")

_HEARTBEAT_S = 10.0

#: The name of the thread that runs the forward passes (the model's thread on a CPU host).
BATCH_THREAD = "worker-batch"


def decode_process_count(configured: int, on_gpu: bool = False) -> int:
    """Decode processes: as configured, else from the cores and where the model runs.

    - on a GPU host, one per core but one: decoding is what limits the path there;
    - on a CPU host, the cores the model's threads leave (see :func:`torch_threads`): on 2
      vCPUs, 1 torch thread + 1 decode process. A spare process (3 CPU-bound parties on 2
      vCPUs) was measured both ways: up to 15% better in bf16 on one host (2026-11-29) and
      20–30% worse, in fp32 and bf16, in four interleaved runs each on another (2026-11-30),
      where the bf16 forward ran at 74–82 ms per view beside one decode process and 110–118
      ms beside two (bench/RESULTS.md). Not oversubscribing loses less where it loses.
    """
    if configured > 0:
        return configured
    cores = multiprocessing.cpu_count() or 2
    if on_gpu:
        return max(1, cores - 1)
    return max(1, cores - _cpu_model_threads(cores))


def _cpu_model_threads(cores: int) -> int:
    # Half the cores for the forward, half for decoding and outputs.
    return max(1, cores // 2)


def runs_on_gpu(config: Config) -> bool:
    """Whether the configured model device resolves to a GPU on this host."""
    try:
        return resolve_device(config.model.device).type == "cuda"
    except ValueError:  # cuda asked for without one: load_model says so
        return False


def _init_decode_process() -> None:
    """Decode processes die with the worker, keep freed memory for the next view (see
    :func:`~triage.procutil.retain_freed_memory`), use one torch thread each and exit
    without collecting their heap (:func:`~triage.procutil.skip_collection_at_exit`)."""
    die_with_parent(signal.SIGKILL)
    skip_collection_at_exit()
    # Ctrl-C reaches the whole process group: the worker gives its studies back itself; a
    # decode process dying of it would charge them a failed attempt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # likewise a terminal's hang-up
    retain_freed_memory()
    init_decode_worker()
    # Outputs are built here too: highdicom warns with the patient's name, pydicom logs the
    # values it cannot read. Their texts are withheld, as in the daemon (stderr is its own).
    configure_logging("warning", "json")


def _decode_executor(processes: int) -> ProcessPoolExecutor:
    """The executor of the worker's pool: *processes* decode processes."""
    # spawn, not fork: a forked child of a process that ran OpenMP threads can hang.
    executor = ProcessPoolExecutor(
        max_workers=processes,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_decode_process,
    )
    widen_pool_pipes(executor)
    read_results_in_place(executor)
    return executor


def _warm_process(config: Config, model: ModelInfo) -> bool:
    """Runs in a pool process: imports done by the initializer, output builders warmed."""
    warm_up_builders(config, model)
    return True


@dataclass
class _InFlight:
    """A claimed study on its way through the pipeline."""

    claim: Claim
    study_type: StudyType
    threshold: float
    headers: dict[str, Dataset]
    order: list[str]
    started: float
    pending: int
    scored: dict[str, ViewResult] = field(default_factory=dict)
    pixels: dict[str, ViewPixels] = field(default_factory=dict)
    skipped: list[SkippedView] = field(default_factory=list)
    error: str = ""
    #: Why the study goes back to the queue unscored, its attempt not counted (a view never
    #: ran to its end: the pool was stopped, or could not start a process).
    give_back: str = ""


@dataclass
class _Started:
    """A batch whose forward pass has started: its decoded views, the pass, when it started,
    and how many views it took from the decoded queue (undecodable ones included)."""

    ready: list[tuple[_InFlight, DecodedView]]
    pending: PendingForward
    at: float
    items: int


#: How long the worker stops claiming after a study's outputs found no room (ENOSPC, EROFS,
#: EDQUOT): doubled while it goes on, up to the last; reset by a study that completes.
_FIRST_CLAIM_PAUSE_S = 10.0
_LAST_CLAIM_PAUSE_S = 300.0
_OUT_OF_ROOM = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


def _is_out_of_room(exc: BaseException) -> bool:
    """Whether *exc* says the spool cannot take more (full, read-only, over quota)."""
    return isinstance(exc, OSError) and exc.errno in _OUT_OF_ROOM


def _out_of_memory(exc: BaseException) -> bool:
    """Whether *exc* says the device had no memory for a forward pass: CUDA's out of memory,
    or the CPU allocator's refusal. A batch of many large-input views can fail so where each
    half would not (other processes on the GPU, a fragmented cache)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _is_store_error(exc: BaseException) -> bool:
    """Whether *exc* says the store could not be reached or used (down, cut, timed out):
    not a constraint or a statement it refused, which would fail the same way each time."""
    return isinstance(exc, (OperationalError, InterfaceError))


class Worker:
    """Scores queued studies until stopped; safe to run next to other workers on PostgreSQL."""

    def __init__(
        self,
        config: Config,
        store: Store,
        spool: Spool,
        model: ScoringModel,
        on_scored: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.spool = spool
        self.model = model
        self.queue = WorkQueue(store)
        self.owner = worker_id()
        self.on_scored = on_scored
        # By claim token: a study's next revision may be claimed while the last one is
        # still on its way through (its result is then discarded).
        self._in_flight: dict[str, _InFlight] = {}
        self._lock = threading.Lock()
        # Claims to give back once the store answers again (it failed when they were done).
        self._to_give_back: dict[str, tuple[Claim, str]] = {}
        # No claims before this (monotonic) while the spool cannot take outputs.
        self._claims_paused_until = 0.0
        self._claim_pause_s = _FIRST_CLAIM_PAUSE_S
        self._decoded: Queue[tuple[_InFlight, str, Future[DecodedView]]] = Queue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._abandoned = threading.Event()  # set once stop() has given the rest back
        self._threads: list[threading.Thread] = []
        self._processes = decode_process_count(
            config.worker.decode_processes, on_gpu=model.device.type == "cuda"
        )
        # Finishing waits on output building in the pool, then on the disk (fsyncs of the
        # outbox files): two per pool process, so a process builds while a study is written,
        # and one that builds in this process while the model has nothing to do.
        self._finisher = ThreadPoolExecutor(
            max_workers=2 * self._processes + 1, thread_name_prefix="finish"
        )
        # Views handed to the decode processes and not yet through the forward pass: while
        # there are none (or, below, while a CPU model waits for one) the model's CPU is idle
        # and outputs may be built here, one study at a time. The condition is notified when
        # either changes or an output job ends.
        self._unscored = 0
        self._building_here = False
        self._model_idle = threading.Condition()
        # On a CPU host the model's cores are idle also while the batch loop waits for the
        # next decoded view: the decode processes are the limit then, and a study's outputs
        # built here leave them more time to decode. Not on a GPU host: there this process
        # (its GIL) is what limits the path, and the model waiting for decodes is the rule.
        self._build_while_starved = model.device.type == "cpu"
        self._starved = False
        # On a GPU the next batch is staged and started while the last one runs (the forward
        # pass returns at once there); on a CPU the pass is done when it returns, and holding
        # its results back would only delay them.
        self._pipelined = model.device.type == "cuda"
        self._last_delivered = 0.0  # monotonic
        # Decodes (the model waits for them) go before SR and overlay building.
        self._pool = PriorityPool(_decode_executor, self._processes)
        self._warm = False

    # --- life cycle ---------------------------------------------------------------------

    def warm_up(self) -> None:
        """Start every decode process and run one forward pass, so the first study does not
        pay for process start-up, imports and lazy initialisation."""
        started = time.monotonic()
        warmers = [
            self._pool.submit(URGENT, _warm_process, self.config, self.model.info)
            for _ in range(self._processes)
        ]
        self.model.warm_up(self.config.model.batch_size)
        # Outputs are built here too when the model has nothing to do (_in_pool_or_here).
        warm_up_builders(self.config, self.model.info)
        for warmer in warmers:
            warmer.result()
        self._warm = True
        log.info("worker_warm", seconds=round(time.monotonic() - started, 2))

    def start(self) -> None:
        """Warm up (unless :meth:`warm_up` already ran), then start the claim and batch loops."""
        if not self._warm:
            self.warm_up()
        self.queue.heartbeat(self.owner, str(self.model.device), self.model.info.version)
        for target, name in (
            (self._claim_loop, "worker-claim"),
            (self._batch_loop, BATCH_THREAD),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "worker_started",
            worker=self.owner,
            device=str(self.model.device),
            precision=self.model.precision,
            traced=self.model.traced,
            batch_size=self.config.model.batch_size,
            decode_processes=self._processes,
            model=self.model.info.name,
            model_version=self.model.info.version,
        )

    @property
    def decode_processes(self) -> int:
        """How many processes decode pixel data."""
        return self._processes

    def load(self) -> metrics.WorkerLoad:
        """What the worker has in hand now (the ``triage_worker_*`` gauges)."""
        with self._lock:
            in_flight = len(self._in_flight)
        with self._model_idle:
            views = max(0, self._unscored)
        pool = self._pool
        return metrics.WorkerLoad(
            studies_in_flight=in_flight,
            views_waiting=views,
            decodes_waiting=pool.waiting(URGENT),
            outputs_waiting=pool.waiting(BACKGROUND),
            decode_processes=self._processes,
        )

    def wake(self) -> None:
        """Studies were queued: claim now instead of at the next poll."""
        self._wake.set()

    def alive(self) -> bool:
        """True while both loops run."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def begin_stop(self) -> None:
        """Stop claiming; studies in flight go on (:meth:`stop` waits for them)."""
        self._stop.set()
        self._wake.set()

    def stop(self, grace_s: float = 30.0) -> None:
        """Stop claiming, let studies in flight finish for *grace_s*, give the rest back."""
        self.begin_stop()
        deadline = time.monotonic() + grace_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        for thread in self._threads:
            thread.join(max(0.1, deadline - time.monotonic()))
        with self._lock:
            leftovers = list(self._in_flight.values())
            self._in_flight.clear()
            deferred = list(self._to_give_back.values())
            self._to_give_back.clear()
        returns = [(s.claim, "worker stopped") for s in leftovers] + deferred
        for claim, reason in returns:
            try:
                self.queue.release(claim, reason)
            except Exception as exc:  # the store is down: the lease expires instead
                log.error("give_back_failed", study_uid=claim.study_uid, error=str(exc))
        # The finishers still running are finishing given-back studies, whose results the
        # store would refuse. Their output jobs wait behind every decode left in the pool (a
        # claim's worth of views, minutes on a slow host): cancelled, so the stop stays
        # within the grace plus the one job each pool process is running.
        self._abandoned.set()
        # The jobs still running end by the deadline (at least a moment more, for a decode
        # or an output begun at its edge) or their processes are killed: the finishers wait
        # on them, and the daemon's exit on their processes.
        killed = self._pool.stop(max(2.0, deadline - time.monotonic()))
        if killed:
            log.warning("decode_processes_killed", count=killed, reason="still busy at stop")
        self._finisher.shutdown(wait=True)
        try:
            self.queue.worker_stopped(self.owner)
        except Exception as exc:  # admin shows the worker stale, not stopped; nothing is lost
            log.warning("worker_stop_not_recorded", worker=self.owner, error=str(exc))
        log.info("worker_stopped", worker=self.owner, released=len(leftovers))

    # --- claiming -----------------------------------------------------------------------

    def _claim_loop(self) -> None:
        last_renew = last_heartbeat = time.monotonic()
        renew_every = self.config.worker.lease_s / 3
        failures = RepeatedFailure(log, "claim_loop_error", "claim_loop_recovered")
        while not self._stop.is_set():
            claimed = 0
            try:
                self._give_back_pending()
                room = self.config.worker.claim_batch - len(self._in_flight)
                if room > 0 and time.monotonic() >= self._claims_paused_until:
                    claims = self.queue.claim(self.owner, room, self.config.worker.lease_s)
                    claimed = len(claims)
                    for claim in claims:
                        if self._stop.is_set():
                            # The stop came while the store answered (a slow store can outlast
                            # the whole grace): begun now, nothing would ever give it back.
                            self._give_back(claim, "worker stopped")
                        else:
                            self._begin_or_give_back(claim)
                now = time.monotonic()
                if now - last_renew > renew_every:
                    with self._lock:
                        claims = [s.claim for s in self._in_flight.values()]
                        claims += [claim for claim, _ in self._to_give_back.values()]
                    self.queue.renew(claims, self.config.worker.lease_s)
                    last_renew = now
                if now - last_heartbeat > _HEARTBEAT_S:
                    self.queue.heartbeat(
                        self.owner, str(self.model.device), self.model.info.version
                    )
                    last_heartbeat = now
                failures.succeeded()
            except Exception as exc:  # the store may be down for a while: keep trying
                # The store holds no patient identity: its errors are logged whole.
                failures.failed(f"{type(exc).__name__}: {exc}")
            if claimed == 0:
                self._wake.wait(self.config.worker.poll_interval_s)
                self._wake.clear()

    def _begin_or_give_back(self, claim: Claim) -> None:
        """:meth:`_begin`; a claim it fails on goes back to the queue (the attempt counts, so
        a study that always fails here ends FAILED) and the next claims are begun all the
        same, not left to wait for their leases to expire."""
        try:
            self._begin(claim)
        except Exception as exc:
            reason = error_text(exc)
            log.error(
                "claim_begin_failed",
                study_uid=claim.study_uid,
                revision=claim.revision,
                error=reason,
            )
            with self._lock:
                self._in_flight.pop(claim.token, None)
            try:
                self.queue.fail_attempt(claim, reason, self.config.worker.max_attempts)
            except Exception as store_exc:  # the store is down: the lease expires instead
                log.error("give_back_failed", study_uid=claim.study_uid, error=str(store_exc))

    def _begin(self, claim: Claim) -> None:
        bound = log.bind(study_uid=claim.study_uid, revision=claim.revision)
        headers: dict[str, Dataset] = {}
        skipped: list[SkippedView] = []
        paths = {}
        for instance in claim.instances:
            try:
                headers[instance.sop_instance_uid] = dcmread(
                    self.spool.path(instance.path), stop_before_pixels=True
                )
                paths[instance.sop_instance_uid] = instance.path
            except Exception as exc:
                reason = f"unreadable: {error_text(exc)}"
                skipped.append(SkippedView(instance.sop_instance_uid, reason))
        if skipped and not headers:
            # Nothing tells what the study is: SKIPPED ("no views") would file an unscored
            # study as out of scope. Retried (a disk that failed may come back), then FAILED.
            reason = f"no instance could be read ({len(skipped)}): {skipped[0].reason}"
            state = self.queue.fail_attempt(claim, reason, self.config.worker.max_attempts)
            if state is not None:
                bound.error("study_unreadable", instances=len(skipped), state=state.value)
            return
        patients = patients_in(headers.values())
        if patients > 1:
            # One result would mix two patients' images, and the SR would name one of them.
            reason = (
                f"instances of {patients} patients under one StudyInstanceUID (PatientID "
                "differs): not scored; correct the study at its source, then cancel it here"
            )
            if self.queue.fail_attempt(claim, reason, max_attempts=1):
                bound.error("study_of_several_patients", patients=patients)
            return
        # In reading order, not arrival order: a tie in the study-type vote goes to the first
        # view, which must not depend on the order the PACS sent them (nor differ from
        # `triage evaluate`, whose loader sorts the same way).
        ordered = sorted(headers.values(), key=view_order)
        decision = decide_study(ordered, covered=self.model.card.study_types)
        if decision.study_type is None:
            if self.queue.skip(claim, decision.reason):
                bound.info("study_skipped", reason=decision.reason)
            return
        skipped += [SkippedView(v.sop_instance_uid, v.reason) for v in decision.skipped_views]
        scored_uids = list(decision.scored_uids)
        study = _InFlight(
            claim=claim,
            study_type=decision.study_type,
            threshold=self.model.card.threshold_for(decision.study_type),
            headers=headers,
            order=scored_uids,
            started=time.monotonic(),
            pending=len(scored_uids),
            skipped=skipped,
        )
        with self._lock:
            self._in_flight[claim.token] = study
        bound.info(
            "study_claimed",
            study_type=decision.study_type.value,
            views=len(scored_uids),
            attempt=claim.attempt,
        )
        card = self.model
        with self._model_idle:
            self._unscored += len(scored_uids)
        # Display images are made at the size the overlays draw them (none without overlays).
        outputs = self.config.outputs
        box = OverlayBox(card.info, outputs.max_side) if outputs.overlays else None
        for uid in scored_uids:
            future = self._pool.submit(
                URGENT,
                decode_view,
                str(self.spool.path(paths[uid])),
                card.input_size,
                card.mean,
                card.std,
                0,
                box,
            )
            future.add_done_callback(lambda f, s=study, u=uid: self._decoded.put((s, u, f)))

    # --- batching -----------------------------------------------------------------------

    def _next_batch(self) -> list[tuple[_InFlight, str, Future[DecodedView]]]:
        try:
            first = self._decoded.get_nowait()
        except Empty:
            self._set_starved(True)
            try:
                first = self._decoded.get(timeout=0.2)
            except Empty:
                return []
            finally:
                self._set_starved(False)
        batch = [first]
        deadline = time.monotonic() + self.config.model.batch_wait_ms / 1000
        while len(batch) < self.config.model.batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._decoded.get(timeout=remaining)
                    if remaining > 0
                    else self._decoded.get_nowait()
                )
            except Empty:
                break
        return batch

    def _batch_loop(self) -> None:
        running: _Started | None = None  # a GPU batch started and not yet delivered
        while not (self._stop.is_set() and not self._in_flight):
            if running is not None and self._decoded.empty():
                # Nothing to stage meanwhile: its results are not held while the loop waits.
                self._deliver(running)
                running = None
            items = self._next_batch()
            if not items:
                continue
            started = self._start(self._decoded_views(items), len(items))
            if running is not None:
                self._deliver(running)
                running = None
            if started is not None and self._pipelined:
                running = started
            elif started is not None:
                self._deliver(started)
        if running is not None:
            self._deliver(running)

    def _decoded_views(
        self, items: list[tuple[_InFlight, str, Future[DecodedView]]]
    ) -> list[tuple[_InFlight, DecodedView]]:
        """The views of *items* that decoded; the others are recorded on their studies."""
        ready: list[tuple[_InFlight, DecodedView]] = []
        for study, uid, future in items:
            try:
                ready.append((study, future.result()))
            except UndecodableView as exc:
                study.skipped.append(SkippedView(uid, f"undecodable: {exc.reason}"))
                self._view_done(study)
            except BrokenProcessPool:  # it killed a process alone (see PriorityPool)
                study.error = "a decode process died while it decoded a view of this study"
                self._view_done(study)
            except JobNotRun as exc:
                study.give_back = f"the view was not decoded: {exc}"
                self._view_done(study)
            except Exception as exc:
                study.error = f"decoding failed: {error_text(exc)}"
                self._view_done(study)
        return ready

    def _set_starved(self, starved: bool) -> None:
        """The batch loop waits (or no longer waits) for a decoded view."""
        if not self._build_while_starved:
            return
        with self._model_idle:
            self._starved = starved
            if starved:
                self._model_idle.notify_all()

    def _model_has_nothing_to_do(self) -> bool:
        """No view is left to decode or score, or (CPU model) the batch loop waits for one.
        Called with ``_model_idle`` held."""
        return self._unscored <= 0 or self._starved

    def _views_scored(self, count: int) -> None:
        """*count* views left the model's queue (scored, or undecodable): once none is left,
        finishers waiting for the pool may build their outputs here."""
        with self._model_idle:
            self._unscored -= count
            if self._unscored <= 0:
                self._model_idle.notify_all()

    def _start(self, ready: list[tuple[_InFlight, DecodedView]], items: int) -> _Started | None:
        """Start the forward pass of the decoded views *ready* (of *items* taken from the
        queue); None when there is none to deliver (no view decoded, or the pass failed to
        start: recorded on the studies)."""
        started = time.monotonic()
        try:
            # Grey views, normalised by the model on its device (a third of the bytes).
            pending = self.model.start([view.grey for _, view in ready]) if ready else None
        except Exception as exc:
            self._forward_failed(ready, exc)
            pending = None
        if pending is None:
            self._views_scored(items)
            return None
        return _Started(ready, pending, started, items)

    def _forward_failed(self, ready: list[tuple[_InFlight, DecodedView]], exc: Exception) -> None:
        """Record *exc*, the failure of *ready*'s forward pass, on their studies; a batch the
        device had no memory for is scored again in halves first (see :func:`_out_of_memory`),
        so that only a view too large on its own fails its study."""
        if _out_of_memory(exc) and len(ready) > 1:
            log.warning("forward_out_of_memory", views=len(ready), retry="in halves")
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()  # the failed pass's blocks, for the halves
            half = len(ready) // 2
            for part in (ready[:half], ready[half:]):
                try:
                    pending = self.model.start([view.grey for _, view in part])
                except Exception as part_exc:
                    self._forward_failed(part, part_exc)
                else:  # items: the caller counts the views out of the model's queue
                    self._record(_Started(part, pending, time.monotonic(), items=0))
            return
        log.exception("forward_failed", views=len(ready))  # called while *exc* is handled
        for study, _view in ready:
            study.error = f"model forward failed: {error_text(exc)}"
            self._view_done(study)

    def _deliver(self, started: _Started) -> None:
        """Wait for *started*'s forward pass and record its views' results."""
        try:
            self._record(started)
        finally:
            self._views_scored(started.items)

    def _record(self, started: _Started) -> None:
        ready = started.ready
        try:
            logits, cams = started.pending.result()
        except Exception as exc:
            self._forward_failed(ready, exc)
            return
        probabilities = torch.sigmoid(logits).tolist()
        logit_values = logits.tolist()
        cam_arrays = cams.numpy()
        # With a batch in flight, counted from the last batch's delivery when that was later
        # than this one's start, so that the model's busy time is not counted twice.
        now = time.monotonic()
        metrics.observe_views(now - max(started.at, self._last_delivered), len(ready))
        self._last_delivered = now
        scored = zip(ready, probabilities, logit_values, cam_arrays, strict=True)
        for (study, view), probability, logit, cam in scored:
            uid = view.sop_instance_uid
            study.scored[uid] = ViewResult(
                uid, float(probability), np.array(cam), view.note, float(logit)
            )
            study.pixels[uid] = ViewPixels(
                study.headers[uid], view.display, (view.rows, view.columns)
            )
            self._view_done(study)

    def _view_done(self, study: _InFlight) -> None:
        study.pending -= 1
        if study.pending == 0:
            try:
                self._finisher.submit(self._finish, study)
            except RuntimeError:
                # A forward pass that outlasted the stop's grace: the stop gave the study back
                # and shut the finishers down meanwhile. Raised, it killed the batch thread.
                if not self._abandoned.is_set():
                    raise

    # --- finishing ----------------------------------------------------------------------

    def _finish(self, study: _InFlight) -> None:
        claim = study.claim
        bound = log.bind(study_uid=claim.study_uid, revision=claim.revision)
        try:
            if study.error:
                raise RuntimeError(study.error)
            if study.give_back:
                if self.queue.release(claim, study.give_back):
                    bound.info("study_given_back", reason=study.give_back)
                return
            views = tuple(study.scored[uid] for uid in study.order if uid in study.scored)
            if not views:
                reasons = "; ".join(s.reason for s in study.skipped) or "no views"
                self.queue.fail_attempt(
                    claim, f"no view could be scored: {reasons}", max_attempts=1
                )
                bound.warning("study_failed", reason="no view could be scored")
                return
            probability = float(np.mean([v.probability for v in views]))
            result = StudyResult(
                study_uid=claim.study_uid,
                revision=claim.revision,
                study_type=study.study_type,
                probability=probability,
                threshold=study.threshold,
                views=views,
                skipped_views=tuple(study.skipped),
            )
            info = self.model.info
            outputs = self._build_outputs(study, result, info)
            failpoints.hit("before_complete")
            elapsed_ms = (time.monotonic() - study.started) * 1000
            destinations = [d.name for d in self.config.destinations]
            if not self.queue.complete(claim, result, info, outputs, destinations, elapsed_ms):
                # No row names these files: nothing would send them, and only the purge
                # would remove them, with the study, weeks from now.
                for path in self.queue.discardable_outputs(claim, [o.path for o in outputs]):
                    self.spool.remove(path)
                bound.info("result_discarded", reason="study changed while it was scored")
                return
            self._claim_pause_s = _FIRST_CLAIM_PAUSE_S
            metrics.STUDY_SCORING_SECONDS.observe(elapsed_ms / 1000)
            if not (outputs and destinations):  # complete() made it DONE: nothing to send
                metrics.observe_study_done(self.queue.store, claim.study_uid)
            bound.info(
                "study_scored",
                study_type=study.study_type.value,
                probability=round(probability, 4),
                abnormal=result.abnormal,
                threshold=study.threshold,
                views=len(views),
                skipped_views=len(study.skipped),
                outputs=len(outputs),
                ms=round(elapsed_ms, 1),
            )
            if self.on_scored:
                self.on_scored()
        except Exception as exc:
            if self._abandoned.is_set() and isinstance(exc, CancelledError):
                bound.info("study_given_back", reason="worker stopped")
                return
            reason = error_text(exc, identity_values(study.headers.values()))
            if _is_out_of_room(exc) or _is_store_error(exc):
                # Ours, not the study's: given back without an attempt counted. Three disk-full
                # or store blips FAILED a good study in a second, for an operator to requeue.
                bound.warning("scoring_interrupted", error=reason)
                if _is_out_of_room(exc):
                    self._pause_claims(reason)
                self._give_back(claim, f"given back: {reason}")
                return
            try:
                state = self.queue.fail_attempt(claim, reason, self.config.worker.max_attempts)
            except Exception as store_exc:  # the store is down: the lease expires instead
                bound.error("scoring_failed", error=reason, state=None, store_error=str(store_exc))
            else:
                bound.error("scoring_failed", error=reason, state=state.value if state else None)
        finally:
            with self._lock:
                self._in_flight.pop(claim.token, None)
            self._wake.set()

    def _give_back(self, claim: Claim, reason: str) -> None:
        """Return *claim* to the queue without counting its attempt, now or, while the store
        does not answer, from the claim loop once it does (its lease renewed meanwhile: left
        to expire, the study waited out the whole lease and the expiry counted an attempt)."""
        try:
            self.queue.release(claim, reason)
        except Exception as exc:
            with self._lock:
                self._to_give_back[claim.token] = (claim, reason)
            log.warning(
                "give_back_deferred",
                study_uid=claim.study_uid,
                revision=claim.revision,
                error=f"{type(exc).__name__}: {exc}",
            )

    def _give_back_pending(self) -> None:
        with self._lock:
            pending = list(self._to_give_back.items())
        for token, (claim, reason) in pending:
            self.queue.release(claim, reason)  # raises while the store is still down
            with self._lock:
                self._to_give_back.pop(token, None)
            log.info("study_given_back", study_uid=claim.study_uid, reason=reason)

    def _pause_claims(self, reason: str) -> None:
        """No new claims for a while: each would fail the same way until space is freed."""
        seconds = self._claim_pause_s
        self._claims_paused_until = time.monotonic() + seconds
        self._claim_pause_s = min(seconds * 2, _LAST_CLAIM_PAUSE_S)
        log.error("claims_paused", seconds=seconds, reason=reason)

    def _build_outputs(
        self, study: _InFlight, result: StudyResult, info: ModelInfo
    ) -> list[OutputFile]:
        """The study's SR and overlays, built in the pool and durable in the outbox.

        Who writes the files depends on where the spare CPU is. With one decode process
        beside the model (a small CPU host) that process is the path's busiest party, and
        writing ~2.4 MB per view into the page cache there (1–7 ms of kernel time per view
        on the VMs measured) slowed the whole path: it sends the bytes and a finisher thread
        writes them. With several (a GPU host) the worker's one process would carry every
        output through a pipe and onto the disk: the pool processes write what they build
        and the worker only makes it durable.
        """
        request = OutputRequest(
            self.config,
            self.spool,
            result,
            info,
            study.pixels,
            self.queue.previous_sr(study.claim, sr_sop_instance_uid(result, info)),
        )
        if self._processes > 1:
            request = replace(request, stage_prefix=f"{uuid.uuid4().hex[:16]}-")
            try:
                staged: list[StagedOutput] = self._in_pool_or_here(stage_outputs, request)
            except BaseException:
                # A pool process that died while it wrote them cannot remove its files.
                self.spool.discard_staged(request.stage_prefix)
                raise
            return commit_outputs(self.spool, staged)
        encoded: list[EncodedOutput] = self._in_pool_or_here(encode_outputs, request)
        return write_outputs(self.spool, encoded)

    def _in_pool_or_here(
        self, build: Callable[[OutputRequest], Any], request: OutputRequest
    ) -> Any:
        """``build(request)`` in a pool process, or in this one if the model goes idle first.

        Building waits behind every decode in the pool, which is what keeps the model fed; so
        a burst of studies ends with the pool building the last studies' outputs one after
        another while the CPU the model used has nothing to do (0.4–0.6 s of a 64-study burst
        of 4.5 s on 2 vCPUs). A job still waiting for a pool process once no view is left for
        the model is taken back and built in this thread (one at a time: building holds the
        GIL most of the time); that tail then took 0.3 s.

        A CPU model also goes idle mid-burst when decoding is the limit (large views, or a
        forward faster than decoding): the batch loop waits for the next decoded view
        while output jobs wait behind the decodes. A job is taken back then too, so the pool
        decodes instead of building and the model's cores build; a forward that starts while
        one is built here shares the CPU with it for that one study. On 2 vCPUs with 72 MB
        views (decode-bound): +1.6 to +8 % views/s; with 10 MB views (model-bound) it rarely
        happens. Not for a GPU model (see ``_build_while_starved``).
        """
        future: Future[Any] = self._pool.submit(BACKGROUND, build, request)
        future.add_done_callback(self._wake_finishers)
        with self._model_idle:
            while not future.done() and (
                self._building_here or not self._model_has_nothing_to_do()
            ):
                self._model_idle.wait()
            # cancel() fails once a pool process has the job: then it is built there.
            take_back = not future.done() and future.cancel()
            if take_back:  # (when not, another finisher may be building here)
                self._building_here = True
        if not take_back:
            try:
                built = future.result()
            except JobNotRun:  # the pool was stopped, or could not start a process
                if self._abandoned.is_set():
                    # Stopped: the study was given back, and its outputs built here would
                    # only hold the stop up (one study at a time) to be refused by the store.
                    raise CancelledError() from None
                with self._model_idle:
                    while self._building_here:
                        self._model_idle.wait()
                    self._building_here = True
            else:
                metrics.OUTPUTS_BUILT.labels("decode_process").inc()
                return built
        try:
            built = build(request)
            metrics.OUTPUTS_BUILT.labels("worker").inc()
            return built
        finally:
            with self._model_idle:
                self._building_here = False
                self._model_idle.notify_all()

    def _wake_finishers(self, _job: Future[Any]) -> None:
        """An output job ended: a finisher waiting for it, or to build here, looks again."""
        with self._model_idle:
            self._model_idle.notify_all()


def torch_threads(config: Config) -> int:
    """CPU threads for the model: as configured; else one on a GPU host, and on a CPU host
    the cores the configured decode processes leave, or half the cores by default (see
    :func:`decode_process_count`).

    torch's default (every core) fights the decode processes for the same cores: on a shared
    2-core host a batch-1 forward took 3.7 s with 2 threads and 0.25 s with 1.
    """
    if config.model.threads > 0:
        return config.model.threads
    cores = multiprocessing.cpu_count() or 1
    if runs_on_gpu(config):
        return 1  # the forward runs on the GPU; the cores decode
    if config.worker.decode_processes > 0:
        return max(1, cores - config.worker.decode_processes)
    return _cpu_model_threads(cores)


class ModelRefused(RuntimeError):
    """The configured model may not run here; the message is one line for the operator."""


def load_configured_model(config: Config) -> ScoringModel:
    """Load the model the config names, refusing an unvalidated one unless allowed."""
    from triage.scoring.card import load_card
    from triage.scoring.model import load_model

    card = load_card(config.model.card)
    if not card.validated and not config.model.allow_unvalidated:
        raise ModelRefused(
            f"model {card.name} {card.version} is not validated; set [model] allow_unvalidated"
            " = true to run it anyway (not for clinical use)"
        )
    torch.set_num_threads(torch_threads(config))
    retain_freed_memory()
    size_primitive_cache(config.model.batch_size)  # before the first forward pass
    model = load_model(
        card,
        device=config.model.device,
        precision=config.model.precision,
        compile=config.model.compile,
        cpu_graph=config.model.cpu_graph,
    )
    if not card.validated:
        log.warning(
            "unvalidated_model_in_use",
            model=card.name,
            version=card.version,
            note="results are labelled NOT VALIDATED; not for clinical use",
        )
    return model
