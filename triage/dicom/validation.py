"""Checks on a received data set, made before it is written: cheap, header only."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

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


#: The most a deflated data set may inflate to: pydicom inflates it whole in memory, and a
#: megabyte of deflated zeros can hold gigabytes. The largest radiographs are ~50 MB.
MAX_INFLATED_BYTES = 256 * 1024 * 1024


#: How much of a file is read to find its transfer syntax: the file meta group is a few
#: hundred bytes (one larger is read as any other file, by pydicom alone).
_META_PROBE_BYTES = 8192


class DataSetTooLarge(ValueError):
    """A deflated data set that inflates past :data:`MAX_INFLATED_BYTES`."""


def read_header(source: str | os.PathLike[str] | bytes) -> Dataset:
    """Parse a Part 10 file (path or bytes) without loading large values such as pixel data.

    A deflated data set is first inflated in a stream, counting only, and refused
    (:class:`DataSetTooLarge`) past :data:`MAX_INFLATED_BYTES`; it is then read whole, since
    pydicom holds it inflated in memory anyway and only whole values show a truncation.
    """
    data = source if isinstance(source, bytes) else None
    if data is None:
        with open(source, "rb") as file:
            head = file.read(_META_PROBE_BYTES)
    else:
        head = data[:_META_PROBE_BYTES]
    body = _deflated_body_offset(head)
    if body is None:
        return dcmread(BytesIO(data) if data is not None else source, defer_size=4096)
    _check_inflated_size(data[body:] if data is not None else source, body)
    return dcmread(BytesIO(data) if data is not None else source)


def _deflated_body_offset(head: bytes) -> int | None:
    """Where the data set of a Part 10 file starts when its transfer syntax is a deflated
    one (read from the start of the file, *head*), else None."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        return None
    (group_length,) = struct.unpack("<L", head[140:144])
    end = 144 + group_length
    position = 144
    while position + 8 <= min(end, len(head)):
        group, element = struct.unpack("<HH", head[position : position + 4])
        vr = head[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            (length,) = struct.unpack("<L", head[position + 8 : position + 12])
            start = position + 12
        else:
            (length,) = struct.unpack("<H", head[position + 6 : position + 8])
            start = position + 8
        if (group, element) == (0x0002, 0x0010):
            syntax = UID(head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace"))
            return end if syntax.is_transfer_syntax and syntax.is_deflated else None
        position = start + length
    return None


def _check_inflated_size(body: bytes | str | os.PathLike[str], offset: int) -> None:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0

    def feed(chunk: bytes) -> None:
        nonlocal total
        while chunk:
            total += len(inflater.decompress(chunk, 1 << 20))
            if total > MAX_INFLATED_BYTES:
                raise DataSetTooLarge(
                    f"the deflated data set inflates to more than {MAX_INFLATED_BYTES >> 20} MiB"
                )
            chunk = inflater.unconsumed_tail

    if isinstance(body, bytes):
        feed(body)
        return
    with open(body, "rb") as file:
        file.seek(offset)
        while chunk := file.read(1 << 20):
            feed(chunk)


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
    except DataSetTooLarge as exc:
        return Rejected(Status.UNREADABLE, str(exc))
    except OSError as exc:
        if exc.errno is None:
            # pydicom's own OSError on a data set cut short ("No tag to read at …").
            return Rejected(Status.UNREADABLE, "unreadable data set: truncated")
        # Our side failed (the file is gone, the disk errs), not the data set: "try later",
        # never 0xC000, which a PACS takes as final.
        return Rejected(Status.OUT_OF_RESOURCES, f"cannot read the received file: {exc.strerror}")
    except Exception as exc:  # pydicom raises many types on corrupt input
        return Rejected(Status.UNREADABLE, f"unreadable data set: {type(exc).__name__}")
    bad = [key for key in _REQUIRED_UIDS if not is_valid_uid(_text(values[key]))]
    if len(bad) == len(_REQUIRED_UIDS) and len(dataset) < 2:
        # pydicom gives up on a value whose delimiter never comes (or on bytes of another
        # encoding) with a warning and an empty data set: nothing in it was understood.
        return Rejected(Status.UNREADABLE, "unreadable data set: no elements could be read")
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
        mismatch = _encapsulation_mismatch(dataset)
        if mismatch:
            return Rejected(Status.UNREADABLE, mismatch)
        if _pixel_data_cut_short(dataset, source):
            return Rejected(Status.UNREADABLE, "pixel data cut short (data set truncated)")
        problem = _image_geometry_problem(dataset)
        if problem:
            return Rejected(Status.DATASET_MISMATCH, problem)
    unreadable = _unreadable_element(dataset)
    if unreadable:
        return Rejected(Status.UNREADABLE, f"unreadable data set: {unreadable}")
    modality = _text(values["Modality"]) or None
    return Accepted(
        study_uid=_text(values["StudyInstanceUID"]),
        series_uid=_text(values["SeriesInstanceUID"]),
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        modality=modality[:16] if modality else None,
        own_output=_text(values["Manufacturer"]) == MANUFACTURER,
    )


#: Pixel data, float and double float pixel data: read by the decoder, never parsed here.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def _unreadable_element(dataset: Dataset) -> str | None:
    """The first public element of *dataset* (or of its sequences' items) whose value cannot
    be parsed, as "<error> in (gggg,eeee)", or None.

    pydicom parses a value when it is first read: an unknown VR or a value its VR cannot
    hold (in the PatientID, say) passed these checks, was acknowledged, and failed its whole
    study at every scoring attempt. Private elements are left alone: no stage reads them,
    and vendors' odd ones must not cost a radiograph. Deferred (large) values are not read.
    """
    for tag in list(dataset.keys()):
        if tag in _PIXEL_TAGS or tag.is_private:
            continue
        raw = dataset.get_item(tag, keep_deferred=True)
        if getattr(raw, "value", b"") is None:  # deferred: over 4 KiB, not loaded
            continue
        try:
            element = dataset[tag]
            items = list(element.value) if element.VR == "SQ" else []
        except Exception as exc:  # pydicom raises many types on a malformed value
            return f"{type(exc).__name__} in {tag}"
        for item in items:
            found = _unreadable_element(item)
            if found:
                return found
    return None


def _encapsulation_mismatch(dataset: Dataset) -> str | None:
    """Why Pixel Data's encoding contradicts the transfer syntax (PS3.5 A.4: encapsulated,
    of undefined length, exactly when the syntax is a compressed one), or None. A router
    that forwards a compressed file under a native syntax without transcoding sends such
    data: stored, it could never be decoded."""
    if 0x7FE00010 not in dataset:
        return None
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_transfer_syntax:
        return None
    length = getattr(dataset.get_item(0x7FE00010, keep_deferred=True), "length", None)
    if length is None:
        return None
    encapsulated = length == 0xFFFFFFFF
    if encapsulated and not syntax.is_encapsulated:
        return f"encapsulated (compressed) Pixel Data under {syntax.name}"
    if not encapsulated and syntax.is_encapsulated:
        return f"Pixel Data not encapsulated under {syntax.name}"
    return None


def _pixel_data_cut_short(dataset: Dataset, source: str | os.PathLike[str] | bytes) -> bool:
    """Whether native Pixel Data's declared length runs past the end of the file (read with
    its value deferred, a truncated data set parses without complaint)."""
    if 0x7FE00010 not in dataset:
        return False
    raw = dataset.get_item(0x7FE00010, keep_deferred=True)
    length = getattr(raw, "length", None)
    if length is None or length == 0xFFFFFFFF:  # encapsulated: checked later
        return False
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):  # read whole (a deflated data set): short of its length?
        return len(value) < length
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_transfer_syntax or syntax.is_deflated:
        return False  # offsets into the inflated stream, not the file
    tell = getattr(raw, "value_tell", None)
    if tell is None:
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
        # Encapsulated: its length says nothing about the image's size.
        return None
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
