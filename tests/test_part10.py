"""encode_part10 writes exactly the bytes pydicom's writer does, without it where it can."""

from __future__ import annotations

import datetime
import io
from collections.abc import Callable, Iterator

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from tests.dicom_validate import make_result, make_study
from triage.dicom import part10
from triage.dicom.part10 import encode_part10
from triage.dicom.pmap import build_parametric_map
from triage.dicom.sc import build_cam_overlay
from triage.dicom.sr import build_sr
from triage.scoring.preprocess import display_pixels
from triage.scoring.result import ModelInfo
from triage.uids import derived_uid

MODEL = ModelInfo(name="densenet169-mura", version="1.2.0", validated=False)
DEVICE_UID = derived_uid("test device")


def pydicom_bytes(dataset: Dataset) -> bytes:
    """What the daemon wrote before: pydicom's writer."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def fallbacks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The SOP instances that went to pydicom's writer."""
    used: list[str] = []
    original = part10._with_pydicom

    def spy(dataset: Dataset) -> bytes:
        used.append(str(dataset.get("SOPInstanceUID", "?")))
        return original(dataset)

    monkeypatch.setattr(part10, "_with_pydicom", spy)
    yield used


def _as_received(source: Dataset, syntax: str) -> Dataset:
    """*source* written in *syntax* and read back without pixels, as the worker holds it."""
    copy = Dataset(source)
    copy.file_meta = FileMetaDataset()
    copy.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    copy.save_as(buffer, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()), stop_before_pixels=True)


def _named(study: list[Dataset], name: str, charset: str) -> list[Dataset]:
    for source in study:
        source.SpecificCharacterSet = charset
        source.PatientName = name
        source.StudyDescription = "XR WRIST 3V Ärztin"
    return study


def _with_sequences(study: list[Dataset]) -> list[Dataset]:
    """Sequences in the patient and study modules, as RIS and PACS data carry them: copied
    into the outputs from headers that, read back, hold them as raw elements."""
    for source in study:
        other_id = Dataset()
        other_id.PatientID = "H-0042"
        other_id.IssuerOfPatientID = "OTHER HOSPITAL"
        other_id.TypeOfPatientID = "TEXT"
        source.OtherPatientIDsSequence = DicomSequence([other_id])
        qualifiers = Dataset()
        qualifiers.UniversalEntityID = "2.16.840.1.113883.19.5"
        qualifiers.UniversalEntityIDType = "ISO"
        source.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifiers])
        procedure = Dataset()
        procedure.CodeValue = "XRWRIST3"
        procedure.CodingSchemeDesignator = "99LOCAL"
        procedure.CodeMeaning = "XR WRIST 3+ VIEWS"
        source.ProcedureCodeSequence = DicomSequence([procedure])
        referenced = Dataset()
        referenced.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        referenced.ReferencedSOPInstanceUID = generate_uid()
        source.ReferencedStudySequence = DicomSequence([referenced])
    return study


STUDIES: dict[str, Callable[[], list[Dataset]]] = {
    "patient and study sequences": lambda: _with_sequences(make_study("DX")),
    "CR MONOCHROME1": lambda: make_study("CR", photometric="MONOCHROME1"),
    "DX": lambda: make_study("DX"),
    "latin-1 names": lambda: _named(make_study("DX"), "Müller^Jürgen", "ISO_IR 100"),
    "UTF-8 names": lambda: _named(make_study("DX"), "山田^太郎=やまだ^たろう", "ISO_IR 192"),
}


@pytest.mark.parametrize("kind", STUDIES)
@pytest.mark.parametrize("received", [None, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_every_output_is_byte_identical_and_written_without_pydicom(
    kind: str, received: str | None, fallbacks: list[str]
) -> None:
    study = STUDIES[kind]()
    headers = study if received is None else [_as_received(s, received) for s in study]
    first = make_result(headers[:2], skipped=[(headers[2], "undecodable: test")])
    second = make_result(headers, revision=2)
    created = datetime.datetime(2026, 11, 30, 8, 15, 1, 250000)
    sr1 = build_sr(headers, first, MODEL, device_uid=DEVICE_UID, created=created)
    sr2 = build_sr(headers, second, MODEL, device_uid=DEVICE_UID, predecessor=sr1)
    display = (display_pixels(study[0])[0] * 255).astype(np.uint8)
    overlay = build_cam_overlay(headers[0], display, second.views[0], second, MODEL)
    pmap = build_parametric_map(headers[0], second.views[0], second, MODEL, device_uid=DEVICE_UID)

    for output in (sr1, sr2, overlay, pmap):
        assert encode_part10(output) == pydicom_bytes(output)
    assert fallbacks == []


def _every_vr() -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = "OT"  # CS, odd length
    ds.ImageType = ["DERIVED", "SECONDARY"]  # CS, multi-valued
    ds.RetrieveAETitle = "AE1"  # AE
    ds.PatientAge = "042Y"  # AS
    ds.FrameIncrementPointer = [0x00181063, 0x00181065]  # AT, multi-valued
    ds.DimensionIndexPointer = 0x00209157  # AT
    ds.StudyDate = "20261130"  # DA as text
    ds.ContentDate = pydicom.valuerep.DA(datetime.date(2026, 11, 30))  # DA as a date
    ds.AcquisitionDateTime = pydicom.valuerep.DT(datetime.datetime(2026, 11, 30, 8, 1, 2, 5))
    ds.StudyTime = pydicom.valuerep.TM(datetime.time(8, 1, 2))
    ds.ContentTime = "080102.5"
    ds.PixelSpacing = [0.1, "0.25"]  # DS, multi-valued, one from text
    ds.SliceThickness = 1.5  # DS
    ds.add_new(0x00189087, "FD", 1.25)
    ds.add_new(0x00186060, "FL", [1.5, -2.0])
    ds.InstanceNumber = 7  # IS
    ds.ReferencedFrameNumber = [1, 2, 3]  # IS, multi-valued
    ds.StudyDescription = "Hand Röntgen"  # LO, non-ASCII
    ds.ImageComments = "odd"  # LT
    ds.add_new(0x00420011, "OB", b"\x01\x02\x03")  # odd-length OB
    ds.add_new(0x00720067, "OD", np.arange(3, dtype="<f8").tobytes())
    ds.add_new(0x00720069, "OF", np.arange(3, dtype="<f4").tobytes())
    ds.add_new(0x00720075, "OL", np.arange(3, dtype="<u4").tobytes())
    ds.add_new(0x00281201, "OW", np.arange(4, dtype="<u2").tobytes())
    ds.PatientName = "Öberg^Åsa"
    ds.ReferringPhysicianName = ""  # empty PN
    ds.StationName = "ST1"  # SH
    ds.add_new(0x00186020, "SL", -5)
    ds.add_new(0x00280106, "SS", -3)  # Smallest Image Pixel Value, unambiguous here
    ds.add_new(0x00081040, "LO", ["A", "B"])  # multi-valued text
    ds.add_new(0x00321066, "UT", "ü" * 3)
    ds.add_new(0x00080119, "UC", "long code value")
    ds.add_new(0x00080120, "UR", "http://example.org/x")
    ds.add_new(0x00280010, "US", 64)
    ds.add_new(0x00280011, "US", 63)
    ds.add_new(0x00081160, "IS", None)  # empty IS
    ds.add_new(0x00540081, "US", [])  # empty multi-valued
    ds.add_new(0x00181030, "LO", "")  # empty text
    ds.add_new(0x00880200, "SQ", [])  # empty sequence
    ds.add_new(0x00185100, "CS", None)  # empty CS
    ds.add_new(0x0040A040, "CS", "TEXT")
    item = Dataset()
    item.CodeValue = "121071"
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = "Finding größer"
    nested = Dataset()
    nested.ReferencedSOPInstanceUID = generate_uid()
    nested.ReferencedFrameNumber = 1
    item.add_new(0x00081199, "SQ", DicomSequence([nested, Dataset()]))  # with an empty item
    ds.ConceptNameCodeSequence = [item]
    utf8 = Dataset()
    utf8.SpecificCharacterSet = "ISO_IR 192"
    utf8.PatientName = "李^华"
    ds.add_new(0x00400275, "SQ", [utf8])  # an item with its own character set
    ds.add_new(0x00080016, "UI", ds.SOPClassUID)
    ds.add_new(0x00091012, "UN", b"\x01\x02\x03")  # UN is not padded
    ds.add_new(0x00102000, "LO", None)
    ds.add_new(0x00091010, "LO", "private")  # private creator-less private tag
    ds.add_new(0x00080000, "UL", 4)  # a retired group length: never written
    ds.add_new(0x00720078, "UV", [1, 2**40])
    ds.add_new(0x00720082, "SV", -(2**40))
    ds.BitsAllocated = 8
    ds.PixelData = np.arange(64 * 63, dtype=np.uint8).tobytes()
    ds["PixelData"].VR = "OB or OW"  # as pydicom leaves it when set by keyword
    return ds


def test_every_vr_is_byte_identical_without_pydicom(fallbacks: list[str]) -> None:
    ds = _every_vr()
    assert encode_part10(ds) == pydicom_bytes(ds)
    assert fallbacks == []


def _implicit(ds: Dataset) -> None:
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def _ambiguous(ds: Dataset) -> None:
    ds.PixelRepresentation = 1
    ds.add_new(0x00280107, "US or SS", -1)  # Largest Image Pixel Value: pydicom resolves it


def _code_extensions(ds: Dataset) -> None:
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎"


def _too_long_for_lo(ds: Dataset) -> None:
    ds.add_new(0x00081030, "LT", "x" * 70000)  # pydicom rewrites it as UN (with a warning)


def _not_encodable(ds: Dataset) -> None:
    ds.StudyDescription = "山田"  # not in ISO_IR 100: pydicom replaces it (with a warning)


def _numpy_number(ds: Dataset) -> None:
    ds.add_new(0x00280100, "US", np.uint16(16))


@pytest.mark.parametrize(
    "change",
    [_implicit, _ambiguous, _code_extensions, _too_long_for_lo, _not_encodable, _numpy_number],
)
@pytest.mark.filterwarnings("ignore")
def test_what_the_fast_path_does_not_cover_is_left_to_pydicom(
    change: Callable[[Dataset], None], fallbacks: list[str]
) -> None:
    ds = _every_vr()
    change(ds)
    assert encode_part10(ds) == pydicom_bytes(ds)
    assert fallbacks == [ds.SOPInstanceUID]
