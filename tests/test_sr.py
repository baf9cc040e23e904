"""The result SR: valid (dciodvfy), readable (dsrdump, highdicom), TID 1500 the IHE AIR way."""

from __future__ import annotations

import copy
import datetime
import io
import re
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from tests.dicom_validate import (
    dciodvfy,
    dsrdump,
    dsrdump_content,
    make_result,
    make_study,
    require_tools,
    write_dataset,
)
from triage.dicom import sr as sr_module
from triage.dicom.sr import build_sr, sr_series_uid, sr_sop_instance_uid
from triage.scoring.result import ModelInfo
from triage.uids import derived_uid

DEVICE_UID = derived_uid("test device")
VALIDATED = ModelInfo(name="densenet169-mura", version="1.2.0", validated=True)
UNVALIDATED = ModelInfo(name="densenet169-mura", version="1.2.0-rc1", validated=False)
CREATED = datetime.datetime(2026, 1, 1, 12, 30, 5)


@pytest.fixture(params=["CR", "DX"])
def study(request: pytest.FixtureRequest) -> list[pydicom.Dataset]:
    """Three wrist views: CR in MONOCHROME1, DX in MONOCHROME2."""
    photometric = "MONOCHROME1" if request.param == "CR" else "MONOCHROME2"
    return make_study(request.param, photometric=photometric)


@pytest.fixture
def dx_study() -> list[pydicom.Dataset]:
    """The DX study alone, for what does not depend on the modality."""
    return make_study("DX")


def _evidence_uids(sr: pydicom.Dataset) -> dict[str, str]:
    """SOPInstanceUID → SeriesInstanceUID of every instance in the current evidence."""
    found = {}
    for study_item in sr.CurrentRequestedProcedureEvidenceSequence:
        assert study_item.StudyInstanceUID == sr.StudyInstanceUID
        for series_item in study_item.ReferencedSeriesSequence:
            for instance in series_item.ReferencedSOPSequence:
                found[instance.ReferencedSOPInstanceUID] = series_item.SeriesInstanceUID
    return found


def _validate(sr: pydicom.Dataset, tmp_path: Path) -> None:
    require_tools("dciodvfy")
    result = dciodvfy(write_dataset(sr, tmp_path / "sr.dcm"))
    assert not result.errors, f"dciodvfy errors:\n{result.output}"
    print(result.output)  # the warnings, shown with -s or on a later failure


@pytest.mark.parametrize("model", [VALIDATED, UNVALIDATED], ids=["validated", "unvalidated"])
def test_sr_passes_dciodvfy(study: list[pydicom.Dataset], model: ModelInfo, tmp_path: Path) -> None:
    result = make_result(
        study[:2], probabilities=[0.9, 0.7], skipped=[(study[2], "pixel data undecodable")]
    )
    _validate(build_sr(study, result, model, device_uid=DEVICE_UID, created=CREATED), tmp_path)


def test_revision_with_predecessor_passes_dciodvfy(
    study: list[pydicom.Dataset], tmp_path: Path
) -> None:
    first = build_sr(study, make_result(study[:2]), VALIDATED, device_uid=DEVICE_UID)
    second = build_sr(
        study, make_result(study, revision=2), VALIDATED, device_uid=DEVICE_UID, predecessor=first
    )
    _validate(second, tmp_path)


@pytest.mark.parametrize(
    ("modality", "photometric"), [("CR", "MONOCHROME1"), ("DX", "MONOCHROME2")]
)
def test_sr_of_a_synthetic_study_passes_dciodvfy(
    modality: str, photometric: str, tmp_path: Path
) -> None:
    """The same with the project's synthetic studies (one series per view), where present."""
    synth = pytest.importorskip("triage.testing.synth")
    study = synth.make_study(
        views=3, modality=modality, photometric=photometric, rows=256, cols=200
    )
    sr = build_sr(study, make_result(study), UNVALIDATED, device_uid=DEVICE_UID)
    _validate(sr, tmp_path)
    assert _evidence_uids(sr) == {ds.SOPInstanceUID: ds.SeriesInstanceUID for ds in study}


def test_sr_without_patient_orientation_passes_dciodvfy(tmp_path: Path) -> None:
    """A CR may lack PatientOrientation, which the optional image library needs: no library."""
    study = make_study("CR", photometric="MONOCHROME1")
    for ds in study:
        del ds.PatientOrientation
    sr = build_sr(study, make_result(study), VALIDATED, device_uid=DEVICE_UID)
    _validate(sr, tmp_path)
    assert len(_evidence_uids(sr)) == 3


@pytest.mark.parametrize(
    ("probabilities", "code", "meaning"),
    [([0.91, 0.73], "263654008", "Abnormal"), ([0.12, 0.3], "17621005", "Normal")],
)
def test_dsrdump_shows_finding_probability_and_algorithm(
    study: list[pydicom.Dataset], probabilities: list[float], code: str, meaning: str
) -> None:
    require_tools("dsrdump")
    result = make_result(study[:2], probabilities=probabilities)
    text = dsrdump(build_sr(study, result, VALIDATED, device_uid=DEVICE_UID))
    content = "\n".join(dsrdump_content(text))

    assert f'CODE:(121071,DCM,"Finding")=({code},SCT,"{meaning}")' in content
    assert content.count('"Finding")=') == 1  # the study's finding only
    shown = re.findall(r'NUM:\(122157,DCM,"Probability"\)="([^"]+)" \(1,UCUM,', content)
    expected = [result.probability, *probabilities]  # the study's group first, then the views
    assert [float(value) for value in shown] == pytest.approx(expected, abs=1e-6)
    assert 'NUM:(122411,DCM,"Threshold Value")="0.5" (1,UCUM,' in content
    assert 'TEXT:(111001,DCM,"Algorithm Name")="densenet169-mura"' in content
    assert 'TEXT:(111003,DCM,"Algorithm Version")="1.2.0"' in content
    assert 'CODE:(111000,DCM,"Algorithm Family")=(123110,DCM,"Artificial Intelligence")' in content
    assert 'CODE:(121005,DCM,"Observer Type")=(121007,DCM,"Device")' in content
    assert f'UIDREF:(121012,DCM,"Device Observer UID")="{DEVICE_UID}"' in content
    assert 'CODE:(363698007,SCT,"Finding Site")=(8205005,SCT,"Wrist region structure")' in content
    assert 'CODE:(121058,DCM,"Procedure reported")=(168537006,SCT,"Plain radiography")' in content


def test_sr_is_in_the_source_study_in_its_own_series_with_every_view_as_evidence(
    study: list[pydicom.Dataset],
) -> None:
    result = make_result(study[:2], skipped=[(study[2], "not a radiograph")])
    sr = build_sr(study, result, VALIDATED, device_uid=DEVICE_UID)

    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == study[0].StudyInstanceUID
    assert sr.PatientID == study[0].PatientID
    assert sr.AccessionNumber == study[0].AccessionNumber
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in study}
    assert sr.Manufacturer == "msk-triage"
    assert sr.SoftwareVersions[1] == "densenet169-mura 1.2.0"
    assert sr.ContentDate and sr.ContentTime
    scored = {ds.SOPInstanceUID: ds.SeriesInstanceUID for ds in study[:2]}
    assert _evidence_uids(sr) == scored  # the skipped view is not evidence

    # Read back as TID 1500: one study group and one group per view, each with its image.
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = report.get_image_measurement_groups()
    assert len(groups) == 3
    study_group, *view_groups = groups
    assert [img.referenced_sop_instance_uid for img in study_group.source_images] == list(scored)
    for group, ds in zip(view_groups, study[:2], strict=True):
        assert [img.referenced_sop_instance_uid for img in group.source_images] == [
            ds.SOPInstanceUID
        ]
        [probability] = group.get_measurements(name=codes.DCM.Probability)
        view = next(v for v in result.views if v.sop_instance_uid == ds.SOPInstanceUID)
        assert probability.value == pytest.approx(view.probability)


def test_headers_without_pixels_suffice(dx_study: list[pydicom.Dataset], tmp_path: Path) -> None:
    headers = []
    for index, ds in enumerate(dx_study):
        path = write_dataset(ds, tmp_path / f"{index}.dcm")
        headers.append(pydicom.dcmread(path, stop_before_pixels=True))
    result = make_result(dx_study)
    from_headers = build_sr(headers, result, VALIDATED, device_uid=DEVICE_UID, created=CREATED)
    from_images = build_sr(dx_study, result, VALIDATED, device_uid=DEVICE_UID, created=CREATED)
    assert from_headers.ContentSequence == from_images.ContentSequence


def _encoded_without_creation_times(sr: pydicom.Dataset) -> bytes:
    """The SR as written, less what highdicom stamps with the current time."""
    sr = copy.deepcopy(sr)
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        del sr[keyword]
    for item in sr.get("ContributingEquipmentSequence", []):
        item.pop("ContributionDateTime", None)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_document_equals_what_highdicoms_full_constructor_writes(
    dx_study: list[pydicom.Dataset], monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_sr hands highdicom the root container alone (speed); nothing in the output changes."""
    first = build_sr(dx_study, make_result(dx_study[:2]), VALIDATED, device_uid=DEVICE_UID)
    result = make_result(dx_study[:2], revision=2, skipped=[(dx_study[2], "not a radiograph")])
    kwargs = {"device_uid": DEVICE_UID, "predecessor": first, "created": CREATED}
    fast = build_sr(dx_study, result, UNVALIDATED, **kwargs)
    monkeypatch.setattr(sr_module, "_without_children", lambda container: container)
    full = build_sr(dx_study, result, UNVALIDATED, **kwargs)

    assert _encoded_without_creation_times(fast) == _encoded_without_creation_times(full)
    assert fast.content[0] == full.content[0]
    assert len(fast.content.get_image_measurement_groups()) == 3


def _clear_item_caches() -> None:
    for cached in (
        sr_module._algorithm,
        sr_module._observation_context,
        sr_module._threshold_measurement,
        sr_module._finding,
    ):
        cached.cache_clear()


def test_shared_content_items_change_nothing_in_any_report(dx_study: list[pydicom.Dataset]) -> None:
    """The items every report of a model shares (algorithm, observer, threshold, finding) give
    the report built afresh; building later reports, or parsing one in memory (highdicom's
    parser re-classes content items in place), leaves every report as it was."""
    result = make_result(dx_study, probabilities=[0.7, 0.8, 0.9])
    kwargs = {"device_uid": DEVICE_UID, "created": CREATED}
    _clear_item_caches()
    cold = build_sr(dx_study, result, UNVALIDATED, **kwargs)
    cold_bytes = _encoded_without_creation_times(cold)
    hd.sr.Comprehensive3DSR.from_dataset(cold)  # parses cold's own content items in place
    # Other reports through the same cached items: other findings, lateralities, thresholds.
    left = [copy.deepcopy(ds) for ds in dx_study]
    for ds in left:
        ds.ImageLaterality = "L"
    for probabilities, threshold in (([0.1, 0.2, 0.3], 0.5), ([0.9, 0.9, 0.9], 0.4)):
        other = make_result(left, probabilities=probabilities, threshold=threshold)
        parsed = build_sr(left, other, UNVALIDATED, **kwargs)
        assert hd.sr.Comprehensive3DSR.from_dataset(parsed).content
        build_sr(dx_study, make_result(dx_study, probabilities=probabilities), VALIDATED, **kwargs)
    warm = build_sr(dx_study, result, UNVALIDATED, **kwargs)

    assert _encoded_without_creation_times(cold) == cold_bytes
    assert _encoded_without_creation_times(warm) == cold_bytes


def test_skipped_views_are_named_with_their_reason(dx_study: list[pydicom.Dataset]) -> None:
    require_tools("dsrdump")
    result = make_result(dx_study[:2], skipped=[(dx_study[2], "pixel data undecodable")])
    content = dsrdump(build_sr(dx_study, result, VALIDATED, device_uid=DEVICE_UID))
    expected = f"Image {dx_study[2].SOPInstanceUID} not scored: pixel data undecodable"
    assert f'TEXT:(121106,DCM,"Comment")="{expected}"' in content


def test_unvalidated_model_says_so_in_content_and_series_description(
    dx_study: list[pydicom.Dataset],
) -> None:
    require_tools("dsrdump")
    result = make_result(dx_study)
    unvalidated = build_sr(dx_study, result, UNVALIDATED, device_uid=DEVICE_UID)
    validated = build_sr(dx_study, result, VALIDATED, device_uid=DEVICE_UID)

    assert "NOT VALIDATED" in unvalidated.SeriesDescription
    assert 'TEXT:(121106,DCM,"Comment")="NOT VALIDATED: model densenet169-mura 1.2.0-rc1' in (
        dsrdump(unvalidated)
    )
    assert "NOT VALIDATED" not in validated.SeriesDescription
    assert "NOT VALIDATED" not in dsrdump(validated)


def test_revision_names_the_previous_sr_as_predecessor(dx_study: list[pydicom.Dataset]) -> None:
    first = build_sr(dx_study, make_result(dx_study[:2]), VALIDATED, device_uid=DEVICE_UID)
    second = build_sr(
        dx_study,
        make_result(dx_study, revision=2),
        VALIDATED,
        device_uid=DEVICE_UID,
        predecessor=first,
    )

    assert "PredecessorDocumentsSequence" not in first
    [study_item] = second.PredecessorDocumentsSequence
    assert study_item.StudyInstanceUID == first.StudyInstanceUID
    [series_item] = study_item.ReferencedSeriesSequence
    assert series_item.SeriesInstanceUID == first.SeriesInstanceUID
    [instance] = series_item.ReferencedSOPSequence
    assert instance.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert instance.ReferencedSOPClassUID == first.SOPClassUID
    assert "(rev 2)" in second.SeriesDescription


def test_uids_are_deterministic(dx_study: list[pydicom.Dataset]) -> None:
    result = make_result(dx_study)
    one = build_sr(dx_study, result, VALIDATED, device_uid=DEVICE_UID)
    two = build_sr(dx_study, result, VALIDATED, device_uid=DEVICE_UID)
    revised = build_sr(
        dx_study, make_result(dx_study, revision=2), VALIDATED, device_uid=DEVICE_UID
    )
    other_model = build_sr(dx_study, result, UNVALIDATED, device_uid=DEVICE_UID)

    assert (one.SOPInstanceUID, one.SeriesInstanceUID) == (
        two.SOPInstanceUID,
        two.SeriesInstanceUID,
    )
    assert one.SOPInstanceUID == sr_sop_instance_uid(result, VALIDATED)
    assert one.SeriesInstanceUID == sr_series_uid(result, VALIDATED)
    assert revised.SOPInstanceUID != one.SOPInstanceUID
    assert revised.SeriesInstanceUID != one.SeriesInstanceUID
    assert other_model.SOPInstanceUID != one.SOPInstanceUID
    assert len({one.SOPInstanceUID, one.SeriesInstanceUID, one.StudyInstanceUID}) == 3


def test_laterality_is_a_finding_site_modifier(dx_study: list[pydicom.Dataset]) -> None:
    require_tools("dsrdump")
    content = dsrdump(build_sr(dx_study, make_result(dx_study), VALIDATED, device_uid=DEVICE_UID))
    # The study group and each of the three view groups: all left wrists.
    assert content.count('CODE:(272741003,SCT,"Laterality")=(7771000,SCT,"Left")') == 4


def test_missing_source_or_other_study_is_refused(dx_study: list[pydicom.Dataset]) -> None:
    result = make_result(dx_study)
    with pytest.raises(ValueError, match="no source dataset"):
        build_sr(dx_study[:2], result, VALIDATED, device_uid=DEVICE_UID)
    stranger = make_study("DX", views=("PA",))[0]
    mixed = make_result([*dx_study[:2], stranger])
    with pytest.raises(ValueError, match="not all in study"):
        build_sr([*dx_study, stranger], mixed, VALIDATED, device_uid=DEVICE_UID)


@pytest.mark.parametrize(
    ("probability", "threshold", "code"),
    [
        (0.5000004, 0.5, "263654008"),  # above by less than six decimals show: abnormal
        (0.5, 0.5, "17621005"),  # at the threshold: normal
        (0.49999996, 0.5, "17621005"),
        (0.4000001, 0.4, "263654008"),
    ],
)
def test_the_probability_and_threshold_read_the_way_the_finding_goes(
    dx_study: list[pydicom.Dataset], probability: float, threshold: float, code: str
) -> None:
    # A reader (or a worklist rule) comparing the two numbers the SR shows finds its finding.
    require_tools("dsrdump")
    result = make_result(dx_study[:1], probabilities=[probability], threshold=threshold)
    content = "\n".join(
        dsrdump_content(dsrdump(build_sr(dx_study, result, VALIDATED, device_uid=DEVICE_UID)))
    )
    assert f'CODE:(121071,DCM,"Finding")=({code},SCT,' in content
    shown = float(re.findall(r'NUM:\(122157,DCM,"Probability"\)="([^"]+)"', content)[0])
    shown_threshold = float(
        re.findall(r'NUM:\(122411,DCM,"Threshold Value"\)="([^"]+)"', content)[0]
    )
    assert (shown > shown_threshold) == result.abnormal


@pytest.mark.parametrize(
    ("image_laterality", "laterality", "expected"),
    [
        ("U", "L", "L"),  # a modality's default "unpaired", the side in Laterality
        ("R", "U", "R"),
        ("", "b", "B"),
        ("U", "", "U"),
        ("", "", ""),
    ],
)
def test_a_side_named_anywhere_wins_over_unpaired(
    image_laterality: str, laterality: str, expected: str
) -> None:
    from pydicom import Dataset

    from triage.dicom.sr import laterality_of

    source = Dataset()
    source.ImageLaterality, source.Laterality = image_laterality, laterality
    assert laterality_of(source) == expected
