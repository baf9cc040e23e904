"""Model cards: what a set of weights is, where it is, and how far it can be trusted.

A card is a TOML file (``models/<name>/card.toml``) that names the architecture, the input size
and normalisation the weights were trained with, the operating threshold(s), the study types it
covers, the weights file and its SHA-256, the training data, the metrics and whether the model is
validated. The daemon refuses to start on a card that does not check out, with a one-line
:class:`CardError`; this module reads and writes cards without importing torch (the listener and
``triage-admin`` read them too). Whether the weights fit the architecture is checked when they
are loaded (:func:`triage.scoring.model.load_model`), which raises the same :class:`CardError`.

Schema (version 1)::

    name = "mura-densenet169"          # required
    version = "2025.11.1"              # required
    description = "…"                  # optional
    architecture = "densenet169"       # required, the only one supported
    input_size = 224                   # required, square input side in pixels
    validated = false                  # required
    created = 2025-11-26               # required, a TOML date
    study_types = ["XR_WRIST", …]      # required, MURA folder names
    threshold = 0.5                    # required, abnormal if probability > threshold

    [thresholds]                       # optional, per study type
    XR_WRIST = 0.45

    [normalisation]                    # required
    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]

    [weights]                          # required: file + sha256, or init = "seeded" + seed
    file = "weights.pt"                # relative to the card's folder (or absolute)
    sha256 = "…64 hex digits…"

    [training]                         # required
    data = "MURA-v1.1 train split, …"
    notes = "…"                        # optional

    [metrics]                          # optional: name = number, or [metrics.<group>] tables
    auroc = 0.91
    [metrics.XR_WRIST]
    kappa = 0.71
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, NoReturn

from triage.atomic_file import write_atomically
from triage.scoring.result import ModelInfo
from triage.study_types import StudyType

#: The file name looked for when a card path names a folder.
CARD_FILE = "card.toml"
#: Architectures :mod:`triage.scoring.model` can build.
ARCHITECTURES: tuple[str, ...] = ("densenet169",)
#: ImageNet normalisation, which the MURA recipe (ImageNet-pretrained DenseNet) uses.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: The only non-file initialisation: torchvision's own initialisation under a fixed seed.
SEEDED_INIT = "seeded"

_TOP_KEYS_REQUIRED = frozenset(
    {
        "name",
        "version",
        "architecture",
        "input_size",
        "validated",
        "created",
        "study_types",
        "threshold",
        "normalisation",
        "weights",
        "training",
    }
)
_TOP_KEYS_OPTIONAL = frozenset({"description", "thresholds", "metrics"})
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CardError(ValueError):
    """A model card is malformed or its weights do not check out; the message is one line."""


@dataclass(frozen=True)
class ModelCard:
    """A validated model card (see the module docstring for the TOML schema)."""

    #: The card file itself (absolute).
    path: Path
    name: str
    version: str
    architecture: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    threshold: float
    study_types: tuple[StudyType, ...]
    validated: bool
    created: date
    training_data: str
    #: The weights file (absolute) with its SHA-256, or None for a seeded initialisation.
    weights_path: Path | None = None
    weights_sha256: str | None = None
    #: ``"seeded"`` for torchvision's initialisation under :attr:`seed` (the demo card).
    init: str | None = None
    seed: int | None = None
    thresholds: Mapping[StudyType, float] = field(default_factory=dict)
    description: str = ""
    training_notes: str = ""
    metrics: Mapping[str, float | Mapping[str, float]] = field(default_factory=dict)

    @property
    def info(self) -> ModelInfo:
        """The model as results and SRs name it (default threshold)."""
        return ModelInfo(
            name=self.name,
            version=self.version,
            validated=self.validated,
            threshold=self.threshold,
            weights=self.weights_sha256 or f"{self.init}:{self.seed}",
        )

    def threshold_for(self, study_type: StudyType | None) -> float:
        """The operating threshold for *study_type*: its own if the card tunes one, else default."""
        if study_type is None:
            return self.threshold
        return self.thresholds.get(study_type, self.threshold)

    def covers(self, study_type: StudyType) -> bool:
        """Whether the model was trained for (and may score) *study_type*."""
        return study_type in self.study_types


def _fail(path: Path, problem: str) -> NoReturn:
    # One line whatever the cause: messages from TOML or the OS may carry newlines.
    raise CardError(f"model card {path}: " + " ".join(problem.split()))


def _card_file(path: str | os.PathLike[str]) -> Path:
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / CARD_FILE
    return candidate.resolve()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file's contents."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _require_str(path: Path, raw: Mapping[str, Any], key: str, where: str = "") -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value.strip():
        _fail(path, f"{where}{key} must be a non-empty string (got {value!r})")
    return value


def _require_dicom_text(path: Path, raw: Mapping[str, Any], key: str) -> str:
    """A string that every result may carry as a DICOM LO value (the SR's and the images'
    SoftwareVersions, the device's name): a backslash separates values there and control
    characters are not allowed, so highdicom refused to build any SR and every study failed."""
    value = _require_str(path, raw, key)
    if any(ch == "\\" or ord(ch) < 32 or ord(ch) == 127 for ch in value):
        _fail(path, f"{key} must hold no backslash or control character (got {value!r})")
    return value


#: The smallest normalisation std accepted: below it 1/std magnifies an input into values no
#: trained network sees (and 1e-320 into infinity).
_MIN_STD = 0.001


def _number(path: Path, where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        _fail(path, f"{where} must be a finite number (got {value!r})")
    return float(value)


def _threshold(path: Path, where: str, value: Any) -> float:
    number = _number(path, where, value)
    if not 0.0 < number < 1.0:
        _fail(path, f"{where} must be strictly between 0 and 1 (got {number})")
    return number


def _study_type(path: Path, where: str, value: Any) -> StudyType:
    try:
        return StudyType(value)
    except ValueError:
        known = ", ".join(t.value for t in StudyType)
        _fail(path, f"{where}: unknown study type {value!r} (known: {known})")


def _unknown_keys(path: Path, table: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    extra = sorted(set(table) - set(allowed))
    if extra:
        _fail(path, f"unknown key{'s' if len(extra) > 1 else ''} {where}{', '.join(extra)}")


def _triple(
    path: Path, where: str, value: Any, low: float, high: float
) -> tuple[float, float, float]:
    """Three numbers in *low* .. *high*: normalisation of pixels scaled to 0..1 (a card
    written in 0..255 units, or a std that makes every input the same, is refused)."""
    if not isinstance(value, list) or len(value) != 3:
        _fail(path, f"{where} must be a list of 3 numbers (got {value!r})")
    numbers = tuple(_number(path, where, v) for v in value)
    if any(not low <= v <= high for v in numbers):
        _fail(
            path,
            f"{where} must be between {low:g} and {high:g}, for pixels scaled to 0..1 "
            f"(got {value!r})",
        )
    return numbers  # type: ignore[return-value]


def _parse_metrics(path: Path, raw: Any) -> dict[str, float | dict[str, float]]:
    if not isinstance(raw, dict):
        _fail(path, "[metrics] must be a table")
    metrics: dict[str, float | dict[str, float]] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            metrics[key] = {
                name: _number(path, f"metrics.{key}.{name}", number)
                for name, number in value.items()
            }
        else:
            metrics[key] = _number(path, f"metrics.{key}", value)
    return metrics


def _parse_created(path: Path, value: Any) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    _fail(path, f"created must be a date like 2025-11-26 (got {value!r})")


def _parse_weights(
    path: Path, raw: Any, verify: bool
) -> tuple[Path | None, str | None, str | None, int | None]:
    if not isinstance(raw, dict):
        _fail(path, "[weights] must be a table")
    if "init" in raw:
        _unknown_keys(path, raw, ("init", "seed"), "in [weights] with init: ")
        if raw["init"] != SEEDED_INIT:
            _fail(path, f'weights.init must be "{SEEDED_INIT}" (got {raw["init"]!r})')
        seed = raw.get("seed")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            _fail(path, f"weights.seed must be an integer >= 0 (got {seed!r})")
        return None, None, SEEDED_INIT, seed
    _unknown_keys(path, raw, ("file", "sha256"), "in [weights]: ")
    file_name = _require_str(path, raw, "file", "weights.")
    digest = _require_str(path, raw, "sha256", "weights.").lower()
    if not _SHA256.match(digest):
        _fail(path, f"weights.sha256 must be 64 hex digits (got {raw['sha256']!r})")
    if "\0" in file_name:
        _fail(path, f"weights.file holds a NUL character (got {file_name!r})")
    weights = (path.parent / file_name).resolve()
    if verify:
        try:
            present = weights.is_file()
            actual = sha256_file(weights) if present else ""
        except OSError as exc:  # permissions, an I/O error …
            reason = getattr(exc, "strerror", None) or exc
            _fail(path, f"cannot read weights file {weights}: {reason}")
        if not present:
            _fail(path, f"weights file missing: {weights}")
        if actual != digest:
            _fail(
                path,
                f"weights file {weights.name} has sha256 {actual}, the card says {digest}",
            )
    return weights, digest, None, None


def parse_card(raw: Mapping[str, Any], path: Path, *, verify_weights: bool = True) -> ModelCard:
    """Validate a card already read from TOML; *path* is the card file (for relative paths)."""
    missing = sorted(_TOP_KEYS_REQUIRED - set(raw))
    if missing:
        _fail(path, f"missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    _unknown_keys(path, raw, _TOP_KEYS_REQUIRED | _TOP_KEYS_OPTIONAL, "")

    name = _require_dicom_text(path, raw, "name")
    version = _require_dicom_text(path, raw, "version")
    architecture = _require_str(path, raw, "architecture")
    if architecture not in ARCHITECTURES:
        _fail(path, f"architecture {architecture!r} is not supported (only {ARCHITECTURES[0]})")
    input_size = raw["input_size"]
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        _fail(path, f"input_size must be an integer (got {input_size!r})")
    # DenseNet-169 downsamples by 32; below 32 pixels there is no feature map left.
    if not 32 <= input_size <= 2048:
        _fail(path, f"input_size must be 32..2048 (got {input_size})")
    validated = raw["validated"]
    if not isinstance(validated, bool):
        _fail(path, f"validated must be true or false (got {validated!r})")
    created = _parse_created(path, raw["created"])

    types_raw = raw["study_types"]
    if not isinstance(types_raw, list) or not types_raw:
        _fail(path, "study_types must be a non-empty list of study types")
    study_types = tuple(_study_type(path, "study_types", value) for value in types_raw)
    if len(set(study_types)) != len(study_types):
        _fail(path, "study_types lists a type twice")

    threshold = _threshold(path, "threshold", raw["threshold"])
    thresholds_raw = raw.get("thresholds", {})
    if not isinstance(thresholds_raw, dict):
        _fail(path, "[thresholds] must be a table of study type = threshold")
    thresholds: dict[StudyType, float] = {}
    for key, value in thresholds_raw.items():
        study_type = _study_type(path, "[thresholds]", key)
        if study_type not in study_types:
            _fail(path, f"thresholds.{key}: the card does not cover {key}")
        thresholds[study_type] = _threshold(path, f"thresholds.{key}", value)

    norm = raw["normalisation"]
    if not isinstance(norm, dict):
        _fail(path, "[normalisation] must be a table with mean and std")
    _unknown_keys(path, norm, ("mean", "std"), "in [normalisation]: ")
    if "mean" not in norm or "std" not in norm:
        _fail(path, "[normalisation] needs both mean and std")
    mean = _triple(path, "normalisation.mean", norm["mean"], 0.0, 1.0)
    std = _triple(path, "normalisation.std", norm["std"], _MIN_STD, 1.0)

    training = raw["training"]
    if not isinstance(training, dict):
        _fail(path, "[training] must be a table")
    _unknown_keys(path, training, ("data", "notes"), "in [training]: ")
    training_data = _require_str(path, training, "data", "training.")
    notes = training.get("notes", "")
    if not isinstance(notes, str):
        _fail(path, f"training.notes must be a string (got {notes!r})")

    description = raw.get("description", "")
    if not isinstance(description, str):
        _fail(path, f"description must be a string (got {description!r})")

    weights_path, digest, init, seed = _parse_weights(path, raw["weights"], verify_weights)
    if init is not None and validated:
        # Seeded weights are random by definition: such a card would load without
        # allow_unvalidated and its outputs would lose their NOT VALIDATED label.
        _fail(path, f'validated = true with weights.init = "{init}": untrained weights')
    return ModelCard(
        path=path,
        name=name,
        version=version,
        architecture=architecture,
        input_size=input_size,
        mean=mean,
        std=std,
        threshold=threshold,
        thresholds=thresholds,
        study_types=study_types,
        validated=validated,
        created=created,
        training_data=training_data,
        training_notes=notes,
        weights_path=weights_path,
        weights_sha256=digest,
        init=init,
        seed=seed,
        description=description,
        metrics=_parse_metrics(path, raw.get("metrics", {})),
    )


def load_card(path: str | os.PathLike[str], *, verify_weights: bool = True) -> ModelCard:
    """Read and validate a model card (a ``card.toml`` file, or a folder holding one).

    With *verify_weights* (the default) the weights file must exist and match the card's
    SHA-256. Raises :class:`CardError` with a one-line message naming the problem.
    """
    card_path = _card_file(path)
    try:
        with open(card_path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        _fail(card_path, "no such file")
    except OSError as exc:
        _fail(card_path, f"cannot read: {exc.strerror or exc}")
    except tomllib.TOMLDecodeError as exc:
        _fail(card_path, f"not valid TOML: {exc}")
    except UnicodeDecodeError as exc:  # TOML is UTF-8: a Latin-1 or UTF-16 file
        _fail(card_path, f"not UTF-8 text (TOML must be): byte {exc.start}")
    return parse_card(raw, card_path, verify_weights=verify_weights)


# --- writing ---------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"a card cannot hold {value!r}")
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, date) and not isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to a card")


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else json.dumps(key, ensure_ascii=False)


def dumps_card(card: ModelCard) -> str:
    """The TOML text of *card*, with the weights path relative to the card's folder if inside."""
    lines = ["# msk-triage model card (see models/README.md)"]
    top: dict[str, Any] = {"name": card.name, "version": card.version}
    if card.description:
        top["description"] = card.description
    top.update(
        architecture=card.architecture,
        input_size=card.input_size,
        validated=card.validated,
        created=card.created,
        study_types=[t.value for t in card.study_types],
        threshold=card.threshold,
    )
    lines += [f"{key} = {_toml_value(value)}" for key, value in top.items()]
    if card.thresholds:
        lines += ["", "[thresholds]"]
        lines += [f"{t.value} = {_toml_value(v)}" for t, v in card.thresholds.items()]
    lines += [
        "",
        "[normalisation]",
        f"mean = {_toml_value(list(card.mean))}",
        f"std = {_toml_value(list(card.std))}",
        "",
        "[weights]",
    ]
    if card.init is not None:
        lines += [f"init = {_toml_value(card.init)}", f"seed = {card.seed}"]
    else:
        assert card.weights_path is not None and card.weights_sha256 is not None
        try:
            file_name = card.weights_path.relative_to(card.path.parent).as_posix()
        except ValueError:
            file_name = str(card.weights_path)
        lines += [
            f"file = {_toml_value(file_name)}",
            f"sha256 = {_toml_value(card.weights_sha256)}",
        ]
    lines += ["", "[training]", f"data = {_toml_value(card.training_data)}"]
    if card.training_notes:
        lines.append(f"notes = {_toml_value(card.training_notes)}")
    scalars = {k: v for k, v in card.metrics.items() if not isinstance(v, Mapping)}
    groups = {k: v for k, v in card.metrics.items() if isinstance(v, Mapping)}
    if card.metrics:
        lines += ["", "[metrics]"]
        lines += [f"{_toml_key(k)} = {_toml_value(float(v))}" for k, v in scalars.items()]
        for group, values in groups.items():
            lines += ["", f"[metrics.{_toml_key(group)}]"]
            lines += [f"{_toml_key(k)} = {_toml_value(float(v))}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_card(
    path: str | os.PathLike[str],
    *,
    name: str,
    version: str,
    weights_file: str | os.PathLike[str],
    training_data: str,
    architecture: str = "densenet169",
    input_size: int = 224,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    threshold: float = 0.5,
    thresholds: Mapping[StudyType | str, float] | None = None,
    study_types: Iterable[StudyType | str] = tuple(StudyType),
    validated: bool = False,
    metrics: Mapping[str, float | Mapping[str, float]] | None = None,
    description: str = "",
    training_notes: str = "",
    created: date | None = None,
) -> ModelCard:
    """Write a card for trained weights, computing their SHA-256, and return it as loaded.

    *path* is the card file, or a folder (the card is then ``card.toml`` in it). A relative
    *weights_file* is taken relative to the current directory, like any path a command is
    given; the card stores it relative to its own folder when the weights live inside it. The
    file is replaced atomically. Raises :class:`CardError` if the result would not load.
    """
    target = Path(path).expanduser()
    if target.is_dir() or target.suffix != ".toml":
        target = target / CARD_FILE
    target = target.resolve()
    weights = Path(weights_file).expanduser().resolve()
    if not weights.is_file():
        _fail(target, f"weights file missing: {weights}")
    card = ModelCard(
        path=target,
        name=name,
        version=version,
        architecture=architecture,
        input_size=input_size,
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        threshold=float(threshold),
        thresholds={
            _study_type(target, "thresholds", k): float(v) for k, v in (thresholds or {}).items()
        },
        study_types=tuple(_study_type(target, "study_types", t) for t in study_types),
        validated=validated,
        created=created or date.today(),
        training_data=training_data,
        training_notes=training_notes,
        weights_path=weights,
        weights_sha256=sha256_file(weights),
        description=description,
        metrics=dict(metrics or {}),
    )
    text = dumps_card(card)
    # Validate before replacing an existing card, so a bad call never leaves a broken file.
    parse_card(tomllib.loads(text), target)
    write_atomically(target, lambda handle: handle.write(text.encode("utf-8")))
    return load_card(target)


__all__ = [
    "ARCHITECTURES",
    "CARD_FILE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SEEDED_INIT",
    "CardError",
    "ModelCard",
    "dumps_card",
    "load_card",
    "parse_card",
    "sha256_file",
    "write_card",
]
