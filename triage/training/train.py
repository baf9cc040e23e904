"""The MURA training recipe (Rajpurkar et al. 2017, section 3.1).

DenseNet-169 with one logit, optionally initialised from a local ImageNet file; weighted
binary cross-entropy per study type (w_T,1 = |N_T|/(|A_T|+|N_T|) on abnormal images,
w_T,0 = |A_T|/(|A_T|+|N_T|) on normal ones, counted on the training images); Adam
(β = 0.9, 0.999), learning rate 1e-4, mini-batches of 8; the learning rate divided by 10 when
the validation loss plateaus after an epoch; random lateral flips and rotations; the weights
with the lowest validation loss are kept.

Outputs in the output folder: ``weights.pt`` (the best state dict, what the daemon loads),
``card.toml`` (unvalidated, metrics from the validation set), ``checkpoint.pt`` (everything
needed to resume), ``valid_report.json`` (the full validation evaluation) and
``history.json``.

Determinism: the shuffling and each image's augmentation derive from (seed, epoch, index)
and the network's initialisation from the seed, so two CPU runs with the same seed, precision
and thread count give identical losses, with any number of loader workers and across a resume.
CUDA runs (bf16 autocast, channels_last, cuDNN autotuning) are fast, not bit-reproducible.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from triage.atomic_file import write_atomically
from triage.scoring.model import cpu_has_native_bf16
from triage.study_types import StudyType
from triage.training.data import (
    Augment,
    DataError,
    EpochSampler,
    Preprocessing,
    View,
    ViewDataset,
    check_patient_split,
    class_weights,
    image_counts,
    one_class_types,
    steps_per_epoch,
    unreadable_images,
)
from triage.training.evaluate import card_metrics, evaluate_table, study_table
from triage.training.metrics import auroc

WEIGHTS_FILE = "weights.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
#: What a checkpoint must hold to be resumed from.
_CHECKPOINT_KEYS = frozenset(
    {
        "format",
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "step_in_epoch",
        "step",
        "best_loss",
        "best_epoch",
        "best_probs",
        "history",
        "rng",
        "data",
    }
)
#: The input sizes ``triage.scoring.card`` accepts: a run at any other size trains weights
#: whose card the daemon refuses. The dry run of the card in ``check`` applies the card's own
#: rule as well; these give the message in terms of ``--image-size``.
MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 2048


@dataclass
class TrainOptions:
    """Everything that shapes a training run (defaults: the paper's recipe)."""

    out_dir: Path
    name: str = "mura-densenet169"
    version: str = field(default_factory=lambda: date.today().strftime("%Y.%m.%d"))
    image_size: int = 224
    #: The paper does not state its epoch count; the plateau schedule makes more harmless.
    epochs: int = 10
    #: Stop after this many optimiser steps in all (None: run all epochs).
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 1e-4
    #: Epochs without a validation-loss improvement before the LR is divided by 10.
    #: 0 = "each time the validation loss plateaus after an epoch", read literally.
    plateau_patience: int = 0
    flip: bool = True
    max_rotation: float = 30.0
    #: Data-loading processes; None: none on a CPU (they would compete with the model for
    #: the same cores), up to 8 with CUDA (decoding would otherwise starve the GPU).
    workers: int | None = None
    device: str = "auto"
    #: auto: bf16 autocast + channels_last on CUDA and CPUs with native bf16, else fp32.
    precision: str = "auto"
    seed: int = 0
    imagenet_weights: str | None = None
    #: Resume from ``out_dir/checkpoint.pt`` when it exists.
    resume: bool = False
    #: Also checkpoint every this many steps inside an epoch (0: only at epoch ends).
    checkpoint_every: int = 0
    log_every: int = 50
    #: Keep prepared images in memory (small data sets, workers = 0).
    cache_images: bool = False
    #: Read every image before the first step, and refuse to start while any cannot be read.
    check_images: bool = False
    eval_batch_size: int = 32
    bootstrap_resamples: int = 10_000
    description: str = ""

    def check(self) -> None:
        """Raise DataError, CardError or ValueError naming the first option that cannot give a run.

        Called before any data is read or network built: a bad option must fail in a second,
        not after hours of training (the card's fields used to be checked only when the card
        was written at the very end).
        """
        for flag, value, low in (
            ("--epochs", self.epochs, 1),
            ("--max-steps", self.max_steps, 1),
            ("--batch-size", self.batch_size, 1),
            ("eval_batch_size", self.eval_batch_size, 1),
            ("--plateau-patience", self.plateau_patience, 0),
            ("--workers", self.workers, 0),
            ("--checkpoint-every", self.checkpoint_every, 0),
            ("--log-every", self.log_every, 1),
            ("--bootstrap", self.bootstrap_resamples, 0),
            ("--image-size", self.image_size, MIN_IMAGE_SIZE),
            ("--seed", self.seed, 0),
        ):
            if value is None and flag in ("--max-steps", "--workers"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise DataError(f"{flag} must be an integer >= {low} (got {value!r})")
        if self.image_size > MAX_IMAGE_SIZE:
            raise DataError(
                f"--image-size must be {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, the model card's "
                f"range (got {self.image_size})"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise DataError(f"--lr must be a positive number (got {self.lr!r})")
        if not (math.isfinite(self.max_rotation) and self.max_rotation >= 0):
            raise DataError(f"--max-rotation must be >= 0 degrees (got {self.max_rotation!r})")
        if self.batch_size == 1 and densenet_final_side(self.image_size) == 1:
            # Training-mode batch normalisation needs two values per channel, and the last
            # block's feature map is 1×1 at this size.
            raise DataError(
                f"--batch-size 1 at {self.image_size} px leaves batch normalisation a single "
                "value per channel; use --batch-size 2 or more"
            )
        step_config(torch.device("cpu"), self.precision)  # raises on an unknown precision
        resolve_device(self.device)  # raises on an unknown device, or cuda without one
        if self.imagenet_weights is not None and not Path(self.imagenet_weights).is_file():
            raise DataError(f"--imagenet-weights {self.imagenet_weights}: no such file")
        self._check_card_fields()

    def _check_card_fields(self) -> None:
        """Dry run of the card this run will write, with the card loader's own rules."""
        from triage.scoring.card import (
            IMAGENET_MEAN,
            IMAGENET_STD,
            ModelCard,
            dumps_card,
            parse_card,
        )

        card_path = Path(self.out_dir).absolute() / "card.toml"
        card = ModelCard(
            path=card_path,
            name=self.name,
            version=self.version,
            architecture="densenet169",
            input_size=self.image_size,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            threshold=0.5,
            study_types=tuple(StudyType),
            validated=False,
            created=date.today(),
            training_data="(the training data)",
            weights_path=card_path.parent / WEIGHTS_FILE,
            weights_sha256="0" * 64,
            description=self.description,
        )
        parse_card(tomllib.loads(dumps_card(card)), card_path, verify_weights=False)


@dataclass
class TrainResult:
    """What a finished run produced."""

    card_path: Path
    weights_path: Path
    best_epoch: int
    best_valid_loss: float
    steps: int
    #: One entry per validation: epoch, step, train loss, validation loss, AUROC, LR.
    history: list[dict[str, Any]]
    #: The evaluation of the best weights on the validation set (evaluate.evaluate_table).
    report: dict[str, Any]


def densenet_final_side(image_size: int) -> int:
    """The side of DenseNet-169's last feature map for a square input of ``image_size``."""
    side = (image_size - 1) // 2 + 1  # 7×7 convolution, stride 2, padding 3
    side = (side - 1) // 2 + 1  # 3×3 max pool, stride 2, padding 1
    for _ in range(3):  # three transitions, 2×2 average pool, stride 2
        side //= 2
    return side


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    from triage.scoring.model import resolve_device as resolve

    return resolve(name)


def _atomic_save(obj: object, path: Path) -> None:
    # A crash mid-write must never leave a truncated checkpoint or weights file behind.
    write_atomically(path, lambda handle: torch.save(obj, handle))


def _atomic_write_text(text: str, path: Path) -> None:
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    # Contiguous fp32 CPU tensors: the daemon loads them on any device and memory format.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _rng_state() -> dict[str, Any]:
    # Plain lists and tensors only, so the checkpoint loads with weights_only=True.
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The paper's loss, averaged over the batch.

    ``binary_cross_entropy_with_logits`` computes log σ stably (no log(0) for confident
    predictions, the unclamped-log bug of some reimplementations); ``weights`` carries w_T,y
    per image.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), weight=weights)


@dataclass(frozen=True)
class StepConfig:
    """How a step runs: device, bf16 autocast, channels_last memory format."""

    device: torch.device
    bf16: bool = False
    channels_last: bool = False


def step_config(device: torch.device, precision: str = "auto") -> StepConfig:
    """``auto``: bf16 autocast + channels_last on CUDA and on CPUs with native bf16, else fp32.

    A CPU without native bf16 emulates it and is slower than fp32, and fp32 convolutions are
    slower in channels_last there (measured in :mod:`triage.scoring.model`), so such a CPU
    stays fp32 and contiguous. With native bf16 (AVX-512 BF16, AMX) a DenseNet-169 step at
    batch 8 took 0.37 s against 0.65 s in fp32 (128 px, two cores); CPU runs stay
    reproducible either way (same kernels, same thread count).
    """
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16 (got {precision!r})")
    native = device.type == "cuda" or cpu_has_native_bf16()
    bf16 = precision == "bf16" or (precision == "auto" and native)
    return StepConfig(device, bf16=bf16, channels_last=bf16 and native)


def forward_logits(model: nn.Module, x: torch.Tensor, cfg: StepConfig) -> torch.Tensor:
    """The model's logits [N] (float32) for a batch [N, 3, S, S]."""
    x = x.to(cfg.device, non_blocking=True)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if cfg.bf16:
        with torch.autocast(cfg.device.type, dtype=torch.bfloat16):
            return model(x).reshape(-1).float()
    return model(x).reshape(-1)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    cfg: StepConfig,
) -> torch.Tensor:
    """One optimiser step on a batch; returns the (detached, on-device) loss."""
    logits = forward_logits(model, x, cfg)
    loss = weighted_bce(
        logits, y.to(cfg.device, non_blocking=True), w.to(cfg.device, non_blocking=True)
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def predict(
    model: nn.Module,
    dataset: ViewDataset,
    cfg: StepConfig,
    *,
    batch_size: int,
    workers: int,
) -> tuple[np.ndarray, float]:
    """(view probabilities in dataset order, mean weighted BCE) of ``model`` on ``dataset``."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=cfg.device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    probs = np.empty(len(dataset), dtype=np.float64)
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y, w, idx in loader:
            logits = forward_logits(model, x, cfg).float().cpu()
            losses = F.binary_cross_entropy_with_logits(
                logits, y.float(), weight=w.float(), reduction="none"
            )
            total += float(losses.sum())
            count += len(y)
            probs[idx.numpy()] = torch.sigmoid(logits).double().numpy()
    model.train(was_training)
    return probs, total / max(count, 1)


def _data_signature(
    train_views: Sequence[View],
    valid_views: Sequence[View],
    options: TrainOptions,
    *,
    full_paths: bool = False,
) -> str:
    """A digest of what a resumed run must share with the run it continues: each image by its
    study and file name, so that the same data reached by another path (absolute, from
    another folder, remounted) resumes. *full_paths*: as written before, for a checkpoint
    an older msk-triage wrote."""
    digest = hashlib.sha256()
    for split, views in (("train", train_views), ("valid", valid_views)):
        for v in views:
            where = v.path if full_paths else Path(v.path).name
            digest.update(f"{split}|{where}|{v.study_id}|{v.study_type.value}|{v.label}\n".encode())
    digest.update(f"{options.image_size}|{options.batch_size}|{options.seed}".encode())
    return digest.hexdigest()


#: Options a resumed run must keep: they shape the run's steps, and the card describes them.
_RECIPE_OPTIONS = ("lr", "plateau_patience", "flip", "max_rotation", "imagenet_weights")


def _changed_recipe(ckpt: dict[str, Any], options: TrainOptions) -> list[str]:
    """The recipe options given otherwise than when the checkpointed run began."""
    try:
        started = json.loads(ckpt.get("options") or "{}")
    except (TypeError, ValueError):
        return []
    now = json.loads(json.dumps(asdict(options), default=str))
    return [
        f"{key} {started[key]} (given {now[key]})"
        for key in _RECIPE_OPTIONS
        if key in started and started[key] != now[key]
    ]


def _describe_views(views: Sequence[View]) -> str:
    studies = len({v.study_id for v in views})
    abnormal = len({v.study_id for v in views if v.label == 1})
    return f"{len(views)} images, {studies} studies ({abnormal} abnormal)"


def train(
    train_views: Sequence[View],
    valid_views: Sequence[View],
    options: TrainOptions,
    *,
    training_data: str,
    log: Callable[[str], None] = _stderr,
) -> TrainResult:
    """Train the recipe on ``train_views``, select on ``valid_views``; write weights and card.

    ``training_data`` describes the source for the card (e.g. "MURA-v1.1 at /data").
    Raises DataError when a patient is in both sets or a set is empty.
    """
    from triage.scoring.card import write_card
    from triage.scoring.model import build_densenet169

    options.check()
    if not train_views or not valid_views:
        raise DataError("training and validation sets must both have images")
    check_patient_split({"train": train_views, "valid": valid_views})
    # A type with one class in training trains on loss weight 0 (w_T,y is the other class's
    # share): the network learns nothing of it, so the card must not cover it either.
    single = one_class_types(train_views)
    learned = [t for t in study_types_of(train_views) if t not in single]
    if not learned:
        raise DataError("no study type has both normal and abnormal studies in training")
    valid_views = _trained_types_only(valid_views, learned, log)
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(options.device)
    workers = options.workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    prep = Preprocessing(input_size=options.image_size)
    weights = class_weights(train_views)
    for t in single:
        log(
            f"warning: {t.value} has a single class in training: its images get loss weight 0, "
            "and the card does not cover it"
        )
    counts = image_counts(train_views)
    log(
        "class weights (w0 normal, w1 abnormal) from training images: "
        + ", ".join(
            f"{t.value} N={counts[t][0]} A={counts[t][1]} w0={w0:.3f} w1={w1:.3f}"
            for t, (w0, w1) in weights.items()
        )
    )

    spe = steps_per_epoch(len(train_views), options.batch_size)
    if spe == 0:
        raise DataError(
            f"{len(train_views)} training images: fewer than one batch of {options.batch_size}"
        )
    # Checked before anything is built: a refused resume should fail fast.
    signature = _data_signature(train_views, valid_views, options)
    ckpt_path = out / CHECKPOINT_FILE
    weights_path = out / WEIGHTS_FILE
    ckpt: dict[str, Any] | None = None
    if options.resume and ckpt_path.is_file():
        ckpt = _load_checkpoint(ckpt_path)
        if ckpt["data"] not in (
            signature,
            _data_signature(train_views, valid_views, options, full_paths=True),
        ):
            raise ValueError(
                f"{ckpt_path}: written for other training/validation data or image size; "
                "resume with the same data and options, or use another output folder"
            )
        changed = _changed_recipe(ckpt, options)
        if changed:
            raise ValueError(
                f"{ckpt_path}: the run began with {'; '.join(changed)}: resume with the "
                "options it began with, or use another output folder"
            )

    if options.check_images:
        _check_images([*train_views, *valid_views], prep, workers, log)
    seed_everything(options.seed)
    train_ds = ViewDataset(
        train_views,
        prep,
        weights=weights,
        augment=Augment(flip=options.flip, max_rotation=options.max_rotation),
        seed=options.seed,
        cache=options.cache_images,
    )
    # Validation is weighted with the *training* weights: the same loss, measured elsewhere.
    valid_ds = ViewDataset(valid_views, prep, weights=weights, cache=options.cache_images)

    try:
        model = build_densenet169(options.imagenet_weights)
    except ValueError:
        raise  # already one line naming the file and what does not fit
    except Exception as exc:
        if options.imagenet_weights is None:
            raise
        # torch.load on a file of another kind raises UnpicklingError, RuntimeError …, with
        # multi-line messages; the kind of failure is what helps here.
        raise DataError(
            f"--imagenet-weights {options.imagenet_weights}: not a PyTorch state dict "
            f"({type(exc).__name__})"
        ) from None
    cfg = step_config(device, options.precision)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=0.1, patience=options.plateau_patience
    )

    epoch, step_in_epoch, global_step = 0, 0, 0
    best_loss, best_epoch = math.inf, -1
    best_probs: np.ndarray | None = None
    history: list[dict[str, Any]] = []
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            epoch, step_in_epoch, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["step"]
            best_loss, best_epoch = ckpt["best_loss"], ckpt["best_epoch"]
            if ckpt["best_probs"] is not None:
                best_probs = ckpt["best_probs"].numpy()
            history = json.loads(ckpt["history"])
            _set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise DataError(
                f"{ckpt_path}: cannot resume from it ({type(exc).__name__}); delete it to "
                "start afresh, or use another output folder"
            ) from None
        log(f"resumed from {ckpt_path}: epoch {epoch + 1}, step {global_step}")

    def checkpoint() -> None:
        _atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "step": global_step,
                "best_loss": best_loss,
                "best_epoch": best_epoch,
                "best_probs": None if best_probs is None else torch.from_numpy(best_probs),
                "history": json.dumps(history),
                "rng": _rng_state(),
                "data": signature,
                "options": json.dumps(asdict(options), default=str),
            },
            ckpt_path,
        )

    max_steps = options.max_steps if options.max_steps is not None else options.epochs * spe
    # The first step whose loss was not finite (0: none) and that loss, kept on the device:
    # reading each step's loss would synchronise CUDA every step. They are read where the loop
    # synchronises anyway (progress lines, checkpoints, validation), and every step on a CPU.
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)

    def stop_if_diverged() -> None:
        if int(bad_step):
            raise DataError(
                f"training diverged at step {int(bad_step)} (loss {float(bad_loss):g}); lower --lr"
            )

    log(
        f"training {options.name} on {device} ({_describe_views(train_views)}; validation "
        f"{_describe_views(valid_views)}), {options.image_size} px, batch {options.batch_size}, "
        f"{spe} steps/epoch"
    )
    model.train()
    while epoch < options.epochs and global_step < max_steps:
        sampler = EpochSampler(
            len(train_ds), options.seed, epoch, skip=step_in_epoch * options.batch_size
        )
        loader = DataLoader(
            train_ds,
            batch_size=options.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            pin_memory=device.type == "cuda",
        )
        window_loss: float | torch.Tensor = 0.0
        epoch_loss: float | torch.Tensor = 0.0
        window_n, window_images, epoch_n = 0, 0, 0
        window_start = time.perf_counter()
        for x, y, w, _ in loader:
            loss = train_step(model, optimizer, x, y, w, cfg)
            global_step += 1
            step_in_epoch += 1
            first = (bad_step == 0) & ~torch.isfinite(loss)
            bad_step = torch.where(first, global_step, bad_step)
            bad_loss = torch.where(first, loss, bad_loss)
            if device.type != "cuda":
                stop_if_diverged()
            # Summed on the device: a float() per step would synchronise CUDA every step.
            window_loss = window_loss + loss
            epoch_loss = epoch_loss + loss
            window_n += 1
            epoch_n += 1
            window_images += len(y)
            if global_step % options.log_every == 0 or step_in_epoch == spe:
                stop_if_diverged()
                elapsed = time.perf_counter() - window_start
                log(
                    f"epoch {epoch + 1}/{options.epochs} step {step_in_epoch}/{spe} "
                    f"(total {global_step}) loss {float(window_loss) / window_n:.4f} "
                    f"lr {optimizer.param_groups[0]['lr']:.1e} "
                    f"{window_images / max(elapsed, 1e-9):.1f} img/s"
                )
                window_loss, window_n, window_images = 0.0, 0, 0
                window_start = time.perf_counter()
            if options.checkpoint_every and global_step % options.checkpoint_every == 0:
                stop_if_diverged()  # never checkpoint a network that has gone to NaN
                checkpoint()
            if global_step >= max_steps:
                break

        stop_if_diverged()
        probs, valid_loss = predict(
            model,
            valid_ds,
            cfg,
            batch_size=options.eval_batch_size,
            workers=workers,
        )
        if not math.isfinite(valid_loss):
            raise DataError(
                f"training diverged at step {global_step} (validation loss {valid_loss:g}); "
                "lower --lr"
            )
        table = study_table(valid_views, probs)
        valid_auroc = float(auroc(table.labels, table.probs)[0])  # NaN with one class
        finished_epoch = step_in_epoch >= spe
        entry = {
            "epoch": epoch + 1,
            "step": global_step,
            "epoch_complete": finished_epoch,
            "train_loss": float(epoch_loss) / max(epoch_n, 1),
            "valid_loss": valid_loss,
            "valid_auroc": valid_auroc if math.isfinite(valid_auroc) else None,
            "lr": optimizer.param_groups[0]["lr"],
        }
        history.append(entry)
        improved = valid_loss < best_loss
        if improved:
            best_loss, best_epoch, best_probs = valid_loss, epoch + 1, probs
            _atomic_save(_cpu_state_dict(model), weights_path)
        log(
            f"epoch {epoch + 1} validation: loss {valid_loss:.4f} study AUROC {valid_auroc:.4f}"
            + (" (best so far, weights saved)" if improved else "")
        )
        if finished_epoch:
            # The plateau schedule is judged only on whole epochs, as in the paper.
            scheduler.step(valid_loss)
            epoch += 1
            step_in_epoch = 0
        checkpoint()
        _atomic_write_text(json.dumps(history, indent=2), out / "history.json")

    if best_probs is None:
        # The options are checked, so only a resume can get here: a checkpoint written before
        # any validation, already at the --max-steps / --epochs asked for.
        raise DataError(
            f"no validation was run: the run stopped at step {global_step}, epoch "
            f"{epoch + 1}, before one; raise --max-steps or --epochs to continue"
        )
    report = evaluate_table(
        study_table(valid_views, best_probs),
        n_resamples=options.bootstrap_resamples,
        seed=options.seed,
    )
    report["valid_loss"] = best_loss
    report["best_epoch"] = best_epoch
    _atomic_write_text(json.dumps(report, indent=2), out / "valid_report.json")

    init = (
        f"ImageNet initialisation from {Path(options.imagenet_weights).name}"
        if options.imagenet_weights
        else f"random initialisation (seed {options.seed})"
    )
    notes = (
        f"DenseNet-169, {init}; weighted BCE per study type; Adam lr {options.lr:g} "
        f"(÷10 on validation-loss plateau, patience {options.plateau_patience}); "
        f"batch {options.batch_size}; {options.image_size} px; "
        f"{'bf16 autocast' if cfg.bf16 else 'fp32'} on {device.type}; "
        f"flips {'on' if options.flip else 'off'}, rotations ±{options.max_rotation:g}°; "
        f"{global_step} steps; best epoch {best_epoch} (validation loss {best_loss:.4f}); "
        f"seed {options.seed}.\nMetrics: validation set, threshold 0.5."
    )
    card = write_card(
        out / "card.toml",
        name=options.name,
        version=options.version,
        weights_file=weights_path,
        training_data=(
            f"{training_data}; training {_describe_views(train_views)}, "
            f"validation {_describe_views(valid_views)}"
        ),
        input_size=options.image_size,
        study_types=learned,
        validated=False,
        metrics={**card_metrics(report), "valid_loss": best_loss},
        description=options.description,
        training_notes=notes,
    )
    log(f"wrote {card.path} (unvalidated) and {weights_path}")
    return TrainResult(
        card_path=card.path,
        weights_path=weights_path,
        best_epoch=best_epoch,
        best_valid_loss=best_loss,
        steps=global_step,
        history=history,
        report=report,
    )


def _check_images(
    views: Sequence[View], prep: Preprocessing, workers: int, log: Callable[[str], None]
) -> None:
    """Log every image that cannot be read, then raise DataError if there was any."""
    log(f"checking that all {len(views)} images can be read …")
    problems = unreadable_images(
        views, prep, workers=workers, progress=lambda done, total: log(f"  read {done} of {total}")
    )
    for problem in problems:
        log(f"cannot read {problem}")
    if problems:
        raise DataError(
            f"{len(problems)} of {len(views)} images cannot be read (listed above): fix them, "
            "or take them out of the data, and start again"
        )
    log("all images can be read")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint to resume from, or DataError saying why it cannot be used."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # A truncated file raises RuntimeError (PytorchStreamReader), another kind of file
        # UnpicklingError …, all with multi-line messages.
        raise DataError(
            f"{path}: not a readable checkpoint ({type(exc).__name__}); delete it to start "
            "afresh, or use another output folder"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise DataError(f"{path}: unknown checkpoint format {found!r}")
    missing = sorted(_CHECKPOINT_KEYS - set(ckpt))
    if missing:
        raise DataError(f"{path}: incomplete checkpoint, no {', '.join(missing)}")
    return ckpt


def _trained_types_only(
    valid_views: Sequence[View], trained: Sequence[StudyType], log: Callable[[str], None]
) -> list[View]:
    """The validation images of the study types learned in training: the card covers only
    those (the daemon skips the rest), so neither its metrics nor the weights it keeps may
    depend on the others."""
    kept = [v for v in valid_views if v.study_type in trained]
    left = sorted({v.study_type.value for v in valid_views} - {t.value for t in trained})
    if left:
        log(
            f"warning: {len(valid_views) - len(kept)} validation images of {', '.join(left)} "
            "left out: no training images of both classes of that type"
        )
    if not kept:
        raise DataError("no validation image of a study type in the training set")
    return kept


def study_types_of(views: Sequence[View]) -> list[StudyType]:
    """The study types present, in enum order."""
    present = {v.study_type for v in views}
    return [t for t in StudyType if t in present]
