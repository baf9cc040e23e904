"""The study's result as a DICOM Structured Report: TID 1500, the IHE AI Results way.

One Comprehensive 3D SR per scored study revision, in the source study, in its own series::

    Imaging Measurement Report (TID 1500)
      Language, Observer Type = Device (UID, name with software version, manufacturer, model)
      Procedure reported = Plain radiography
      Image Library: every scored view (when their headers allow; it is optional)
      Imaging Measurements
        Measurement Group "study"          finding site = the study type's anatomy
          Algorithm Name / Version / Family / Manufacturer (TID 4019)
          Probability (UCUM 1), derivation Mean      the mean of the view probabilities
          Threshold Value (UCUM 1)                   abnormal when Probability > it
          Finding = Abnormal | Normal
          Comment: NOT VALIDATED …                   only for a model that is not validated
          Comment: Image … not scored: …             one per skipped view
          Source: every scored view
        Measurement Group "view n (PA)"   one per scored view
          finding site (+ laterality), algorithm, Probability, Comment: note, Source: the view

The threshold is a measurement (DCM 122411 "Threshold Value") rather than an algorithm
parameter so that a consumer can compare the two numbers without parsing text. Views have no
Finding of their own: MURA's decision is per study, and a per-view "Abnormal" next to a study
"Normal" would read as a contradiction. Skipped views are free-text qualitative evaluations of
the study group (TID 1501 allows TEXT there); they are not evidence, since nothing was derived
from them.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

import triage
from triage import __version__
from triage.dicom import iod_lookup
from triage.dicom.geometry import scored_frames
from triage.dicom.source_header import declare_character_set, fitted_text, header_for_outputs
from triage.scoring.result import ModelInfo, StudyResult, output_identity, shown_decimals
from triage.uids import derived_uid

# Every SR, overlay and parametric map goes through highdicom's IOD table searches several
# times; the answers never change (see iod_lookup). sc and pmap import this module.
iod_lookup.install()

#: Manufacturer of every object msk-triage writes (General Equipment).
MANUFACTURER = triage.MANUFACTURER
#: Series numbers of the outputs: high, so they sort after the modality's series.
SR_SERIES_NUMBER = 9900

_PLAIN_RADIOGRAPHY = hd.sr.CodedConcept("168537006", "SCT", "Plain radiography")
_THRESHOLD_VALUE = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
_NO_UNITS = codes.UCUM.NoUnits
_LATERALITY_CODES = {
    "R": codes.SCT.Right,
    "L": codes.SCT.Left,
    "B": hd.sr.CodedConcept("51440002", "SCT", "Right and left"),
}


def not_validated_statement(model: ModelInfo) -> str:
    """The sentence every output of an unvalidated model carries."""
    return (
        f"NOT VALIDATED: model {model.name} {model.version} has not been validated for "
        "clinical use; this result must not be used for diagnosis."
    )


def series_description(kind: str, result: StudyResult, model: ModelInfo) -> str:
    """A SeriesDescription ("AI triage SR - NOT VALIDATED (rev 2)"), at most 64 characters.

    ASCII only: the outputs inherit the sources' character set, which may be the default one.
    """
    text = f"AI triage {kind}"
    if not model.validated:
        text += " - NOT VALIDATED"
    if result.revision > 1:
        text += f" (rev {result.revision})"
    return text[:64]


def software_versions(model: ModelInfo, header: pydicom.Dataset) -> list[str]:
    """SoftwareVersions: msk-triage's version, then the model's name and version, each within
    64 bytes in the character set of the outputs of *header* (see :func:`fitted_text`)."""
    return [
        f"msk-triage {__version__}"[:64],
        fitted_text(f"{model.name} {model.version}", header, "LO"),
    ]


def laterality_of(source: pydicom.Dataset) -> str:
    """The view's laterality (R, L, B or U) from ImageLaterality or Laterality, "" if unknown.

    A side either names wins over "unpaired" in the other: a modality that writes "U" to
    ImageLaterality by default and the side to Laterality lost the side.
    """
    values = [
        str(source.get(keyword, "") or "").strip().upper()
        for keyword in ("ImageLaterality", "Laterality")
    ]
    return next((v for v in values if v in ("R", "L", "B")), next((v for v in values if v), ""))


def sr_series_uid(result: StudyResult, model: ModelInfo) -> str:
    """SeriesInstanceUID of the SR of this study revision (the same on every rebuild)."""
    return derived_uid(
        result.study_uid, result.revision, output_identity(result, model), "sr", "series"
    )


def sr_sop_instance_uid(result: StudyResult, model: ModelInfo) -> str:
    """SOPInstanceUID of the SR of this study revision (the same on every rebuild)."""
    return derived_uid(result.study_uid, result.revision, output_identity(result, model), "sr")


def build_sr(
    sources: Sequence[pydicom.Dataset],
    result: StudyResult,
    model: ModelInfo,
    *,
    device_uid: str,
    predecessor: pydicom.Dataset | None = None,
    device_name: str = "msk-triage",
    institution_name: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
    created: datetime.datetime | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The Structured Report of one scored study revision.

    *sources* are the study's images (headers suffice); every scored view of *result* must be
    among them, others are ignored. *device_uid* identifies this msk-triage installation as
    the observer. *predecessor* is the SR of the previous revision, named in
    PredecessorDocumentsSequence. *created* is the ContentDate/Time (default: now); UIDs do
    not depend on it, so a rebuild after a crash replaces the same instance.
    """
    if not result.views:
        raise ValueError(f"study {result.study_uid} has no scored views: nothing to report")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    missing = [
        view.sop_instance_uid for view in result.views if view.sop_instance_uid not in by_uid
    ]
    if missing:
        raise ValueError(f"no source dataset for scored views {', '.join(missing)}")
    evidence = [by_uid[view.sop_instance_uid] for view in result.views]
    other_study = [ds for ds in evidence if str(ds.StudyInstanceUID) != result.study_uid]
    if other_study:
        raise ValueError(f"sources are not all in study {result.study_uid}")
    # Headers as they come from modalities: highdicom refuses many (missing Type 2
    # attributes, odd character sets, dates of 00000000), and one header must not fail a study.
    # Measured in the character set the report is written in: its own text may make it UTF-8.
    own_text = [
        not_validated_statement(model),
        *(skipped.reason for skipped in result.skipped_views),
        *(view.note for view in result.views),
        model.name,
        model.version,
        model.manufacturer,
        device_name,
        institution_name or "",
    ]
    evidence = [header_for_outputs(ds, also=own_text) for ds in evidence]

    algorithm = _algorithm(model.name, model.version, model.manufacturer)
    site_code, site_meaning = result.study_type.finding_site
    lateralities = {laterality_of(ds) for ds in evidence}
    study_laterality = lateralities.pop() if len(lateralities) == 1 else ""
    decimals = shown_decimals(result.probability, result.threshold, 6)

    study_group = _group(
        tracking=("study", _tracking_uid(result, "study")),
        site=_finding_site(site_code, site_meaning, study_laterality),
        algorithm=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=codes.DCM.Probability,
                value=_rounded(result.probability, decimals),
                unit=_NO_UNITS,
                derivation=codes.SCT.Mean,
            ),
            _threshold_measurement(_rounded(result.threshold, decimals)),
        ],
        finding=_finding(result.abnormal),
        comments=(
            ([] if model.validated else [not_validated_statement(model)])
            + [
                f"Image {skipped.sop_instance_uid} not scored: {skipped.reason}"
                for skipped in result.skipped_views
            ]
        ),
        images=evidence,
    )
    view_groups = [
        _group(
            tracking=(_view_label(index, source), _tracking_uid(result, view.sop_instance_uid)),
            site=_finding_site(site_code, site_meaning, laterality_of(source)),
            algorithm=algorithm,
            measurements=[
                hd.sr.Measurement(
                    name=codes.DCM.Probability, value=_rounded(view.probability), unit=_NO_UNITS
                )
            ],
            finding=None,
            comments=[view.note] if view.note else [],
            images=[source],
        )
        for index, (view, source) in enumerate(zip(result.views, evidence, strict=True), start=1)
    ]

    report = _measurement_report(
        _observation_context(device_uid, f"{device_name} {__version__}", model.name),
        [study_group, *view_groups],
        evidence,
    )
    created = created or datetime.datetime.now()
    # highdicom's document constructor deep-copies the content tree, parses the copy and
    # searches it for references: 60% of the whole build (31 of 53 ms for two views). It gets
    # the root container alone and the tree is attached after, which writes the same bytes
    # (tests/test_sr.py compares the two): every evidence instance is in this study, so all of
    # them are recorded either way, and every referenced view was checked to be among them.
    root = report[0]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=_without_children(root),
        series_instance_uid=sr_series_uid(result, model),
        series_number=series_number,
        sop_instance_uid=sr_sop_instance_uid(result, model),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="msk-triage",
        software_versions=software_versions(model, evidence[0]),
        series_description=series_description("SR", result, model),
        institution_name=institution_name,
        # The algorithm has run over every view it could; the report is not a physician's.
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        # Declared below, once the text it must encode is all there.
        specific_character_set=None,
        content_date=created.date(),
        content_time=created.time(),
    )
    sr.ContentSequence = root.ContentSequence
    # What Comprehensive3DSR.from_dataset would parse the tree into, so that sr.content holds
    # the whole report.
    sr._content = report
    declare_character_set(sr, evidence[0])
    return sr


def _without_children(container: pydicom.Dataset) -> pydicom.Dataset:
    """The root container's own attributes, with an empty ContentSequence."""
    bare = pydicom.Dataset()
    for element in container:
        if element.keyword != "ContentSequence":
            bare.add(element)
    bare.ContentSequence = []
    return bare


def _measurement_report(
    context: hd.sr.ObservationContext,
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    images: Sequence[pydicom.Dataset],
) -> hd.sr.MeasurementReport:
    """TID 1500, with a TID 1600 Image Library of *images* when highdicom can describe them.

    The library is optional; its entries for projection radiographs need PatientOrientation
    and ImagerPixelSpacing, which a CR may lack, and the report is worth more than the library.
    Asking first would build the library twice; an error that is not the library's is raised
    again by the second attempt.
    """
    common = {
        "observation_context": context,
        "procedure_reported": _PLAIN_RADIOGRAPHY,
        "imaging_measurements": groups,
    }
    try:
        return hd.sr.MeasurementReport(**common, referenced_images=images)
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return hd.sr.MeasurementReport(**common, referenced_images=None)


def _rounded(value: float, decimals: int = 6) -> float:
    # Six decimals are beyond any meaningful precision of a probability, and keep the DS
    # readable ("0.82", not "0.82000000000000" from a float sum); more only where the study
    # probability would read as its threshold (see shown_decimals).
    return round(float(value), decimals)


def _tracking_uid(result: StudyResult, subject: str) -> str:
    # Without revision or model version: a revision's group tracks the same subject (the study,
    # one view) as the previous revision's, which TID 4108 tracking identifiers are for.
    return derived_uid(result.study_uid, "tracking", subject)


def _view_label(index: int, source: pydicom.Dataset) -> str:
    position = str(source.get("ViewPosition", "") or "").strip()
    return f"view {index} ({position})" if position else f"view {index}"


# The content items below are the same in every report of a model on a device: they are
# built once and the same objects go into every report's content tree (~1.4 of 7 ms per
# 2-view SR). Nothing writes to them: highdicom copies nothing it is given and sets no
# attribute of the items it is handed. Parsing a finished report in memory
# (Comprehensive3DSR.from_dataset, even with copy=True) re-classes its content items in
# place, which leaves these as they are (each is already of the class the parser picks) but
# would turn a FindingSite into a plain CodeContentItem that highdicom then refuses as a
# finding site: finding sites are built for each report. tests/test_sr.py checks that reports
# are the same built with these cached or afresh, parsed in memory or not.


@functools.lru_cache(maxsize=16)
def _algorithm(name: str, version: str, manufacturer: str) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=name,
        version=version,
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=manufacturer,
    )


@functools.lru_cache(maxsize=16)
def _observation_context(
    device_uid: str, device_name: str, model_name: str
) -> hd.sr.ObservationContext:
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=device_name,
            manufacturer_name=MANUFACTURER,
            model_name=model_name,
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def _finding_site(site_code: str, site_meaning: str, laterality: str) -> hd.sr.FindingSite:
    # U (unpaired) and unknown lateralities get no laterality modifier.
    return hd.sr.FindingSite(
        anatomic_location=hd.sr.CodedConcept(site_code, "SCT", site_meaning),
        laterality=_LATERALITY_CODES.get(laterality),
    )


@functools.lru_cache(maxsize=64)
def _threshold_measurement(threshold: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=_THRESHOLD_VALUE, value=threshold, unit=_NO_UNITS)


@functools.lru_cache(maxsize=2)
def _finding(abnormal: bool) -> hd.sr.QualitativeEvaluation:
    return hd.sr.QualitativeEvaluation(
        name=codes.DCM.Finding, value=codes.SCT.Abnormal if abnormal else codes.SCT.Normal
    )


def _group(
    *,
    tracking: tuple[str, str],
    site: hd.sr.FindingSite,
    algorithm: hd.sr.AlgorithmIdentification,
    measurements: list[hd.sr.Measurement],
    finding: hd.sr.QualitativeEvaluation | None,
    comments: list[str],
    images: Sequence[pydicom.Dataset],
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 measurement group, with TID 1501 row-12 TEXT evaluations for comments."""
    label, uid = tracking
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=label),
        algorithm_id=algorithm,
        finding_sites=[site],
        measurements=measurements,
        qualitative_evaluations=[finding] if finding is not None else None,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(
                image, referenced_frame_numbers=scored_frames(image)
            )
            for image in images
        ],
    )
    items = group[0].ContentSequence
    # Comments go after the evaluations and before the source images, as TID 1501 orders them.
    position = len(items) - len(images)
    for offset, text in enumerate(comments):
        items.insert(
            position + offset,
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=text,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        )
    return group
