"""``triage train`` and ``triage evaluate``.

:func:`add_commands` adds both to the ``triage`` parser; :func:`main` runs them on their own
(``python -m triage.training.cli train …``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.training.errors import DataError

if TYPE_CHECKING:
    from triage.training.data import View

_DEVICES = ("auto", "cpu", "cuda")
#: The model card's input-size range (triage.scoring.card; TrainOptions.check repeats it).
_IMAGE_SIZES = (32, 2048)
#: Seeds numpy's generators (non-negative only) and torch.manual_seed (< 2**64) both take.
_MAX_SEED = 2**63 - 1


def _int_from(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {span} (got {value})")
        return value

    return parse


def _number(low: float, high: float, *, low_open: bool, high_open: bool) -> Callable[[str], float]:
    """An argparse type: a finite number between low and high (each end open or closed)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if not math.isfinite(value) or below or above:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be in {span} (got {text})")
        return value

    return parse


_POSITIVE = _number(0.0, math.inf, low_open=True, high_open=True)


def _add_data_args(parser: argparse.ArgumentParser, *, training: bool) -> None:
    data = parser.add_argument_group("data (a MURA-v1.1 folder, or labelled DICOM folders)")
    data.add_argument(
        "--mura", metavar="ROOT", help="MURA-v1.1 folder, or the folder that contains it"
    )
    if training:
        data.add_argument("--train-dicom", metavar="DIR", help="DICOM training studies")
        data.add_argument(
            "--train-labels", metavar="CSV", help="StudyInstanceUID,label (1=abnormal)"
        )
        data.add_argument("--valid-dicom", metavar="DIR", help="DICOM validation studies")
        data.add_argument("--valid-labels", metavar="CSV", help="StudyInstanceUID,label")
    else:
        data.add_argument(
            "--split", default="valid", choices=("train", "valid"), help="MURA split (valid)"
        )
        data.add_argument("--dicom", metavar="DIR", help="DICOM studies to evaluate")
        data.add_argument("--labels", metavar="CSV", help="StudyInstanceUID,label (1=abnormal)")


def add_commands(subparsers: Any) -> None:
    """Add ``train`` and ``evaluate`` to the ``triage`` sub-command parsers."""
    train = subparsers.add_parser(
        "train",
        help="train the MURA DenseNet-169 recipe; writes weights and an unvalidated model card",
        description="Train DenseNet-169 with the MURA recipe (weighted BCE per study type, Adam "
        "1e-4, batch 8, LR/10 on validation plateau, flips and rotations, best validation loss "
        "kept). Writes OUT/weights.pt, OUT/card.toml, OUT/checkpoint.pt, OUT/valid_report.json.",
    )
    _add_data_args(train, training=True)
    train.add_argument("--out", required=True, type=Path, help="output folder")
    train.add_argument("--name", default="mura-densenet169", help="model name in the card")
    train.add_argument("--version", help="model version in the card (default: today's date)")
    train.add_argument("--description", default="", help="free text for the card")
    train.add_argument(
        "--image-size",
        type=_int_from(*_IMAGE_SIZES),
        default=224,
        help="input side in px, 32..2048 (224)",
    )
    train.add_argument("--epochs", type=_int_from(1), default=10, help="epochs (10)")
    train.add_argument(
        "--max-steps", type=_int_from(1), help="stop after this many optimiser steps"
    )
    train.add_argument("--batch-size", type=_int_from(1), default=8, help="mini-batch size (8)")
    train.add_argument("--lr", type=_POSITIVE, default=1e-4, help="initial learning rate (1e-4)")
    train.add_argument(
        "--plateau-patience",
        type=_int_from(0),
        default=0,
        help="epochs without validation improvement before LR/10 (0: at the first plateau)",
    )
    train.add_argument("--no-flip", action="store_true", help="no random lateral flips")
    train.add_argument(
        "--max-rotation",
        type=_number(0.0, 180.0, low_open=False, high_open=False),
        default=30.0,
        help="random rotation range ± degrees (30)",
    )
    train.add_argument(
        "--workers",
        type=_int_from(0),
        help="data-loading processes (default: 0 on a CPU, 8 with CUDA)",
    )
    train.add_argument("--device", default="auto", choices=_DEVICES, help="auto: CUDA if present")
    train.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="auto: bf16 autocast + channels_last on CUDA and on CPUs with native bf16, else fp32",
    )
    train.add_argument("--seed", type=_int_from(0, _MAX_SEED), default=0, help="random seed (0)")
    train.add_argument(
        "--imagenet-weights",
        metavar="FILE",
        help="local torchvision densenet169 ImageNet state dict (never downloaded)",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt if present"
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an OUT that holds another run (its weights and card are replaced)",
    )
    train.add_argument(
        "--checkpoint-every",
        type=_int_from(0),
        default=500,
        help="also checkpoint every N steps, 0: only after validations (500)",
    )
    train.add_argument(
        "--log-every", type=_int_from(1), default=50, help="progress line every N steps"
    )
    train.add_argument(
        "--cache-images", action="store_true", help="keep prepared images in memory (small sets)"
    )
    train.add_argument(
        "--check-images",
        action="store_true",
        help="read every image before training and list all that cannot be read (a damaged "
        "image otherwise stops the run when it is first drawn)",
    )
    train.add_argument(
        "--bootstrap",
        type=_int_from(0),
        default=10_000,
        help="bootstrap resamples for the CIs (10000)",
    )
    train.set_defaults(func=run_train)

    ev = subparsers.add_parser(
        "evaluate",
        help="study-level metrics with bootstrap CIs; reader comparison; operating point",
        description="Score studies with a model card as the daemon does (mean of view "
        "probabilities) and report AUROC, F1, kappa, sensitivity and specificity per study type "
        "and in aggregate, with 95% bootstrap CIs.",
    )
    ev.add_argument("--card", required=True, help="model card (card.toml or its folder)")
    _add_data_args(ev, training=False)
    ev.add_argument(
        "--readers",
        metavar="CSV",
        help="readers' labels: header 'study,<reader>,<reader>,…' (study path or UID)",
    )
    ev.add_argument(
        "--reader-tie",
        choices=("abnormal", "normal"),
        default="abnormal",
        help="what a tied majority vote counts as (ties need an even group): abnormal",
    )
    point = ev.add_mutually_exclusive_group()
    point.add_argument(
        "--threshold",
        type=_number(0.0, 1.0, low_open=True, high_open=True),
        help="one threshold for all, in (0, 1) (default: the card's)",
    )
    point.add_argument(
        "--tune-threshold",
        type=_number(0.0, 1.0, low_open=True, high_open=False),
        metavar="SENSITIVITY",
        help="choose global and per-type thresholds reaching this sensitivity on these studies "
        "and write them into the card (which becomes unvalidated)",
    )
    ev.add_argument("--json", type=Path, metavar="FILE", help="write the full report as JSON")
    ev.add_argument("--plots", type=Path, metavar="DIR", help="write ROC plots (PNG) here")
    ev.add_argument("--bootstrap", type=_int_from(0), default=10_000, help="resamples (10000)")
    ev.add_argument("--seed", type=_int_from(0, _MAX_SEED), default=0, help="bootstrap seed (0)")
    ev.add_argument("--device", default="auto", choices=_DEVICES)
    ev.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ev.add_argument("--batch-size", type=_int_from(1), default=32)
    ev.add_argument("--workers", type=_int_from(0), default=0, help="decoding processes (0)")
    ev.set_defaults(func=run_evaluate)


def _files(n: int) -> str:
    return f"{n} damaged DICOM file{'' if n == 1 else 's'}"


def _fail(message: str) -> int:
    print(f"triage: {' '.join(_without_worker_traceback(message).split())}", file=sys.stderr)
    return 1


def _without_worker_traceback(message: str) -> str:
    """The original error of a DataLoader worker: torch raises it again in the main process
    with the worker's whole traceback as its message ("Caught DataError in DataLoader worker
    process 0. Original Traceback … DataError: <message>")."""
    if not message.startswith("Caught ") or "Original Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]
    kind, separator, original = last.partition(": ")
    return original if separator and " " not in kind else last


def _training_data(args: argparse.Namespace) -> tuple[list[View], list[View], str]:
    from triage.training.data import find_mura_dir, load_dicom_folder, load_mura

    dicom = (args.train_dicom, args.train_labels, args.valid_dicom, args.valid_labels)
    if args.mura and any(dicom):
        raise DataError("give --mura or the --train-/--valid- DICOM options, not both")
    if args.mura:
        mura = find_mura_dir(args.mura)
        return load_mura(mura, "train"), load_mura(mura, "valid"), f"MURA-v1.1 at {mura}"
    if not all(dicom):
        raise DataError(
            "give --mura ROOT, or all of --train-dicom, --train-labels, --valid-dicom, "
            "--valid-labels"
        )
    views: list[list[View]] = []
    for folder, labels in (
        (args.train_dicom, args.train_labels),
        (args.valid_dicom, args.valid_labels),
    ):
        damaged: list[Path] = []
        views.append(load_dicom_folder(folder, labels, damaged=damaged))
        if damaged:
            # A count, not the paths: exported folders are often named after the patient.
            print(
                f"warning: {_files(len(damaged))} under {folder} skipped",
                file=sys.stderr,
            )
    return (
        views[0],
        views[1],
        f"DICOM {args.train_dicom} labelled by {Path(args.train_labels).name}",
    )


def run_train(args: argparse.Namespace) -> int:
    """``triage train``."""
    from triage.scoring.card import CardError
    from triage.training.train import TrainOptions, train

    try:
        options = TrainOptions(
            out_dir=args.out,
            name=args.name,
            image_size=args.image_size,
            epochs=args.epochs,
            max_steps=args.max_steps,
            batch_size=args.batch_size,
            lr=args.lr,
            plateau_patience=args.plateau_patience,
            flip=not args.no_flip,
            max_rotation=args.max_rotation,
            workers=args.workers,
            device=args.device,
            precision=args.precision,
            seed=args.seed,
            imagenet_weights=args.imagenet_weights,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            log_every=args.log_every,
            cache_images=args.cache_images,
            check_images=args.check_images,
            bootstrap_resamples=args.bootstrap,
            description=args.description,
        )
        if args.version is not None:
            options.version = args.version
        # Before the data: a DICOM scan can take minutes, a bad option should not.
        options.check()
        held = [
            name
            for name in ("card.toml", "weights.pt", "checkpoint.pt")
            if (Path(args.out) / name).is_file()
        ]
        if held and args.resume and "checkpoint.pt" not in held and not args.overwrite:
            # --resume with nothing to resume from would start afresh and replace the run.
            raise DataError(
                f"{args.out} holds a run ({', '.join(held)}) but no checkpoint.pt to continue "
                "from: --overwrite starts afresh there"
            )
        if held and not args.resume and not args.overwrite:
            # A run of days, replaced by a typo in --out.
            raise DataError(
                f"{args.out} holds another run ({', '.join(held)}): --resume continues it, "
                "--overwrite starts afresh there"
            )
        train_views, valid_views, description = _training_data(args)
        result = train(train_views, valid_views, options, training_data=description)
    except (DataError, CardError, ValueError, OSError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        checkpoint = Path(args.out) / "checkpoint.pt"
        resume = (
            f"; the same command with --resume continues from {checkpoint}"
            if checkpoint.is_file()
            else ""
        )
        print(f"triage: interrupted{resume}", file=sys.stderr)
        return 130
    from triage.training.evaluate import format_report

    print(format_report(result.report))
    print(f"card: {result.card_path}")
    return 0


def _evaluation_views(args: argparse.Namespace, notes: list[str]) -> tuple[list[View], str]:
    from triage.training.data import find_mura_dir, load_dicom_folder, load_mura

    if args.mura and (args.dicom or args.labels):
        raise DataError("give --mura or --dicom with --labels, not both")
    if args.mura:
        mura = find_mura_dir(args.mura)
        return load_mura(mura, args.split), f"MURA-v1.1 {args.split} split at {mura}"
    if not (args.dicom and args.labels):
        raise DataError("give --mura ROOT, or --dicom DIR with --labels CSV")
    # Studies the daemon would skip are left out, as the daemon would, and counted.
    skipped: list[tuple[str, str]] = []
    damaged: list[Path] = []
    views = load_dicom_folder(args.dicom, args.labels, skipped=skipped, damaged=damaged)
    if damaged:
        # A count, not the paths: exported folders are often named after the patient.
        notes.append(f"{_files(len(damaged))} skipped")
    if skipped:
        notes.append(
            f"{len(skipped)} labelled studies skipped as the daemon would, e.g. "
            f"{skipped[0][0]}: {skipped[0][1]}"
        )
    return views, f"DICOM {args.dicom}"


def run_evaluate(args: argparse.Namespace) -> int:
    """``triage evaluate``."""
    from triage.scoring.card import CardError, load_card
    from triage.training.evaluate import (
        evaluate_readers,
        evaluate_table,
        format_report,
        read_reader_labels,
        study_table,
        tune_thresholds,
        write_operating_point,
    )

    try:
        card = load_card(args.card)
        if args.tune_threshold is not None and card.weights_path is None:
            # Said before the data set is scored (hours on a large one), not after.
            raise DataError(f"{card.path}: a card without a weights file cannot be tuned")
        notes: list[str] = []
        views, description = _evaluation_views(args, notes)
        covered = [v for v in views if card.covers(v.study_type)]
        if len(covered) < len(views):
            skipped = sorted(
                {v.study_type.value for v in views} - {t.value for t in card.study_types}
            )
            notes.append(
                f"{len(views) - len(covered)} views of {', '.join(skipped)} skipped: "
                "the card does not cover them"
            )
        if not covered:
            raise DataError("no view of a study type the card covers")
        probs = predict_with_card(
            card,
            covered,
            device=args.device,
            precision=args.precision,
            batch_size=args.batch_size,
            workers=args.workers,
        )
        table = study_table(covered, probs)
        threshold = card.threshold if args.threshold is None else args.threshold
        thresholds = dict(card.thresholds) if args.threshold is None else {}
        if args.tune_threshold is not None:
            threshold, thresholds = tune_thresholds(table, args.tune_threshold)
            notes.append(
                f"thresholds tuned for sensitivity {args.tune_threshold:g} on these studies: "
                "the metrics below are optimistic; confirm on other data"
            )
        report = evaluate_table(
            table,
            threshold=threshold,
            thresholds=thresholds,
            n_resamples=args.bootstrap,
            seed=args.seed,
        )
        report["card"] = str(card.path)
        report["data"] = description
        if args.readers:
            names, labels = read_reader_labels(args.readers)
            report["readers"] = evaluate_readers(
                table,
                names,
                labels,
                threshold=threshold,
                thresholds=thresholds,
                n_resamples=args.bootstrap,
                seed=args.seed,
                tie=1 if args.reader_tie == "abnormal" else 0,
            )
        if args.tune_threshold is not None:
            notes.append(f"wrote the thresholds into {card.path} (now unvalidated)")
        report["notes"] = notes
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2, allow_nan=False), encoding="utf-8")
        if args.plots:
            from triage.training.plots import write_roc_plots

            write_roc_plots(report, args.plots)
        if args.tune_threshold is not None:
            # Last: a report or plot that cannot be written fails the command, and a card
            # rewritten by a failed command would be a surprise.
            write_operating_point(
                card,
                threshold=threshold,
                thresholds=thresholds,
                target_sensitivity=args.tune_threshold,
                report=report,
                data_description=description,
            )
    except (DataError, CardError, ValueError, OSError) as exc:
        return _fail(str(exc))
    print(format_report(report))
    return 0


def predict_with_card(
    card: Any,
    views: Sequence[View],
    *,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    workers: int = 0,
) -> Any:
    """View probabilities (numpy, in ``views`` order) from the daemon's ScoringModel."""
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from triage.scoring.model import load_model
    from triage.training.data import Preprocessing, ViewDataset

    model = load_model(card, device=device, precision=precision)
    prep = Preprocessing(input_size=card.input_size, mean=card.mean, std=card.std)
    loader = DataLoader(ViewDataset(views, prep), batch_size=batch_size, num_workers=workers)
    probs = np.empty(len(views), dtype=np.float64)
    for x, _, _, idx in loader:
        logits, _cams = model.forward(x)
        probs[idx.numpy()] = torch.sigmoid(logits.float()).double().numpy()
    return probs


def build_parser() -> argparse.ArgumentParser:
    """A parser with just ``train`` and ``evaluate`` (until they are wired into ``triage``)."""
    parser = argparse.ArgumentParser(prog="triage")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``train`` or ``evaluate`` from an argument list."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
