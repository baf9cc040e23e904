"""`triage train` / `triage evaluate` on bad input, and the card a re-tuned operating point writes.

Bad options fail before any data is read (argparse's usage error, exit 2, or one ``triage: …``
line, exit 1); a run that goes to NaN, a damaged checkpoint or ImageNet file stop with one
line and no traceback; damaged DICOM files are skipped and counted.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.test_training import _tiny, one_thread  # noqa: F401 - a fixture
from triage.scoring.card import CardError, ModelCard, load_card, write_card
from triage.study_types import StudyType
from triage.testing.synth import write_labelled_dicom_dataset
from triage.training.cli import main
from triage.training.data import DataError, steps_per_epoch
from triage.training.evaluate import (
    StudyTable,
    card_metrics,
    evaluate_table,
    operating_point_version,
    tune_thresholds,
    write_operating_point,
)
from triage.training.train import TrainOptions, densenet_final_side, train

#: Small and fast: what every training run here adds to its arguments.
_FAST = ["--image-size", "32", "--batch-size", "4", "--bootstrap", "0", "--device", "cpu"]


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "command, args, flag",
    [
        ("train", ["--epochs", "0"], "--epochs"),
        ("train", ["--max-steps", "0"], "--max-steps"),
        ("train", ["--batch-size", "0"], "--batch-size"),
        ("train", ["--image-size", "16"], "--image-size"),
        ("train", ["--image-size", "4096"], "--image-size"),
        ("train", ["--lr", "nan"], "--lr"),
        ("train", ["--lr", "0"], "--lr"),
        ("train", ["--log-every", "0"], "--log-every"),
        ("train", ["--bootstrap", "-1"], "--bootstrap"),
        ("evaluate", ["--batch-size", "0"], "--batch-size"),
        ("evaluate", ["--threshold", "1.5"], "--threshold"),
        ("evaluate", ["--tune-threshold", "0"], "--tune-threshold"),
        ("evaluate", ["--workers", "-1"], "--workers"),
    ],
)
def test_out_of_range_options_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, args: list[str], flag: str
) -> None:
    where = ["--out", str(tmp_path / "o")] if command == "train" else ["--card", str(tmp_path)]
    with pytest.raises(SystemExit) as exited:
        main([command, "--mura", str(tmp_path / "none"), *where, *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--version", " "], "version must be a non-empty string"),
        (["--version", ""], "version must be a non-empty string"),
        (["--name", ""], "name must be a non-empty string"),
        (["--batch-size", "1", "--image-size", "32"], "single value per channel"),
        (["--imagenet-weights", "/nonexistent/densenet.pth"], "no such file"),
    ],
)
def test_card_fields_and_option_combinations_are_checked_before_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    # The data folder does not exist: an option checked only after the data (or, for the
    # card's fields, after training) would fail with another message.
    out = tmp_path / "o"
    assert main(["train", "--mura", str(tmp_path / "none"), "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("triage: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_options_are_checked_for_programmatic_runs_too(tmp_path: Path) -> None:
    out = tmp_path / "o"
    for bad in ({"epochs": 0}, {"max_steps": 0}, {"batch_size": 0}, {"image_size": 16}):
        with pytest.raises(DataError, match="must be"):
            options = TrainOptions(out_dir=out, **bad)  # type: ignore[arg-type]
            train([], [], options, training_data="x")
    with pytest.raises(CardError, match="version must be a non-empty string"):
        train([], [], TrainOptions(out_dir=out, version=" "), training_data="x")
    assert not out.exists()
    with pytest.raises(DataError, match="batch size"):
        steps_per_epoch(10, 0)
    TrainOptions(out_dir=out, image_size=32).check()
    TrainOptions(out_dir=out, image_size=2048).check()  # the card's whole range is accepted


def test_final_feature_side_is_densenets() -> None:
    from triage.scoring.model import build_densenet169

    features = build_densenet169().features.eval()
    with torch.inference_mode():
        for size in (32, 48, 61, 62, 64, 100):
            side = features(torch.zeros(1, 3, size, size)).shape[-1]
            assert densenet_final_side(size) == side, size


@pytest.mark.usefixtures("one_thread")
def test_a_diverging_run_stops_at_once_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    code = main(
        ["train", "--mura", str(_tiny(tmp_path)), "--out", str(out), *_FAST, "--max-steps", "3",
         "--lr", "1e30", "--log-every", "100", "--checkpoint-every", "0"]
    )  # fmt: skip
    assert code == 1
    last = _last_line(capsys)
    assert re.fullmatch(
        r"triage: training diverged at step \d \(loss (nan|inf)\); lower --lr", last
    )
    # Stopped before validating or checkpointing a network gone to NaN.
    assert not (out / "card.toml").exists() and not (out / "checkpoint.pt").exists()


@pytest.mark.usefixtures("one_thread")
def test_damaged_checkpoints_and_imagenet_files_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = _tiny(tmp_path)
    out = tmp_path / "o"
    run = ["train", "--mura", str(tiny), "--out", str(out), *_FAST, "--log-every", "100"]

    not_torch = tmp_path / "densenet.pth"
    not_torch.write_text("[model]\ncard = 'x'\n")
    assert main([*run, "--max-steps", "1", "--imagenet-weights", str(not_torch)]) == 1
    assert _last_line(capsys).endswith("not a PyTorch state dict (UnpicklingError)")

    # A real checkpoint, cut short as a full disk or a copy would leave it.
    assert main([*run, "--max-steps", "1"]) == 0
    capsys.readouterr()
    ckpt_path = out / "checkpoint.pt"
    whole = ckpt_path.read_bytes()
    ckpt_path.write_bytes(whole[: len(whole) // 2])
    assert main([*run, "--max-steps", "2", "--resume"]) == 1
    assert re.fullmatch(
        r"triage: \S+checkpoint.pt: not a readable checkpoint \(\w+\); .*", _last_line(capsys)
    )

    torch.save({"format": 1, "data": "x"}, ckpt_path)
    assert main([*run, "--max-steps", "2", "--resume"]) == 1
    assert "incomplete checkpoint, no best_epoch" in _last_line(capsys)

    # A checkpoint written between steps and validation (by --checkpoint-every), resumed at
    # the step it holds: nothing to select weights from, said as such.
    ckpt_path.write_bytes(whole)
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["best_probs"] = None
    torch.save(ckpt, ckpt_path)
    assert main([*run, "--max-steps", "1", "--resume"]) == 1
    assert _last_line(capsys).startswith("triage: no validation was run: the run stopped at step 1")


def test_damaged_dicom_files_are_counted_by_both_commands(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from triage.training.cli import _evaluation_views, _training_data

    labels = write_labelled_dicom_dataset(tmp_path / "d", studies=2, rows=32, cols=32, seed=1)
    good = next(p for p in sorted((tmp_path / "d").rglob("*.dcm")))
    blob = bytearray(good.read_bytes())
    blob[blob.index(b"\x02\x00\x10\x00UI", 132) + 5] = ord("f")  # an unknown VR
    (tmp_path / "d" / "damaged.dcm").write_bytes(bytes(blob))

    notes: list[str] = []
    args = argparse.Namespace(mura=None, dicom=tmp_path / "d", labels=labels)
    assert _evaluation_views(args, notes)[0]
    assert notes == ["1 damaged DICOM file skipped"]

    args = argparse.Namespace(
        mura=None, train_dicom=tmp_path / "d", train_labels=labels, valid_dicom=tmp_path / "d",
        valid_labels=labels,
    )  # fmt: skip
    _training_data(args)
    err = capsys.readouterr().err
    assert err.count(f"warning: 1 damaged DICOM file under {tmp_path / 'd'} skipped") == 2


def _card(tmp_path: Path) -> ModelCard:
    weights = tmp_path / "m" / "weights.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"only hashed here")
    return write_card(
        tmp_path / "m",
        name="m",
        version="2025.11.1",
        weights_file=weights,
        training_data="t",
        input_size=32,
        study_types=[StudyType.HAND, StudyType.WRIST],
        metrics={
            "auroc": 0.9,
            "auroc_ci95_low": 0.8,
            "auroc_ci95_high": 0.95,
            "valid_loss": 0.3,
            "XR_HAND": {"auroc": 0.7},
        },
        training_notes="best epoch 1 (validation loss 0.3)\nMetrics: validation set.",
    )


def test_a_retuned_card_holds_this_evaluations_metrics_and_its_own_version(
    tmp_path: Path,
) -> None:
    card = _card(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 10)
    # Wrist studies only: the card's XR_HAND metrics and CIs cannot come from this data.
    table = StudyTable(
        [f"s{i}" for i in range(20)],
        [StudyType.WRIST] * 20,
        labels,
        np.clip(0.3 * labels + rng.random(20) * 0.7, 0.01, 0.99),
        np.ones(20, dtype=np.int64),
    )
    threshold, thresholds = tune_thresholds(table, 0.9)
    report = evaluate_table(table, threshold=threshold, thresholds=thresholds, n_resamples=0)

    def tune(card: ModelCard, threshold: float, thresholds: dict[StudyType, float]) -> ModelCard:
        return write_operating_point(
            card,
            threshold=threshold,
            thresholds=thresholds,
            target_sensitivity=0.9,
            report=report,
            data_description="local wrists",
        )

    tuned = tune(card, threshold, thresholds)
    assert dict(tuned.metrics) == card_metrics(report)
    assert "XR_HAND" not in tuned.metrics and "valid_loss" not in tuned.metrics
    assert not any("ci95" in key for key in tuned.metrics)
    assert "validation loss 0.3" in tuned.training_notes

    # A version of its own, that the card loader accepts.
    version = tuned.version
    assert re.fullmatch(rf"2025\.11\.1\+t{threshold:.4f}\.[0-9a-f]{{6}}", version)
    assert load_card(tmp_path / "m").version == version
    # The same operating point again: the same version. Another: the suffix is replaced.
    assert tune(tuned, threshold, thresholds).version == version
    other = tune(tuned, threshold, {StudyType.WRIST: thresholds[StudyType.WRIST] + 1e-4})
    assert other.version != version and other.version.count("+t") == 1
    assert other.version.startswith("2025.11.1+t")


def test_operating_point_versions_tell_every_threshold_apart() -> None:
    wrist = {StudyType.WRIST: 0.4}
    base = operating_point_version("1.0", 0.5, wrist)
    assert base.startswith("1.0+t0.5000.")
    assert operating_point_version("1.0", 0.50001, wrist) != base
    assert operating_point_version("1.0", 0.5, {StudyType.WRIST: 0.41}) != base
    assert operating_point_version("1.0", 0.5, {**wrist, StudyType.HAND: 0.4}) != base
    assert operating_point_version(base, 0.5, wrist) == base


@pytest.mark.usefixtures("one_thread")
def test_a_trained_card_is_readable_by_others_and_a_failed_tuning_leaves_it_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Cards and weights came out 0600 (a temp file's mode): made by root, copied next to the
    daemon's config, the daemon's own user could not read them. A tuning whose report could
    not be written failed, yet had rewritten the card."""
    import os
    import stat

    tiny = _tiny(tmp_path)
    out = tmp_path / "o"
    before = os.umask(0o022)
    try:
        run = ["train", "--mura", str(tiny), "--out", str(out), *_FAST, "--max-steps", "1"]
        assert main([*run, "--log-every", "100"]) == 0
    finally:
        os.umask(before)
    for name in ("card.toml", "weights.pt"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    capsys.readouterr()
    card_bytes = (out / "card.toml").read_bytes()
    (tmp_path / "a-file").write_text("not a folder")
    evaluate = ["evaluate", "--card", str(out), "--mura", str(tiny), "--bootstrap", "0"]
    blocked = str(tmp_path / "a-file" / "report.json")
    code = main([*evaluate, "--device", "cpu", "--tune-threshold", "0.9", "--json", blocked])
    assert code == 1 and "a-file" in _last_line(capsys)
    assert (out / "card.toml").read_bytes() == card_bytes


@pytest.mark.usefixtures("one_thread")
def test_an_unreadable_image_is_one_line_also_from_a_loader_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # torch raises a worker's error again with the worker's traceback as its message.
    tiny = _tiny(tmp_path)
    image = sorted((tiny / "MURA-v1.1" / "valid").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:100])
    out = tmp_path / "o"
    lines = []
    for workers in ("0", "1"):
        run = ["train", "--mura", str(tiny), "--out", str(out), *_FAST, "--max-steps", "1"]
        assert main([*run, "--workers", workers, "--log-every", "100"]) == 1
        lines.append(_last_line(capsys))
    assert lines[0] == lines[1], lines
    assert lines[0].startswith(f"triage: {image}: unreadable image")


@pytest.mark.usefixtures("one_thread")
def test_resume_takes_the_same_data_by_another_path_and_refuses_another_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = _tiny(tmp_path)
    link = tmp_path / "same-data"
    link.symlink_to(tiny)  # as after a remount, or given as another path
    out = tmp_path / "o"
    run = ["--out", str(out), *_FAST, "--log-every", "100", "--checkpoint-every", "1"]
    assert main(["train", "--mura", str(tiny), *run, "--max-steps", "1"]) == 0
    capsys.readouterr()
    # The card would say lr 0.01, though the optimiser state (lr 1e-4) is what runs.
    changed = ["--lr", "0.01", "--no-flip"]
    assert main(["train", "--mura", str(link), *run, "--max-steps", "2", "--resume", *changed]) == 1
    last = _last_line(capsys)
    assert "the run began with lr 0.0001 (given 0.01); flip True (given False)" in last
    assert main(["train", "--mura", str(link), *run, "--max-steps", "2", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_a_type_not_learned_in_training_is_left_out_of_the_card_and_its_validation(
    tmp_path: Path,
) -> None:
    # The card does not cover the type (the daemon skips its studies): its metrics and the
    # choice of weights must not count it either.
    from triage.training.data import load_mura

    tiny = _tiny(tmp_path)
    # Hands: abnormal ones only, which train on loss weight 0: nothing of them is learned.
    train_views = [
        v for v in load_mura(tiny, "train") if v.study_type is StudyType.WRIST or v.label == 1
    ]
    assert {v.study_type for v in train_views} == {StudyType.WRIST, StudyType.HAND}
    lines: list[str] = []
    options = TrainOptions(
        out_dir=tmp_path / "o", image_size=32, batch_size=4, max_steps=1, device="cpu",
        cache_images=True, bootstrap_resamples=0, log_every=100,
    )  # fmt: skip
    result = train(
        train_views, load_mura(tiny, "valid"), options, training_data="t", log=lines.append
    )
    card = load_card(result.card_path)
    assert tuple(card.study_types) == (StudyType.WRIST,)
    assert "XR_HAND" not in card.metrics
    assert any("validation images of XR_HAND left out" in line for line in lines)
    assert any("XR_HAND has a single class" in line and "not cover" in line for line in lines)


def test_ctrl_c_says_how_to_resume_in_one_line(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    tiny = _tiny(tmp_path)
    out = tmp_path / "o"
    # Python leaves SIGINT ignored when the process starts with it ignored, as a test run
    # started in the background of a shell without job control does: as at a terminal here.
    script = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from triage.training.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    args = ["train", "--mura", str(tiny), "--out", str(out), *_FAST, "--max-steps", "100000",
            "--log-every", "1", "--checkpoint-every", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args], stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"triage: interrupted; the same command with --resume continues from {out}/checkpoint.pt"
    )


@pytest.mark.usefixtures("one_thread")
def test_a_folder_that_holds_a_run_is_not_trained_into_afresh_by_accident(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = _tiny(tmp_path)
    out = tmp_path / "o"
    run = ["train", "--mura", str(tiny), "--out", str(out), *_FAST, "--max-steps", "1"]
    assert main([*run, "--log-every", "100"]) == 0
    weights = (out / "weights.pt").read_bytes()
    capsys.readouterr()
    assert main([*run, "--log-every", "100"]) == 1
    assert _last_line(capsys) == (
        f"triage: {out} holds another run (card.toml, weights.pt, checkpoint.pt): --resume "
        "continues it, --overwrite starts afresh there"
    )
    assert (out / "weights.pt").read_bytes() == weights
    assert main([*run, "--log-every", "100", "--overwrite", "--seed", "7"]) == 0
    assert (out / "weights.pt").read_bytes() != weights


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("workers", ["0", "1"])
def test_check_images_lists_every_unreadable_image_before_the_first_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], workers: str
) -> None:
    """Without it, training stops at the first damaged image it draws, one per run; with
    it, all of them (in training and validation) are listed before anything is trained."""
    tiny = _tiny(tmp_path)
    damaged = [
        sorted((tiny / "MURA-v1.1" / split).rglob("*.png"))[index]
        for split, index in (("train", 2), ("valid", 0), ("valid", 3))
    ]
    damaged[0].write_bytes(damaged[0].read_bytes()[:100])  # truncated
    damaged[1].write_bytes(b"")
    damaged[2].write_bytes(b"not a picture at all")
    out = tmp_path / "o"
    run = ["train", "--mura", str(tiny), "--out", str(out), *_FAST, "--max-steps", "1"]
    assert main([*run, "--workers", workers, "--check-images"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    listed = [line for line in err.splitlines() if line.startswith("cannot read ")]
    assert len(listed) == 3
    for line, path in zip(listed, damaged, strict=True):
        assert line.startswith(f"cannot read {path}: "), line
    total = len(list((tiny / "MURA-v1.1").rglob("*.png")))
    assert err.strip().splitlines()[-1] == (
        f"triage: 3 of {total} images cannot be read (listed above): fix them, or take them"
        " out of the data, and start again"
    )
    assert not (out / "checkpoint.pt").exists() and not (out / "weights.pt").exists()


@pytest.mark.usefixtures("one_thread")
def test_check_images_lets_a_readable_data_set_train(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny = _tiny(tmp_path)
    out = tmp_path / "o"
    run = ["train", "--mura", str(tiny), "--out", str(out), *_FAST, "--max-steps", "1"]
    assert main([*run, "--check-images"]) == 0
    err = capsys.readouterr().err
    assert "all images can be read" in err
    assert (out / "card.toml").is_file()


def test_negative_seed_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--seed"):
        TrainOptions(out_dir=tmp_path, seed=-1).check()
    for command in (
        ["train", "--mura", str(tmp_path), "--out", str(tmp_path / "o"), "--seed", "-1"],
        ["evaluate", "--card", "models/demo", "--mura", str(tmp_path), "--seed", "-1"],
    ):
        with pytest.raises(SystemExit) as exc:  # argparse, before any data or scoring
            main(command)
        assert exc.value.code == 2


def test_resume_without_a_checkpoint_does_not_replace_a_finished_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "weights.pt").write_bytes(b"weights of a finished run")
    (out / "card.toml").write_text("# card\n")
    assert main(["train", "--mura", str(tmp_path / "none"), "--out", str(out), "--resume"]) == 1
    assert "no checkpoint.pt" in capsys.readouterr().err
    assert (out / "weights.pt").read_bytes() == b"weights of a finished run"
