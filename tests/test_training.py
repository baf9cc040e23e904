"""`triage train` / `triage evaluate` end to end on synthetic MURA-layout data (CPU).

The learning test trains with the real recipe code (DenseNet-169 from scratch, weighted BCE per
study type, Adam, batch 8, flips and ±30° rotations, LR/10 on plateau, best-validation-loss
selection) through the CLI, then evaluates the card it wrote on a held-out data set (other
patients, other seed) the way the daemon scores: the card must load, and the held-out
study-level AUROC must reach 0.9.

What differs from the recipe so that it learns at all in a CPU test (on two idle cores: about
55 s in all on a CPU with native bf16, where training runs in bf16 autocast — 80 steps in
36 s, held-out AUROC 0.997 — and about two minutes in fp32 on a CPU without it):

* the data: phantoms from the synthetic MURA writer's renderer whose abnormal views carry
  *hardware* (plates, screws, wires, arthroplasty). With the writer's full mix (mostly
  fractures, lesions and dislocations, subtle at this size) DenseNet-169 stayed at chance
  (held-out AUROC 0.48–0.53 after 150 steps at 64 and 96 px, learning rate 1e-3);
* 128 px input (the card says so): hardware-only reached 0.82 after 150 steps at 64 px, 0.93
  after 125 at 96 px, 0.91 after 50 and 0.96 after 75 at 128 px (a step costs 0.6, 0.7 and
  1.2–1.4 s at 64, 96 and 128 px);
* learning rate 5e-4 instead of 1e-4: from scratch, with no ImageNet weights offline, 1e-4 had
  not left chance after 120 steps (64 px, full mix); 1e-3 was unstable (128 px: 0.90 after 45
  steps, 0.39 after 60);
* 80 steps (about two epochs of this set). The command's defaults stay the paper's.

Training runs in a child process with ``GOMP_SPINCOUNT=10000``: on a shared two-core host,
OpenMP's default spin-waiting made each step 5–10× slower whenever another process was busy
(15–28 s instead of 2.5 s at 64 px); a short spin keeps the idle speed (1.2–1.4 s per step at
128 px, batch 8) and behaves like ``OMP_WAIT_POLICY=PASSIVE`` under load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from triage.scoring.card import load_card
from triage.scoring.model import load_model
from triage.study_types import StudyType
from triage.testing.phantom import render_phantom_with_findings
from triage.testing.synth import write_mura_dataset
from triage.training.data import DataError, load_mura
from triage.training.train import TrainOptions, TrainResult, train

#: The learning test's settings (see the module docstring).
LEARN_SIZE = 128
LEARN_LR = "5e-4"
LEARN_BATCH = 8
LEARN_STEPS = 80
LEARN_TYPES = tuple(StudyType)

_CLI = "import sys; from triage.training.cli import main; sys.exit(main(sys.argv[1:]))"


def _cli(*args: object, timeout: float = 800) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GOMP_SPINCOUNT": "10000"}
    return subprocess.run(
        [sys.executable, "-c", _CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def write_phantom_mura(
    root: Path,
    *,
    seed: int,
    studies_per_type: int,
    valid_every: int,
    kinds: frozenset[str] = frozenset({"hardware"}),
    size: tuple[int, int] = (128, 104),
) -> None:
    """Phantom studies in the MURA-v1.1 layout; abnormal views carry a finding of ``kinds``.

    The synthetic MURA writer's renderer, with its abnormal views re-drawn until one of their
    findings is of the wanted kind. Half the studies are abnormal; every ``valid_every``-th
    study goes to the valid split; one new patient per study; PA and lateral views.
    """
    mura = root / "MURA-v1.1"
    images: dict[str, list[str]] = {"train": [], "valid": []}
    studies: dict[str, list[str]] = {"train": [], "valid": []}
    patient = seed * 10_000
    for part in StudyType:
        for s in range(studies_per_type):
            split = "valid" if s % valid_every == valid_every - 1 else "train"
            patient += 1
            label = s % 2
            kind = "positive" if label else "negative"
            study = f"{split}/{part.value}/patient{patient:05d}/study1_{kind}"
            for k, view in enumerate(("PA", "LAT"), 1):
                for attempt in range(50):
                    rng = np.random.default_rng([seed, patient, k, attempt])
                    pixels, found = render_phantom_with_findings(
                        part, view, *size, bool(label), rng
                    )
                    if not label or any(f.kind in kinds for f in found):
                        break
                path = mura / study / f"image{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(path)
                images[split].append(f"MURA-v1.1/{study}/image{k}.png")
            studies[split].append(f"MURA-v1.1/{study}/,{label}")
    for split in ("train", "valid"):
        (mura / f"{split}_image_paths.csv").write_text("".join(f"{p}\n" for p in images[split]))
        (mura / f"{split}_labeled_studies.csv").write_text(
            "".join(f"{p}\n" for p in studies[split])
        )


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A training set (train + valid splits) and a held-out set of other patients."""
    base = tmp_path_factory.mktemp("mura")
    write_phantom_mura(base / "train", seed=1, studies_per_type=30, valid_every=5)
    write_phantom_mura(base / "heldout", seed=2, studies_per_type=10, valid_every=1)
    return base / "train", base / "heldout"


@pytest.mark.slow
# 1–2 minutes on two idle cores (bf16 / fp32), twice that with other work on them: above the
# suite's 300 s default.
@pytest.mark.timeout(900)
def test_training_learns_and_its_card_scores_held_out_studies(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    data, heldout = synthetic
    out = tmp_path / "model"
    start = time.monotonic()
    result = _cli(
        "train", "--mura", data, "--out", out, "--image-size", LEARN_SIZE, "--lr", LEARN_LR,
        "--batch-size", LEARN_BATCH, "--max-steps", LEARN_STEPS, "--epochs", 100,
        "--cache-images", "--bootstrap", 1000, "--device", "cpu", "--log-every", 20,
        "--version", "test-1",
    )  # fmt: skip
    train_seconds = time.monotonic() - start
    assert result.returncode == 0, result.stderr[-3000:]
    progress = [line for line in result.stderr.splitlines() if " img/s" in line]
    assert progress and "loss" in progress[0]
    assert "validation: loss" in result.stderr

    card = load_card(out)
    assert card.validated is False
    assert card.input_size == LEARN_SIZE and card.version == "test-1"
    assert set(card.study_types) == set(LEARN_TYPES)
    assert "auroc" in card.metrics and "valid_loss" in card.metrics
    assert (out / "checkpoint.pt").is_file() and (out / "valid_report.json").is_file()
    model = load_model(card, device="cpu", precision="fp32")
    assert model.input_size == LEARN_SIZE

    report_path, plots = tmp_path / "report.json", tmp_path / "plots"
    start = time.monotonic()
    evaluated = _cli(
        "evaluate", "--card", out, "--mura", heldout, "--split", "valid",
        "--json", report_path, "--plots", plots, "--bootstrap", 2000,
        "--device", "cpu", "--precision", "fp32",
    )  # fmt: skip
    eval_seconds = time.monotonic() - start
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(report_path.read_text())
    aggregate = report["groups"]["aggregate"]
    auroc = aggregate["metrics"]["auroc"]["value"]
    print(
        f"\nlearning test: {LEARN_STEPS} steps in {train_seconds:.0f} s, held-out evaluation "
        f"{eval_seconds:.0f} s, held-out study AUROC {auroc:.3f} "
        f"(95% CI {aggregate['metrics']['auroc']['ci95']}), {aggregate['n_studies']} studies"
    )
    assert aggregate["n_studies"] == len({v.study_id for v in load_mura(heldout, "valid")})
    assert auroc >= 0.9, f"held-out study AUROC {auroc:.3f} < 0.9\n{evaluated.stdout}"
    assert "aggregate" in evaluated.stdout and "AUROC (95% CI)" in evaluated.stdout
    roc = Image.open(plots / "roc.png")
    assert roc.size[0] >= 4 * 300 and (plots / "roc_aggregate.png").is_file()
    # Study probability = mean of the view probabilities, from the daemon's model.
    first = report["studies"][0]
    views = [v for v in load_mura(heldout, "valid") if v.study_id == first["study"]]
    from triage.training.data import Preprocessing, load_view_array

    prep = Preprocessing(card.input_size, card.mean, card.std)
    batch = model.make_batch([load_view_array(v, prep) for v in views])
    probs, _cams = model.probabilities(batch)
    assert first["probability"] == pytest.approx(float(probs.mean()), abs=1e-5)


@pytest.mark.slow
def test_tuned_operating_point_is_written_into_the_card_and_readers_compared(
    synthetic: tuple[Path, Path], tmp_path: Path
) -> None:
    """Operating point and readers on a barely trained model (what is checked is the plumbing:
    thresholds written into the card, and the reader table matched by MURA study path)."""
    data, heldout = synthetic
    out = tmp_path / "model"
    trained = _cli(
        "train", "--mura", data, "--out", out, "--image-size", 32, "--max-steps", 2,
        "--batch-size", 4, "--cache-images", "--bootstrap", 0, "--device", "cpu",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    studies = load_mura(heldout, "valid")
    ids = sorted({v.study_id for v in studies})
    truth = {v.study_id: v.label for v in studies}
    rng = np.random.default_rng(0)
    lines = ["study,r1,r2,r3,r4,r5,label"]
    for sid in ids:
        votes = [truth[sid] if rng.random() < 0.85 else 1 - truth[sid] for _ in range(5)]
        # Spelled as in MURA's CSVs: with the MURA-v1.1/ prefix and a trailing slash.
        lines.append(f"MURA-v1.1/{sid}/," + ",".join(map(str, votes)) + f",{truth[sid]}")
    readers = tmp_path / "readers.csv"
    readers.write_text("\n".join(lines) + "\n")
    report_path = tmp_path / "report.json"
    evaluated = _cli(
        "evaluate", "--card", out / "card.toml", "--mura", heldout, "--tune-threshold", 0.9,
        "--readers", readers, "--json", report_path, "--bootstrap", 500,
        "--device", "cpu", "--precision", "fp32",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    card = load_card(out)
    assert card.validated is False
    assert 0 < card.threshold < 1
    report = json.loads(report_path.read_text())
    assert report["threshold"] == pytest.approx(card.threshold)
    assert {t.value: v for t, v in card.thresholds.items()} == pytest.approx(report["thresholds"])
    # Tuned on these studies: each tuned group reaches the target sensitivity.
    for name, group in report["groups"].items():
        sens = group["metrics"]["sensitivity"]["value"]
        if name == "aggregate" or name in report["thresholds"]:
            assert sens >= 0.9 - 1e-9, (name, sens)
    assert "Operating point: sensitivity 0.9" in card.training_notes
    assert card.metrics["sensitivity"] == pytest.approx(
        report["groups"]["aggregate"]["metrics"]["sensitivity"]["value"], abs=1e-6
    )
    compared = report["readers"]["groups"]["aggregate"]
    assert compared["readers"] == ["r1", "r2", "r3", "r4", "r5"]
    assert compared["n_studies"] == len(ids)
    assert set(compared["model_scores"]["f1"]) == {
        "r2+r3+r4+r5",
        "r1+r3+r4+r5",
        "r1+r2+r4+r5",
        "r1+r2+r3+r5",
        "r1+r2+r3+r4",
    }
    diff = compared["model_minus_readers"]["f1"]
    assert diff["value"] == pytest.approx(
        compared["model_mean"]["f1"]["value"] - compared["reader_mean"]["f1"]["value"]
    )
    assert "Readers (r1, r2, r3, r4, r5)" in evaluated.stdout


def _tiny(tmp_path: Path) -> Path:
    root = tmp_path / "tiny"
    write_mura_dataset(
        root,
        studies_per_type=4,
        min_size=48,
        max_size=64,
        seed=3,
        study_types=(StudyType.WRIST, StudyType.HAND),
        valid_fraction=0.5,
    )
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: no OpenMP spinning against other busy processes on a shared host."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run(tiny: Path, out: Path, **kw: object) -> tuple[list[str], TrainResult]:
    options = {
        "out_dir": out, "image_size": 32, "batch_size": 4, "epochs": 3, "device": "cpu",
        "seed": 5, "log_every": 1, "cache_images": True, "bootstrap_resamples": 0, **kw,
    }  # fmt: skip
    lines: list[str] = []
    result = train(
        load_mura(tiny, "train"),
        load_mura(tiny, "valid"),
        TrainOptions(**options),  # type: ignore[arg-type]
        training_data="tiny",
        log=lines.append,
    )
    losses = [line.split(" loss ")[1].split()[0] for line in lines if " img/s" in line]
    assert any(line.startswith("resumed from") for line in lines) == bool(kw.get("resume"))
    return losses, result


@pytest.mark.usefixtures("one_thread")
def test_cpu_training_is_deterministic_and_resumable(tmp_path: Path) -> None:
    tiny = _tiny(tmp_path)
    losses, a = _run(tiny, tmp_path / "a", max_steps=5)
    again, b = _run(tiny, tmp_path / "b", max_steps=5)
    assert len(losses) == 5 and again == losses
    assert [(h["train_loss"], h["valid_loss"]) for h in a.history] == [
        (h["train_loss"], h["valid_loss"]) for h in b.history
    ]
    assert a.weights_path.read_bytes() == b.weights_path.read_bytes()

    # Stopped after 2 steps (mid-epoch), then resumed to 5: the same steps, the same network.
    first, _ = _run(tiny, tmp_path / "c", max_steps=2)
    rest, c = _run(tiny, tmp_path / "c", max_steps=5, resume=True)
    assert first + rest == losses
    ck_a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    ck_c = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=True)
    assert ck_a["step"] == ck_c["step"] == c.steps == 5
    for key, value in ck_a["model"].items():
        assert torch.equal(value, ck_c["model"][key]), key
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(ck_a["optimizer"]["state"][0][key], ck_c["optimizer"]["state"][0][key])
    assert ck_a["scheduler"] == ck_c["scheduler"]

    # Another seed trains differently; resuming with other data or options is refused.
    other, _ = _run(tiny, tmp_path / "d", max_steps=1, seed=6)
    assert other[0] != losses[0]
    with pytest.raises(ValueError, match="other training/validation data"):
        _run(tiny, tmp_path / "c", max_steps=6, resume=True, image_size=48)


def test_train_refuses_a_patient_in_both_sets(tmp_path: Path) -> None:
    views = load_mura(_tiny(tmp_path), "train")
    options = TrainOptions(out_dir=tmp_path / "x", image_size=32, device="cpu")
    with pytest.raises(DataError, match="more than one split"):
        train(views, views[:2], options, training_data="tiny")
    assert not (tmp_path / "x" / "weights.pt").exists()


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from triage.training.cli import main

    assert main(["train", "--mura", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("triage: ") and "neither a MURA-v1.1 folder" in err
    assert err.count("\n") == 1
    assert main(["evaluate", "--card", str(tmp_path / "none"), "--mura", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("triage: model card") and err.count("\n") == 1


def test_dicom_folders_train_and_evaluate(tmp_path: Path) -> None:
    """Training and evaluation from DICOM folders labelled by StudyInstanceUID."""
    from triage.testing.synth import write_labelled_dicom_dataset

    # Two types, so that each has normal and abnormal training studies: a type of one class
    # is not learned (loss weight 0) and the card would not cover it.
    types = (StudyType.WRIST, StudyType.HAND)
    train_labels = write_labelled_dicom_dataset(
        tmp_path / "train", studies=8, study_types=types, rows=96, cols=80, seed=21
    )
    valid_labels = write_labelled_dicom_dataset(
        tmp_path / "valid", studies=7, study_types=types, rows=96, cols=80, seed=22
    )
    out = tmp_path / "model"
    trained = _cli(
        "train", "--train-dicom", tmp_path / "train", "--train-labels", train_labels,
        "--valid-dicom", tmp_path / "valid", "--valid-labels", valid_labels, "--out", out,
        "--image-size", 32, "--batch-size", 4, "--max-steps", 1, "--bootstrap", 0,
        "--device", "cpu",
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    card = load_card(out)
    assert "DICOM" in card.training_data
    report_path = tmp_path / "report.json"
    evaluated = _cli(
        "evaluate", "--card", out, "--dicom", tmp_path / "valid", "--labels", valid_labels,
        "--json", report_path, "--bootstrap", 200, "--device", "cpu", "--precision", "fp32",
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads(report_path.read_text())
    expected = {row.split(",")[0] for row in valid_labels.read_text().splitlines()[1:]}
    assert {s["study"] for s in report["studies"]} == expected
    labels = dict(row.split(",") for row in valid_labels.read_text().splitlines()[1:])
    assert all(str(s["label"]) == labels[s["study"]] for s in report["studies"])
