"""Checks on a received data set, made before it is written: cheap, header only."""

from __future__ import annotations

import os
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from triage import MANUFACTURER
from triage.dicom.sop import Status
from triage.uids import is_valid_uid

_REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
#: Attributes of the Image Pixel module every image storage IOD requires.
_IMAGE_PIXEL = ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "PhotometricInterpretation")


@dataclass(frozen=True)
class Accepted:
    """A data set that passed the checks, with what the store records about it."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    #: An object msk-triage made itself (a CAM overlay a PACS routed back): never a new view.
    own_output: bool = False


@dataclass(frozen=True)
class Rejected:
    """A data set that failed a check: the DIMSE status and a reason for the peer and the log."""

    status: int
    reason: str


def read_header(source: str | os.PathLike[str] | bytes) -> Dataset:
    """Parse a Part 10 file (path or bytes) without loading large values such as pixel data."""
    if isinstance(source, bytes):
        return dcmread(BytesIO(source), defer_size=4096)
    return dcmread(source, defer_size=4096)


def check_instance(
    source: str | os.PathLike[str] | bytes,
    affected_sop_class: str,
    affected_sop_instance: str,
    image_classes: frozenset[str],
) -> Accepted | Rejected:
    """Validate a received instance (a Part 10 file, as a path or bytes).

    Rejects (with the status a PACS expects) a SOP class msk-triage does not store (0x0122),
    an unreadable data set or one whose pixel data is cut short (0xC000), a missing or
    malformed UID (0xC001), a SOP Instance UID other than the request's (0xC002), and a data set
    that does not match its SOP class (0xA900): another class, an image class without pixels, an
    image of zero rows or columns, or native pixel data shorter than its rows, columns, samples
    and frames need (acknowledged, such a view could never be scored).
    """
    if affected_sop_class not in image_classes:
        # Sent under a presentation context of another class: stored, it would be taken
        # for a view of its study.
        return Rejected(Status.SOP_CLASS_NOT_SUPPORTED, "SOP class not supported")
    try:
        dataset = read_header(source)
        values = {key: dataset.get(key) for key in (*_REQUIRED_UIDS, "Modality", "Manufacturer")}
    except OSError as exc:
        # Our side failed (the file is gone, the disk errs), not the data set: "try later",
        # never 0xC000, which a PACS takes as final.
        return Rejected(Status.OUT_OF_RESOURCES, f"cannot read the received file: {exc.strerror}")
    except Exception as exc:  # pydicom raises many types on corrupt input
        return Rejected(Status.UNREADABLE, f"unreadable data set: {type(exc).__name__}")
    bad = [key for key in _REQUIRED_UIDS if not is_valid_uid(_text(values[key]))]
    if bad:
        return Rejected(Status.INVALID_UID, "missing or invalid " + ", ".join(bad))
    sop_class = _text(values["SOPClassUID"])
    sop_instance = _text(values["SOPInstanceUID"])
    if sop_class != affected_sop_class:
        return Rejected(Status.DATASET_MISMATCH, "SOP Class UID differs from the request")
    if sop_instance != affected_sop_instance:
        return Rejected(Status.INSTANCE_MISMATCH, "SOP Instance UID differs from the request")
    if sop_class in image_classes:
        try:
            missing = [key for key in _IMAGE_PIXEL if dataset.get(key) in (None, "")]
            has_pixels = any(tag in dataset for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009))
        except Exception as exc:
            return Rejected(Status.UNREADABLE, f"unreadable image module: {type(exc).__name__}")
        if missing or not has_pixels:
            what = ", ".join(missing + ([] if has_pixels else ["PixelData"]))
            return Rejected(Status.DATASET_MISMATCH, f"image SOP class without {what}")
        if _pixel_data_cut_short(dataset, source):
            return Rejected(Status.UNREADABLE, "pixel data cut short (data set truncated)")
        problem = _image_geometry_problem(dataset)
        if problem:
            return Rejected(Status.DATASET_MISMATCH, problem)
    modality = _text(values["Modality"]) or None
    return Accepted(
        study_uid=_text(values["StudyInstanceUID"]),
        series_uid=_text(values["SeriesInstanceUID"]),
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        modality=modality[:16] if modality else None,
        own_output=_text(values["Manufacturer"]) == MANUFACTURER,
    )


def _pixel_data_cut_short(dataset: Dataset, source: str | os.PathLike[str] | bytes) -> bool:
    """Whether native Pixel Data's declared length runs past the end of the file (read with
    its value deferred, a truncated data set parses without complaint)."""
    if 0x7FE00010 not in dataset:
        return False
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_transfer_syntax or syntax.is_deflated:
        return False  # offsets into the inflated stream, not the file
    raw = dataset.get_item(0x7FE00010, keep_deferred=True)
    length = getattr(raw, "length", None)
    tell = getattr(raw, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:  # encapsulated: checked later
        return False
    size = len(source) if isinstance(source, bytes) else os.path.getsize(source)
    return tell + length > size


def _image_geometry_problem(dataset: Dataset) -> str | None:
    """Why the Image Pixel module cannot describe a decodable image, or None when it can."""
    try:
        sizes = {
            key: int(dataset.get(key) or 0)
            for key in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel")
        }
        frames = int(dataset.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return "non-numeric Rows, Columns, BitsAllocated, SamplesPerPixel or NumberOfFrames"
    zero = [key for key, size in sizes.items() if size <= 0] + (["NumberOfFrames"] * (frames <= 0))
    if zero:
        return "image of zero " + ", ".join(zero)
    if 0x7FE00010 not in dataset:
        return None  # float or double pixel data: rare, left to the decoder
    raw = dataset.get_item(0x7FE00010, keep_deferred=True)
    length = getattr(raw, "length", None)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        length = len(value)
    if length == 0:
        return "empty Pixel Data"
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if length is None or length == 0xFFFFFFFF:
        return None  # encapsulated: its length says nothing about the image's size
    if syntax is None or not syntax.is_transfer_syntax or syntax.is_encapsulated:
        return None  # compressed, or a syntax pydicom does not know: left to the decoder
    pixels = sizes["Rows"] * sizes["Columns"] * frames
    if str(dataset.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        needed = pixels * 2 * sizes["BitsAllocated"] // 8  # two samples a pixel, subsampled
    else:
        needed = (pixels * sizes["SamplesPerPixel"] * sizes["BitsAllocated"] + 7) // 8
    if length < needed:
        return f"Pixel Data holds {length} bytes, its image needs {needed}"
    return None


def _text(value: object) -> str:
    if value is None:
        return ""
    return str(value).strip().rstrip("\x00")
