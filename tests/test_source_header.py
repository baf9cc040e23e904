"""Outputs of studies whose headers are as modalities really send them: character sets
highdicom does not take as spelt, missing Type 2 attributes, malformed dates and sexes,
values longer than their VR allows. Every study still gets its SR, overlays and parametric
maps, each valid (dciodvfy) and with the patient's name as the source has it.

Sources are written to files and read back without pixels, as the worker holds them (their
elements raw until read).
"""

from __future__ import annotations

import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.charset import convert_encodings
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import PersonName

from tests.dicom_validate import (
    dciodvfy,
    display_of,
    make_result,
    make_study,
    require_tools,
    write_dataset,
)
from triage.dicom.part10 import encode_part10
from triage.dicom.pmap import build_parametric_map
from triage.dicom.sc import build_cam_overlay
from triage.dicom.source_header import header_for_outputs, normalise_character_set
from triage.dicom.sr import build_sr
from triage.scoring.result import ModelInfo
from triage.uids import derived_uid

MODEL = ModelInfo(name="densenet169-mura", version="1.2.0", validated=False)
DEVICE_UID = derived_uid("test device")
CREATED = datetime.datetime(2026, 1, 1, 12, 30, 5)
PATIENT_NAME = 0x00100010

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"
KOREAN = "Hong^Gildong=洪^吉洞=홍^길동"


def _small_study(views: tuple[str, ...] = ("PA",)) -> list[pydicom.Dataset]:
    return make_study("DX", views=views, rows=96, cols=80)


def _received(study: list[pydicom.Dataset], tmp_path: Path) -> list[pydicom.Dataset]:
    """*study* written and read back without pixels, as the worker reads it."""
    return [
        pydicom.dcmread(
            write_dataset(source, tmp_path / f"source{index}.dcm"), stop_before_pixels=True
        )
        for index, source in enumerate(study)
    ]


def _written(output: pydicom.Dataset, path: Path, *, invalid_in_source: tuple[str, ...] = ()):
    """*output* encoded as the worker does, checked by dciodvfy, and read back. Errors are
    allowed only about the attributes in *invalid_in_source* (copied invalid on purpose)."""
    path.write_bytes(encode_part10(output))
    validation = dciodvfy(path)
    errors = [e for e in validation.errors if not any(f"</{k}(" in e for k in invalid_in_source)]
    assert not errors, f"{path.name}:\n{validation.output}"
    return pydicom.dcmread(path)


def _outputs(
    study: list[pydicom.Dataset],
    tmp_path: Path,
    *,
    invalid_in_source: tuple[str, ...] = (),
    model: ModelInfo = MODEL,
) -> dict[str, pydicom.Dataset]:
    """SR, first overlay and first parametric map of *study* by *model*, as written (and
    checked by dciodvfy) and read back."""
    require_tools("dciodvfy")
    headers = _received(study, tmp_path)
    result = make_result(study)
    view = result.views[0]
    built = {
        "sr": build_sr(headers, result, model, device_uid=DEVICE_UID, created=CREATED),
        "sc": build_cam_overlay(headers[0], display_of(study[0]), view, result, model),
        "pm": build_parametric_map(headers[0], view, result, model, device_uid=DEVICE_UID),
    }
    return {
        kind: _written(output, tmp_path / f"{kind}.dcm", invalid_in_source=invalid_in_source)
        for kind, output in built.items()
    }


# --- character sets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "name", "raw", "description", "expected"),
    [
        (["", "ISO 2022 IR 87"], JAPANESE, None, "手首 XR", ["", "ISO 2022 IR 87"]),
        (["", "ISO 2022 IR 149"], KOREAN, None, "손목 XR", ["", "ISO 2022 IR 149"]),
        (
            ["ISO 2022 IR 6", "ISO 2022 IR 149"],
            KOREAN,
            None,
            "손목",
            ["ISO 2022 IR 6", "ISO 2022 IR 149"],
        ),
        ("ISO_IR 6", "Smith^John", None, "XR WRIST", None),
        ("ISO 2022 IR 100", "Müller^Jürgen", None, "Hüfte", "ISO_IR 100"),
        ("ISO IR 100", "Müller^Jürgen", "latin-1", "XR WRIST", "ISO_IR 100"),
        ("iso_ir 192", "Müller^Jürgen=李^小龙", "utf-8", "XR WRIST", "ISO_IR 192"),
        ("GBK", "Wang^XiaoDong=王^小東", None, "手腕 XR", "GB18030"),
        ("GB18030", "Wang^XiaoDong=王^小东", None, "手腕 XR", "GB18030"),
        ("ISO_IR 13", "ﾔﾏﾀﾞ^ﾀﾛｳ", None, "XR WRIST", ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
        (
            ["ISO_IR 13", "ISO 2022 IR 87"],
            "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎",
            None,
            "XR",
            ["ISO 2022 IR 13", "ISO 2022 IR 87"],
        ),
        ("ISO_IR 144", "Иванов^Иван", None, "XR ЗАПЯСТЬЕ", "ISO_IR 144"),
        ("ISO_IR 126", "Παπαδόπουλος^Νίκος", None, "XR", "ISO_IR 126"),
        ("ISO_IR 127", "قباني^لنزار", None, "XR", "ISO_IR 127"),
        ("ISO_IR 138", "שרון^דבורה", None, "XR", "ISO_IR 138"),
        ("ISO_IR 166", "ประเทศไทย^สมชาย", None, "XR", "ISO_IR 166"),
        ("ISO_IR 101", "Wałęsa^Lech", None, "XR", "ISO_IR 101"),
        ("ISO_IR 148", "Çelik^Ayşe", None, "XR", "ISO_IR 148"),
    ],
    ids=[
        "japanese",
        "korean",
        "korean-ir6",
        "iso-ir-6",
        "2022-ir100-alone",
        "ISO-IR-100",
        "lower-utf8",
        "gbk",
        "gb18030",
        "ir13",
        "ir13-ir87",
        "cyrillic",
        "greek",
        "arabic",
        "hebrew",
        "thai",
        "latin2",
        "latin5",
    ],
)
def test_outputs_of_a_common_character_set_are_valid_and_name_the_patient_as_the_source(
    declared: str | list[str],
    name: str,
    raw: str | None,
    description: str,
    expected: str | list[str] | None,
    tmp_path: Path,
) -> None:
    study = _small_study()
    for source in study:
        source.SpecificCharacterSet = declared
        # pydicom cannot encode in a misspelt character set: the bytes are the test's.
        source.add_new(PATIENT_NAME, "PN", name.encode(raw) if raw else name)
        source.StudyDescription = description

    for kind, output in _outputs(study, tmp_path).items():
        assert output.get("SpecificCharacterSet") == expected, kind
        assert str(output.PatientName) == name, kind
        assert output.StudyDescription == description, kind


def test_japanese_names_are_written_in_iso_2022_jis(tmp_path: Path) -> None:
    study = _small_study()
    study[0].SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    study[0].PatientName = JAPANESE
    written = _outputs(study, tmp_path)["sr"]
    encoded = written.get_item(PATIENT_NAME).value
    assert encoded.startswith(b"Yamada^Tarou=\x1b$B")  # JIS X 0208 designated, not UTF-8


def test_latin_1_names_without_a_character_set_are_declared_latin_1_byte_for_byte(
    tmp_path: Path,
) -> None:
    # Old CR units write Latin-1 and declare nothing; pydicom reads it as Latin-1.
    study = _small_study()
    del study[0].SpecificCharacterSet
    study[0].add_new(PATIENT_NAME, "PN", "Müller^Jürgen".encode("latin-1"))
    for kind, output in _outputs(study, tmp_path).items():
        assert output.SpecificCharacterSet == "ISO_IR 100", kind
        assert output.get_item(PATIENT_NAME).value.rstrip(b" ") == b"M\xfcller^J\xfcrgen", kind


def test_latin_1_bytes_declared_utf_8_keep_their_letters(tmp_path: Path) -> None:
    # pydicom would make replacement characters of them.
    study = _small_study()
    study[0].SpecificCharacterSet = "ISO_IR 192"
    study[0].add_new(PATIENT_NAME, "PN", "Müller^Jürgen".encode("latin-1"))
    for kind, output in _outputs(study, tmp_path).items():
        assert output.SpecificCharacterSet == "ISO_IR 192", kind
        assert str(output.PatientName) == "Müller^Jürgen", kind


def test_sr_text_the_sources_character_set_cannot_hold_makes_it_utf_8(tmp_path: Path) -> None:
    require_tools("dciodvfy")
    study = _small_study(("PA", "LL"))
    for source in study:
        del source.SpecificCharacterSet
    headers = _received(study, tmp_path)
    result = make_result(study[:1], skipped=[(study[1], "not a DICOM file: bad preamble ‘µ’")])
    sr = build_sr(headers, result, MODEL, device_uid=DEVICE_UID, created=CREATED)
    assert _written(sr, tmp_path / "sr.dcm").SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ()),
        ("ISO_IR 6", ()),
        ("ISO 2022 IR 6", ()),
        (["", "ISO 2022 IR 87"], ("", "ISO 2022 IR 87")),
        (b"\\ISO 2022 IR 87 ", ("", "ISO 2022 IR 87")),  # raw, as read
        ("ISO 2022 IR 87", ("", "ISO 2022 IR 87")),
        (["ISO 2022 IR 6", "ISO 2022 IR 149"], ("ISO 2022 IR 6", "ISO 2022 IR 149")),
        (["ISO_IR 13", "ISO 2022 IR 87"], ("ISO 2022 IR 13", "ISO 2022 IR 87")),
        ("ISO 2022 IR 100", ("ISO_IR 100",)),
        ("ISO IR 100", ("ISO_IR 100",)),
        ("iso_ir 192", ("ISO_IR 192",)),
        ("ISO_IR192", ("ISO_IR 192",)),
        (["ISO_IR 100", "ISO_IR 100"], ("ISO_IR 100",)),
        ("GB18030", ("GB18030",)),
        ("WINDOWS-1252", ()),  # unknown: the text decides (see declare_character_set)
    ],
)
def test_character_sets_are_normalised(value: object, expected: tuple[str, ...]) -> None:
    assert normalise_character_set(value) == expected


# --- missing and malformed values -----------------------------------------------------------


@pytest.mark.parametrize(
    "keyword",
    [
        "AccessionNumber",
        "PatientBirthDate",
        "PatientSex",
        "PatientName",
        "PatientID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "ReferringPhysicianName",
        "Modality",
    ],
)
def test_a_missing_attribute_leaves_it_empty_in_every_output(keyword: str, tmp_path: Path) -> None:
    study = _small_study()
    delattr(study[0], keyword)
    for kind, output in _outputs(study, tmp_path).items():
        if keyword != "Modality":  # each output has its own
            assert keyword in output and not output[keyword].value, kind
        assert output.PatientID == "TRIAGE-0001" or keyword == "PatientID", kind


@pytest.mark.parametrize(
    ("keyword", "value", "expected"),
    [
        ("PatientSex", "U", ""),
        ("PatientSex", "X", ""),
        ("PatientSex", "m", "M"),
        ("PatientSex", " f ", "F"),
        ("PatientBirthDate", "00000000", ""),
        ("PatientBirthDate", "19700000", ""),
        ("StudyDate", "20260230", ""),
        ("StudyDate", "2026.01.01", "20260101"),  # ACR-NEMA's form of a valid date
        ("StudyTime", "10:15:00", ""),
    ],
)
def test_a_malformed_value_is_emptied_or_mended_and_the_rest_kept(
    keyword: str, value: str, expected: str, tmp_path: Path
) -> None:
    study = _small_study()
    study[0][keyword].value = value
    for kind, output in _outputs(study, tmp_path).items():
        assert (output[keyword].value or "") == expected, kind
        assert str(output.PatientName) == "Test^Patient", kind
        assert output.AccessionNumber == "ACC0001", kind


def test_values_longer_than_their_vr_allows_are_cut_to_length(tmp_path: Path) -> None:
    study = _small_study()
    source = study[0]
    source.StudyDescription = "D" * 80  # LO: 64
    source.PatientName = "N" * 70 + "^Given"  # PN: 64 per component group
    source.ReferringPhysicianName = "R" * 70 + "^Q"
    source.InstitutionName = "Universitätsklinikum " + "Z" * 60  # LO, into equipment

    for kind, output in _outputs(study, tmp_path).items():
        assert output.StudyDescription == "D" * 64, kind
        # The name keeps its components: cut from the longest one.
        assert str(output.PatientName) == "N" * 58 + "^Given", kind
        assert str(output.ReferringPhysicianName) == "R" * 62 + "^Q", kind


def _set_raw(source: pydicom.Dataset, keyword: str, raw: bytes) -> None:
    """*keyword* holding *raw* as it would arrive: pydicom refuses to set most of these."""
    tag = Tag(tag_for_keyword(keyword))
    raw += b" " * (len(raw) % 2)
    source[tag] = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)


@pytest.mark.parametrize(
    ("keyword", "raw", "expected"),
    [
        ("BodyPartExamined", b"hand", "HAND"),
        ("BodyPartExamined", b"Finger(s)", ""),
        ("PatientOrientation", b"l\\f", ["L", "F"]),
        ("PatientOrientation", b"X\\F", ""),  # CS, but not a direction: not in the overlay
        ("PatientAge", b"45Y", "045Y"),
        ("PatientAge", b"45", ""),  # years or months?
        ("PatientWeight", b"72,5", ""),
        ("PatientSize", b"1.80m", ""),
        ("PatientSize", b"1.80", "1.80"),
        ("PatientSexNeutered", b"Altered", "ALTERED"),
        ("PatientName", b"A^B^C^D^E^F", "A^B^C^D^E F"),
        ("PatientName", b"A^B=C^D=E^F=G^H", "A^B=C^D=E^F"),
        ("PatientName", b"Doe^John\\Smith^J", "Doe^John"),  # highdicom refused the list
    ],
)
def test_a_value_its_vr_does_not_allow_is_mended_or_left_out_of_every_output(
    keyword: str, raw: bytes, expected: object, tmp_path: Path
) -> None:
    study = _small_study()
    _set_raw(study[0], keyword, raw)
    outputs = _outputs(study, tmp_path)
    for kind, output in outputs.items():
        value = output[keyword].value if keyword in output else ""
        if keyword == "PatientName":
            value = str(value)
        elif isinstance(value, MultiValue):
            value = list(value)
        # The SR has no BodyPartExamined or PatientOrientation of its own.
        assert (value or "") in (expected, ""), kind
        if kind == "sc":
            assert (value or "") == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"0.14333333333333333\\0.14333333333333333", [0.14333333333333] * 2),  # 19 chars
        (b"0,143\\0,143", [1.0, 1.0]),  # no number: the map falls back to 1 mm
    ],
)
def test_a_pixel_spacing_written_too_long_is_shortened_not_lost(
    raw: bytes, expected: list[float], tmp_path: Path
) -> None:
    # Emptied as malformed, it made the parametric map fail on float("").
    study = _small_study()
    _set_raw(study[0], "ImagerPixelSpacing", raw)
    if "PixelSpacing" in study[0]:
        del study[0].PixelSpacing
    outputs = _outputs(study, tmp_path)
    measures = outputs["pm"].SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == expected


def test_an_attribute_of_no_known_dictionary_is_left_out_of_the_overlay(tmp_path: Path) -> None:
    study = _small_study()
    study[0].add_new(0x00109999, "LO", "from a newer standard, or a typo")
    for kind, output in _outputs(study, tmp_path).items():
        assert 0x00109999 not in output, kind


@pytest.mark.parametrize(
    ("charset", "description", "kept"),
    [
        ("GB18030", "手腕" * 30, 32),  # two bytes a character
        ("ISO_IR 192", "é" * 60, 32),  # two bytes in UTF-8
        (["", "ISO 2022 IR 87"], "手首" * 20, 29),  # escapes in and out take six bytes
        (["", "ISO 2022 IR 87"], "a山" * 8, 13),  # escapes to kanji and back with every 山
    ],
)
def test_text_is_cut_to_the_bytes_its_vr_allows_in_the_outputs_character_set(
    charset: object, description: str, kept: int, tmp_path: Path
) -> None:
    study = _small_study()
    study[0].SpecificCharacterSet = charset
    study[0].StudyDescription = description
    for kind, output in _outputs(study, tmp_path).items():
        assert output.StudyDescription == description[:kept], kind


def test_text_its_set_cannot_decode_is_cut_to_the_bytes_of_the_utf_8_it_is_written_in(
    tmp_path: Path,
) -> None:
    # Korean bytes with a run the set cannot decode: read as U+FFFD, which makes the outputs
    # UTF-8; measured in the source's set, the description came out 104 bytes long.
    study = _small_study()
    study[0].SpecificCharacterSet = ["", "ISO 2022 IR 149"]
    _set_raw(study[0], "StudyDescription", b"\x1b$)C" + b"\xff" * 10 + "가".encode("euc_kr") * 20)
    for kind, output in _outputs(study, tmp_path).items():
        assert output.SpecificCharacterSet == "ISO_IR 192", kind
        assert 60 <= len(output.get_item(0x00081030).value) <= 64, kind


def test_a_person_name_group_is_cut_to_64_bytes_as_written_keeping_its_components() -> None:
    # Each component is escaped on its own in ISO 2022: measured as pydicom writes it.
    [source] = _small_study()
    source.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    source.PatientName = "Yamada^Tarou=" + "山田" * 20 + "^太郎"
    name = header_for_outputs(source).PatientName
    assert name.alphabetic == "Yamada^Tarou"
    family, given = name.ideographic.split("^")
    assert given == "太郎" and family == ("山田" * 20)[: len(family)]
    written = PersonName(name.ideographic).encode(convert_encodings(["", "ISO 2022 IR 87"]))
    assert 60 < len(written) <= 64


def test_the_keys_results_are_filed_by_are_copied_as_they_are_even_too_long(
    tmp_path: Path,
) -> None:
    # Cut, they filed the results under a new patient (Orthanc matches on PatientID) and
    # another order (the RIS on the accession number): the source's invalid length stays.
    study = _small_study()
    source = study[0]
    keys = {
        "PatientID": "P" * 77,  # LO: 64
        "IssuerOfPatientID": "I" * 70,  # LO
        "AccessionNumber": "A" * 18,  # SH: 16
        "StudyID": "S" * 20,  # SH
    }
    for keyword, value in keys.items():
        setattr(source, keyword, value)
    for kind, output in _outputs(study, tmp_path, invalid_in_source=tuple(keys)).items():
        for keyword, value in keys.items():
            assert output[keyword].value == value, (kind, keyword)


def test_the_header_copy_leaves_the_source_as_it_was() -> None:
    [source] = _small_study()
    source.PatientSex = "m"
    source.StudyDescription = "D" * 80
    del source.AccessionNumber
    header = header_for_outputs(source)
    assert (header.PatientSex, header.StudyDescription, header.AccessionNumber) == (
        "M",
        "D" * 64,
        None,
    )
    assert (source.PatientSex, len(source.StudyDescription)) == ("m", 80)
    assert "AccessionNumber" not in source and "PixelData" not in header
    assert np.frombuffer(source.PixelData, np.uint16).size == 96 * 80


def test_empty_type_3_sequences_of_the_source_are_left_out_of_every_output(
    tmp_path: Path,
) -> None:
    # Modalities copy empty sequences from the worklist (ReferencedStudySequence,
    # ProcedureCodeSequence …); copied empty, each was a dciodvfy error ("1-n" items).
    study = _small_study()
    code = pydicom.Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "XRW", "99LOCAL", "XR WRIST"
    code.EquivalentCodeSequence = []
    for source in study:
        source.ReferencedStudySequence = []
        source.OtherPatientIDsSequence = []
        source.ProcedureCodeSequence = [code]
    for kind, output in _outputs(study, tmp_path).items():
        assert "ReferencedStudySequence" not in output, kind
        assert output.ProcedureCodeSequence[0].CodeValue == "XRW", kind


def test_text_cut_for_the_sources_set_still_fits_once_the_sr_is_made_utf_8(
    tmp_path: Path,
) -> None:
    # Cut to 64 Latin-1 bytes, then written in UTF-8 for the reason's quotes: 110 bytes.
    require_tools("dciodvfy")
    study = _small_study(("PA", "LL"))
    for source in study:
        source.SpecificCharacterSet = "ISO_IR 100"
        source.StudyDescription = "Röntgen Handgelenk " + "ä" * 50
        source.PatientName = "Müller" * 10 + "^Jürgen"
    headers = _received(study, tmp_path)
    result = make_result(study[:1], skipped=[(study[1], "not a DICOM file: bad preamble ‘µ’")])
    sr = build_sr(headers, result, MODEL, device_uid=DEVICE_UID, created=CREATED)
    written = _written(sr, tmp_path / "sr.dcm")  # dciodvfy: LO and PN within 64 bytes
    assert written.SpecificCharacterSet == "ISO_IR 192"
    assert written.StudyDescription.startswith("Röntgen Handgelenk ää")
    assert str(written.PatientName).endswith("^Jürgen")


def test_text_cut_for_the_sources_set_still_fits_in_an_overlay_and_map_made_utf_8(
    tmp_path: Path,
) -> None:
    # A model named beyond Latin-1 makes the overlay and the map UTF-8 too.
    require_tools("dciodvfy")
    [source] = _small_study()
    source.SpecificCharacterSet = "ISO_IR 100"
    source.StudyDescription = "Röntgen Handgelenk " + "ä" * 50
    source.PatientName = "Müller" * 10 + "^Jürgen"
    [header] = _received([source], tmp_path)
    model = ModelInfo(name="densenet169-mura-β", version="1.2.0", validated=False)
    result = make_result([source])
    view = result.views[0]
    built = {
        "sc": build_cam_overlay(header, display_of(source), view, result, model),
        "pm": build_parametric_map(header, view, result, model, device_uid=DEVICE_UID),
    }
    for kind, output in built.items():
        written = _written(output, tmp_path / f"{kind}.dcm")  # LO and PN within 64 bytes
        assert written.SpecificCharacterSet == "ISO_IR 192", kind
        assert str(written.PatientName).endswith("^Jürgen"), kind


def test_references_to_a_multi_frame_view_name_the_frame_it_was_scored_on(
    tmp_path: Path,
) -> None:
    """A multi-frame view is scored on its first frame: a reference to it that does not
    apply to every frame must say which (PS3.3 Table 10-3, Referenced Frame Number 1C)."""
    require_tools("dciodvfy")
    study = _small_study(("PA", "LL"))
    headers = _received(study, tmp_path)
    headers[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    headers[0].NumberOfFrames = 2
    result = make_result(study)
    view = result.views[0]
    sr = _written(
        build_sr(headers, result, MODEL, device_uid=DEVICE_UID, created=CREATED),
        tmp_path / "sr.dcm",
    )
    sc = _written(
        build_cam_overlay(headers[0], display_of(study[0]), view, result, MODEL),
        tmp_path / "sc.dcm",
    )
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 1

    def frames_referenced(items) -> dict[str, object]:  # type: ignore[no-untyped-def]
        found = {}
        for item in items:
            if item.ValueType == "IMAGE":
                reference = item.ReferencedSOPSequence[0]
                found[reference.ReferencedSOPInstanceUID] = reference.get("ReferencedFrameNumber")
            found.update(frames_referenced(item.get("ContentSequence", [])))
        return found

    groups = next(
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "126010"  # Imaging Measurements
    ).ContentSequence
    referenced = frames_referenced(groups)
    assert referenced == {headers[0].SOPInstanceUID: 1, headers[1].SOPInstanceUID: None}


def test_the_models_name_in_an_outputs_own_text_is_cut_to_the_bytes_of_its_vr(
    tmp_path: Path,
) -> None:
    # SoftwareVersions and the map's ContentDescription were cut to 64 characters: a model
    # named in Cyrillic made every output UTF-8 and those values up to twice 64 bytes long.
    model = ModelInfo(name="Детектор переломов запястья DenseNet", version="2.0.1", validated=False)
    written = _outputs(_small_study(("PA", "LL")), tmp_path, model=model)  # LO within 64 bytes
    for kind, output in written.items():
        assert output.SpecificCharacterSet == "ISO_IR 192", kind
        assert output.SoftwareVersions[1].startswith("Детектор переломов запястья"), kind
    description = written["pm"].ContentDescription
    assert description.startswith("Class activation map of Детектор")


@pytest.mark.parametrize(
    ("keyword", "vr", "raw", "expected"),
    [
        ("ReferringPhysicianName", "LO", b"Smith^John", "Smith^John"),
        ("StudyTime", "LO", b"101500", "101500"),
        ("PatientSex", "LO", b"f", "F"),
        ("PatientWeight", "LO", b"72,5", ""),  # then made valid as a DS
        ("StudyDescription", "SH", b"XR WRIST", "XR WRIST"),
    ],
)
def test_a_value_sent_under_another_string_vr_is_copied_under_the_dictionarys(
    keyword: str, vr: str, raw: bytes, expected: str, tmp_path: Path
) -> None:
    # Copied under the VR it came with, the SR and the map had "Invalid Value Representation
    # LO (PN Required)" errors.
    study = _small_study()
    tag = Tag(tag_for_keyword(keyword))
    raw += b" " * (len(raw) % 2)
    study[0][tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    for kind, output in _outputs(study, tmp_path).items():
        assert dictionary_VR(tag) == output[keyword].VR, kind
        assert str(output[keyword].value or "") == expected, kind
