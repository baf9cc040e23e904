"""The seven MURA study types: names, folder names and SNOMED CT finding-site codes."""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class _TypeInfo:
    display: str
    sct_code: str
    sct_meaning: str


class StudyType(enum.StrEnum):
    """A MURA study type; the value is the MURA folder name (``XR_WRIST``)."""

    ELBOW = "XR_ELBOW"
    FINGER = "XR_FINGER"
    FOREARM = "XR_FOREARM"
    HAND = "XR_HAND"
    HUMERUS = "XR_HUMERUS"
    SHOULDER = "XR_SHOULDER"
    WRIST = "XR_WRIST"

    @property
    def display(self) -> str:
        """A human name ("wrist")."""
        return _INFO[self].display

    @property
    def finding_site(self) -> tuple[str, str]:
        """SNOMED CT (code value, code meaning) of the anatomy, for the SR's finding site."""
        info = _INFO[self]
        return info.sct_code, info.sct_meaning


_INFO = {
    StudyType.ELBOW: _TypeInfo("elbow", "127949000", "Elbow region structure"),
    StudyType.FINGER: _TypeInfo("finger", "7569003", "Finger structure"),
    StudyType.FOREARM: _TypeInfo("forearm", "14975008", "Forearm structure"),
    StudyType.HAND: _TypeInfo("hand", "85562004", "Hand structure"),
    StudyType.HUMERUS: _TypeInfo("humerus", "85050009", "Bone structure of humerus"),
    StudyType.SHOULDER: _TypeInfo("shoulder", "16982005", "Shoulder region structure"),
    StudyType.WRIST: _TypeInfo("wrist", "8205005", "Wrist region structure"),
}
