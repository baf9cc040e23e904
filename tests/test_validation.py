"""check_instance on received files that are damaged in ways a header parse does not show.

Each gets a final status (0xC000) with its reason, never 0x0000 (stored, then undecodable)
nor 0xA700 (which a PACS retries for ever). The storescu and pynetdicom paths to the same
checks are in test_listener.py.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from triage.dicom import validation
from triage.dicom.sop import DEFAULT_STORAGE_CLASSES, Status
from triage.dicom.validation import Accepted, Rejected, check_instance
from triage.testing.synth import make_study

CLASSES = frozenset(DEFAULT_STORAGE_CLASSES)


def _dataset(rows: int = 64, cols: int = 64) -> pydicom.Dataset:
    return make_study(modality="DX", views=1, rows=rows, cols=cols, seed=7)[0]


def _save(ds: pydicom.Dataset, path: Path, syntax: str) -> bytes:
    if "file_meta" not in ds.__dict__:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def _meta_end(data: bytes) -> int:
    """Where the data set starts in a Part 10 file: after the file meta group."""
    start = data.index(b"DICM") + 4
    return start + 12 + int.from_bytes(data[start + 8 : start + 12], "little")


def _check(data: bytes, ds: pydicom.Dataset) -> Accepted | Rejected:
    return check_instance(data, str(ds.SOPClassUID), str(ds.SOPInstanceUID), CLASSES)


def test_a_data_set_cut_inside_a_sequence_is_unreadable_not_out_of_resources(
    tmp_path: Path,
) -> None:
    # pydicom raises OSError ("No tag to read …") for it, like a failing disk.
    ds = _dataset()
    item = pydicom.Dataset()
    item.CodeValue = "7569003"
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = "Finger"
    ds.AnatomicRegionSequence = Sequence([item])
    ds["AnatomicRegionSequence"].is_undefined_length = True
    data = _save(ds, tmp_path / "seq.dcm", ImplicitVRLittleEndian)
    start = data.index(b"\x08\x00\x18\x22")  # (0008,2218), implicit VR
    verdict = _check(data[: start + 8 + 8 + 2], ds)  # the header, an item's, 2 bytes of it
    assert verdict == Rejected(Status.UNREADABLE, "unreadable data set: truncated")


def test_a_truncated_deflated_data_set_is_refused(tmp_path: Path) -> None:
    """The deferred value's declared length looked complete: it was acknowledged."""
    ds = _dataset()
    data = _save(ds, tmp_path / "whole.dcm", DeflatedExplicitVRLittleEndian)
    assert isinstance(_check(data, ds), Accepted)
    # A complete deflate stream around a data set whose pixel data stops half way.
    meta_end = _meta_end(data)
    raw = _save(ds, tmp_path / "plain.dcm", ExplicitVRLittleEndian)
    body = raw[_meta_end(raw) :]
    cut = body[: len(body) - len(ds.PixelData) // 2]
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = squeezer.compress(cut) + squeezer.flush()
    verdict = _check(data[:meta_end] + deflated, ds)
    assert verdict == Rejected(Status.UNREADABLE, "pixel data cut short (data set truncated)")


def test_a_deflated_data_set_that_inflates_past_the_limit_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A megabyte of deflated zeros held a gigabyte: pydicom inflated it whole in the
    listener (2 GiB resident for one instance)."""
    monkeypatch.setattr(validation, "MAX_INFLATED_BYTES", 1 << 20)
    ds = _dataset(rows=1024, cols=1024)  # 2 MiB of pixels
    ds.PixelData = np.zeros((1024, 1024), np.uint16).tobytes()
    data = _save(ds, tmp_path / "bomb.dcm", DeflatedExplicitVRLittleEndian)
    assert len(data) < 64 * 1024
    for source in (data, tmp_path / "bomb.dcm"):
        verdict = _check(source, ds)  # type: ignore[arg-type]
        assert verdict == Rejected(
            Status.UNREADABLE, "the deflated data set inflates to more than 1 MiB"
        )


def test_pixel_data_encoded_against_its_transfer_syntax_is_refused(tmp_path: Path) -> None:
    """Compressed pixel data under a native syntax is what a router that forwards a file
    without transcoding sends: acknowledged, it could never be decoded; native pixel data
    under a compressed syntax neither."""
    native = _save(_dataset(), tmp_path / "native.dcm", ExplicitVRLittleEndian)
    compressed_ds = _dataset()
    compressed_ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 100 + b"\xff\xd9"])
    compressed_ds["PixelData"].VR = "OB"
    compressed = _save(compressed_ds, tmp_path / "jpeg.dcm", JPEGBaseline8Bit)
    # Both bodies are explicit VR little endian: only the meta group's syntax differs.
    jpeg_in_native = native[: _meta_end(native)] + compressed[_meta_end(compressed) :]
    assert _check(jpeg_in_native, compressed_ds) == Rejected(
        Status.UNREADABLE,
        "encapsulated (compressed) Pixel Data under Explicit VR Little Endian",
    )
    native_as_jpeg = compressed[: _meta_end(compressed)] + native[_meta_end(native) :]
    assert _check(native_as_jpeg, compressed_ds) == Rejected(
        Status.UNREADABLE, "Pixel Data not encapsulated under JPEG Baseline (Process 1)"
    )


def test_a_data_set_pydicom_reads_as_empty_is_unreadable_not_missing_uids(
    tmp_path: Path,
) -> None:
    # A value whose delimiter never comes: pydicom warns and returns no elements at all,
    # and the peer was told its UIDs were missing.
    ds = _dataset()
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\0" * 5000 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    data = _save(ds, tmp_path / "cut.dcm", JPEGBaseline8Bit)
    undefined = data[: _meta_end(data)] + b"\x08\x00\x18\x22SQ\0\0\xff\xff\xff\xff" + b"\xfe\xff"
    verdict = _check(undefined, ds)
    assert isinstance(verdict, Rejected) and verdict.status == Status.UNREADABLE, verdict


def test_a_long_reason_becomes_an_error_comment_cut_at_a_word() -> None:
    # ErrorComment is LO: 64 characters. "… under Explicit VR Little En" left the PACS
    # operator guessing.
    from triage.dicom.listener import error_comment

    reason = "encapsulated (compressed) Pixel Data under Explicit VR Little Endian"
    assert error_comment(reason) == "encapsulated (compressed) Pixel Data under Explicit VR..."
    assert error_comment("pixel data cut short (data set truncated)") == (
        "pixel data cut short (data set truncated)"
    )
    assert all(len(error_comment("x " * n)) <= 64 for n in range(60))


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("1.2.840.10008.1.2", True),
        ("1.2.03.4", True),  # a leading zero: invalid per PS3.5, common, harmless in a path
        ("1.2.3\n", False),  # "$" matched before a final newline: a study named "1.2.3\n"
        ("1.2.3 ", False),
        ("1..2", False),
        (".1.2", False),
        ("1.2.", False),
        ("1.2.a", False),
        ("", False),
        ("1." * 32 + "1", False),  # 65 characters
    ],
)
def test_a_uid_is_digits_and_dots_and_nothing_after(value: str, valid: bool) -> None:
    from triage.uids import is_valid_uid

    assert is_valid_uid(value) is valid


@pytest.mark.parametrize("where", ["top level", "in a sequence", "private"])
def test_a_public_value_pydicom_cannot_parse_is_refused(tmp_path: Path, where: str) -> None:
    """pydicom parses a value when it is first read: an unknown VR in the PatientID was
    acknowledged and failed the whole study at every scoring attempt. A private element is
    left alone (no stage reads it; a vendor's odd one must not cost a radiograph)."""
    ds = _dataset()
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "T-D8800", "SRT", "Wrist"
    ds.AnatomicRegionSequence = Sequence([item])
    ds.add_new(0x00091010, "LO", "VENDORX")
    ds.add_new(0x00090010, "LO", "ACME")
    data = bytearray(_save(ds, tmp_path / "vr.dcm", ExplicitVRLittleEndian))
    element = {
        "top level": b"\x10\x00\x20\x00LO",  # (0010,0020) PatientID
        "in a sequence": b"\x08\x00\x04\x01LO",  # (0008,0104) CodeMeaning
        "private": b"\x09\x00\x10\x10LO",
    }[where]
    at = data.index(element)
    data[at + 4 : at + 6] = b"Z!"
    verdict = _check(bytes(data), ds)
    if where == "private":
        assert isinstance(verdict, Accepted)
        return
    assert isinstance(verdict, Rejected) and verdict.status == Status.UNREADABLE
    tag = "(0010,0020)" if where == "top level" else "(0008,0104)"
    assert verdict.reason == f"unreadable data set: NotImplementedError in {tag}"
