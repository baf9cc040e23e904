"""Scoring benchmark: the daemon's scoring path against the bare model, same run, same batch.

- **bare model**: torchvision DenseNet-169 forward on ready tensors (no decoding, no CAM, no
  store), at the batch size and precision the worker uses;
- **scoring path**: the worker as the daemon runs it — spool files → decode processes → batched
  forward with CAM → SR and CAM overlays written to the outbox → result rows committed — timed
  from the first claim to the last study DONE, with and without overlay images.

A burst of studies starts with the model waiting for its first decoded views and ends with the
decode processes building the last studies' SRs and overlays while the model idles (~0.2 s
and ~1 s on 2 vCPUs). 64 studies keep those ends to about a sixth of the run, so the figure is
close to what a steadily fed daemon does; 24 (the earlier default) made them a third.

    python -m bench.scoring --studies 64 --views 2 --size-mb 10 --batch 16
    python -m bench.scoring --device cuda --batch 256 --studies 1000 --size-mb 2   # on a GPU host
    python -m bench.scoring --device cuda --batch 256 --studies 1000 --size-mb 2 --compile

On a lent GPU machine these run through ``bench/gpu_run.sh`` (with the wheels of
``bench/gpu_wheels.sh``). ``--compile`` runs the worker's model through ``torch.compile``
(``[model] compile``): the model is loaded once and shared by the model-stage row and both
paths, so its one graph is compiled once (~90 s on an H200); the bare model is then compiled
too, with static shapes, as the reference for the worker's graph (another ~90 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import platform
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from bench.cpu_account import CpuPerView, CpuSnapshot, process_tree_cpu_s  # noqa: E402
from triage.config import Config, load_config  # noqa: E402
from triage.procutil import retain_freed_memory, size_primitive_cache  # noqa: E402
from triage.scoring.card import load_card  # noqa: E402
from triage.scoring.model import ScoringModel, _load_weights, load_model  # noqa: E402
from triage.scoring.worker import (  # noqa: E402
    BATCH_THREAD,
    Worker,
    load_configured_model,
    torch_threads,
)
from triage.store.models import StudyState, utcnow  # noqa: E402
from triage.store.repository import Store  # noqa: E402
from triage.store.spool import Spool  # noqa: E402
from triage.testing.received import local_worker_config, received_store  # noqa: E402
from triage.testing.synth import write_benchmark_files  # noqa: E402


def bare_model(
    card_path: str, device: str, precision: str, batch: int, images: int, compile: bool = False
) -> float:
    """Images/s of a plain torchvision forward (the model loaded the way the worker loads it);
    *compile*: through ``torch.compile`` with every shape static (built by the warm-up), the
    reference for a worker that compiles its model."""
    card = load_card(card_path)
    scoring = load_model(card, device=device, precision=precision)
    net: torch.nn.Module = _load_weights(card).eval().to(scoring.device)
    dtype = torch.bfloat16 if scoring.precision == "bf16" else torch.float32
    fmt = torch.channels_last if scoring.channels_last else torch.contiguous_format
    on_cuda = scoring.device.type == "cuda"
    if on_cuda and dtype == torch.bfloat16:
        net = net.to(dtype)
    net = net.to(memory_format=fmt)
    forward = cast(torch.nn.Module, torch.compile(net)) if compile else net
    x = torch.randn(batch, 3, card.input_size, card.input_size).to(scoring.device)
    x = x.to(dtype if on_cuda else torch.float32).contiguous(memory_format=fmt)
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if scoring.precision == "bf16" and not on_cuda
        else torch.autocast("cpu", enabled=False)
    )

    def run() -> None:
        with torch.inference_mode(), autocast:
            forward(x)
        if on_cuda:
            torch.cuda.synchronize()

    run()  # warm-up
    rounds = max(1, images // batch)
    start = time.perf_counter()
    for _ in range(rounds):
        run()
    return rounds * batch / (time.perf_counter() - start)


def compiled_reference(args: argparse.Namespace, card: str, images: int) -> float | None:
    """Views/s of the bare model through ``torch.compile`` at ``--batch``, every shape static
    (the worker's graph has a dynamic batch dimension); None, with the error printed, when
    it cannot be built."""
    try:
        return bare_model(card, args.device, args.precision, args.batch, images, compile=True)
    except Exception as exc:  # a compiler failure: say so, keep the run's other figures
        print(f"(the bare compiled reference failed: {type(exc).__name__}: {exc})")
        return None


def worker_forward(model: ScoringModel, batch: int, images: int) -> float:
    """Images/s of the worker's model stage alone, as its batch loop runs it, on ready grey
    views (as the decode processes send them): each batch staged from its views and started
    (:meth:`ScoringModel.start`: on a CPU a traced graph, compiled with ``--compile``), and on
    a GPU the next one started before the last one's logits and CAMs are taken back."""
    views = [np.zeros((model.input_size, model.input_size), np.float32)] * batch
    for _ in range(3):  # warm-up (a traced graph profiles its first runs)
        model.start(views).result()
    rounds = max(1, images // batch)
    start = time.perf_counter()
    running = model.start(views)
    for _ in range(rounds - 1):
        started = model.start(views)
        running.result()  # on a CPU it was done when started
        running = started
    running.result()
    return rounds * batch / (time.perf_counter() - start)


def worker_config(args: argparse.Namespace, work: Path, overlays: bool) -> Config:
    """The daemon's defaults with the benchmark's store, spool, model and worker settings."""
    return local_worker_config(
        work,
        model={
            "device": args.device,
            "precision": args.precision,
            "batch_size": args.batch,
            "batch_wait_ms": args.wait_ms,
            "compile": args.compile,
        },
        worker={
            "decode_processes": args.decode_processes,
            "claim_batch": max(args.batch // args.views * 2, 4),
            "poll_interval_s": 0.05,
        },
        overlays=overlays,
    )


def first_use_of_batch_sizes(model: ScoringModel, batch: int) -> float:
    """Run a forward pass at every batch size up to *batch*; returns the seconds it took.

    The worker runs whatever size the decoded views make (1 to ``batch``), and oneDNN builds
    a layer's primitives the first time it sees a shape (~0.1 s a size on 2 vCPUs): a daemon
    pays that once in its life, a burst of 64 studies right after start pays it inside the
    timed run. The scoring path is measured as a daemon runs after its first minutes.
    """
    blank = np.zeros((model.input_size, model.input_size), np.float32)  # as decoded views
    started = time.perf_counter()
    for size in range(1, batch + 1):
        model.forward(model.make_batch([blank] * size))
    return time.perf_counter() - started


def _received_studies(
    args: argparse.Namespace, config: Config
) -> tuple[Engine, Store, Spool, list[Path]]:
    """The benchmark's studies written into *config*'s spool and recorded in its store as
    the listener records received instances (not yet queued)."""
    spool_dir = Path(config.store.spool_dir)
    files = write_benchmark_files(
        spool_dir, args.studies * args.views, size_mb=args.size_mb, views_per_study=args.views
    )
    engine, store, spool = received_store(config.store.url, spool_dir, files)
    return engine, store, spool, files


def scoring_path(
    args: argparse.Namespace, model: ScoringModel, overlays: bool, work: Path
) -> tuple[float, int, float, CpuPerView]:
    """Views/s of the worker from queued studies to DONE; also returns its decode processes,
    the seconds of its untimed first pass at every batch size, and the CPU per view of its
    model thread, the rest of its process and its decode processes.

    Both paths run the one *model* (:func:`~triage.scoring.worker.load_configured_model`,
    as the daemon loads it): a compiled one is built once, not once a path."""
    config = worker_config(args, work, overlays)
    engine, store, spool, files = _received_studies(args, config)
    # The end is signalled by the worker's own callback, not found by polling the store: a
    # poll every few milliseconds is Python work in the worker's process that the daemon
    # does not do, and it slowed the forward it shares the GIL with.
    scored = [0]
    all_scored = threading.Event()
    lock = threading.Lock()

    def on_scored() -> None:  # called from the worker's finisher threads
        with lock:
            scored[0] += 1
            if scored[0] >= args.studies:
                all_scored.set()

    worker = Worker(config, store, spool, model, on_scored=on_scored)
    worker.warm_up()
    first_use_s = first_use_of_batch_sizes(model, args.batch)
    store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
    cpu_before = CpuSnapshot.take(BATCH_THREAD)
    start = time.perf_counter()
    worker.start()  # already warm: claims at once
    while not all_scored.wait(0.5):
        if store.counts_by_state().get(StudyState.FAILED, 0):
            raise RuntimeError("a study FAILED: see the log")
    seconds = time.perf_counter() - start
    cpu = CpuPerView.between(cpu_before, CpuSnapshot.take(BATCH_THREAD), len(files))
    if store.counts_by_state().get(StudyState.DONE, 0) != args.studies:
        raise RuntimeError("the worker reported studies scored that are not DONE")
    worker.stop(10)
    engine.dispose()
    shutil.rmtree(work, ignore_errors=True)  # a GPU run's paths write ~4 GB each
    return len(files) / seconds, worker.decode_processes, first_use_s, cpu


def _run_worker_process(config: Config, notify_socket: str) -> None:
    """A ``triage worker`` process, as systemd runs one (``deploy/triage-worker@.service``):
    READY=1 on *notify_socket* once warm, then scoring until SIGTERM."""
    from triage.daemon import run_worker
    from triage.logs import configure_logging

    configure_logging("warning", "console")
    os.environ["NOTIFY_SOCKET"] = notify_socket
    sys.exit(run_worker(config))


def scoring_path_processes(
    args: argparse.Namespace, overlays: bool, work: Path
) -> tuple[float, int, float, float]:
    """Views/s of ``--worker-processes`` real ``triage worker`` processes sharing one store
    and spool (what README's "Sizing a GPU host" sets up), from queueing to every study
    DONE; the ``--decode-processes`` are shared among them. Also returns the decode
    processes of each, and the CPU ms per view of the worker processes (model threads
    included) and of their decode processes.

    Each loads its own model and warms up as the daemon's worker does (no pass at every
    batch size: on a CPU the first batches of a new size pay for oneDNN's primitives)."""
    workers = args.worker_processes
    each = max(1, args.decode_processes // workers) if args.decode_processes else 0
    config = worker_config(args, work, overlays)
    config = dataclasses.replace(
        config, worker=dataclasses.replace(config.worker, decode_processes=each)
    )
    engine, store, _, files = _received_studies(args, config)
    context = multiprocessing.get_context("spawn")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(work / "notify"))
        notify.settimeout(1.0)
        processes = [
            context.Process(
                target=_run_worker_process, args=(config, str(work / "notify")), daemon=False
            )
            for _ in range(workers)
        ]
        for process in processes:
            process.start()
        try:
            ready = 0
            deadline = time.monotonic() + 600  # a compiled model takes minutes
            while ready < workers:
                dead = [p for p in processes if p.exitcode is not None]
                if dead:
                    raise RuntimeError(f"a worker process exited with {dead[0].exitcode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker processes did not get ready in 600 s")
                try:
                    ready += "READY=1" in notify.recv(4096).decode().splitlines()
                except TimeoutError:
                    continue
            before = [process_tree_cpu_s(p.pid) for p in processes if p.pid]
            start = time.perf_counter()
            store.queue_quiet_studies(0.0, now=utcnow() + timedelta(seconds=1))
            while store.counts_by_state().get(StudyState.DONE, 0) < args.studies:
                if store.counts_by_state().get(StudyState.FAILED, 0):
                    raise RuntimeError("a study FAILED: see the log")
                if any(p.exitcode is not None for p in processes):
                    raise RuntimeError("a worker process died")
                time.sleep(0.02)
            seconds = time.perf_counter() - start
            after = [process_tree_cpu_s(p.pid) for p in processes if p.pid]
        finally:
            for process in processes:
                if process.pid and process.exitcode is None:
                    os.kill(process.pid, signal.SIGTERM)
            for process in processes:
                process.join(60)
                if process.exitcode is None:
                    process.kill()
    engine.dispose()
    shutil.rmtree(work, ignore_errors=True)
    scale = 1000 / len(files)
    worker_ms = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) * scale
    decode_ms = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) * scale
    return len(files) / seconds, each, worker_ms, decode_ms


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=64)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--wait-ms", type=float, default=20.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--decode-processes", type=int, default=0)
    parser.add_argument("--reps", type=int, default=3, help="repetitions of the bare model")
    parser.add_argument(
        "--worker-processes",
        type=int,
        default=1,
        help="also run the overlay path as this many `triage worker` processes sharing the"
        " --decode-processes (a GPU host's deployment, README 'Sizing a GPU host')",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the worker's model through torch.compile ([model] compile; ~3 min on a GPU)",
    )
    args = parser.parse_args(argv)
    from triage.logs import configure_logging

    configure_logging("warning", "console")
    retain_freed_memory()  # as the daemon's worker does: the bare forward gets it too
    # Before this process's first forward pass, or oneDNN's cache keeps its default size.
    size_primitive_cache(args.batch)
    card = str(ROOT / "models" / "demo" / "card.toml")
    views = args.studies * args.views
    # A GPU runs a batch of 256 in ~20–35 ms: the model-alone figures time at least 20
    # batches there, not the path's few, so that launch and first-batch effects stay small.
    on_gpu = args.device != "cpu" and torch.cuda.is_available()
    forward_images = max(views, 20 * args.batch) if on_gpu else views
    work = Path(tempfile.mkdtemp(prefix="triage-bench-scoring-"))
    all_cores = torch.get_num_threads()
    defaults = load_config(None, env={})
    worker_threads = torch_threads(
        dataclasses.replace(
            defaults,
            model=dataclasses.replace(defaults.model, device=args.device),
            worker=dataclasses.replace(defaults.worker, decode_processes=args.decode_processes),
        )
    )
    try:
        bare_all = [
            bare_model(card, args.device, args.precision, args.batch, forward_images)
            for _ in range(args.reps)
        ]
        # The worker's own thread budget: the cores its decode processes leave.
        torch.set_num_threads(worker_threads)
        bare = [
            bare_model(card, args.device, args.precision, args.batch, forward_images)
            for _ in range(args.reps)
        ]
        # The worker's model, as the daemon loads it (threads, allocator; on a CPU a traced
        # graph: the same results without the GIL between operators; compiled with
        # --compile). Its model stage alone is shown beside the eager reference.
        loading = time.perf_counter()
        model = load_configured_model(worker_config(args, work, True))
        warm_up_s = model.warm_up(args.batch)
        load_s = time.perf_counter() - loading
        compile_cache = inductor_cache_use()  # a hit: compiled before (the tests step)
        device = str(model.device)
        forward_alone = worker_forward(model, args.batch, forward_images)
        full, processes, full_first_use, full_cpu = scoring_path(args, model, True, work / "full")
        sr_only, _, sr_first_use, sr_cpu = scoring_path(args, model, False, work / "sr")
        several = (
            scoring_path_processes(args, True, work / "processes")
            if args.worker_processes > 1
            else None
        )
        # The reference again after the paths: a shared host's speed drifts over a run (20–32
        # views/s within one session here), and a ratio to a figure taken only before the
        # paths then says more about the host than about the path.
        torch.set_num_threads(worker_threads)
        bare += [
            bare_model(card, args.device, args.precision, args.batch, forward_images)
            for _ in range(args.reps)
        ]
        # Last, so that a failure here costs no other figure of a GPU run.
        bare_compiled = compiled_reference(args, card, forward_images) if args.compile else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    reference = statistics.median(bare)
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, torch {torch.__version__}, device {device}, "
        f"worker: {worker_threads} torch thread(s) + {processes} decode process(es)"
    )
    if device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"{args.studies} studies × {args.views} views of {args.size_mb:g} MB, batch {args.batch}")
    print()
    compiled = ", compiled" if model.compiled else ""
    rows = [
        (f"bare forward, {worker_threads} thread(s), ready tensors", reference),
        (f"bare forward, {all_cores} threads, ready tensors", statistics.median(bare_all)),
        (f"the worker's model stage alone, {worker_threads} thread(s){compiled}", forward_alone),
        *([("bare forward compiled, static shapes", bare_compiled)] if bare_compiled else []),
        ("scoring path: results + SR", sr_only),
        ("scoring path: results + SR + CAM overlays", full),
    ]
    if several is not None:
        rows.append(
            (
                f"  … as {args.worker_processes} `triage worker` × {several[1]} decode procs",
                several[0],
            )
        )
    print(f"{'path':<48} {'views/s':>8} {'vs bare':>8}")
    print("-" * 66)
    for label, value in rows:
        print(f"{label:<48} {value:>8.1f} {value / reference:>7.2f}x")
    print(
        f"(bare, worker's threads, {len(bare) // 2} runs before the paths and "
        f"{len(bare) - len(bare) // 2} after: "
        + ", ".join(f"{value:.1f}" for value in bare)
        + " views/s; the median is the reference)"
    )
    print(
        f"(the worker's model loaded in {load_s:.1f} s, of which {warm_up_s:.1f} s warming up"
        + (f" = compiling its graph; {compile_cache}" if model.compiled else "")
        + ")"
    )
    print(
        f"(first forward pass at each batch size 1..{args.batch}, before the timed runs: "
        + f"{full_first_use:.1f} s, {sr_first_use:.1f} s"
        + ")"
    )
    print()
    print_cpu_table([("results + SR", sr_cpu), ("results + SR + CAM overlays", full_cpu)])
    busy = [
        ("results + SR", decode_busy(sr_cpu.children, sr_only, processes), processes),
        ("with overlays", decode_busy(full_cpu.children, full, processes), processes),
    ]
    if several is not None:
        views_per_s, each, worker_ms, decode_ms = several
        print(
            f"{args.worker_processes} worker processes × {each} decode processes, overlays:"
            f" {worker_ms:.1f} ms of CPU per view in the worker processes (model threads"
            f" included), {decode_ms:.1f} in their decode processes"
        )
        busy.append(
            (
                f"{args.worker_processes} worker processes",
                decode_busy(decode_ms, views_per_s, args.worker_processes * each),
                args.worker_processes * each,
            )
        )
    # Near 100 %: decoding is what limits the path (the aim on a GPU host).
    print(
        "decode processes busy: "
        + "; ".join(f"{label} {share:.0%} of {count}" for label, share, count in busy)
    )
    return 0


def inductor_cache_use() -> str:
    """What torch.compile's FX graph cache did so far in this process ("inductor cache 1
    hit(s), 0 miss(es)"):
    a hit loads a graph compiled before (TORCHINDUCTOR_CACHE_DIR) instead of compiling it."""
    from torch._dynamo.utils import counters

    hits, misses = (
        counters["inductor"]["fxgraph_cache_hit"],
        counters["inductor"]["fxgraph_cache_miss"],
    )
    return f"inductor cache {hits} hit(s), {misses} miss(es)"


def decode_busy(ms_per_view: float, views_per_s: float, processes: int) -> float:
    """The share of *processes* decode processes' time they were busy, from their CPU per
    view and the path's views/s: 1.0 when decoding is all that limits the path."""
    return ms_per_view * views_per_s / (1000 * processes) if processes else 0.0


def print_cpu_table(runs: list[tuple[str, CpuPerView]]) -> None:
    """CPU per view of each path: the model thread, the rest of the worker's process (claims,
    batching, results, pipes, the store) and the decode processes (decoding, SR, overlays).

    The last column sizes a GPU host: with the forward off the CPU, one worker process
    (one GIL) keeps at most this many decode processes busy; more need more worker
    processes (``triage worker``) on the host."""
    print(
        f"{'CPU ms per view':<30} {'model thread':>13} {'rest of worker':>15} "
        f"{'decode procs':>13} {'decode/rest':>12}"
    )
    print("-" * 87)
    for label, cpu in runs:
        ratio = cpu.children / cpu.rest_of_process if cpu.rest_of_process > 0 else float("inf")
        print(
            f"{label:<30} {cpu.thread:>13.1f} {cpu.rest_of_process:>15.1f} "
            f"{cpu.children:>13.1f} {ratio:>12.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
