"""DICOM UIDs: validation before a UID becomes a path, and deterministic output UIDs."""

from __future__ import annotations

import re
import uuid
from typing import Any

# Digits and dots only, no empty component. Leading zeros inside a component are invalid per
# PS3.5 §9.1 but common in data that PACSes already hold; they are harmless in a path, so they
# are accepted rather than stalling a routing rule.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_NAMESPACE = uuid.UUID("5b7f3f1e-3c55-4a57-9a43-6f1d1b1e7a11")


def is_valid_uid(value: Any) -> bool:
    """True if *value* is a syntactically valid DICOM UID (1–64 characters, digits and dots)."""
    # fullmatch: "$" also matches before a final newline, and "1.2.3\n" became a study (its
    # own row, a spool folder, outputs under a UID the PACS does not hold).
    return isinstance(value, str) and 0 < len(value) <= 64 and _UID.fullmatch(value) is not None


def derived_uid(*parts: object) -> str:
    """A UUID-derived ``2.25.`` UID that is the same every time for the same *parts*.

    Output objects use it (study UID, revision, model version, object kind, view), so a
    delivery repeated after a crash sends the same SOP instances again, never new ones.
    """
    name = "|".join(str(part) for part in parts)
    return f"2.25.{uuid.uuid5(_NAMESPACE, name).int}"
