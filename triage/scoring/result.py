"""What scoring produces, shared by the worker, the store and the SR/SC builders."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from triage import MANUFACTURER, __version__
from triage.study_types import StudyType


@dataclass(frozen=True)
class ModelInfo:
    """The model that produced a result (from its model card)."""

    name: str
    version: str
    validated: bool
    #: Operating point: a study is abnormal if its probability is > threshold.
    threshold: float = 0.5
    manufacturer: str = MANUFACTURER
    #: Which weights: their SHA-256, or how a weightless card initialises them ("seeded:0").
    weights: str = ""


def shown_decimals(probability: float, threshold: float, at_least: int) -> int:
    """How many decimals to write a probability and its threshold with: *at_least*, or more
    where fewer would round them onto the same value or the wrong way round ("p 0.50,
    threshold 0.50: abnormal")."""
    above = probability > threshold
    for decimals in range(at_least, 16):
        if (round(probability, decimals) > round(threshold, decimals)) == above:
            return decimals
    return 16


@dataclass(frozen=True)
class ViewResult:
    """One scored view (a source image)."""

    sop_instance_uid: str
    probability: float
    #: Class activation map on the model's feature grid (e.g. 7×7 for 224² input), float32,
    #: in logit units: its spatial mean plus the classifier bias is the view's logit.
    cam: np.ndarray
    #: How the pixels were interpreted when that was a choice ("first of 3 frames", …).
    note: str = ""
    #: The view's logit as the model gave it (None: recovered from the probability, which
    #: float32 rounds to 0 or 1 beyond about ±16).
    logit: float | None = None


@dataclass(frozen=True)
class SkippedView:
    """A view that was not scored, with the reason (undecodable, not a radiograph …)."""

    sop_instance_uid: str
    reason: str


@dataclass(frozen=True)
class StudyResult:
    """One scored study revision: mean of the view probabilities vs the card's threshold."""

    study_uid: str
    revision: int
    study_type: StudyType
    probability: float
    threshold: float
    views: tuple[ViewResult, ...]
    skipped_views: tuple[SkippedView, ...] = field(default=())

    @property
    def abnormal(self) -> bool:
        """The finding: abnormal when the study probability is above the threshold."""
        return self.probability > self.threshold


def output_identity(result: StudyResult, model: ModelInfo) -> str:
    """What a result's output UIDs derive from besides its study and revision.

    Everything that can change what the SR and overlays say: the model (name, version, its
    weights, validated or not), the study's operating threshold, this software's version
    (preprocessing) and the images the result covers, scored or not (the study probability
    is their mean; a study cancelled, sent more images and requeued is scored again at the
    same revision). The same result built again after a crash gets the same UIDs, so a
    repeated delivery sends the same instances; a re-tuned threshold, other weights under an
    unchanged version, an upgrade or other images get new ones. A PACS keeps the first
    instance it gets under a UID (Orthanc does by default): reused UIDs would keep the stale
    finding there.
    """
    return "|".join(
        (
            model.name,
            model.version,
            model.weights,
            "validated" if model.validated else "not validated",
            repr(float(result.threshold)),
            f"msk-triage {__version__}",
            "scored " + ",".join(sorted(view.sop_instance_uid for view in result.views)),
            "not scored " + ",".join(sorted(v.sop_instance_uid for v in result.skipped_views)),
        )
    )
