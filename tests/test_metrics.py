"""Metrics, bootstrap CIs, the operating point and the multi-reader protocol, on hand-made cases."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from triage.study_types import StudyType
from triage.training.evaluate import StudyTable, evaluate_table, tune_thresholds
from triage.training.metrics import (
    auroc,
    binary_metrics,
    bootstrap,
    compare_with_readers,
    majority_vote,
    resample_weights,
    roc_curve,
    study_metrics,
    threshold_for_sensitivity,
)


def test_f1_kappa_sensitivity_specificity_by_hand() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred = np.array([1, 1, 1, 0, 1, 0, 0, 0, 0, 0])
    # TP 3, FN 1, FP 1, TN 5.
    # F1 = 2·3 / (2·3 + 1 + 1) = 0.75
    # κ: observed 8/10; chance = (4/10)(4/10) + (6/10)(6/10) = 0.52; (0.8 − 0.52)/0.48 = 7/12
    m = {k: float(v[0]) for k, v in binary_metrics(y, pred).items()}
    assert m["f1"] == pytest.approx(0.75)
    assert m["kappa"] == pytest.approx(7 / 12)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)


def test_kappa_zero_for_chance_agreement_and_nan_when_undefined() -> None:
    # Both raters say "abnormal" half the time, independently: observed 1/2 = chance 1/2.
    y = np.array([1, 1, 0, 0])
    pred = np.array([1, 0, 1, 0])
    assert float(binary_metrics(y, pred)["kappa"][0]) == pytest.approx(0.0)
    # Everyone says normal: chance agreement is 1, κ undefined; F1 has no positives at all.
    m = binary_metrics(np.zeros(3), np.zeros(3))
    assert math.isnan(float(m["kappa"][0])) and math.isnan(float(m["f1"][0]))


def test_auroc_tiny_cases() -> None:
    # Abnormal 0.35 beats normal 0.1, loses to 0.4; abnormal 0.8 beats both: 3 of 4 pairs.
    assert float(auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])[0]) == pytest.approx(0.75)
    # A tie counts one half.
    assert float(auroc([0, 1], [0.5, 0.5])[0]) == pytest.approx(0.5)
    assert float(auroc([0, 1, 1], [0.2, 0.2, 0.9])[0]) == pytest.approx(0.75)
    assert math.isnan(float(auroc([1, 1], [0.2, 0.3])[0]))


def test_weights_equal_duplicated_studies() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 40)
    s = rng.integers(0, 6, 40) / 5  # many ties
    w = rng.integers(0, 4, 40)
    rep_y, rep_s = np.repeat(y, w), np.repeat(s, w)
    assert float(auroc(y, s, w)[0]) == pytest.approx(float(auroc(rep_y, rep_s)[0]))
    pred = s > 0.5
    weighted = binary_metrics(y, pred, w)
    repeated = binary_metrics(rep_y, np.repeat(pred, w))
    for name in weighted:
        assert float(weighted[name][0]) == pytest.approx(float(repeated[name][0]))


def test_roc_curve_and_operating_point() -> None:
    fpr, tpr, thr = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert tpr.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)
    assert thr[0] == np.inf

    y = np.array([1, 1, 1, 1, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.5, 0.2])
    # 75%: 3 of 4 abnormal; the 3rd highest abnormal score is 0.6, the next lower score 0.5.
    assert threshold_for_sensitivity(y, s, 0.75) == pytest.approx(0.55)
    # 100%: down to 0.3; next lower 0.2 → 0.25 (flags 0.5 too: specificity 1/2).
    t = threshold_for_sensitivity(y, s, 1.0)
    assert t == pytest.approx(0.25)
    m = binary_metrics(y, s > t)
    assert float(m["sensitivity"][0]) == 1.0 and float(m["specificity"][0]) == 0.5
    # 95% of 20 is exactly 19 abnormal studies, not 20 (floating-point 0.95·20 = 19.000…04).
    y20 = np.r_[np.ones(20), np.zeros(5)]
    s20 = np.r_[np.linspace(0.99, 0.60, 20), np.full(5, 0.1)]
    t20 = threshold_for_sensitivity(y20, s20, 0.95)
    assert float(binary_metrics(y20, s20 > t20)["sensitivity"][0]) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        threshold_for_sensitivity(np.zeros(3), np.ones(3), 0.9)


def test_tuned_thresholds_reach_the_target_for_abnormal_studies_scored_near_zero() -> None:
    # A confidently missed abnormal study (5e-7): a sensitivity of 1 needs a threshold below
    # it. A floor of 1e-6 on card thresholds put it above, and the tuned card missed it.
    probs = np.array([0.9, 0.8, 0.7, 5e-7, 0.3, 0.2, 1e-7])
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    table = StudyTable(
        [f"s{i}" for i in range(7)], [StudyType.WRIST] * 7, labels, probs, np.ones(7, np.int64)
    )
    overall, per_type = tune_thresholds(table, 1.0)
    assert overall == pytest.approx(3e-7) and per_type[StudyType.WRIST] == pytest.approx(3e-7)
    report = evaluate_table(table, threshold=overall, thresholds=per_type, n_resamples=0)
    assert report["groups"]["aggregate"]["metrics"]["sensitivity"]["value"] == 1.0
    # Every abnormal study scored 0 (an underflowed sigmoid): no threshold in (0, 1), as
    # cards require, can flag them; the smallest positive one is as close as it gets.
    zero = StudyTable(["a", "b"], [StudyType.WRIST] * 2, np.array([1, 0]), np.zeros(2), np.ones(2))
    low, _ = tune_thresholds(zero, 1.0)
    assert 0.0 < low < 1e-300


def test_resample_weights_are_counts_of_draws() -> None:
    w = resample_weights(7, 50, np.random.default_rng(0))
    assert w.shape == (50, 7) and (w.sum(axis=1) == 7).all()


def test_bootstrap_ci_covers_truth_and_is_seeded() -> None:
    # A population with a known AUROC: normal scores N(0,1), abnormal N(d,1): Φ(d/√2).
    d = 1.0
    true_auc = 0.5 * (1 + math.erf(d / 2))  # Φ(d/√2) = ½(1 + erf(d/2))
    rng = np.random.default_rng(42)
    y = np.r_[np.ones(150), np.zeros(150)]
    s = np.r_[rng.normal(d, 1, 150), rng.normal(0, 1, 150)]
    probs = 1 / (1 + np.exp(-s))
    first = study_metrics(y, probs, 0.5, n_resamples=10_000, seed=7)
    again = study_metrics(y, probs, 0.5, n_resamples=10_000, seed=7)
    other = study_metrics(y, probs, 0.5, n_resamples=10_000, seed=8)
    auc = first["auroc"]
    assert auc.low < true_auc < auc.high
    assert auc.low < auc.value < auc.high
    assert first == again
    assert other["auroc"].low != auc.low
    # The sensitivity of k/n positives has a known spread: binomial, ≈ ±1.96·√(p(1−p)/n).
    sens = first["sensitivity"]
    p = sens.value
    half = 1.96 * math.sqrt(p * (1 - p) / 150)
    assert sens.low == pytest.approx(p - half, abs=0.012)
    assert sens.high == pytest.approx(p + half, abs=0.012)


def test_bootstrap_independent_of_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0])
    s = np.linspace(0, 1, 8)

    def stat(w: np.ndarray) -> dict[str, np.ndarray]:
        return {"auroc": auroc(y, s, w)}

    whole = bootstrap(8, stat, n_resamples=1000, seed=1)["auroc"]
    import triage.training.metrics as metrics

    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 8 * 37)  # 37 resamples per chunk
    chunked = bootstrap(8, stat, n_resamples=1000, seed=1)["auroc"]
    np.testing.assert_array_equal(np.nan_to_num(whole), np.nan_to_num(chunked))


def test_majority_vote_and_ties() -> None:
    labels = np.array([[1, 0, 1], [1, 0, 0], [0, 0, 1]])
    assert majority_vote(labels).tolist() == [1, 0, 1]
    two = np.array([[1, 0], [0, 0]])  # study 0 is a 1–1 tie
    assert majority_vote(two, tie=1).tolist() == [1, 0]
    assert majority_vote(two, tie=0).tolist() == [0, 0]


# Four readers, six studies, and the model, worked by hand:
#
#            s1 s2 s3 s4 s5 s6
#   A         1  1  0  0  1  0
#   B         1  0  0  0  1  1
#   C         1  1  1  1  0  0
#   D         0  1  0  1  1  0
#   model     1  1  0  1  1  0
#
# Ground truths (majority of the three other readers; s4 is a 2–2 split, so it depends on who
# is left out):
#   maj(B,C,D) = 1 1 0 1 1 0      maj(A,C,D) = 1 1 0 1 1 0
#   maj(A,B,D) = 1 1 0 0 1 0      maj(A,B,C) = 1 1 0 0 1 0
#
# Readers against the others' majority:
#   A: TP3 FN1 FP0 TN2 → F1 6/7; κ: po 5/6, pe (3/6)(4/6)+(3/6)(2/6) = 1/2 → 2/3
#   B: TP2 FN2 FP1 TN1 → F1 4/7; κ: po 1/2, pe 1/2 → 0
#   C: TP2 FN1 FP2 TN1 → F1 4/7; κ: po 1/2, pe (4/6)(3/6)+(2/6)(3/6) = 1/2 → 0
#   D: TP2 FN1 FP1 TN2 → F1 2/3; κ: po 2/3, pe 1/2 → 1/3
#   mean F1 (6/7 + 4/7 + 4/7 + 2/3)/4 = 2/3; mean κ (2/3 + 0 + 0 + 1/3)/4 = 1/4
# The model against each group's majority:
#   B+C+D, A+C+D: identical → F1 1, κ 1
#   A+B+D, A+B+C: TP3 FP1 FN0 TN2 → F1 6/7; κ: po 5/6, pe (4/6)(3/6)+(2/6)(3/6) = 1/2 → 2/3
#   mean F1 (1 + 1 + 6/7 + 6/7)/4 = 13/14; mean κ (1 + 1 + 2/3 + 2/3)/4 = 5/6
# Model − readers: F1 13/14 − 2/3 = 11/42; κ 5/6 − 1/4 = 7/12.
READERS = {
    "A": [1, 1, 0, 0, 1, 0],
    "B": [1, 0, 0, 0, 1, 1],
    "C": [1, 1, 1, 1, 0, 0],
    "D": [0, 1, 0, 1, 1, 0],
}
MODEL = [1, 1, 0, 1, 1, 0]


def test_reader_protocol_by_hand() -> None:
    result = compare_with_readers(
        {k: np.array(v) for k, v in READERS.items()}, np.array(MODEL), n_resamples=2000, seed=0
    )
    f1, kappa = result.reader_scores["f1"], result.reader_scores["kappa"]
    assert f1 == pytest.approx({"A": 6 / 7, "B": 4 / 7, "C": 4 / 7, "D": 2 / 3})
    assert kappa == pytest.approx({"A": 2 / 3, "B": 0.0, "C": 0.0, "D": 1 / 3})
    assert result.model_scores["f1"] == pytest.approx(
        {"B+C+D": 1.0, "A+C+D": 1.0, "A+B+D": 6 / 7, "A+B+C": 6 / 7}
    )
    assert result.model_scores["kappa"] == pytest.approx(
        {"B+C+D": 1.0, "A+C+D": 1.0, "A+B+D": 2 / 3, "A+B+C": 2 / 3}
    )
    assert result.reader_mean["f1"].value == pytest.approx(2 / 3)
    assert result.model_mean["f1"].value == pytest.approx(13 / 14)
    assert result.difference["f1"].value == pytest.approx(11 / 42)
    assert result.reader_mean["kappa"].value == pytest.approx(1 / 4)
    assert result.model_mean["kappa"].value == pytest.approx(5 / 6)
    assert result.difference["kappa"].value == pytest.approx(7 / 12)
    # Odd groups (three readers): no ties.
    assert result.tied_studies == 0
    diff = result.difference["f1"]
    assert diff.low <= diff.value <= diff.high
    # Seeded: the same call gives the same intervals.
    again = compare_with_readers(
        {k: np.array(v) for k, v in READERS.items()}, np.array(MODEL), n_resamples=2000, seed=0
    )
    assert again.difference == result.difference


def test_reader_protocol_counts_ties_with_even_groups() -> None:
    three = {k: np.array(v) for k, v in list(READERS.items())[:3]}
    result = compare_with_readers(three, np.array(MODEL), n_resamples=0)
    # Groups of two: A/B disagree on s2 and s6, A/C on s3, s4, s5, B/C on s2, s3, s4, s5, s6.
    assert result.tied_studies == 5
    with pytest.raises(ValueError):
        compare_with_readers({"A": np.ones(3), "B": np.ones(3)}, np.ones(3))


def test_reader_comparison_with_an_undefined_score_is_valid_json() -> None:
    # Three normal studies that every reader calls normal: F1 and kappa are undefined.
    readers = [(name, np.zeros(3, dtype=int)) for name in ("a", "b", "c")]
    result = compare_with_readers(readers, np.zeros(3, dtype=bool), n_resamples=5)
    out = json.loads(json.dumps(result.as_dict(), allow_nan=False))
    assert out["reader_scores"]["f1"] == {"a": None, "b": None, "c": None}
    assert set(out["model_scores"]["kappa"].values()) == {None}
