"""Study type from headers, view eligibility, and the study-level decision."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from triage.dicom.sop import (
    CR_IMAGE_STORAGE,
    DX_FOR_PRESENTATION,
    DX_FOR_PROCESSING,
    SECONDARY_CAPTURE,
)
from triage.dicom.study_type import (
    check_view,
    decide_study,
    detect_study_type,
    detect_study_type_from,
    parse_anatomy,
)
from triage.study_types import StudyType

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ELBOW, FINGER, FOREARM, HAND = (
    StudyType.ELBOW,
    StudyType.FINGER,
    StudyType.FOREARM,
    StudyType.HAND,
)
HUMERUS, SHOULDER, WRIST = StudyType.HUMERUS, StudyType.SHOULDER, StudyType.WRIST


def header(
    sop_class: str = DX_FOR_PRESENTATION, modality: str = "DX", **attributes: str
) -> Dataset:
    """The header of one view, as the worker reads it (no pixels)."""
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("XR WRIST 3V", WRIST),
        ("XR WRIST 3+ VIEWS LEFT", WRIST),
        ("wrist", WRIST),
        ("Dx Wrist, Left", WRIST),
        ("XRWRIST", WRIST),
        ("WRIST-RT", WRIST),
        ("WRISTRT", WRIST),
        ("SCAPHOID SERIES", WRIST),
        ("XR SCAPHOID L", WRIST),
        ("CARPAL TUNNEL VIEW", WRIST),
        ("DISTAL RADIUS", WRIST),
        ("XR HAND 3+ VIEWS", HAND),
        ("HAND2V", HAND),
        ("CR L-HAND", HAND),
        ("BILATERAL HANDS", HAND),
        ("XR HAND AND WRIST", HAND),  # the first part named decides
        ("METACARPAL", HAND),
        ("XR FINGER(S) 2+ VIEWS", FINGER),
        ("FINGERS RIGHT", FINGER),
        ("THUMB", FINGER),
        ("XR THUMB LT 2V", FINGER),
        ("DIGIT 5 RIGHT HAND", FINGER),
        ("XR FOREARM 2 VIEWS", FOREARM),
        ("FORE-ARM", FOREARM),
        ("LOWER ARM", FOREARM),
        ("RADIUS ULNA", FOREARM),
        ("RAD/ULNA", FOREARM),
        ("Radius and Ulna", FOREARM),
        ("XR HUMERUS 2V", HUMERUS),
        ("UPPER ARM", HUMERUS),
        ("ARM", HUMERUS),
        ("XR ARM LT", HUMERUS),
        ("HUMERUS, RIGHT", HUMERUS),
        ("XR ELBOW 3V", ELBOW),
        ("ELBOW (BILAT)", ELBOW),
        ("RADIAL HEAD VIEW", ELBOW),
        ("XR RAD HEAD LT", ELBOW),  # radial head, not the head
        ("XR SHOULDER 3+ VIEWS", SHOULDER),
        ("SHOULDER, LEFT; AXIAL", SHOULDER),
        ("RT SHLDR", SHOULDER),
        ("SHOULDER SCAPULA Y", SHOULDER),  # a MURA part wins over other anatomy in one text
        ("SCAPULAR Y VIEW", SHOULDER),  # a shoulder series' own view, not a scapula study
        ("Y VIEW", SHOULDER),
        ("DX SHOULDER/HUMERUS", SHOULDER),
    ],
)
def test_description_variants(text: str, expected: StudyType):
    assert parse_anatomy(text)[0] is expected
    decision = detect_study_type_from(study_description=text)
    assert decision.study_type is expected
    assert decision.source == "StudyDescription"
    assert expected.display in decision.reason


@pytest.mark.parametrize(
    ("body_part", "expected"),
    [
        ("WRIST", WRIST),
        ("HAND", HAND),
        ("FINGER", FINGER),
        ("THUMB", FINGER),
        ("FOREARM", FOREARM),
        ("HUMERUS", HUMERUS),
        ("ARM", HUMERUS),
        ("UPPER_ARM", HUMERUS),
        ("ELBOW", ELBOW),
        ("SHOULDER", SHOULDER),
        ("Shoulder", SHOULDER),
    ],
)
def test_body_part_examined(body_part: str, expected: StudyType):
    decision = detect_study_type_from(body_part=body_part)
    assert (decision.study_type, decision.source) == (expected, "BodyPartExamined")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("CHEST PA AND LAT", "chest"),
        ("XR KNEE 3V", "knee"),
        ("PELVIS AP", "pelvis"),
        ("XR FOOT 3V", "foot"),
        ("FOOT DIGIT 2", "foot"),  # a digit of the foot is not a finger
        ("TOE PHALANX", "toe"),
        ("ANKLE", "ankle"),
        ("C-SPINE", "spine"),
        ("CLAVICLE", "clavicle"),
        ("XR FOREFOOT", "forefoot"),
        ("XR METATARSALS LT", "metatarsals"),
        ("OS CALCIS AXIAL", "os calcis"),
    ],
)
def test_other_anatomy_is_none_with_a_reason(text: str, named: str):
    decision = detect_study_type_from(study_description=text)
    assert decision.study_type is None and decision.other_anatomy
    assert "not an upper-extremity radiograph" in decision.reason
    assert named in decision.reason


def test_body_part_comes_first():
    decision = detect_study_type_from(
        body_part="HAND", study_description="XR WRIST", series_description="ELBOW"
    )
    assert (decision.study_type, decision.source) == (HAND, "BodyPartExamined")
    # A body part outside MURA decides too: a mislabelled study is skipped, never mis-scored.
    chest = detect_study_type_from(body_part="CHEST", study_description="XR WRIST")
    assert chest.study_type is None and chest.source == "BodyPartExamined"


def test_sources_naming_nothing_are_passed_over():
    decision = detect_study_type_from(
        body_part="EXTREMITY",
        study_description="RADIOGRAPH 2 VIEWS",
        series_description="AP",
        protocol_name="XR ELBOW",
    )
    assert (decision.study_type, decision.source) == (ELBOW, "ProtocolName")
    series = detect_study_type_from(
        study_description="OUTSIDE FILMS", series_description="LT WRIST"
    )
    assert (series.study_type, series.source) == (WRIST, "SeriesDescription")


def test_nothing_named():
    empty = detect_study_type_from()
    assert empty.study_type is None and empty.reason == "no body part or description in the headers"
    vague = detect_study_type_from(body_part="EXTREMITY", study_description="XR 2 VIEWS")
    assert vague.study_type is None and not vague.other_anatomy
    assert "EXTREMITY" in vague.reason and "XR 2 VIEWS" in vague.reason


def test_detect_from_dataset():
    ds = header(BodyPartExamined="", StudyDescription="XR SHOULDER 2V", ProtocolName="CHEST")
    decision = detect_study_type(ds)
    assert (decision.study_type, decision.source) == (SHOULDER, "StudyDescription")


# --- eligibility ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "modality", "attributes"),
    [
        (CR_IMAGE_STORAGE, "CR", {}),
        (DX_FOR_PRESENTATION, "DX", {}),
        (SECONDARY_CAPTURE, "CR", {}),
        (SECONDARY_CAPTURE, "DX", {}),
        (SECONDARY_CAPTURE, "OT", {"SeriesDescription": "XR WRIST 2V"}),
        (SECONDARY_CAPTURE, "OT", {"BodyPartExamined": "HAND", "ConversionType": "DI"}),
    ],
)
def test_radiographs_are_eligible(sop_class: str, modality: str, attributes: dict[str, str]):
    assert check_view(header(sop_class, modality, **attributes)).eligible


@pytest.mark.parametrize(
    ("sop_class", "modality", "attributes", "reason"),
    [
        (DX_FOR_PROCESSING, "DX", {}, "DX For Processing"),
        (CT_IMAGE_STORAGE, "CT", {}, "SOP class CT Image Storage is not a radiograph"),
        (DX_FOR_PRESENTATION, "MG", {}, "modality MG is not a radiograph"),
        (SECONDARY_CAPTURE, "US", {}, "Secondary Capture of modality US"),
        (SECONDARY_CAPTURE, "OT", {"SeriesDescription": "REQUISITION"}, "own headers name no"),
        (SECONDARY_CAPTURE, "DX", {"ConversionType": "SD"}, "a scanned document"),
        (SECONDARY_CAPTURE, "OT", {"Manufacturer": "msk-triage"}, "an output of msk-triage"),
    ],
)
def test_other_views_are_not_eligible(
    sop_class: str, modality: str, attributes: dict[str, str], reason: str
):
    eligibility = check_view(header(sop_class, modality, StudyDescription="XR WRIST", **attributes))
    assert not eligibility.eligible
    assert reason in eligibility.reason


# --- study-level decision ------------------------------------------------------------------


def test_majority_of_typed_views_decides_and_untyped_views_are_scored():
    views = [
        header(SeriesDescription="HAND PA"),
        header(SeriesDescription="WRIST PA"),
        header(SeriesDescription="WRIST LAT"),
        header(SeriesDescription="OBLIQUE"),
    ]
    decision = decide_study(views)
    assert decision.study_type is WRIST
    assert "2 of 3 typed views" in decision.reason and "XR_HAND 1" in decision.reason
    assert decision.scored_uids == tuple(v.SOPInstanceUID for v in views)


def test_a_tie_goes_to_the_earliest_view():
    views = [header(SeriesDescription="ELBOW AP"), header(SeriesDescription="FOREARM AP")]
    assert decide_study(views).study_type is ELBOW
    assert decide_study(views[::-1]).study_type is FOREARM


def test_study_description_types_every_view():
    views = [header(StudyDescription="XR FINGER(S) 2+ VIEWS") for _ in range(3)]
    decision = decide_study(views)
    assert decision.study_type is FINGER and "3 of 3" in decision.reason


def test_ineligible_and_other_anatomy_views_are_skipped_with_reasons():
    processing = header(DX_FOR_PROCESSING, StudyDescription="XR WRIST")
    chest = header(BodyPartExamined="CHEST")
    wrist = header(StudyDescription="XR WRIST")
    decision = decide_study([processing, chest, wrist])
    assert decision.study_type is WRIST
    assert decision.scored_uids == (wrist.SOPInstanceUID,)
    reasons = {v.sop_instance_uid: v.reason for v in decision.skipped_views}
    assert "DX For Processing" in reasons[processing.SOPInstanceUID]
    assert "chest" in reasons[chest.SOPInstanceUID]


def test_chest_study_is_none_with_a_reason():
    decision = decide_study([header("1.2.840.10008.5.1.4.1.1.1", "CR", BodyPartExamined="CHEST")])
    assert decision.study_type is None and not decision.scored_uids
    assert decision.reason.startswith("no scorable view")
    assert "chest" in decision.reason


def test_only_dx_for_processing_is_none():
    views = [header(DX_FOR_PROCESSING, StudyDescription="XR HAND") for _ in range(2)]
    decision = decide_study(views)
    assert decision.study_type is None
    assert "2× DX For Processing" in decision.reason


def test_no_part_named_anywhere_is_none():
    decision = decide_study([header(StudyDescription="OUTSIDE FILMS")])
    assert decision.study_type is None
    assert decision.reason.startswith("no upper-extremity part named")


def test_type_the_model_does_not_cover_is_none():
    views = [header(StudyDescription="XR ELBOW")]
    decision = decide_study(views, covered=[WRIST, HAND])
    assert decision.study_type is None
    assert "does not cover XR_ELBOW" in decision.reason
    assert not decision.scored_uids
    assert decide_study(views, covered=list(StudyType)).study_type is ELBOW


def test_empty_study():
    decision = decide_study([])
    assert decision.study_type is None and decision.reason == "no scorable view: no views"


def test_a_digit_is_a_toe_when_another_text_of_the_view_names_the_foot():
    decision = detect_study_type_from(series_description="DIGITS OBL", protocol_name="FOOT")
    assert decision.study_type is None and decision.other_anatomy
    finger = detect_study_type_from(series_description="DIGITS OBL", protocol_name="HAND")
    assert finger.study_type is FINGER


@pytest.mark.parametrize("body_part", [None, "EXTREMITY"])
def test_a_view_whose_own_series_names_other_anatomy_is_not_typed_by_the_study(
    body_part: str | None,
):
    # A study description types the views that name nothing themselves; not a chest or a
    # foot series filed in it.
    extra = {"BodyPartExamined": body_part} if body_part else {}
    hands = [
        header(StudyDescription="XR HANDS AND FEET BILAT", SeriesDescription=s, **extra)
        for s in ("HANDS PA", "HANDS NORGAARD", "PA")
    ]
    feet = header(StudyDescription="XR HANDS AND FEET BILAT", SeriesDescription="FOOT R DP")
    chest = header(StudyDescription="XR HANDS AND FEET BILAT", ProtocolName="CHEST PA", **extra)
    decision = decide_study([*hands, feet, chest])
    assert decision.study_type is HAND
    assert decision.scored_uids == tuple(view.SOPInstanceUID for view in hands)
    reasons = {v.sop_instance_uid: v.reason for v in decision.skipped_views}
    assert reasons[feet.SOPInstanceUID].endswith("SeriesDescription 'FOOT R DP' names foot")
    assert reasons[chest.SOPInstanceUID].endswith("ProtocolName 'CHEST PA' names chest")


def test_a_body_part_examined_is_not_overruled_by_the_series():
    # BodyPartExamined is the view's own: a "SCAPULA" series of a shoulder view stays.
    view = header(BodyPartExamined="SHOULDER", SeriesDescription="SCAPULA")
    assert decide_study([view]).scored_uids == (view.SOPInstanceUID,)


@pytest.mark.parametrize(
    "description", ["XR SKELETAL SURVEY INFANT", "BONE SURVEY COMPLETE", "BABYGRAM"]
)
def test_a_skeletal_survey_is_skipped_whatever_its_views_name(description: str):
    views = [
        header(BodyPartExamined=part, StudyDescription=description)
        for part in ("HAND", "HAND", "FOREARM", "HUMERUS", "CHEST", "SKULL")
    ]
    decision = decide_study(views)
    assert decision.study_type is None and not decision.scored_uids
    assert decision.reason == (
        f"no scorable view: not an upper-extremity radiograph: StudyDescription "
        f"{description!r} names a survey of several parts"
    )


def test_patients_in_counts_distinct_patient_ids_ignoring_empty_ones():
    from triage.dicom.study_type import patients_in

    views = [header(PatientID="A1"), header(PatientID=" A1 "), header(PatientID=""), header()]
    assert patients_in(views) == 1
    assert patients_in([*views, header(PatientID="B2")]) == 2


# --- adjectives: ULNAR and SCAPULAR are not ULNA or SCAPULA + R(ight) -----------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PA ULNAR DEVIATION", StudyType.WRIST),  # a scaphoid/wrist view, not a forearm
        ("ULNAR DEV", StudyType.WRIST),
        ("TRANS-SCAPULAR LAT", StudyType.SHOULDER),  # the shoulder's Y view
        ("Y SCAPULAR", StudyType.SHOULDER),
        ("SCAPULAR Y VIEW", StudyType.SHOULDER),
        ("WRISTR", StudyType.WRIST),  # a glued laterality is still stripped
        ("ULNA", StudyType.FOREARM),
    ],
)
def test_adjectives_are_not_unglued_into_another_part(text: str, expected: StudyType):
    assert parse_anatomy(text)[0] is expected


def test_a_trans_scapular_view_of_a_shoulder_study_is_scored():
    views = [
        header(StudyDescription="XR SHOULDER 3 VIEWS RIGHT", SeriesDescription=s)
        for s in ("AP INT ROT", "GRASHEY", "TRANS-SCAPULAR LAT")
    ]
    decision = decide_study(views)
    assert decision.study_type is StudyType.SHOULDER
    assert decision.scored_uids == tuple(v.SOPInstanceUID for v in views)


def test_an_ulnar_deviation_view_does_not_make_a_forearm_study():
    views = [
        header(StudyDescription="RADIOGRAPHY", SeriesDescription=s)
        for s in ("PA ULNAR DEVIATION", "PA", "LAT")
    ]
    assert decide_study(views).study_type is not StudyType.FOREARM


def test_abd_in_a_shoulder_series_is_abduction_not_the_abdomen():
    views = [
        header(StudyDescription="XR SHOULDER 2 VIEWS", SeriesDescription=s)
        for s in ("AP ABD ER", "AXILLARY")
    ]
    decision = decide_study(views)
    assert decision.study_type is StudyType.SHOULDER
    assert decision.scored_uids == tuple(v.SOPInstanceUID for v in views)
    # A study that says abdomen in full is still no upper-extremity radiograph.
    assert decide_study([header(StudyDescription="XR ABDOMEN 1 VIEW")]).study_type is None


def test_reasons_withhold_the_patient_identity_a_description_carries():
    """Reasons quote descriptions and are logged and stored: a site that writes the
    patient's name or the accession number into them must not see those in the log."""
    identity = {"PatientName": "SMITH^JOHN", "PatientID": "MRN4711", "AccessionNumber": "ACC99"}
    chest = header(StudyDescription="CHEST PA SMITH ACC99", **identity)
    wrist = header(SeriesDescription="WRIST PA MRN4711", **identity)
    for views in ([chest], [chest, wrist]):
        decision = decide_study(views)
        texts = [decision.reason, *(view.reason for view in decision.views)]
        assert not any(value in text for text in texts for value in ("SMITH", "MRN4711", "ACC99"))
        assert any("CHEST PA ... ..." in text for text in texts)
    assert decide_study([chest, wrist]).study_type is WRIST
