"""Test helpers for DICOM objects: dciodvfy and dsrdump wrappers, realistic radiographs, results.

``dciodvfy`` (dicom3tools) checks a file against its IOD; ``dsrdump`` (DCMTK) renders an SR
content tree as text. Both are external programs, so tests that use them should be skipped
with :func:`require_tools` where they are missing. :func:`make_radiograph` and
:func:`make_study` build CR / DX source images the way modalities send them (12-bit, with
laterality, view position and patient orientation), independent of any other test module;
:func:`make_result` scores them with CAMs that behave like the model's (mean + bias = logit).
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from triage.dicom.sop import CR_IMAGE_STORAGE, DX_FOR_PRESENTATION
from triage.scoring.result import SkippedView, StudyResult, ViewResult
from triage.study_types import StudyType

_TIMEOUT_S = 60


def require_tools(*names: str) -> None:
    """Skip the calling test when one of the external programs *names* is not on PATH."""
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def write_dataset(dataset: pydicom.Dataset, path: Path) -> Path:
    """Write *dataset* as a PS3.10 file (preamble and file meta) and return *path*.

    A dataset without a transfer syntax in its file meta is written Explicit VR Little Endian.
    """
    _with_transfer_syntax(dataset).save_as(path, enforce_file_format=True)
    return path


def _with_transfer_syntax(dataset: pydicom.Dataset) -> pydicom.Dataset:
    """*dataset*, or a shallow copy of it whose file meta says Explicit VR Little Endian."""
    meta = getattr(dataset, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return dataset
    dataset = copy.copy(dataset)  # the caller's dataset keeps its (missing) file meta
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return dataset


@dataclass(frozen=True)
class Validation:
    """What ``dciodvfy`` said about one file."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    output: str = ""

    def __str__(self) -> str:
        return self.output


def dciodvfy(target: pydicom.Dataset | Path) -> Validation:
    """Run ``dciodvfy`` on a dataset (written to a temporary file) or a file.

    Lines starting with ``Error`` are errors, lines starting with ``Warning`` warnings; the
    full output is kept so a failing assertion can show the context of each line.
    """
    if isinstance(target, pydicom.Dataset):
        with tempfile.TemporaryDirectory() as tmp:
            return dciodvfy(write_dataset(target, Path(tmp) / "object.dcm"))
    proc = subprocess.run(
        ["dciodvfy", "-new", str(target)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=_TIMEOUT_S,
        check=False,
    )
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines()]
    return Validation(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )


def dsrdump(target: pydicom.Dataset | Path) -> str:
    """The ``dsrdump`` rendering of an SR document (header and content tree).

    Codes are printed with their designators (``+Pc``), long texts in full (``+Pl``) and
    referenced instances with their UIDs (``+Pu``). A document ``dsrdump`` cannot read, or one
    it warns about, fails the calling test.
    """
    if isinstance(target, pydicom.Dataset):
        with tempfile.TemporaryDirectory() as tmp:
            return dsrdump(write_dataset(target, Path(tmp) / "sr.dcm"))
    proc = subprocess.run(
        ["dsrdump", "+Pc", "+Pl", "+Pu", str(target)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=_TIMEOUT_S,
        check=False,
    )
    if proc.returncode != 0 or proc.stderr.strip():
        raise AssertionError(f"dsrdump ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc.stdout


def dsrdump_content(text: str) -> list[str]:
    """The content-tree lines of a ``dsrdump`` output (those that start with ``<``)."""
    return [line.strip() for line in text.splitlines() if line.lstrip().startswith("<")]


# --- source images ----------------------------------------------------------------------------


def _phantom(rows: int, cols: int, seed: int) -> np.ndarray:
    """A 12-bit image with a bright 'bone' band on soft tissue and noise, as uint16."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    tissue = 1200 + 600 * np.exp(-(((x - cols / 2) / (cols / 3)) ** 2))
    bone = 1800 * (np.abs(x - cols / 2 - 0.1 * (y - rows / 2)) < cols / 10)
    image = tissue + bone + rng.normal(0, 40, size=(rows, cols))
    return np.clip(image, 0, 4095).astype(np.uint16)


def make_radiograph(
    modality: str = "DX",
    *,
    study_uid: str,
    series_uid: str | None = None,
    instance_number: int = 1,
    rows: int = 512,
    cols: int = 400,
    photometric: str = "MONOCHROME2",
    laterality: str = "L",
    view_position: str = "PA",
    orientation: tuple[str, str] = ("A", "FL"),
    body_part: str = "WRIST",
    seed: int = 0,
) -> pydicom.Dataset:
    """A realistic CR or DX (for presentation) image: 12 bits stored in 16, one frame.

    CR carries laterality in the series (Laterality), DX in the image (ImageLaterality), as
    modalities do; MONOCHROME1 images have an INVERSE presentation LUT shape.
    """
    if modality not in ("CR", "DX"):
        raise ValueError(f"modality must be CR or DX, not {modality}")
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE if modality == "CR" else DX_FOR_PRESENTATION
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"

    ds.PatientName = "Test^Patient"
    ds.PatientID = "TRIAGE-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"

    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20260101"
    ds.StudyTime = "101500"
    ds.ReferringPhysicianName = "Referring^Doctor"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDescription = f"XR {body_part} 3V"

    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = 1
    ds.SeriesDescription = f"{body_part} {view_position}"
    ds.BodyPartExamined = body_part
    ds.ViewPosition = view_position
    ds.Manufacturer = "Acme Imaging"
    ds.ManufacturerModelName = "Radiograph 9000"
    ds.InstitutionName = "General Hospital"

    ds.InstanceNumber = instance_number
    ds.ContentDate = "20260101"
    ds.ContentTime = "101600"
    ds.AcquisitionDate = "20260101"
    ds.AcquisitionTime = "101600"
    ds.PatientOrientation = list(orientation)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    pixels = _phantom(rows, cols, seed)
    if photometric == "MONOCHROME1":
        pixels = (4095 - pixels).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"

    if modality == "CR":
        ds.Laterality = laterality
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.KVP = 55
        ds.RescaleType = "US"
    else:
        ds.ImageLaterality = laterality
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.RescaleType = "US"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImagerPixelSpacing = [0.139, 0.139]
        ds.KVP = 57
        ds.PositionerType = "NONE"
        ds.AcquisitionContextSequence = []
        region = pydicom.Dataset()
        region.CodeValue = "8205005"
        region.CodingSchemeDesignator = "SCT"
        region.CodeMeaning = "Wrist region structure"
        ds.AnatomicRegionSequence = [region]
    return ds


def make_study(
    modality: str = "DX",
    *,
    views: Sequence[str] = ("PA", "LL", "OBL"),
    photometric: str = "MONOCHROME2",
    laterality: str = "L",
    rows: int = 512,
    cols: int = 400,
) -> list[pydicom.Dataset]:
    """A wrist study: one image per view position, all in one series of a new study."""
    study_uid = generate_uid()
    series_uid = generate_uid()
    return [
        make_radiograph(
            modality,
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=index + 1,
            rows=rows,
            cols=cols,
            photometric=photometric,
            laterality=laterality,
            view_position=view,
            seed=index,
        )
        for index, view in enumerate(views)
    ]


def display_of(source: pydicom.Dataset) -> np.ndarray:
    """The view as a viewer shows it: float32 0..1 through the Modality LUT and the first
    window, MONOCHROME1 inverted."""
    stored = _with_transfer_syntax(source).pixel_array
    pixels = apply_modality_lut(stored, source).astype(np.float32)
    center, width = (
        float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
        for value in (source.WindowCenter, source.WindowWidth)
    )
    shown = np.clip((pixels - (center - width / 2)) / width, 0.0, 1.0)
    if source.PhotometricInterpretation == "MONOCHROME1":
        shown = 1.0 - shown
    return shown.astype(np.float32)


# --- scoring results --------------------------------------------------------------------------

#: The classifier bias the synthetic CAMs are made with.
BIAS = -0.5


def peaked_cam(
    peak: tuple[int, int] | None = (1, 5), *, high: float = 6.0, low: float = -1.0, grid: int = 7
) -> np.ndarray:
    """A CAM grid at *low* logits with one cell at *high* (none when *peak* is None)."""
    cam = np.full((grid, grid), low, dtype=np.float32)
    if peak is not None:
        cam[peak] = high
    return cam


def probability_of(cam: np.ndarray, bias: float = BIAS) -> float:
    """The view probability a CAM implies: sigmoid(mean(cam) + bias)."""
    return float(1.0 / (1.0 + np.exp(-(float(np.mean(cam)) + bias))))


def make_result(
    sources: Sequence[pydicom.Dataset],
    cams: Sequence[np.ndarray] | None = None,
    *,
    probabilities: Sequence[float] | None = None,
    revision: int = 1,
    skipped: Sequence[tuple[pydicom.Dataset, str]] = (),
    threshold: float = 0.5,
    study_type: StudyType = StudyType.WRIST,
) -> StudyResult:
    """A StudyResult scoring every source with its CAM (default: a peak in the upper right).

    View probabilities follow from the CAMs unless *probabilities* are given.
    """
    if cams is None:
        cams = [peaked_cam() for _ in sources]
    if probabilities is None:
        probabilities = [probability_of(cam) for cam in cams]
    views = tuple(
        ViewResult(str(ds.SOPInstanceUID), float(p), np.asarray(cam, np.float32))
        for ds, cam, p in zip(sources, cams, probabilities, strict=True)
    )
    return StudyResult(
        study_uid=str(sources[0].StudyInstanceUID),
        revision=revision,
        study_type=study_type,
        probability=float(np.mean([view.probability for view in views])),
        threshold=threshold,
        views=views,
        skipped_views=tuple(SkippedView(str(ds.SOPInstanceUID), why) for ds, why in skipped),
    )
