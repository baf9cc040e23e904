"""A source image's geometry as the outputs read it: PatientOrientation (0020,0020), pixel
spacing and pixel aspect ratio; read once here for the overlay and the parametric map."""

from __future__ import annotations

import math
from fractions import Fraction

import pydicom

#: PS3.3 C.7.6.1.1.1: anterior, posterior, right, left, head, foot.
DIRECTION_LETTERS = frozenset("APRLHF")


def patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    """The (row, column) directions of *source*, upper-cased, when PatientOrientation is two
    values made of direction letters ("A", "FL" …); None when it is absent or anything else
    (such values cannot be copied into a valid output, nor trusted for geometry)."""
    values = [str(v).strip().upper() for v in (source.get("PatientOrientation") or [])]
    if len(values) == 2 and all(v and set(v) <= DIRECTION_LETTERS for v in values):
        return values[0], values[1]
    return None


def _positive_pair(source: pydicom.Dataset, keyword: str) -> tuple[float, float] | None:
    try:
        values = [float(value) for value in source.get(keyword) or []]
    except (TypeError, ValueError):
        return None
    if len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values):
        return values[0], values[1]
    return None


def pixel_spacing(source: pydicom.Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm: PixelSpacing, else ImagerPixelSpacing, where it is two
    positive numbers; None otherwise."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        spacing = _positive_pair(source, keyword)
        if spacing is not None:
            return spacing
    return None


def pixel_aspect_ratio(source: pydicom.Dataset) -> tuple[int, int] | None:
    """The (vertical, horizontal) size ratio of *source*'s pixels as two integers, from its
    spacing, else its PixelAspectRatio; None when the pixels are square (or it is unknown).

    An output resampled by the same factor along both axes keeps this ratio: without it, a
    viewer that honours the source's spacing shows the source and its overlay at different
    aspects.
    """
    spacing = pixel_spacing(source) or _positive_pair(source, "PixelAspectRatio")
    if spacing is None:
        return None
    ratio = Fraction(spacing[0] / spacing[1]).limit_denominator(1000)
    if ratio == 1:
        return None
    return ratio.numerator, ratio.denominator


def scored_frames(source: pydicom.Dataset) -> list[int] | None:
    """The frames of *source* a result derives from, for a reference that must name them:
    ``[1]`` for a multi-frame image (a view is scored on its first frame), ``None`` for a
    single-frame one (PS3.3 Table 10-3: Referenced Frame Number is required when the
    referenced image has several frames and the reference does not apply to all of them).

    Multi-frame means an image of a multi-frame IOD (a Multi-frame Grayscale Word SC added
    to ``extra_sop_classes``) with more than one frame; a CR or DX that says it has several
    is scored on its first frame too, but its IOD has no frames to name (highdicom refuses
    a frame number for it, and the reference is left whole).
    """
    from triage.dicom.iod_lookup import is_attribute_in_iod

    try:
        frames = int(source.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return None
    if frames <= 1 or not is_attribute_in_iod("NumberOfFrames", str(source.SOPClassUID)):
        return None
    return [1]
