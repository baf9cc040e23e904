"""Synthetic upper-extremity radiograph studies for tests, benchmarks, demos and training.

- :func:`make_study` builds CR or DX (For Presentation) data sets for one study, with the tags
  real modalities send (descriptions, body part, views, laterality, equipment) and phantom pixels
  from :mod:`triage.testing.phantom`. The same arguments and seed give identical data sets, UIDs
  included. One series per view, one image per series: what DR rooms and CR readers commonly do
  (each exposure is its own series); ``series_per_view=False`` gives the one-series layout some
  CR readers use.
- :func:`write_study` writes Part 10 files in several transfer syntaxes (:data:`ENCODINGS`);
  :func:`available_encodings` says which work on this machine.
- :func:`write_benchmark_files` writes many large files fast by reusing one rendered image.
- :func:`write_mura_dataset` and :func:`write_labelled_dicom_dataset` write training data in
  the MURA-v1.1 layout and as labelled DICOM folders.
- :func:`main` is the command line (``triage synth -- ...`` or ``python -m triage.testing.synth``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from triage.dicom.sop import CR_IMAGE_STORAGE, DX_FOR_PRESENTATION
from triage.study_types import StudyType
from triage.testing.phantom import (
    Finding,
    field_of_view_mm,
    normalise_view,
    parse_body_part,
    render_phantom_with_findings,
)

__all__ = [
    "BODY_PART_EXAMINED",
    "ENCODINGS",
    "MuraSummary",
    "available_encodings",
    "main",
    "make_study",
    "study_findings",
    "write_benchmark_files",
    "write_labelled_dicom_dataset",
    "write_mura_dataset",
    "write_study",
]

BodyPart = StudyType | str

#: Encoding name → transfer syntax UID. All of them are lossless.
ENCODINGS: dict[str, str] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg-ls": JPEGLSLossless,
    "jpeg-lossless": JPEGLosslessSV1,
}

MODALITIES: dict[str, str] = {"CR": CR_IMAGE_STORAGE, "DX": DX_FOR_PRESENTATION}

#: Body Part Examined values drawn for each body part (DICOM defined terms, PS3.16 Annex L),
#: with weights. Every value maps back to the same study type; conflicting or empty values are
#: for a caller to ask for explicitly (``body_part_examined=``).
BODY_PART_EXAMINED: dict[BodyPart, tuple[tuple[str, float], ...]] = {
    StudyType.WRIST: (("WRIST", 1.0),),
    StudyType.HAND: (("HAND", 1.0),),
    StudyType.FINGER: (("FINGER", 1.0),),
    StudyType.FOREARM: (("FOREARM", 1.0),),
    StudyType.ELBOW: (("ELBOW", 1.0),),
    StudyType.HUMERUS: (("HUMERUS", 0.7), ("ARM", 0.3)),
    StudyType.SHOULDER: (("SHOULDER", 1.0),),
    "CHEST": (("CHEST", 1.0),),
    "KNEE": (("KNEE", 1.0),),
}

# Anatomic Region Sequence codes (SNOMED CT) for Body Part Examined values (PS3.16 Annex L).
_REGION_CODES: dict[str, tuple[str, str]] = {
    "WRIST": ("74670003", "Wrist joint"),
    "HAND": ("85562004", "Hand"),
    "FINGER": ("7569003", "Finger"),
    "THUMB": ("76505004", "Thumb"),
    "FOREARM": ("14975008", "Forearm"),
    "ELBOW": ("16953009", "Elbow joint"),
    "HUMERUS": ("85050009", "Humerus"),
    "ARM": ("40983000", "Upper arm"),
    "SHOULDER": ("16982005", "Shoulder"),
    "CHEST": ("43799004", "Chest"),
    "KNEE": ("72696002", "Knee"),
    "EXTREMITY": ("66019005", "Extremity"),
}

_WORDS: dict[BodyPart, str] = {
    StudyType.WRIST: "WRIST",
    StudyType.HAND: "HAND",
    StudyType.FINGER: "FINGER",
    StudyType.FOREARM: "FOREARM",
    StudyType.ELBOW: "ELBOW",
    StudyType.HUMERUS: "HUMERUS",
    StudyType.SHOULDER: "SHOULDER",
    "CHEST": "CHEST",
    "KNEE": "KNEE",
}

# (renderer view, series label) in the order technologists acquire them.
_VIEW_PLANS: dict[BodyPart, tuple[tuple[str, str], ...]] = {
    StudyType.WRIST: (("PA", "PA"), ("LAT", "LAT"), ("OBL", "OBL"), ("PA", "SCAPHOID")),
    StudyType.HAND: (("PA", "PA"), ("OBL", "OBL"), ("LAT", "LAT"), ("OBL", "NORGAARD")),
    StudyType.FINGER: (("PA", "PA"), ("LAT", "LAT"), ("OBL", "OBL"), ("PA", "PA")),
    StudyType.FOREARM: (("AP", "AP"), ("LAT", "LAT"), ("OBL", "OBL"), ("AP", "AP")),
    StudyType.ELBOW: (("AP", "AP"), ("LAT", "LAT"), ("OBL", "OBL"), ("OBL", "RAD HEAD")),
    StudyType.HUMERUS: (("AP", "AP"), ("LAT", "LAT"), ("AP", "AP"), ("LAT", "LAT")),
    StudyType.SHOULDER: (
        ("AP", "AP INT ROT"),
        ("AP", "AP EXT ROT"),
        ("LAT", "Y VIEW"),
        ("OBL", "GRASHEY"),
    ),
    "CHEST": (("PA", "PA"), ("LAT", "LAT"), ("AP", "AP"), ("LAT", "LAT")),
    "KNEE": (("AP", "AP"), ("LAT", "LAT"), ("OBL", "OBL"), ("AP", "AP")),
}

_KVP: dict[BodyPart, tuple[int, int]] = {
    StudyType.FINGER: (48, 55),
    StudyType.HAND: (50, 57),
    StudyType.WRIST: (52, 60),
    StudyType.FOREARM: (55, 65),
    StudyType.ELBOW: (55, 66),
    StudyType.HUMERUS: (65, 75),
    StudyType.SHOULDER: (68, 80),
    "CHEST": (110, 125),
    "KNEE": (63, 72),
}

_EQUIPMENT: dict[str, tuple[tuple[str, str, str], ...]] = {
    "CR": (
        ("FUJIFILM Corporation", "FCR PROFECT CS", "A08"),
        ("Agfa", "CR 30-X", "NX 3.0.9"),
        ("KONICA MINOLTA", "REGIUS 190", "V3.20"),
        ("Carestream Health", "DirectView CR 975", "5.7.412"),
    ),
    "DX": (
        ("SIEMENS", "Ysio Max", "VF10E"),
        ("Philips Medical Systems", "DigitalDiagnost", "4.3.5"),
        ("GE Healthcare", "Definium 8000", "dm_Platform_release_FW1.3"),
        ("Carestream Health", "DRX-Evolution Plus", "5.7.1011"),
        ("Canon Inc.", "CXDI-710C Wireless", "3.20"),
    ),
}

_FAMILY = ("DOE", "ROE", "SMITH", "NGUYEN", "GARCIA", "MUELLER", "TANAKA", "KOWALSKI", "OKAFOR")
_GIVEN = ("JANE", "JOHN", "ALEX", "SAM", "MARIA", "WEI", "AMARA", "LUCA", "NOOR", "ELIF")


def _descriptions(part: BodyPart, n: int, lat: str | None) -> list[str]:
    """Study descriptions seen in the wild for *part* with *n* views and laterality *lat*."""
    word = _WORDS[part]
    short = {"L": "LT", "R": "RT"}.get(lat or "", "")
    long = {"L": "LEFT", "R": "RIGHT"}.get(lat or "", "")
    plus = f"{n}+ VIEWS" if n >= 3 else f"{n} VIEWS" if n > 1 else "1 VIEW"
    out = [
        f"XR {word} {n}V",
        f"XR {word} {plus} {short}".strip(),
        f"{word} {long} {n} VIEWS".replace("  ", " ").strip(),
        f"DX {word} {short}".strip(),
    ]
    if n >= 3:
        out.append(f"XR {word} MIN 3 VIEWS {short}".strip())
        out.append(f"XR {word} COMPLETE {long}".strip())
    if part is StudyType.FINGER:
        out += ["XR FINGER(S)", f"XR FINGER(S) {short}".strip(), f"XR FINGER(S) {plus}"]
    elif part is StudyType.FOREARM:
        out.append(f"XR FOREARM 2 VIEWS {long}".strip() if n == 2 else f"XR FOREARM {n}V")
    elif part is StudyType.HUMERUS:
        out.append(f"XR HUMERUS MIN 2 VIEWS {short}".strip() if n >= 2 else "XR HUMERUS 1V")
    elif part is StudyType.SHOULDER and n >= 3:
        out.append(f"XR SHOULDER TRAUMA SERIES {short}".strip())
    elif part == "CHEST":
        out = {1: ["XR CHEST 1V", "CHEST PA", "XR CHEST PORTABLE 1V"]}.get(
            n, [f"XR CHEST {n}V", "XR CHEST PA AND LATERAL", "CHEST PA LAT"]
        )
    elif part == "KNEE":
        out.append("XR KNEE 1-2 VIEWS" if n <= 2 else f"XR KNEE {plus} {short}".strip())
    return out


@dataclass(frozen=True)
class _Plan:
    """Everything about a study that is drawn from the seed, so that it is drawn once."""

    part: BodyPart
    views: tuple[tuple[str, str], ...]
    laterality: str | None
    rows: int
    cols: int
    bits: int
    photometric: str
    modality: str


def _rows_cols(size_mb: float) -> tuple[int, int]:
    """Rows × columns (portrait 5:4, multiples of 16) of a 16-bit image of about *size_mb* MiB."""
    pixels = size_mb * 1024 * 1024 / 2
    cols = max(16, round(math.sqrt(pixels * 4 / 5) / 16) * 16)
    rows = max(16, round(pixels / cols / 16) * 16)
    return rows, cols


def _ds_number(value: float) -> str:
    """A Decimal String of at most 16 characters."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.4e}"


@functools.lru_cache(maxsize=4)
def _cached_phantom(
    part: BodyPart,
    view: str,
    rows: int,
    cols: int,
    abnormal: bool,
    seed: tuple[int, ...],
    laterality: str | None,
) -> tuple[np.ndarray, tuple[Finding, ...]]:
    image, findings = render_phantom_with_findings(
        part, view, rows, cols, abnormal, np.random.default_rng(list(seed)), laterality=laterality
    )
    image.flags.writeable = False
    return image, tuple(findings)


@functools.lru_cache(maxsize=4)
def _cached_pixels(
    key: tuple[object, ...], bits: int, photometric: str
) -> tuple[bytes, tuple[float, float]]:
    image, _ = _cached_phantom(*key)  # type: ignore[arg-type]
    return _quantise(image, bits, photometric)


def _quantise(image: np.ndarray, bits: int, photometric: str) -> tuple[bytes, tuple[float, float]]:
    """Stored little-endian uint16 pixels and the (low, high) display range in stored values."""
    top = (1 << bits) - 1
    stored = np.rint(image * np.float32(top)).astype(np.uint16)
    sample = image[:: max(1, image.shape[0] // 256), :: max(1, image.shape[1] // 256)]
    low, high = (float(v) * top for v in np.percentile(sample, [1.0, 99.7]))
    if photometric == "MONOCHROME1":
        # MONOCHROME1: the minimum stored value is displayed white, so attenuation is inverted.
        stored = np.uint16(top) - stored
        low, high = top - high, top - low
    return stored.astype("<u2", copy=False).tobytes(), (low, high)


def _uid(*parts: object) -> str:
    return str(generate_uid(entropy_srcs=["msk-triage-synth", *(str(p) for p in parts)]))


def make_study(
    body_part: BodyPart = StudyType.WRIST,
    *,
    views: int | Sequence[str] = 2,
    modality: str = "DX",
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
    rows: int = 1280,
    cols: int = 1024,
    size_mb: float | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = 0.0,
    windows: int | Sequence[tuple[float, float]] = 1,
    abnormal: bool = False,
    patient_name: str | None = None,
    patient_id: str | None = None,
    patient_birth_date: str | None = None,
    patient_sex: str | None = None,
    study_uid: str | None = None,
    accession_number: str | None = None,
    study_description: str | None = None,
    body_part_examined: str | None = None,
    laterality: str | None = None,
    series_per_view: bool = True,
    series_laterality: bool | None = None,
    seed: int = 0,
    phantom_seed: int | None = None,
) -> list[Dataset]:
    """Build the data sets of one synthetic radiograph study.

    *body_part*: a :class:`StudyType` (or its name, "WRIST" or "XR_WRIST"), or "CHEST"/"KNEE"
    (not eligible for scoring). *views*: how many (1–4, in the usual acquisition order for the
    body part) or explicit view names (AP, PA, LAT, OBL). *modality*: "CR" (CR Image Storage) or
    "DX" (Digital X-Ray Image Storage – For Presentation). *bits_stored*: 8–16 (default 12 for CR,
    14 for DX), always in 16 allocated bits, unsigned. *photometric*: "MONOCHROME2", or
    "MONOCHROME1" whose stored values are inverted. *size_mb* overrides *rows*/*cols* with a
    portrait image of about that many MiB. *windows*: how many VOI windows to compute, or explicit
    (center, width) pairs in rescaled units. ``None`` patient fields are drawn from the seed;
    ``body_part_examined=""`` sends the attribute empty. Laterality goes in Image Laterality for
    DX and in the General Series Laterality for CR: the DX IOD forbids the series attribute when
    Image Laterality is present (Type 2C, dciodvfy reports it as an error);
    ``series_laterality=True`` sends both anyway, as many DR systems do. *phantom_seed*: render
    the pixels from this seed instead of *seed* and keep the render cached, so that many studies
    (new UIDs) can share one image cheaply.

    The same arguments give identical data sets, UIDs included. No finding or label is written
    into the data sets; :func:`study_findings` says where the findings are.
    """
    if phantom_seed is not None and laterality is None:
        # Shared pixels need a shared side: the laterality tags must match the image.
        laterality = "LR"[phantom_seed % 2]
    plan, rng = _plan(
        body_part, views, modality, bits_stored, photometric, rows, cols, size_mb, laterality, seed
    )
    options = (
        plan,
        rescale_slope,
        rescale_intercept,
        windows,
        abnormal,
        body_part_examined,
        series_per_view,
        series_laterality,
        phantom_seed,
    )
    if series_laterality is None:
        series_laterality = plan.modality != "DX"
    study_uid = study_uid or _uid("study", seed, options)
    when = dt.datetime(2023, 1, 2, 7, 0) + dt.timedelta(
        days=int(rng.integers(0, 900)), seconds=int(rng.integers(0, 15 * 3600))
    )
    age = int(rng.integers(6, 92))
    birth = when.date() - dt.timedelta(days=int(age * 365.25 + rng.integers(0, 365)))
    drawn_name = f"{rng.choice(_FAMILY)}^{rng.choice(_GIVEN)}"
    drawn_id = f"SYN{int(rng.integers(0, 10**7)):07d}"
    drawn_sex = str(rng.choice(["F", "M"]))
    drawn_accession = f"A{when:%y%m%d}{int(rng.integers(0, 10**5)):05d}"
    manufacturer, model, software = _EQUIPMENT[plan.modality][
        int(rng.integers(len(_EQUIPMENT[plan.modality])))
    ]
    values, weights = zip(*BODY_PART_EXAMINED[plan.part], strict=True)
    drawn_bpe = str(rng.choice(values, p=np.array(weights) / sum(weights)))
    description = str(rng.choice(_descriptions(plan.part, len(plan.views), plan.laterality)))
    series_style = int(rng.integers(4))
    protocol_style = int(rng.integers(4))
    kvp_low, kvp_high = _KVP[plan.part]
    kvp = int(rng.integers(kvp_low, kvp_high + 1))
    spacing = field_of_view_mm(plan.part, plan.rows, plan.cols) / min(plan.rows, plan.cols)

    bpe = drawn_bpe if body_part_examined is None else body_part_examined.upper()
    word = _WORDS[plan.part]
    lat = plan.laterality
    study = {
        "name": patient_name if patient_name is not None else drawn_name,
        "id": patient_id if patient_id is not None else drawn_id,
        "birth": patient_birth_date if patient_birth_date is not None else f"{birth:%Y%m%d}",
        "sex": patient_sex if patient_sex is not None else drawn_sex,
        "age": f"{age:03d}Y",
        "accession": accession_number if accession_number is not None else drawn_accession,
        "description": study_description if study_description is not None else description,
        "study_id": str(int(rng.integers(1, 10**6))),
    }
    protocol = (
        f"XR {word}",
        word.title(),
        f"{word} ROUTINE",
        f"{word} {len(plan.views)}V",
    )[protocol_style]
    top = (1 << plan.bits) - 1

    datasets = []
    for index, (view, label) in enumerate(plan.views):
        pixel_seed = (phantom_seed if phantom_seed is not None else seed, 7919, index)
        key = (plan.part, view, plan.rows, plan.cols, abnormal, pixel_seed, lat)
        if phantom_seed is not None:
            pixel_data, (low, high) = _cached_pixels(key, plan.bits, plan.photometric)
        else:
            image, _ = render_phantom_with_findings(
                plan.part,
                view,
                plan.rows,
                plan.cols,
                abnormal,
                np.random.default_rng(list(pixel_seed)),
                laterality=lat,
            )
            pixel_data, (low, high) = _quantise(image, plan.bits, plan.photometric)
        series_number = index + 1 if series_per_view else 1
        instance_number = 1 if series_per_view else index + 1
        series_uid = _uid("series", study_uid, seed, options, series_number)
        sop_uid = _uid("instance", study_uid, seed, options, index)
        acquired = when + dt.timedelta(seconds=40 * index + int(rng.integers(0, 30)))
        if series_per_view:
            series_description = _series_description(series_style, word, label, lat)
        else:
            series_description = _series_description(series_style, word, "", lat)

        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.InstanceCreationDate = f"{when:%Y%m%d}"
        ds.InstanceCreationTime = f"{acquired:%H%M%S}"
        ds.SOPClassUID = MODALITIES[plan.modality]
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = f"{when:%Y%m%d}"
        ds.SeriesDate = f"{when:%Y%m%d}"
        ds.AcquisitionDate = f"{acquired:%Y%m%d}"
        ds.ContentDate = f"{acquired:%Y%m%d}"
        ds.StudyTime = f"{when:%H%M%S}"
        ds.SeriesTime = f"{acquired:%H%M%S}"
        ds.AcquisitionTime = f"{acquired:%H%M%S}"
        ds.ContentTime = f"{acquired:%H%M%S}"
        ds.AccessionNumber = study["accession"]
        ds.Modality = plan.modality
        if plan.modality == "DX":
            ds.PresentationIntentType = "FOR PRESENTATION"
        ds.Manufacturer = manufacturer
        ds.InstitutionName = "Synthetic General Hospital"
        ds.ReferringPhysicianName = ""
        ds.StationName = f"XR{1 + seed % 7:02d}"
        ds.StudyDescription = study["description"]
        ds.SeriesDescription = series_description
        ds.ManufacturerModelName = model
        ds.PatientName = study["name"]
        ds.PatientID = study["id"]
        ds.IssuerOfPatientID = "SGH"
        # As RIS and PACS data carry them: sequences in the patient and study modules, which
        # the outputs copy from headers read back as raw elements.
        ds.OtherPatientIDsSequence = DicomSequence([_other_patient_id(study["id"])])
        ds.ProcedureCodeSequence = DicomSequence([_procedure_code(plan.part, study["description"])])
        ds.PatientBirthDate = study["birth"]
        ds.PatientSex = study["sex"]
        ds.PatientAge = study["age"]
        ds.BodyPartExamined = bpe
        ds.KVP = str(kvp)
        ds.DeviceSerialNumber = f"SN{1000 + seed % 9000}"
        ds.SoftwareVersions = software
        ds.ProtocolName = protocol
        ds.ImagerPixelSpacing = [_ds_number(spacing), _ds_number(spacing)]
        ds.ExposureInuAs = int(rng.integers(1000, 12000))
        ds.ViewPosition = _view_position(view, lat)
        if plan.modality == "DX":
            ds.DetectorType = "SCINTILLATOR"
            ds.PositionerType = "COLUMN"
            ds.ViewCodeSequence = DicomSequence([_view_code(view, lat)])
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = study["study_id"]
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = index + 1
        ds.InstanceNumber = instance_number
        ds.PatientOrientation = _patient_orientation(view, plan.part)
        if lat is not None and series_laterality:
            ds.Laterality = lat
        if plan.modality == "DX":
            ds.ImageLaterality = lat or "U"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = plan.photometric
        ds.Rows = plan.rows
        ds.Columns = plan.cols
        ds.BitsAllocated = 16
        ds.BitsStored = plan.bits
        ds.HighBit = plan.bits - 1
        ds.PixelRepresentation = 0
        ds.BurnedInAnnotation = "NO"
        if plan.modality == "DX":
            ds.PixelIntensityRelationship = "LOG"
            # Sign: −1 when higher stored values mean less X-ray intensity (MONOCHROME2 here).
            ds.PixelIntensityRelationshipSign = -1 if plan.photometric == "MONOCHROME2" else 1
        ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation = _windows(
            windows, low, high, top, plan.photometric, rescale_slope, rescale_intercept
        )
        ds.RescaleIntercept = _ds_number(rescale_intercept)
        ds.RescaleSlope = _ds_number(rescale_slope)
        ds.RescaleType = "US"
        ds.VOILUTFunction = "LINEAR"
        ds.LossyImageCompression = "00"
        if plan.modality == "DX":
            ds.AcquisitionContextSequence = DicomSequence()
            region = _REGION_CODES.get(bpe) or _REGION_CODES[BODY_PART_EXAMINED[plan.part][0][0]]
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
                region[0],
                "SCT",
                region[1],
            )
            ds.AnatomicRegionSequence = DicomSequence([code])
            ds.PresentationLUTShape = "IDENTITY" if plan.photometric == "MONOCHROME2" else "INVERSE"
        ds.PixelData = pixel_data
        ds["PixelData"].VR = "OW"
        datasets.append(ds)
    return datasets


def study_findings(
    body_part: BodyPart = StudyType.WRIST,
    *,
    views: int | Sequence[str] = 2,
    rows: int = 1280,
    cols: int = 1024,
    size_mb: float | None = None,
    abnormal: bool = True,
    laterality: str | None = None,
    seed: int = 0,
    phantom_seed: int | None = None,
    modality: str = "DX",
) -> list[list[Finding]]:
    """Where the findings are, per view, in the study :func:`make_study` builds from the same
    arguments (for checking CAMs and demos; never written into the data sets)."""
    if phantom_seed is not None and laterality is None:
        laterality = "LR"[phantom_seed % 2]
    plan, _ = _plan(
        body_part, views, modality, None, "MONOCHROME2", rows, cols, size_mb, laterality, seed
    )
    out = []
    for index, (view, _label) in enumerate(plan.views):
        pixel_seed = (phantom_seed if phantom_seed is not None else seed, 7919, index)
        _, findings = render_phantom_with_findings(
            plan.part,
            view,
            plan.rows,
            plan.cols,
            abnormal,
            np.random.default_rng(list(pixel_seed)),
            laterality=plan.laterality,
        )
        out.append(findings)
    return out


def _plan(
    body_part: BodyPart,
    views: int | Sequence[str],
    modality: str,
    bits_stored: int | None,
    photometric: str,
    rows: int,
    cols: int,
    size_mb: float | None,
    laterality: str | None,
    seed: int,
) -> tuple[_Plan, np.random.Generator]:
    part = parse_body_part(body_part)
    modality = modality.upper()
    if modality not in MODALITIES:
        raise ValueError(f"modality must be CR or DX, not {modality!r}")
    photometric = photometric.upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    bits = bits_stored if bits_stored is not None else (12 if modality == "CR" else 14)
    if not 8 <= bits <= 16:
        raise ValueError(f"bits_stored must be 8..16, not {bits}")
    if size_mb is not None:
        if size_mb <= 0:
            raise ValueError("size_mb must be positive")
        rows, cols = _rows_cols(size_mb)
    if rows < 16 or cols < 16:
        raise ValueError("rows and cols must be at least 16")
    if isinstance(views, int):
        if not 1 <= views <= 4:
            raise ValueError(f"views must be 1..4, not {views}")
        plan_views = _VIEW_PLANS[part][:views]
    else:
        if not 1 <= len(views) <= 4:
            raise ValueError("give 1 to 4 views")
        plan_views = tuple((normalise_view(v), normalise_view(v)) for v in views)
    rng = np.random.default_rng([seed, 0])
    drawn_lat = "L" if rng.random() < 0.5 else "R"
    if part == "CHEST":
        lat = None
    elif laterality is not None:
        lat = laterality.upper()[:1]
        if lat not in ("L", "R"):
            raise ValueError("laterality must be L or R")
    else:
        lat = drawn_lat
    return _Plan(part, plan_views, lat, rows, cols, bits, photometric, modality), rng


def _series_description(style: int, word: str, label: str, lat: str | None) -> str:
    side = {"L": "L", "R": "R"}.get(lat or "", "")
    if style == 0:
        text = f"{word} {label}"
    elif style == 1:
        text = f"{word.title()} {label.title() if len(label) > 3 else label}"
    elif style == 2:
        text = f"{side} {word} {label}"
    else:
        text = f"XR {word} {label}"
    return " ".join(text.split())


def _view_position(view: str, lat: str | None) -> str:
    """View Position (CS): the DICOM defined terms AP, PA, LL, RL, LLO, RLO."""
    side = lat or "L"
    return {"AP": "AP", "PA": "PA", "LAT": f"{side}L", "OBL": f"{side}LO"}[view]


_VIEW_CODES = {  # CID 4010 DX View
    "AP": ("399348003", "antero-posterior"),
    "PA": ("272479007", "postero-anterior"),
    "LL": ("399173006", "left lateral"),
    "RL": ("399198007", "right lateral"),
    "LLO": ("399184004", "left oblique"),
    "RLO": ("399236003", "right oblique"),
}


def _other_patient_id(patient_id: str) -> Dataset:
    item = Dataset()
    item.PatientID = f"MPI-{patient_id}"[:64]
    item.IssuerOfPatientID = "REGIONAL MPI"
    item.TypeOfPatientID = "TEXT"
    return item


def _procedure_code(part: BodyPart, description: str) -> Dataset:
    item = Dataset()
    item.CodeValue = f"XR{getattr(part, 'value', part)}".replace("_", "")[:16]
    item.CodingSchemeDesignator = "99SGH"
    item.CodeMeaning = description[:64] or "XR"
    return item


def _view_code(view: str, lat: str | None) -> Dataset:
    code = Dataset()
    value, meaning = _VIEW_CODES[_view_position(view, lat)]
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "SCT", meaning
    code.ViewModifierCodeSequence = DicomSequence()
    return code


def _patient_orientation(view: str, part: BodyPart) -> list[str]:
    column = "H" if part in (StudyType.FINGER, StudyType.HAND, StudyType.WRIST) else "F"
    row = {"AP": "L", "PA": "R", "OBL": "L", "LAT": "P"}[view]
    return [row, column]


def _windows(
    windows: int | Sequence[tuple[float, float]],
    low: float,
    high: float,
    top: int,
    photometric: str,
    slope: float,
    intercept: float,
) -> tuple[list[str], list[str], list[str]]:
    """Window centres, widths and explanations in rescaled units."""
    if not isinstance(windows, int):
        pairs = [(float(c), float(w)) for c, w in windows]
        if not pairs:
            raise ValueError("windows: give at least one (center, width)")
        names = [f"WINDOW {i + 1}" for i in range(len(pairs))]
    else:
        if not 1 <= windows <= 4:
            raise ValueError("windows must be 1..4 or explicit (center, width) pairs")
        width = max(high - low, 16.0)
        center = (low + high) / 2
        # Bone detail sits at the high-attenuation end: high stored values in MONOCHROME2,
        # low ones in MONOCHROME1.
        toward_bone = 1.0 if photometric == "MONOCHROME2" else -1.0
        candidates = [
            ("DEFAULT", center, width),
            ("BONE", center + toward_bone * 0.2 * width, 0.6 * width),
            ("SOFT TISSUE", center - toward_bone * 0.15 * width, 1.4 * width),
            ("FULL RANGE", top / 2, float(top + 1)),
        ]
        pairs, names = [], []
        for name, c, w in candidates[:windows]:
            pairs.append((c * slope + intercept, w * abs(slope)))
            names.append(name)
    return (
        [_ds_number(c) for c, _ in pairs],
        [_ds_number(max(w, 1.0)) for _, w in pairs],
        names,
    )


# --------------------------------------------------------------------------------------------
# Writing.


def _stored_pixels(ds: Dataset) -> np.ndarray:
    return np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)


def _file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _write_native(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    out = copy.copy(ds)
    out.file_meta = _file_meta(ds, transfer_syntax)
    out.save_as(path, enforce_file_format=True)


def _write_pydicom_compressed(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    out = copy.deepcopy(ds)
    out.file_meta = _file_meta(ds, ExplicitVRLittleEndian)
    out.compress(transfer_syntax, _stored_pixels(ds), generate_instance_uid=False)
    out.save_as(path, enforce_file_format=True)


def _write_dcmtk(ds: Dataset, path: Path, command: list[str]) -> None:
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-") as tmp:
        source = Path(tmp) / "in.dcm"
        _write_native(ds, source, ExplicitVRLittleEndian)
        done = subprocess.run(
            [*command, str(source), str(path)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stderr.strip() or done.stdout.strip()}")


def _pydicom_can(transfer_syntax: str) -> bool:
    from pydicom.pixels import get_encoder

    try:
        return bool(get_encoder(transfer_syntax).is_available)
    except (NotImplementedError, ValueError, KeyError):
        return False


def _writer(encoding: str) -> str:
    """How *encoding* is written here: "native", "pydicom", "dcmtk", or "" when it cannot be."""
    if encoding in ("explicit", "implicit", "deflated"):
        return "native"
    if encoding in ("rle", "jpeg2000"):
        return "pydicom" if _pydicom_can(ENCODINGS[encoding]) else ""
    if encoding == "jpeg-ls":
        if _pydicom_can(JPEGLSLossless):
            return "pydicom"
        return "dcmtk" if shutil.which("dcmcjpls") else ""
    if encoding == "jpeg-lossless":
        return "dcmtk" if shutil.which("dcmcjpeg") else ""
    raise ValueError(f"unknown encoding {encoding!r}: one of {', '.join(ENCODINGS)}")


def _write_one(ds: Dataset, path: Path, encoding: str, how: str) -> None:
    transfer_syntax = ENCODINGS[encoding]
    if how == "native":
        _write_native(ds, path, transfer_syntax)
    elif how == "pydicom":
        _write_pydicom_compressed(ds, path, transfer_syntax)
    elif encoding == "jpeg-ls":
        _write_dcmtk(ds, path, ["dcmcjpls", "--encode-lossless"])
    else:
        # SV1 lossless is dcmcjpeg's default; spell it out so a DCMTK default change is harmless.
        _write_dcmtk(ds, path, ["dcmcjpeg", "--encode-lossless-sv1", "--true-lossless"])


def available_encodings() -> list[str]:
    """Encodings that write and decode back to identical pixels on this machine.

    Each candidate is tried once per process on a small 12- and a 16-bit image.
    """
    return list(_probe_encodings())


@functools.cache
def _probe_encodings() -> tuple[str, ...]:
    probe = make_study(StudyType.FINGER, views=1, rows=40, cols=32, bits_stored=16, seed=1)[0]
    probe_12 = make_study(StudyType.FINGER, views=1, rows=40, cols=32, bits_stored=12, seed=2)[0]
    working = []
    with tempfile.TemporaryDirectory(prefix="synth-probe-") as tmp:
        for encoding in ENCODINGS:
            how = _writer(encoding)
            if not how:
                continue
            try:
                ok = True
                for n, ds in enumerate((probe, probe_12)):
                    path = Path(tmp) / f"{encoding}-{n}.dcm"
                    _write_one(ds, path, encoding, how)
                    back = dcmread(path)
                    ok = ok and back.file_meta.TransferSyntaxUID == ENCODINGS[encoding]
                    ok = ok and np.array_equal(back.pixel_array, _stored_pixels(ds))
            except Exception:  # any failure means "not available here"
                ok = False
            if ok:
                working.append(encoding)
    return tuple(working)


def write_study(
    datasets: Sequence[Dataset], out_dir: str | os.PathLike[str], encoding: str = "explicit"
) -> list[Path]:
    """Write *datasets* as Part 10 files ``<SOPInstanceUID>.dcm`` under *out_dir*.

    *encoding* is a key of :data:`ENCODINGS`; every one is lossless, so the files decode to
    exactly the data sets' pixels. The data sets themselves are not modified. Raises ValueError
    for an encoding that does not work here (see :func:`available_encodings`).
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}: one of {', '.join(ENCODINGS)}")
    how = _writer(encoding)
    if not how or (how != "native" and encoding not in available_encodings()):
        raise ValueError(f"encoding {encoding!r} is not available here")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        _write_one(ds, path, encoding, how)
        paths.append(path)
    return paths


def write_benchmark_files(
    out_dir: str | os.PathLike[str],
    count: int = 100,
    *,
    size_mb: float = 10.0,
    body_part: BodyPart = StudyType.WRIST,
    modality: str = "DX",
    views_per_study: int = 1,
    encoding: str = "explicit",
    seed: int = 0,
    bits_stored: int | None = None,
) -> list[Path]:
    """Write *count* files of about *size_mb* MiB each (uncompressed), fast.

    One image per view is rendered (from *seed*) and reused across studies that differ in UIDs
    and patient details: generating 100 × 10 MiB costs about the time to write a gigabyte.
    Files go to ``out_dir/<StudyInstanceUID>/``.
    """
    paths: list[Path] = []
    study = 0
    while len(paths) < count:
        n = min(views_per_study, count - len(paths))
        datasets = make_study(
            body_part,
            views=n,
            modality=modality,
            size_mb=size_mb,
            bits_stored=bits_stored,
            seed=seed * 1_000_003 + study,
            phantom_seed=seed,
        )
        paths += write_study(datasets, Path(out_dir) / datasets[0].StudyInstanceUID, encoding)
        study += 1
    return paths


# --------------------------------------------------------------------------------------------
# Training data.


@dataclass(frozen=True)
class MuraSummary:
    """What :func:`write_mura_dataset` wrote."""

    root: Path
    train_studies: int
    valid_studies: int
    images: int
    positive_studies: int
    patients: int


def _split_labels(n: int, fraction: float, rng: np.random.Generator) -> list[int]:
    """*n* labels with round(n × fraction) ones, at least one of each when n ≥ 2."""
    positives = math.floor(n * fraction + 0.5)
    if n >= 2 and 0 < fraction < 1:
        positives = min(max(positives, 1), n - 1)
    labels = [1] * positives + [0] * (n - positives)
    rng.shuffle(labels)
    return labels


def _stratified_labels(
    counts: Sequence[int], fraction: float, rng: np.random.Generator
) -> list[list[int]]:
    """Labels for consecutive groups (study types) of *counts* studies.

    The positives total round(N × fraction) and spread evenly over the groups; a split of two or
    more studies gets at least one of each label when 0 < fraction < 1.
    """
    total = sum(counts)
    target = math.floor(total * fraction + 0.5)
    if total >= 2 and 0 < fraction < 1:
        target = min(max(target, 1), total - 1)
    blocks, done, start = [], 0, 0
    for count in counts:
        end = start + count
        upto = math.floor(end * target / total + 0.5) if total else 0
        block = [1] * (upto - done) + [0] * (count - (upto - done))
        rng.shuffle(block)
        blocks.append(block)
        done, start = upto, end
    return blocks


def write_mura_dataset(
    root: str | os.PathLike[str],
    *,
    studies_per_type: int = 10,
    study_types: Sequence[StudyType] = tuple(StudyType),
    abnormal_fraction: float = 0.4,
    valid_fraction: float = 0.2,
    min_size: int = 128,
    max_size: int = 512,
    seed: int = 0,
) -> MuraSummary:
    """Write phantom PNGs in the MURA-v1.1 layout under ``root/MURA-v1.1/``.

    ``{train,valid}_image_paths.csv`` list one image path per line and
    ``{train,valid}_labeled_studies.csv`` one ``study_folder/,label`` per line (no headers, paths
    relative to *root* starting with ``MURA-v1.1/``), as in the real data set. Images are 8-bit
    grayscale, long side between *min_size* and *max_size*, variable aspect; 1–4 per study.
    Patients are split, never studies: no patient is in both splits. A patient may have several
    studies (study1, study2, …) and appear under several study types, as in MURA.
    """
    from PIL import Image

    if not 0 <= abnormal_fraction <= 1 or not 0 <= valid_fraction < 1:
        raise ValueError("abnormal_fraction must be in [0, 1] and valid_fraction in [0, 1)")
    if not 16 <= min_size <= max_size:
        raise ValueError("need 16 <= min_size <= max_size")
    base = Path(root)
    top = base / "MURA-v1.1"
    rng = np.random.default_rng([seed, 31337])
    lines: dict[str, list[str]] = {"train": [], "valid": []}
    studies: dict[str, list[str]] = {"train": [], "valid": []}
    patients: dict[str, list[int]] = {"train": [], "valid": []}
    next_patient = {"train": 1, "valid": 0}
    counts: dict[tuple[int, str], int] = {}  # (patient, type) → studies so far
    images = positives = 0
    parts = [part for part in map(parse_body_part, study_types) if isinstance(part, StudyType)]
    if len(parts) != len(study_types) or not parts:
        raise ValueError("MURA study types are the seven StudyType members")
    n_valid = 0
    if studies_per_type >= 2 and valid_fraction > 0:
        n_valid = min(
            max(math.floor(studies_per_type * valid_fraction + 0.5), 1), studies_per_type - 1
        )
    plan: list[tuple[StudyType, str, int]] = []
    for split, n in (("train", studies_per_type - n_valid), ("valid", n_valid)):
        blocks = _stratified_labels([n] * len(parts), abnormal_fraction, rng)
        plan += [
            (part, split, label)
            for part, block in zip(parts, blocks, strict=True)
            for label in block
        ]
    # Valid patients are numbered after train ones, as in MURA (train 1–11184, valid 11185–).
    n_train = sum(1 for _, split, _ in plan if split == "train")
    next_patient["valid"] = n_train + 1
    for number, (part, split, label) in enumerate(plan):
        pool = patients[split]
        if pool and rng.random() < 0.15:
            patient = int(rng.choice(pool))
        else:
            patient = next_patient[split]
            next_patient[split] += 1
            pool.append(patient)
        index = counts.get((patient, part.value), 0) + 1
        counts[(patient, part.value)] = index
        kind = "positive" if label else "negative"
        rel = f"MURA-v1.1/{split}/{part.value}/patient{patient:05d}/study{index}_{kind}/"
        folder = base / rel
        folder.mkdir(parents=True, exist_ok=True)
        n_images = int(rng.choice([1, 2, 3, 4], p=[0.1, 0.35, 0.4, 0.15]))
        for k in range(n_images):
            view = _VIEW_PLANS[part][k][0]
            long_side = int(rng.integers(min_size, max_size + 1))
            short_side = max(16, round(long_side * float(rng.uniform(0.6, 1.0))))
            rows, cols = (long_side, short_side) if rng.random() < 0.8 else (short_side, long_side)
            image = render_phantom_with_findings(
                part,
                view,
                rows,
                cols,
                bool(label),
                np.random.default_rng([seed, 4242, number, k]),
            )[0]
            pixels = np.rint(image * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"image{k + 1}.png", compress_level=1)
            lines[split].append(f"{rel}image{k + 1}.png")
            images += 1
        studies[split].append(f"{rel},{label}")
        positives += label
    top.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        (top / f"{split}_image_paths.csv").write_text("".join(f"{p}\n" for p in lines[split]))
        (top / f"{split}_labeled_studies.csv").write_text("".join(f"{s}\n" for s in studies[split]))
    return MuraSummary(
        root=base,
        train_studies=len(studies["train"]),
        valid_studies=len(studies["valid"]),
        images=images,
        positive_studies=positives,
        patients=len(patients["train"]) + len(patients["valid"]),
    )


def write_labelled_dicom_dataset(
    root: str | os.PathLike[str],
    *,
    studies: int = 20,
    study_types: Sequence[StudyType] = tuple(StudyType),
    abnormal_fraction: float = 0.4,
    modality: str | None = None,
    rows: int = 512,
    cols: int = 416,
    encoding: str = "explicit",
    seed: int = 0,
) -> Path:
    """Write DICOM studies under ``root/<StudyInstanceUID>/`` and ``root/labels.csv``.

    The CSV has a header ``StudyInstanceUID,label`` and one row per study (1 = abnormal).
    Study types cycle through *study_types*; modality (CR/DX), photometric interpretation, bits
    stored and view count (1–4) vary per study unless *modality* is given. Returns the CSV path.
    """
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2718])
    labels = _split_labels(studies, abnormal_fraction, rng)
    rows_out = []
    for index, label in enumerate(labels):
        datasets = make_study(
            study_types[index % len(study_types)],
            views=int(rng.choice([1, 2, 3, 4], p=[0.1, 0.35, 0.4, 0.15])),
            modality=modality or str(rng.choice(["CR", "DX"])),
            photometric=str(rng.choice(["MONOCHROME2", "MONOCHROME1"], p=[0.8, 0.2])),
            bits_stored=int(rng.choice([12, 14, 16])),
            rows=rows,
            cols=cols,
            abnormal=bool(label),
            seed=seed * 1_000_003 + index,
        )
        uid = datasets[0].StudyInstanceUID
        write_study(datasets, base / uid, encoding)
        rows_out.append((uid, label))
    path = base / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["StudyInstanceUID", "label"])
        writer.writerows(rows_out)
    return path


# --------------------------------------------------------------------------------------------
# Command line.


def _parse_part(text: str) -> BodyPart | None:
    if text.lower() == "random":
        return None
    try:
        return parse_body_part(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``triage synth``."""
    parser = argparse.ArgumentParser(
        prog="triage synth",
        description="Write synthetic radiograph studies (DICOM), or training data "
        "(MURA-v1.1 PNG layout, or labelled DICOM folders).",
    )
    parser.add_argument("--out", type=Path, help="output folder")
    parser.add_argument(
        "--studies",
        type=int,
        default=1,
        help="studies to write (with --mura: studies per study type)",
    )
    parser.add_argument(
        "--body-part",
        type=_parse_part,
        default=None,
        help="WRIST, HAND, FINGER, FOREARM, ELBOW, HUMERUS, SHOULDER (or "
        "XR_WRIST …), CHEST, KNEE, or random (default: a MURA type per study)",
    )
    parser.add_argument(
        "--views",
        type=int,
        choices=range(1, 5),
        metavar="1..4",
        help="views per study (default: 1–4, drawn per study)",
    )
    parser.add_argument(
        "--modality",
        choices=sorted(MODALITIES),
        type=str.upper,
        help="CR or DX (default DX; with --labelled-dicom: drawn per study)",
    )
    parser.add_argument(
        "--photometric",
        choices=["MONOCHROME1", "MONOCHROME2"],
        type=str.upper,
        default="MONOCHROME2",
    )
    parser.add_argument(
        "--bits",
        type=int,
        choices=range(8, 17),
        metavar="8..16",
        help="bits stored (default 12 for CR, 14 for DX)",
    )
    parser.add_argument("--encoding", choices=list(ENCODINGS), default="explicit")
    parser.add_argument("--size-mb", type=float, help="about this many MiB per (uncompressed) file")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--cols", type=int, default=None)
    parser.add_argument("--abnormal-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--single-series",
        action="store_true",
        help="all views in one series (default: one series per view)",
    )
    parser.add_argument(
        "--reuse-pixels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="render once and reuse the pixels across studies, all of one body part "
        "(default: on with --size-mb)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--mura",
        action="store_true",
        help="write a MURA-v1.1 layout of PNG phantoms (training data)",
    )
    mode.add_argument(
        "--labelled-dicom",
        action="store_true",
        help="write labelled DICOM studies and labels.csv (training data)",
    )
    mode.add_argument(
        "--list-encodings", action="store_true", help="print the encodings that work here and exit"
    )
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="with --mura")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=(128, 512),
        metavar=("MIN", "MAX"),
        help="with --mura: long side range in pixels",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``triage synth``; prints one line per study written (no patient names)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["--"]:
        args_list = args_list[1:]
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.list_encodings:
        for name in available_encodings():
            print(f"{name}\t{ENCODINGS[name]}")
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.studies < 1:
        parser.error("--studies must be at least 1")
    if not 0 <= args.abnormal_fraction <= 1:
        parser.error("--abnormal-fraction must be in 0..1")
    if not args.mura and args.encoding not in available_encodings():
        print(
            f"triage synth: encoding {args.encoding!r} is not available here "
            f"(available: {', '.join(available_encodings())})",
            file=sys.stderr,
        )
        return 2
    other_part = args.body_part is not None and not isinstance(args.body_part, StudyType)
    if (args.mura or args.labelled_dicom) and other_part:
        parser.error("training data holds the seven MURA study types only")
    types = [args.body_part] if isinstance(args.body_part, StudyType) else list(StudyType)
    try:
        if args.mura:
            return _main_mura(args, types)
        if args.labelled_dicom:
            path = write_labelled_dicom_dataset(
                args.out,
                studies=args.studies,
                study_types=types,
                abnormal_fraction=args.abnormal_fraction,
                modality=args.modality,
                rows=args.rows or 512,
                cols=args.cols or 416,
                encoding=args.encoding,
                seed=args.seed,
            )
            with path.open() as handle:
                for row in list(csv.reader(handle))[1:]:
                    print(f"{row[0]}  label={row[1]}  -> {args.out / row[0]}")
            print(f"labels: {path}")
            return 0
        return _main_studies(args)
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"triage synth: {exc}", file=sys.stderr)
        return 1


def _main_mura(args: argparse.Namespace, types: list[StudyType]) -> int:
    summary = write_mura_dataset(
        args.out,
        studies_per_type=args.studies,
        study_types=types,
        abnormal_fraction=args.abnormal_fraction,
        valid_fraction=args.valid_fraction,
        min_size=args.image_size[0],
        max_size=args.image_size[1],
        seed=args.seed,
    )
    top = summary.root / "MURA-v1.1"
    for split in ("train", "valid"):
        for line in (top / f"{split}_labeled_studies.csv").read_text().splitlines():
            path, label = line.rsplit(",", 1)
            print(f"{path}  label={label}")
    print(
        f"MURA-v1.1: {summary.train_studies} train + {summary.valid_studies} valid studies, "
        f"{summary.images} images, {summary.positive_studies} positive, "
        f"{summary.patients} patients -> {top}"
    )
    return 0


def _iter_cli_studies(args: argparse.Namespace) -> Iterator[tuple[list[Dataset], bool]]:
    rng = np.random.default_rng([args.seed, 99])
    reuse = args.reuse_pixels if args.reuse_pixels is not None else args.size_mb is not None
    size = {}
    if args.size_mb is not None:
        size["size_mb"] = args.size_mb
    elif args.rows or args.cols:
        size["rows"] = args.rows or 1280
        size["cols"] = args.cols or 1024
    # Reused pixels come from a small cache: one body part keeps every study on the same images.
    fixed = args.body_part or (_random_type(rng) if reuse else None)
    for index in range(args.studies):
        part = fixed or _random_type(rng)
        views = args.views or int(rng.choice([1, 2, 3, 4], p=[0.1, 0.35, 0.4, 0.15]))
        abnormal = bool(rng.random() < args.abnormal_fraction)
        datasets = make_study(
            part,
            views=views,
            modality=args.modality or "DX",
            bits_stored=args.bits,
            photometric=args.photometric,
            abnormal=abnormal,
            series_per_view=not args.single_series,
            seed=args.seed * 1_000_003 + index,
            phantom_seed=args.seed if reuse else None,
            **size,
        )
        yield datasets, abnormal


def _random_type(rng: np.random.Generator) -> StudyType:
    return StudyType(str(rng.choice([t.value for t in StudyType])))


def _main_studies(args: argparse.Namespace) -> int:
    for datasets, abnormal in _iter_cli_studies(args):
        first = datasets[0]
        folder = args.out / first.StudyInstanceUID
        paths = write_study(datasets, folder, args.encoding)
        megabytes = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"{first.StudyInstanceUID}  {first.BodyPartExamined or '-':9s} "
            f"views={len(datasets)} {first.Modality} {first.PhotometricInterpretation} "
            f"bits={first.BitsStored} {first.Rows}x{first.Columns} "
            f"{'abnormal' if abnormal else 'normal'} {args.encoding} {megabytes:.1f} MiB "
            f"-> {folder}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
