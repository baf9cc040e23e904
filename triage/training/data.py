"""Training and evaluation data: MURA-v1.1 folders and labelled DICOM folders.

Both sources become a list of :class:`View` (one image, its study, patient, study type and
study label). Pixels go through the daemon's own preprocessing (``prepare_array`` /
``decode_view``), so a model is trained on exactly what it will be shown in production;
augmentation (lateral flip, rotation) is applied on top, to training batches only.

Labels: 1 = abnormal. The MURA study folders repeat the label in their name
(``study1_positive``); the loader checks the labelled-studies CSV against it, because public
reimplementations have shipped with the mapping inverted.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from triage.scoring.card import IMAGENET_MEAN, IMAGENET_STD
from triage.study_types import StudyType
from triage.training.errors import DataError

__all__ = [
    "MURA_DIR",
    "Augment",
    "DataError",
    "EpochSampler",
    "Preprocessing",
    "View",
    "ViewDataset",
    "augment_tensor",
    "check_patient_split",
    "class_weights",
    "find_mura_dir",
    "image_counts",
    "load_dicom_folder",
    "load_mura",
    "load_view_array",
    "normalise_study_key",
    "one_class_types",
    "quiet_pydicom",
    "read_png_pixels",
    "read_uid_labels",
    "steps_per_epoch",
    "studies_of",
]

MURA_DIR = "MURA-v1.1"
MURA_SPLITS = ("train", "valid")


@dataclass(frozen=True)
class View:
    """One image of one study, with the study's label."""

    #: The image file (PNG for MURA, a DICOM instance otherwise).
    path: Path
    #: Study key: MURA ``valid/XR_WRIST/patient11185/study1_positive``, DICOM StudyInstanceUID.
    study_id: str
    #: Patient key, used only to keep patients out of two splits (never logged for DICOM).
    patient_id: str
    study_type: StudyType
    #: 1 = abnormal, 0 = normal.
    label: int
    is_dicom: bool = False


# --------------------------------------------------------------------------------------------
# MURA-v1.1


def find_mura_dir(root: str | Path) -> Path:
    """The ``MURA-v1.1`` folder, given it or the folder that contains it."""
    root = Path(root)
    if (root / "train_image_paths.csv").is_file() or (root / "valid_image_paths.csv").is_file():
        return root
    if (root / MURA_DIR).is_dir():
        return root / MURA_DIR
    raise DataError(f"{root}: neither a {MURA_DIR} folder nor a folder containing one")


def _relative_to_split(path: str, split: str, source: str) -> PurePosixPath:
    """``valid/XR_WRIST/patient…/study…[/image…]`` from a CSV path with any prefix."""
    parts = PurePosixPath(path.strip().replace("\\", "/")).parts
    if split not in parts:
        raise DataError(f"{source}: path {path!r} is not under a {split!r} folder")
    return PurePosixPath(*parts[_last(parts, split) :])


def _last(parts: tuple[str, ...], name: str) -> int:
    """The index of the last *name* in *parts*: a prefix may hold a folder of the split's
    name too (``/mnt/train/MURA-v1.1/train/XR_WRIST/…``)."""
    return len(parts) - 1 - parts[::-1].index(name)


def _read_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return [row for row in csv.reader(fh) if row and any(cell.strip() for cell in row)]


def _parse_label(value: str, where: str) -> int:
    value = value.strip()
    if value not in ("0", "1"):
        raise DataError(f"{where}: label {value!r} is not 0 (normal) or 1 (abnormal)")
    return int(value)


def _folder_label(study_folder: str) -> int | None:
    """The label a MURA study folder name states (``…_positive`` = abnormal), if any."""
    if study_folder.endswith("_positive"):
        return 1
    if study_folder.endswith("_negative"):
        return 0
    return None


def _study_type_of(rel: PurePosixPath, where: str) -> StudyType:
    for part in rel.parts:
        if part.startswith("XR_"):
            try:
                return StudyType(part)
            except ValueError:
                break
    raise DataError(f"{where}: no MURA study type folder (XR_ELBOW … XR_WRIST) in {rel}")


def load_mura(root: str | Path, split: str) -> list[View]:
    """The views of one MURA split (``train`` or ``valid``), labelled per study.

    Reads ``{split}_image_paths.csv`` and ``{split}_labeled_studies.csv`` (no headers). The
    study of an image is its folder; its label comes from the labelled-studies CSV (1 =
    abnormal) and must agree with the folder's ``_positive``/``_negative`` suffix; its type
    is the ``XR_*`` folder; its patient the ``patient*`` folder.
    """
    if split not in MURA_SPLITS:
        raise DataError(f"unknown MURA split {split!r} (expected one of {MURA_SPLITS})")
    mura = find_mura_dir(root)
    studies_csv = mura / f"{split}_labeled_studies.csv"
    images_csv = mura / f"{split}_image_paths.csv"

    labels: dict[PurePosixPath, int] = {}
    for lineno, row in enumerate(_read_rows(studies_csv), 1):
        where = f"{studies_csv.name} line {lineno}"
        if len(row) < 2:
            raise DataError(f"{where}: expected 'study_path,label'")
        study = _relative_to_split(row[0], split, where)
        label = _parse_label(row[1], where)
        stated = _folder_label(study.name)
        if stated is not None and stated != label:
            raise DataError(
                f"{where}: label {label} contradicts the folder name {study.name!r} "
                "(positive = abnormal = 1); the labels are inverted or misaligned"
            )
        if labels.setdefault(study, label) != label:
            raise DataError(f"{where}: study {study} labelled twice with different labels")

    views: list[View] = []
    seen: set[PurePosixPath] = set()
    listed: dict[PurePosixPath, int] = {}
    for lineno, row in enumerate(_read_rows(images_csv), 1):
        where = f"{images_csv.name} line {lineno}"
        rel = _relative_to_split(row[0], split, where)
        if listed.setdefault(rel, lineno) != lineno:
            # Twice, it would weigh twice in training and in its study's mean.
            raise DataError(f"{where}: {rel} is listed already, on line {listed[rel]}")
        study = rel.parent
        if study not in labels:
            raise DataError(f"{where}: study {study} of {rel.name} is not in {studies_csv.name}")
        patient = next((p for p in study.parts if p.startswith("patient")), None)
        if patient is None:
            raise DataError(f"{where}: no patient folder in {rel}")
        path = mura / rel
        if not path.is_file():
            raise DataError(f"{where}: {path} does not exist")
        seen.add(study)
        views.append(
            View(
                path=path,
                study_id=str(study),
                patient_id=patient,
                study_type=_study_type_of(rel, where),
                label=labels[study],
            )
        )
    unseen = sorted(set(labels) - seen)
    if unseen:
        raise DataError(
            f"{studies_csv.name}: {len(unseen)} labelled studies have no image in "
            f"{images_csv.name}, e.g. {unseen[0]}"
        )
    if not views:
        raise DataError(f"{images_csv}: no images")
    return views


def normalise_study_key(key: str) -> str:
    """A study key as the loaders spell it: MURA paths from the split folder, UIDs as is."""
    key = key.strip().replace("\\", "/").rstrip("/")
    parts = PurePosixPath(key).parts
    found = [(_last(parts, split), split) for split in MURA_SPLITS if split in parts]
    if found:
        return str(PurePosixPath(*parts[max(found)[0] :]))
    return key


# --------------------------------------------------------------------------------------------
# DICOM folders labelled by a CSV of StudyInstanceUIDs


def read_uid_labels(path: str | Path) -> dict[str, int]:
    """``StudyInstanceUID,label`` rows (an optional header is skipped); 1 = abnormal."""
    path = Path(path)
    out: dict[str, int] = {}
    for lineno, row in enumerate(_read_rows(path), 1):
        where = f"{path.name} line {lineno}"
        if len(row) < 2:
            raise DataError(f"{where}: expected 'StudyInstanceUID,label'")
        if lineno == 1 and row[1].strip() not in ("0", "1"):
            continue  # header
        uid = row[0].strip()
        label = _parse_label(row[1], where)
        if out.setdefault(uid, label) != label:
            raise DataError(f"{where}: study {uid} labelled twice with different labels")
    if not out:
        raise DataError(f"{path}: no labelled studies")
    return out


def _view_order(item: tuple[Path, Any]) -> tuple[int, int, str, str]:
    """The worker's reading order (:func:`~triage.dicom.study_type.view_order`), then the path
    (two files of one SOP instance)."""
    from triage.dicom.study_type import view_order

    path, ds = item
    return (*view_order(ds), str(path))


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records for the duration.

    pydicom quotes the offending value when it warns ("Invalid value for VR UI: '…'",
    over-long PN or LO values), and that value may be a patient's name, ID or birth date: it
    must not reach stderr or a log. Not thread-safe (it swaps process-wide filters), which
    the training CLI does not need.
    """
    logger = logging.getLogger("pydicom")
    was_disabled = logger.disabled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.disabled = True
        try:
            yield
        finally:
            logger.disabled = was_disabled


def _read_header(path: Path) -> Any:
    """The header of a DICOM file with every top-level value parsed, or None if not DICOM.

    Raises whatever pydicom raises on a damaged file. Values are parsed here because pydicom
    parses them lazily: a damaged value would otherwise raise later, out of the study
    decision, with no file to blame and no way to skip just that file.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    for _element in ds:
        pass
    return ds


def load_dicom_folder(
    folder: str | Path,
    labels: Mapping[str, int] | str | Path,
    *,
    skipped: list[tuple[str, str]] | None = None,
    damaged: list[Path] | None = None,
) -> list[View]:
    """The views of the labelled studies under ``folder`` (searched recursively).

    The study type and the views scored are the daemon's decision
    (:func:`triage.dicom.study_type.decide_study`, views ordered by series and instance
    number), so a model is trained and evaluated on what the daemon would score. Files that are
    not DICOM are ignored, and so are studies the labels do not mention (a folder may hold more
    than one data set). DICOM files that cannot be read (damaged, truncated, unreadable) are
    skipped; their paths are appended to ``damaged`` when given. pydicom's warnings are
    silenced throughout (they can quote patient data). Every labelled study must be found
    and have one patient. A labelled study the daemon would skip raises DataError, unless
    ``skipped`` is given: then (StudyInstanceUID, reason) is appended to it, as the daemon
    would record it.
    """
    folder = Path(folder)
    if not isinstance(labels, Mapping):
        labels = read_uid_labels(labels)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    # Not just the reading: the study decision warns again on the values it re-validates
    # (UID(…) of a damaged SOP Class UID).
    with quiet_pydicom():
        return _load_dicom_folder(folder, labels, skipped, damaged)


def _load_dicom_folder(
    folder: Path,
    labels: Mapping[str, int],
    skipped: list[tuple[str, str]] | None,
    damaged: list[Path] | None,
) -> list[View]:
    from triage.dicom.study_type import decide_study, patients_in

    headers: dict[str, list[tuple[Path, Any]]] = defaultdict(list)
    bad: list[Path] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = _read_header(path)
            if ds is None:
                continue
            uid = str(ds.get("StudyInstanceUID", "") or "")
        # pydicom raises many types on damaged files (NotImplementedError for an unknown VR,
        # BytesLengthException, struct.error …): one such file skips, not stops, a scan of
        # thousands.
        except Exception:
            bad.append(path)
            continue
        if uid in labels:
            headers[uid].append((path, ds))
    if damaged is not None:
        damaged.extend(bad)

    missing = sorted(set(labels) - set(headers))
    if missing:
        also = (
            f" ({len(bad)} damaged DICOM file{'' if len(bad) == 1 else 's'} skipped)" if bad else ""
        )
        raise DataError(
            f"{folder}: {len(missing)} labelled studies have no DICOM file, e.g. {missing[0]}{also}"
        )
    views: list[View] = []
    for uid, items in headers.items():
        items.sort(key=_view_order)
        # As the daemon counts them (patients_in): a view without a PatientID is one of the
        # study's patient, not another; it stopped `triage evaluate` on a study the daemon
        # scores. A study none of whose views names its patient is its own patient.
        if patients_in(ds for _, ds in items) > 1:
            raise DataError(f"study {uid}: instances of more than one patient")
        named = [ds for _, ds in items if str(ds.get("PatientID", "") or "").strip()]
        patients = {
            f"{ds.get('IssuerOfPatientID', '')}/{str(ds.get('PatientID')).strip()}"
            for ds in named[:1]
        } or {f"unknown patient of study {uid}"}
        decision = decide_study([ds for _, ds in items])
        if decision.study_type is None:
            if skipped is None:
                raise DataError(f"study {uid}: the daemon would skip it: {decision.reason}")
            skipped.append((uid, decision.reason))
            continue
        scored = set(decision.scored_uids)
        patient = patients.pop()
        views.extend(
            View(path, uid, patient, decision.study_type, labels[uid], is_dicom=True)
            for path, ds in items
            if str(ds.get("SOPInstanceUID", "")) in scored
        )
    return views


# --------------------------------------------------------------------------------------------
# Checks and statistics


def check_patient_split(splits: Mapping[str, Sequence[View]]) -> None:
    """Raise DataError if a patient has views in two splits (train/validation leakage).

    The message names studies, not patients, so it is safe for logs.
    """
    owner: dict[str, tuple[str, str]] = {}
    clashes: list[str] = []
    for split, views in splits.items():
        for view in views:
            first = owner.setdefault(view.patient_id, (split, view.study_id))
            if first[0] != split:
                clashes.append(f"study {first[1]} ({first[0]}) and study {view.study_id} ({split})")
                owner[view.patient_id] = (split, view.study_id)
    if clashes:
        raise DataError(
            f"{len(clashes)} patient(s) appear in more than one split, e.g. the patient of "
            f"{clashes[0]}; split by patient so validation measures unseen patients"
        )


def image_counts(views: Iterable[View]) -> dict[StudyType, tuple[int, int]]:
    """Per study type (|N_T| normal images, |A_T| abnormal images)."""
    counts: Counter[tuple[StudyType, int]] = Counter((v.study_type, v.label) for v in views)
    types = sorted({t for t, _ in counts}, key=lambda t: t.value)
    return {t: (counts[(t, 0)], counts[(t, 1)]) for t in types}


def class_weights(views: Iterable[View]) -> dict[StudyType, tuple[float, float]]:
    """The paper's loss weights per study type T: (w_T,0, w_T,1).

    w_T,1 = |N_T| / (|A_T| + |N_T|) weighs abnormal images and w_T,0 = |A_T| / (|A_T| + |N_T|)
    normal ones, counting training images, so each type's rarer class weighs more.
    """
    out: dict[StudyType, tuple[float, float]] = {}
    for t, (normal, abnormal) in image_counts(views).items():
        total = normal + abnormal
        out[t] = (abnormal / total, normal / total)
    return out


def one_class_types(views: Iterable[View]) -> list[StudyType]:
    """Study types with a single class in ``views``: the formula gives that class weight 0."""
    return [t for t, (n, a) in image_counts(views).items() if n == 0 or a == 0]


# --------------------------------------------------------------------------------------------
# Pixels


def read_png_pixels(path: str | Path) -> np.ndarray:
    """A PNG/JPEG radiograph as ``prepare_array`` takes it (uint8 grey or RGB, float 0..1).

    8-bit images are display values: the conversion to 0..1 and colour → luminance is left
    to ``prepare_array``, so a MURA PNG and the same pixels wrapped in a DICOM secondary
    capture give the daemon's exact input. Wider ones (16-bit, 32-bit, float) are raw values:
    stretched as the daemon stretches a DICOM image without a window
    (:func:`~triage.scoring.preprocess.stretch_raw`), not divided by 65535 into near black.
    """
    with Image.open(path) as im:
        if im.mode in ("L", "RGB", "RGBA"):
            return np.asarray(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            from triage.scoring.preprocess import UndecodableView, stretch_raw

            raw = np.asarray(im)
            if raw.dtype.kind == "f" and not np.isfinite(raw).all():
                raise DataError(f"{path}: pixel values that are not finite numbers")
            try:
                return stretch_raw(raw)
            except UndecodableView as exc:
                raise DataError(f"{path}: {exc.reason}") from None
        if im.mode in ("P", "PA"):
            # Colours, to luminance in float as the daemon converts a palette or RGB image:
            # PIL's convert("L") rounds it to 8 bits (up to half a grey level off).
            return np.asarray(im.convert("RGB"))
        # Grey + alpha, bilevel, CMYK …: PIL's own conversion to grey.
        return np.asarray(im.convert("L"))


@dataclass(frozen=True)
class Preprocessing:
    """The model card's input contract."""

    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def load_view_array(view: View, prep: Preprocessing) -> np.ndarray:
    """The model input [3, S, S] float32 of one view, by the daemon's preprocessing path."""
    if view.is_dicom:
        from triage.scoring.preprocess import UndecodableView, decode_view

        try:
            # Quiet: reading the file again re-parses the values the scan was silenced for.
            with quiet_pydicom():
                # A small display image: training only needs the model input.
                decoded = decode_view(str(view.path), prep.input_size, prep.mean, prep.std, 64)
        except UndecodableView as exc:
            raise DataError(f"{view.path}: {exc.reason}") from None
        return decoded.array
    from triage.scoring.preprocess import prepare_array

    try:
        pixels = read_png_pixels(view.path)
    except OSError as exc:
        raise DataError(f"{view.path}: unreadable image: {exc}") from None
    return prepare_array(pixels, prep.input_size, prep.mean, prep.std)


class _ReadCheck(Dataset[tuple[int, str]]):
    """``(index, why it cannot be read or "")`` for each view: reading without stopping."""

    def __init__(self, views: Sequence[View], prep: Preprocessing) -> None:
        self.views = list(views)
        self.prep = prep

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, index: int) -> tuple[int, str]:
        try:
            load_view_array(self.views[index], self.prep)
        except DataError as exc:
            return index, str(exc)
        except Exception as exc:  # any decoder's error is this image's problem
            return index, f"{self.views[index].path}: {type(exc).__name__}: {exc}"
        return index, ""


def _as_is(item: tuple[int, str]) -> tuple[int, str]:
    return item


def unreadable_images(
    views: Sequence[View],
    prep: Preprocessing,
    *,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Read every view as training does (in *workers* DataLoader processes) and return one
    ``"path: reason"`` line per view that cannot be read, in the views' order.

    Training stops at the first such image it draws, possibly hours in, and one at a time;
    this finds them all before the first step. *progress* gets (read, total) every tenth
    (at least every 500 images) of a large set.
    """
    from torch.utils.data import DataLoader

    loader = DataLoader(
        _ReadCheck(views, prep),
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
    )
    problems: dict[int, str] = {}
    step = max(500, len(views) // 10)
    for done, (index, reason) in enumerate(loader, start=1):
        if reason:
            problems[index] = reason
        if progress is not None and done % step == 0 and done < len(views):
            progress(done, len(views))
    return [problems[index] for index in sorted(problems)]


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random lateral flip and rotation (MURA paper, section 3.1)."""

    flip: bool = True
    #: Rotations are uniform in ±max_rotation degrees. The paper's text says only "random
    #: lateral inversions and rotations", no angle; ±30° is the project's working figure.
    max_rotation: float = 30.0


def augment_tensor(
    x: torch.Tensor, rng: np.random.Generator, augment: Augment, prep: Preprocessing
) -> torch.Tensor:
    """Flip and rotate one prepared view; the corners are filled with black (pixel 0)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvf

    flip = augment.flip and rng.random() < 0.5
    angle = float(rng.uniform(-augment.max_rotation, augment.max_rotation))
    if flip:
        x = torch.flip(x, dims=(-1,))
    if augment.max_rotation > 0:
        # Black in the normalised space: radiograph backgrounds are black, so a rotated
        # corner looks like more background rather than a bright artefact.
        fill = [-m / s for m, s in zip(prep.mean, prep.std, strict=True)]
        x = tvf.rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=fill)
    return x


class ViewDataset(Dataset[tuple[torch.Tensor, float, float, int]]):
    """Views as (input [3,S,S], label, loss weight, view index).

    Indexed by ``(epoch, index)`` pairs (see :class:`EpochSampler`) when augmenting, so each
    item's random flip/rotation depends only on (seed, epoch, index): the same with any number
    of workers and after resuming. ``cache`` keeps prepared arrays in memory (per process; use
    it with ``workers=0`` on data sets that fit).
    """

    def __init__(
        self,
        views: Sequence[View],
        prep: Preprocessing,
        *,
        weights: Mapping[StudyType, tuple[float, float]] | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        cache: bool = False,
    ) -> None:
        self.views = list(views)
        self.prep = prep
        self.augment = augment
        self.seed = seed
        self.labels = np.array([v.label for v in self.views], dtype=np.float32)
        if weights is None:
            self.loss_weights = np.ones(len(self.views), dtype=np.float32)
        else:
            self.loss_weights = np.array(
                [weights.get(v.study_type, (1.0, 1.0))[v.label] for v in self.views],
                dtype=np.float32,
            )
        self._cache: dict[int, np.ndarray] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.views)

    def _array(self, index: int) -> np.ndarray:
        if self._cache is None:
            return load_view_array(self.views[index], self.prep)
        if index not in self._cache:
            self._cache[index] = load_view_array(self.views[index], self.prep)
        return self._cache[index]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, float, float, int]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        x = torch.from_numpy(np.array(self._array(index), dtype=np.float32, copy=True))
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, epoch, index])
            x = augment_tensor(x, rng, self.augment, self.prep)
        return x, float(self.labels[index]), float(self.loss_weights[index]), index


class EpochSampler(Sampler[tuple[int, int]]):
    """A seeded permutation per epoch, yielding ``(epoch, index)``; can start mid-epoch."""

    def __init__(self, n: int, seed: int, epoch: int, skip: int = 0) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip

    def __len__(self) -> int:
        return max(self.n - self.skip, 0)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed, self.epoch, 7]).permutation(self.n)
        for index in order[self.skip :]:
            yield self.epoch, int(index)


def steps_per_epoch(n_views: int, batch_size: int) -> int:
    """Optimiser steps in one pass over the views.

    The last partial batch is dropped (it is a different subset each epoch): a batch of one
    makes batch normalisation fail on a 1×1 feature map and is a noisy step anyway.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1 (got {batch_size})")
    return n_views // batch_size


def studies_of(views: Sequence[View]) -> dict[str, list[int]]:
    """Study id → indices of its views, in first-seen order."""
    out: dict[str, list[int]] = {}
    for i, v in enumerate(views):
        out.setdefault(v.study_id, []).append(i)
    return out
