"""Output UIDs change with whatever changes what an output says, and only with that.

A PACS keeps the first instance it receives under a SOP Instance UID (Orthanc does by
default): an SR rebuilt with another finding under the same UID would leave the stale one on
the worklist. A re-tuned threshold (`triage evaluate --tune-threshold`) or other weights
under an unchanged version must give new UIDs; the same result rebuilt must not.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from triage.dicom.pmap import parametric_map_sop_instance_uid
from triage.dicom.sc import overlay_series_uid, overlay_sop_instance_uid
from triage.dicom.sr import sr_series_uid, sr_sop_instance_uid
from triage.scoring.card import load_card
from triage.scoring.result import ModelInfo, SkippedView, StudyResult, ViewResult
from triage.study_types import StudyType

MODEL = ModelInfo("densenet169-mura", "2026.12.01", True, 0.5, weights="ab" * 32)
STUDY = "1.2.826.0.1.3680043.8.498.77"


def _view(n: int, probability: float = 0.495) -> ViewResult:
    return ViewResult(f"{STUDY}.{n}", probability, np.zeros((7, 7), np.float32))


def _result(
    threshold: float = 0.5,
    revision: int = 1,
    views: tuple[ViewResult, ...] = (_view(1),),
    skipped: tuple[SkippedView, ...] = (),
) -> StudyResult:
    probability = float(np.mean([view.probability for view in views]))
    return StudyResult(STUDY, revision, StudyType.WRIST, probability, threshold, views, skipped)


def _uids(result: StudyResult, model: ModelInfo) -> tuple[str, ...]:
    view = result.views[0]
    return (
        sr_sop_instance_uid(result, model),
        sr_series_uid(result, model),
        overlay_sop_instance_uid(result, model, view),
        overlay_series_uid(result, model),
        parametric_map_sop_instance_uid(result, model, view),
    )


def test_the_same_result_rebuilt_keeps_its_uids() -> None:
    assert _uids(_result(), MODEL) == _uids(_result(), dataclasses.replace(MODEL))
    one, two = _result(views=(_view(1), _view(2, 0.9))), _result(views=(_view(2, 0.9), _view(1)))
    assert sr_sop_instance_uid(one, MODEL) == sr_sop_instance_uid(two, MODEL)
    assert overlay_sop_instance_uid(one, MODEL, _view(1)) == overlay_sop_instance_uid(
        two, MODEL, _view(1)
    )


@pytest.mark.parametrize(
    ("result", "model"),
    [
        pytest.param(_result(threshold=0.4935), MODEL, id="re-tuned threshold"),
        pytest.param(_result(), dataclasses.replace(MODEL, weights="cd" * 32), id="other weights"),
        pytest.param(_result(), dataclasses.replace(MODEL, validated=False), id="not validated"),
        pytest.param(_result(), dataclasses.replace(MODEL, version="2026.12.02"), id="version"),
        pytest.param(_result(revision=2), MODEL, id="revision"),
        # A cancelled study sent one more image and requeued: the same revision, scored again.
        pytest.param(_result(views=(_view(1), _view(2, 0.9))), MODEL, id="another image"),
        pytest.param(
            _result(skipped=(SkippedView(f"{STUDY}.2", "cannot decode"),)),
            MODEL,
            id="an image not scored",
        ),
    ],
)
def test_anything_that_changes_what_the_outputs_say_gives_new_uids(
    result: StudyResult, model: ModelInfo
) -> None:
    before, after = _uids(_result(), MODEL), _uids(result, model)
    assert not set(before) & set(after)


def test_a_cards_weights_name_its_outputs() -> None:
    demo = load_card(Path(__file__).resolve().parents[1] / "models" / "demo" / "card.toml")
    assert demo.info.weights == f"seeded:{demo.seed}"
    other_seed = dataclasses.replace(demo, seed=(demo.seed or 0) + 1)
    assert _uids(_result(), demo.info) != _uids(_result(), other_seed.info)
