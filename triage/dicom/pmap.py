"""The raw class activation map of a view as a DICOM Parametric Map (optional output).

For viewers that overlay parametric maps themselves (with their own colour and opacity
controls), the CAM is stored as float32 values at the source's Rows × Columns: a radiograph
has no Frame of Reference, so the map registers to its source by having the same pixel matrix
(and by its Derivation Image reference). It is upsampled bilinearly, so every value lies
within the range of the model's own grid values; no threshold or sigmoid is applied.

The Parametric Map IOD nevertheless requires a Frame of Reference and plane geometry, so each
map gets a frame of reference of its own that nothing else shares (see
:func:`_with_own_frame_of_reference`), and hence a series of its own: all images of a series
share one frame of reference, and views of one study must not appear spatially related.

Two real-world value mappings describe the same stored values:

- ``CAM``: the class activation (DCM 130402) itself, in logit units, identity mapping;
- ``LOCAL LOGIT``: CAM plus the classifier bias (intercept), the logit the model would give if
  the whole image looked like that spot (see :mod:`triage.dicom.sc`).
"""

from __future__ import annotations

import datetime

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from triage.dicom.geometry import patient_orientation, pixel_spacing
from triage.dicom.sc import classifier_bias, set_series_laterality, upsample
from triage.dicom.source_header import declare_character_set, fitted_text, header_for_outputs
from triage.dicom.sr import MANUFACTURER, laterality_of, series_description, software_versions
from triage.scoring.result import ModelInfo, StudyResult, ViewResult, output_identity
from triage.uids import derived_uid

#: Series number of the parametric maps (the SR is 9900, the overlays 9901).
PM_SERIES_NUMBER = 9902

# Patient directions (LPS) of PatientOrientation letters.
_DIRECTIONS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def has_one_frame(source: pydicom.Dataset) -> bool:
    """Whether a parametric map can be made for *source*: a multi-frame source would need one
    map frame per frame, and only its first is scored."""
    try:
        return int(source.get("NumberOfFrames", 1) or 1) == 1
    except (TypeError, ValueError):
        return False


def parametric_map_series_uid(result: StudyResult, model: ModelInfo, view: ViewResult) -> str:
    """SeriesInstanceUID of the parametric map of *view* (one series per map, see above)."""
    return derived_uid(
        result.study_uid,
        result.revision,
        output_identity(result, model),
        "pm",
        "series",
        view.sop_instance_uid,
    )


def parametric_map_sop_instance_uid(result: StudyResult, model: ModelInfo, view: ViewResult) -> str:
    """SOPInstanceUID of the parametric map of *view* (the same on every rebuild)."""
    return derived_uid(
        result.study_uid,
        result.revision,
        output_identity(result, model),
        "pm",
        view.sop_instance_uid,
    )


def build_parametric_map(
    source: pydicom.Dataset,
    view: ViewResult,
    result: StudyResult,
    model: ModelInfo,
    *,
    device_uid: str | None = None,
    series_number: int = PM_SERIES_NUMBER,
    created: datetime.datetime | None = None,
) -> hd.pm.ParametricMap:
    """The CAM of one view as a single-frame float Parametric Map of the source's size.

    *source* needs its header only (Rows, Columns, UIDs, patient and study). *device_uid*
    becomes the DeviceSerialNumber. ContentQualification is PRODUCT for a validated model and
    RESEARCH otherwise.
    """
    if str(source.SOPInstanceUID) != view.sop_instance_uid:
        raise ValueError("source and view are different images")
    if str(source.StudyInstanceUID) != result.study_uid:
        raise ValueError(f"source is not in study {result.study_uid}")
    if not has_one_frame(source):
        raise ValueError("parametric maps are made for single-frame sources only")

    cam = np.asarray(view.cam, dtype=np.float32)
    bias = classifier_bias(view)
    values = upsample(cam, int(source.Rows), int(source.Columns), smooth=False)
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-6:
        high = low + 1e-3  # a flat map still needs a non-empty range and window

    laterality = laterality_of(source)
    series_laterality = laterality if laterality in ("R", "L") else ""
    created = created or datetime.datetime.now()
    description = series_description("CAM", result, model)
    if series_laterality:
        description = f"{description} {series_laterality}"[:64]

    mappings = [
        hd.pm.RealWorldValueMapping(
            lut_label="CAM",
            lut_explanation="Class activation map, logit units",
            unit=codes.UCUM.NoUnits,
            value_range=(low, high),
            slope=1.0,
            intercept=0.0,
            quantity_definition=codes.DCM.ClassActivation,
        ),
        hd.pm.RealWorldValueMapping(
            lut_label="LOCAL LOGIT",
            lut_explanation="CAM plus classifier bias: local logit",
            unit=codes.UCUM.NoUnits,
            value_range=(low, high),
            slope=1.0,
            intercept=bias,
        ),
    ]
    # The patient and study come from a repaired copy of the header (see build_sr).
    header = header_for_outputs(source, also=(model.name, model.version, description))
    pm = hd.pm.ParametricMap(
        source_images=[_with_own_frame_of_reference(header, result, model, view)],
        pixel_array=values,
        series_instance_uid=parametric_map_series_uid(result, model, view),
        series_number=series_number,
        sop_instance_uid=parametric_map_sop_instance_uid(result, model, view),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="msk-triage",
        software_versions=software_versions(model, header),
        device_serial_number=(device_uid or MANUFACTURER)[:64],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=mappings,
        voi_lut_transformations=[
            # LINEAR_EXACT: a CAM's range is often narrower than 1, which plain LINEAR forbids.
            hd.VOILUTTransformation(
                window_center=(low + high) / 2,
                window_width=high - low,
                voi_lut_function=hd.VOILUTFunctionValues.LINEAR_EXACT,
            )
        ],
        content_label="CAM",
        content_description=fitted_text(
            f"Class activation map of {model.name} {model.version}", header, "LO"
        ),
        content_qualification=(
            hd.ContentQualificationValues.PRODUCT
            if model.validated
            else hd.ContentQualificationValues.RESEARCH
        ),
        series_description=description,
        content_date=created.date(),
        content_time=created.time(),
        # Declared below, once the text it must encode is all there.
        specific_character_set=None,
    )
    set_series_laterality(pm, laterality)
    declare_character_set(pm, header)
    return pm


def _with_own_frame_of_reference(
    source: pydicom.Dataset, result: StudyResult, model: ModelInfo, view: ViewResult
) -> pydicom.Dataset:
    """The source's header with a Frame of Reference of the map's own (pixel data left out).

    The Parametric Map IOD requires a Frame of Reference and plane geometry, which a
    projection radiograph does not have. The map gets a new frame of reference that nothing
    else shares, so it claims no spatial relation to any other object: it registers to its
    source by the identical pixel matrix and its Derivation Image reference. Within it the
    plane lies at the origin, oriented as the source's PatientOrientation says where that is
    unambiguous, with the source's (imager) pixel spacing.
    """
    header = pydicom.Dataset()
    for element in source:
        if element.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            header.add(element)
    header.FrameOfReferenceUID = derived_uid(
        result.study_uid,
        result.revision,
        output_identity(result, model),
        "pm",
        "frame",
        view.sop_instance_uid,
    )
    header.PositionReferenceIndicator = None
    header.ImagePositionPatient = [0.0, 0.0, 0.0]
    header.ImageOrientationPatient = list(_orientation(source))
    header.PixelSpacing = _spacing(source)
    header.SliceThickness = 1.0
    return header


def _spacing(source: pydicom.Dataset) -> list[float]:
    """The (imager) pixel spacing, or 1 mm where neither is two positive numbers."""
    return list(pixel_spacing(source) or (1.0, 1.0))


def _orientation(source: pydicom.Dataset) -> tuple[float, ...]:
    """Row and column direction cosines from PatientOrientation's dominant letters."""
    directions = patient_orientation(source)
    if directions is not None:
        row, column = _DIRECTIONS[directions[0][0]], _DIRECTIONS[directions[1][0]]
        if sum(a * b for a, b in zip(row, column, strict=True)) == 0.0:
            return (*row, *column)
    return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
