"""Model cards: the demo card, writing and reading cards, and one-line errors for bad ones."""

from __future__ import annotations

import hashlib
import tomllib
from datetime import date
from pathlib import Path

import pytest

from triage.scoring.card import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CardError,
    dumps_card,
    load_card,
    write_card,
)
from triage.scoring.result import ModelInfo
from triage.study_types import StudyType

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = b"stand-in weights: card checks hash bytes, loading them is tested in test_model"
DIGEST = hashlib.sha256(WEIGHTS).hexdigest()

VALID = f"""\
name = "mura-test"
version = "1.2"
architecture = "densenet169"
input_size = 224
validated = true
created = 2025-11-26
study_types = ["XR_WRIST", "XR_HAND"]
threshold = 0.5

[thresholds]
XR_WRIST = 0.4

[normalisation]
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[weights]
file = "weights.pt"
sha256 = "{DIGEST}"

[training]
data = "MURA-v1.1 train"

[metrics]
auroc = 0.9
"""


def _card_dir(tmp_path: Path, text: str = VALID, weights: bytes | None = WEIGHTS) -> Path:
    (tmp_path / "card.toml").write_text(text, encoding="utf-8")
    if weights is not None:
        (tmp_path / "weights.pt").write_bytes(weights)
    return tmp_path


def _error(path: Path) -> str:
    with pytest.raises(CardError) as caught:
        load_card(path)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith("model card ")
    return message


def test_demo_card():
    card = load_card(REPO / "models" / "demo")
    assert card.path == (REPO / "models" / "demo" / "card.toml").resolve()
    assert card.architecture == "densenet169" and card.input_size == 224
    assert card.init == "seeded" and card.seed == 0 and card.weights_path is None
    assert card.validated is False
    assert card.mean == IMAGENET_MEAN and card.std == IMAGENET_STD
    assert set(card.study_types) == set(StudyType)
    assert card.info == ModelInfo(
        name="mura-densenet169-demo",
        version="0.0.0-demo",
        validated=False,
        threshold=0.5,
        weights="seeded:0",
    )


def test_valid_card_by_folder_or_file(tmp_path: Path):
    folder = _card_dir(tmp_path)
    card = load_card(folder)
    assert load_card(folder / "card.toml") == card
    assert card.weights_path == (folder / "weights.pt").resolve()
    assert card.weights_sha256 == DIGEST
    assert card.created == date(2025, 11, 26)
    assert card.study_types == (StudyType.WRIST, StudyType.HAND)
    assert card.threshold_for(StudyType.WRIST) == 0.4
    assert card.threshold_for(StudyType.HAND) == 0.5
    assert card.threshold_for(None) == 0.5
    assert card.covers(StudyType.HAND) and not card.covers(StudyType.ELBOW)
    assert card.metrics == {"auroc": 0.9}
    assert card.info.validated and card.info.threshold == 0.5


def test_write_card_round_trip(tmp_path: Path):
    weights = tmp_path / "run" / "weights.pt"
    weights.parent.mkdir()
    weights.write_bytes(WEIGHTS)
    notes = 'lr 1e-4, "batch" 8\nsecond line, ünïcode'
    card = write_card(
        tmp_path / "run",
        name="mura-densenet169",
        version="2025.11.1",
        weights_file=weights,
        training_data="MURA-v1.1 train split",
        training_notes=notes,
        thresholds={"XR_WRIST": 0.43, StudyType.ELBOW: 0.61},
        metrics={"auroc": 0.912, "kappa": 0.7, "XR_WRIST": {"auroc": 0.93, "f1": 0.85}},
        created=date(2025, 11, 2),
    )
    assert card.path == (tmp_path / "run" / "card.toml").resolve()
    assert card.weights_sha256 == DIGEST
    assert card.validated is False
    assert card.training_notes == notes
    assert card.thresholds == {StudyType.WRIST: 0.43, StudyType.ELBOW: 0.61}
    assert card.metrics["XR_WRIST"] == {"auroc": 0.93, "f1": 0.85}
    assert card.created == date(2025, 11, 2)
    raw = tomllib.loads(card.path.read_text(encoding="utf-8"))
    # Stored relative to the card, so the folder can move between hosts.
    assert raw["weights"]["file"] == "weights.pt"
    assert load_card(card.path) == card
    assert dumps_card(card) == card.path.read_text(encoding="utf-8")


def test_write_card_with_weights_elsewhere_keeps_an_absolute_path(tmp_path: Path):
    (tmp_path / "store").mkdir()
    weights = tmp_path / "store" / "w.pt"
    weights.write_bytes(WEIGHTS)
    card = write_card(
        tmp_path / "cards" / "mine.toml",
        name="m",
        version="1",
        weights_file=weights,
        training_data="x",
    )
    raw = tomllib.loads(card.path.read_text(encoding="utf-8"))
    assert raw["weights"]["file"] == str(weights.resolve())
    assert card.path.name == "mine.toml"


def test_write_card_refuses_a_bad_card_and_keeps_the_old_one(tmp_path: Path):
    folder = _card_dir(tmp_path)
    before = (folder / "card.toml").read_text(encoding="utf-8")
    with pytest.raises(CardError, match="threshold must be strictly between 0 and 1"):
        write_card(
            folder,
            name="m",
            version="1",
            weights_file=folder / "weights.pt",
            training_data="x",
            threshold=1.5,
        )
    assert (folder / "card.toml").read_text(encoding="utf-8") == before
    assert not list(folder.glob(".card-*"))
    with pytest.raises(CardError, match="weights file missing"):
        write_card(
            folder, name="m", version="1", weights_file=folder / "nope.pt", training_data="x"
        )


def test_missing_card_file(tmp_path: Path):
    assert "no such file" in _error(tmp_path / "card.toml")


def test_missing_weights_file(tmp_path: Path):
    message = _error(_card_dir(tmp_path, weights=None))
    assert "weights file missing" in message and "weights.pt" in message


def test_weights_with_another_sha256(tmp_path: Path):
    message = _error(_card_dir(tmp_path, weights=WEIGHTS + b"!"))
    assert "weights file weights.pt has sha256" in message
    assert f"the card says {DIGEST}" in message


def test_unverified_load_does_not_need_the_weights(tmp_path: Path):
    card = load_card(_card_dir(tmp_path, weights=None), verify_weights=False)
    assert card.weights_path == (tmp_path / "weights.pt").resolve()


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("threshold = 0.5\n", "threshold = 0.5\ntreshold = 0.4\n", "unknown key treshold"),
        (
            f'sha256 = "{DIGEST}"',
            f'sha256 = "{DIGEST}"\nsize = 3',
            "unknown key in [weights]: size",
        ),
        ("[training]\ndata", "[training]\nepochs = 3\ndata", "unknown key in [training]: epochs"),
        ('name = "mura-test"\n', "", "missing key name"),
        # Both go into every result as DICOM LO: highdicom refused a backslash in any SR.
        ('name = "mura-test"', 'name = "mura\\\\test"', "name must hold no backslash"),
        ('version = "1.2"', 'version = "1.2\\t"', "version must hold no backslash or control"),
        ('version = "1.2"', 'version = "1.2', "not valid TOML"),
        ('"densenet169"', '"resnet50"', "architecture 'resnet50' is not supported"),
        ("input_size = 224", "input_size = 16", "input_size must be 32..2048"),
        ("input_size = 224", 'input_size = "224"', "input_size must be an integer"),
        ("validated = true", 'validated = "yes"', "validated must be true or false"),
        ("threshold = 0.5", "threshold = 1.5", "threshold must be strictly between 0 and 1"),
        ('"XR_HAND"]', '"XR_KNEE"]', "unknown study type 'XR_KNEE'"),
        ('"XR_HAND"]', '"XR_WRIST"]', "study_types lists a type twice"),
        ("XR_WRIST = 0.4", "XR_ELBOW = 0.4", "thresholds.XR_ELBOW: the card does not cover"),
        ("created = 2025-11-26", 'created = "last week"', "created must be a date"),
        ("std = [0.229, 0.224, 0.225]", "std = [0.229, 0.224]", "std must be a list of 3"),
        (
            "std = [0.229, 0.224, 0.225]",
            "std = [0.229, 0.0, 0.225]",
            "std must be between 0.001 and 1",
        ),
        ("std = [0.229, 0.224, 0.225]", "std = [inf, inf, inf]", "std must be a finite number"),
        ("std = [0.229, 0.224, 0.225]", "std = [0.229, nan, 0.225]", "must be a finite number"),
        (
            "mean = [0.485, 0.456, 0.406]",
            "mean = [123.675, 116.28, 103.53]",  # ImageNet's, in 0..255 units
            "mean must be between 0 and 1, for pixels scaled to 0..1",
        ),
        ("auroc = 0.9", "auroc = inf", "metrics.auroc must be a finite number"),
        (f'"{DIGEST}"', '"abc"', "weights.sha256 must be 64 hex digits"),
        ('file = "weights.pt"\n', "", "weights.file must be a non-empty string"),
        ('file = "weights.pt"', 'init = "random"\nseed = 1', "in [weights] with init: sha256"),
        ("auroc = 0.9", 'auroc = "high"', "metrics.auroc must be a finite number"),
    ],
)
def test_malformed_card_is_one_line_naming_the_problem(
    tmp_path: Path, old: str, new: str, expected: str
):
    assert old in VALID
    message = _error(_card_dir(tmp_path, VALID.replace(old, new, 1)))
    assert expected in message, message


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_card_that_is_not_utf8_says_so(tmp_path: Path, encoding: str):
    card = tmp_path / "card.toml"
    card.write_text(VALID.replace("MURA-v1.1 train", "MURA-v1.1 train, révisé"), encoding=encoding)
    (tmp_path / "weights.pt").write_bytes(WEIGHTS)
    assert "not UTF-8 text" in _error(card)


def test_a_weights_file_name_with_a_nul_is_one_line(tmp_path: Path):
    text = VALID.replace('file = "weights.pt"', 'file = "weights\\u0000.pt"')
    assert "weights.file holds a NUL character" in _error(_card_dir(tmp_path, text))


def test_a_weights_file_that_cannot_be_read_is_one_line(tmp_path: Path):
    # A file whose reads fail (EIO): what a failing disk gives; root reads past permissions.
    text = VALID.replace('file = "weights.pt"', 'file = "/proc/self/mem"')
    assert "mem: Input/output error" in _error(_card_dir(tmp_path, text))


def test_seeded_init_needs_a_seed(tmp_path: Path):
    text = VALID.replace(f'file = "weights.pt"\nsha256 = "{DIGEST}"', 'init = "seeded"')
    assert "weights.seed must be an integer" in _error(_card_dir(tmp_path, text))
    text = text.replace('"seeded"', '"seeded"\nseed = 5')
    # Random weights by definition: never validated (it would load without allow_unvalidated).
    assert "untrained weights" in _error(_card_dir(tmp_path, text))
    text = text.replace("validated = true", "validated = false")
    seeded = load_card(_card_dir(tmp_path, text))
    assert (seeded.init, seeded.seed, seeded.weights_path) == ("seeded", 5, None)
