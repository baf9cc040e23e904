"""Training throughput of the MURA recipe: the paper's batch 8 fp32 vs batch 64 bf16.

Trains DenseNet-169 at 224² with the recipe's loss and optimiser (weighted BCE, Adam 1e-4) on
synthetic phantom radiographs for a fixed number of steps, in two configurations run back to
back in one process on the same device:

* ``b8-fp32``: the paper — mini-batches of 8, fp32, contiguous memory;
* ``b64-bf16-cl``: mini-batches of 64, bf16 autocast, channels_last (``triage train``'s CUDA
  default precision).

It prints images/s for every timed step, then for each configuration the median images/s,
peak GPU memory, and the time one MURA-v1.1 training epoch (37,111 images) would take at that
rate. The GPU step is timed on its own (inputs already on the device); the CPU input pipeline
(PNG decode, the daemon's resize and normalisation, flip and rotation) is measured separately
per worker process, and the epoch estimate states which of the two limits it.

    python -m bench.train_gpu                       # CUDA: 30 timed steps per configuration
    python -m bench.train_gpu --device cpu --steps 2 --warmup 1 --size 64   # a quick check

Writes a JSON summary with ``--json FILE``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from triage.scoring.model import build_densenet169, resolve_device  # noqa: E402
from triage.study_types import StudyType  # noqa: E402
from triage.training.data import (  # noqa: E402
    Augment,
    Preprocessing,
    View,
    ViewDataset,
    load_view_array,
)
from triage.training.train import StepConfig, train_step  # noqa: E402

MURA_TRAIN_IMAGES = 37_111
_THREADS = torch.get_num_threads()
CONFIGS = {
    "b8-fp32": (8, False, False),
    "b64-bf16-cl": (64, True, True),
}


def _phantoms(folder: Path, n: int, seed: int) -> list[View]:
    """n phantom PNGs (half abnormal) written by the synthetic MURA writer's renderer."""
    from PIL import Image

    from triage.testing.phantom import render_phantom_with_findings

    views = []
    types = list(StudyType)
    rng = np.random.default_rng(seed)
    for i in range(n):
        t = types[i % len(types)]
        rows = int(rng.integers(380, 520))
        cols = int(rows * rng.uniform(0.6, 1.0))
        image, _ = render_phantom_with_findings(
            t, "PA", rows, cols, bool(i % 2), np.random.default_rng([seed, i])
        )
        path = folder / f"{i}.png"
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(path)
        views.append(View(path, f"s{i}", f"p{i}", t, i % 2))
    return views


def _input_pipeline_rate(views: list[View], size: int, seconds: float = 3.0) -> float:
    """Images/s of one process decoding, preparing and augmenting training views."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        ds = ViewDataset(views, Preprocessing(size), augment=Augment(), seed=0)
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or done < 8:
            ds[(0, done % len(ds))]
            done += 1
        return done / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(_THREADS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_config(
    name: str,
    pool: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, object]:
    """Time ``args.steps`` training steps of one configuration; returns its summary."""
    batch, bf16, channels_last = CONFIGS[name]
    cfg = StepConfig(device, bf16=bf16, channels_last=channels_last)
    torch.manual_seed(0)
    model = build_densenet169().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    weights = torch.where(labels > 0, 0.6, 0.4).to(device)  # w_T,1 / w_T,0 of a 40% type
    rates: list[float] = []
    for step in range(args.warmup + args.steps):
        idx = torch.randint(0, pool.shape[0], (batch,), generator=gen).to(device)
        x, y, w = pool[idx], labels[idx], weights[idx]
        _sync(device)
        start = time.perf_counter()
        loss = train_step(model, optimizer, x, y, w, cfg)
        _sync(device)
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            rates.append(batch / elapsed)
            print(
                f"{name} step {step - args.warmup + 1}/{args.steps}: {batch / elapsed:8.1f} img/s "
                f"({elapsed * 1000:.1f} ms, loss {float(loss):.4f})",
                flush=True,
            )
    median = statistics.median(rates)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "batch": batch,
        "bf16": bf16,
        "channels_last": channels_last,
        "median_img_s": median,
        "min_img_s": min(rates),
        "max_img_s": max(rates),
        "peak_gib": peak,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; prints per-step and summary lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--size", type=int, default=224, help="input side (224, the recipe)")
    parser.add_argument("--steps", type=int, help="timed steps per config (30 CUDA, 2 CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (10 CUDA, 1 CPU)")
    parser.add_argument("--workers", type=int, default=16, help="loader processes assumed (16)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"subset of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (30 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}")

    where = torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu"
    print(
        f"device {device} ({where}), torch {torch.__version__}, {args.size}px, "
        f"{args.steps} timed steps after {args.warmup} warm-up, {torch.get_num_threads()} threads",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        views = _phantoms(Path(tmp), 32, seed=0)
        prep = Preprocessing(args.size)
        pool = torch.from_numpy(np.stack([load_view_array(v, prep) for v in views])).to(device)
        labels = torch.tensor([float(v.label) for v in views], device=device)
        pipeline = _input_pipeline_rate(views, args.size)
    print(f"input pipeline: {pipeline:.1f} img/s per worker process", flush=True)

    results: dict[str, dict[str, object]] = {}
    for name in names:
        results[name] = run_config(name, pool, labels, device, args)
    fed = pipeline * args.workers
    print()
    print(
        f"{'config':<14} {'img/s':>9} {'peak GiB':>9} {'MURA epoch (step)':>18} {'with input':>11}"
    )
    for name, r in results.items():
        rate = float(r["median_img_s"])  # type: ignore[arg-type]
        epoch_step = MURA_TRAIN_IMAGES / rate
        epoch_fed = MURA_TRAIN_IMAGES / min(rate, fed)
        r.update(epoch_s_step=epoch_step, epoch_s_with_input=epoch_fed, input_bound=fed < rate)
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(
            f"{name:<14} {rate:>9.1f} {peak:>9} {epoch_step / 60:>15.1f} min "
            f"{epoch_fed / 60:>8.1f} min" + (" (input-bound)" if fed < rate else "")
        )
    print(
        f"MURA epoch = {MURA_TRAIN_IMAGES} images; 'with input' assumes {args.workers} loader "
        f"processes at {pipeline:.1f} img/s each ({fed:.0f} img/s)."
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "device": where,
                    "torch": torch.__version__,
                    "size": args.size,
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "input_img_s_per_worker": pipeline,
                    "workers": args.workers,
                    "configs": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
