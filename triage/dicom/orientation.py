"""A source image's PatientOrientation (0020,0020), read once for every output that uses it."""

from __future__ import annotations

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
