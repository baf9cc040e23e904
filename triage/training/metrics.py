"""Study-level metrics, seeded bootstrap confidence intervals and the multi-reader protocol.

Every metric here is written for *weighted* samples: a weight matrix ``w`` of shape
``(B, n)`` scores B weightings of the same n studies at once. The point estimate is the
all-ones weighting; a bootstrap resample is the weighting by how many times each study was
drawn. That turns 10,000 resamples into a few matrix products instead of a Python loop, and
the same code computes the estimate and its confidence interval, so they cannot disagree.

Conventions (those of the MURA paper and the daemon): label 1 = abnormal; a study is predicted
abnormal when its probability is ``> threshold``; metrics that are undefined on a sample (F1
with no positives at all, AUROC with one class only, κ when chance agreement is 1) are NaN
and bootstrap percentiles ignore them (the count of such resamples is reported).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

#: The paper's number of bootstrap resamples.
DEFAULT_RESAMPLES = 10_000
#: Elements of the (resamples × studies) weight matrix built at once; bounds memory (~64 MB).
_CHUNK_ELEMENTS = 8_000_000

BINARY_METRICS = ("f1", "kappa", "sensitivity", "specificity")


def _as_weights(w: np.ndarray | None, n: int) -> np.ndarray:
    if w is None:
        return np.ones((1, n))
    w = np.asarray(w, dtype=np.float64)
    return w[None, :] if w.ndim == 1 else w


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def confusion(
    y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Weighted (TP, FP, FN, TN), each of shape ``(B,)``.

    ``y`` and ``pred`` are 0/1 arrays of length n (1 = abnormal); ``w`` is ``(n,)``, ``(B, n)``
    or None (every study counted once).
    """
    y = np.asarray(y).astype(bool)
    pred = np.asarray(pred).astype(bool)
    w = _as_weights(w, y.size)
    tp = w @ (y & pred).astype(np.float64)
    fp = w @ (~y & pred).astype(np.float64)
    fn = w @ (y & ~pred).astype(np.float64)
    tn = w @ (~y & ~pred).astype(np.float64)
    return tp, fp, fn, tn


def binary_metrics(
    y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """F1, Cohen's κ, sensitivity and specificity of binary predictions, each ``(B,)``."""
    tp, fp, fn, tn = confusion(y, pred, w)
    n = tp + fp + fn + tn
    observed = _div(tp + tn, n)
    # Chance agreement: both say abnormal by chance + both say normal by chance.
    chance = _div((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn), n * n)
    return {
        "f1": _div(2 * tp, 2 * tp + fp + fn),
        "kappa": _div(observed - chance, 1.0 - chance),
        "sensitivity": _div(tp, tp + fn),
        "specificity": _div(tn, tn + fp),
    }


def auroc(y: np.ndarray, scores: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Area under the ROC curve (Mann–Whitney, ties count one half), shape ``(B,)``.

    With weights the area is Σ w_i w_j [s_i > s_j] over abnormal i and normal j (ties ½),
    divided by (Σ w_abnormal)(Σ w_normal): exactly the AUROC of the resample the weights
    describe. Scores are sorted once; every weighting costs O(n).
    """
    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    w = _as_weights(w, y.size)
    order = np.argsort(scores, kind="stable")
    s_sorted = scores[order]
    pos = y[order].astype(np.float64)
    w_sorted = w[:, order]
    neg_w = w_sorted * (1.0 - pos)
    pos_w = w_sorted * pos
    cum_neg = np.cumsum(neg_w, axis=1)
    # Tie groups: every study sees the normals strictly below its group, and half of those in it.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    ends = np.r_[starts[1:], s_sorted.size] - 1
    group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, s_sorted.size]))
    below_group = cum_neg[:, starts] - neg_w[:, starts]
    in_group = cum_neg[:, ends] - below_group
    credit = below_group[:, group] + 0.5 * in_group[:, group]
    num = np.sum(pos_w * credit, axis=1)
    return _div(num, pos_w.sum(axis=1) * neg_w.sum(axis=1))


def roc_curve(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate, threshold) from (0, 0) to (1, 1).

    Point k is the rule ``score >= thresholds[k]``; the first point (threshold +inf) predicts
    nothing abnormal.
    """
    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    tps = np.cumsum(y[order])
    fps = np.cumsum(~y[order])
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tps, fps, thr = tps[last_of_tie], fps[last_of_tie], s[last_of_tie]
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr, np.r_[np.inf, thr]


def threshold_for_sensitivity(y: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The operating point: the highest threshold whose rule ``score > t`` reaches ``target``.

    With the k-th highest abnormal score s_k (k = ⌈target·P⌉), every t just below s_k flags k
    abnormal studies; the highest such t flags the fewest normals. The midpoint between s_k and
    the next lower score (of either class) is returned rather than a hair below s_k, so a new
    study scoring like s_k is not decided by rounding. Raises ValueError without abnormal studies.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y = np.asarray(y).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.sort(scores[y])[::-1]
    if positives.size == 0:
        raise ValueError("no abnormal studies: sensitivity is undefined")
    # The small epsilon keeps 0.95·20 = 19 from becoming 20 through floating-point error.
    k = int(np.ceil(target * positives.size - 1e-9))
    s_k = positives[max(k, 1) - 1]
    lower = scores[scores < s_k]
    if lower.size == 0:
        return float(np.nextafter(s_k, -np.inf))
    return float((s_k + lower.max()) / 2.0)


# --------------------------------------------------------------------------------------------
# Bootstrap


def resample_weights(n: int, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``(n_resamples, n)`` counts: how often each of n items is drawn in each resample of n."""
    idx = rng.integers(0, n, size=(n_resamples, n))
    offsets = (np.arange(n_resamples) * n)[:, None]
    return np.bincount((idx + offsets).ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def bootstrap(
    n: int,
    statistic: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Evaluate ``statistic(weights)`` on ``n_resamples`` resamples with replacement of n items.

    ``statistic`` takes a ``(B, n)`` weight matrix and returns named ``(B,)`` arrays. Resamples
    are drawn in chunks (bounded memory) from one seeded generator, so the result depends only
    on (n, n_resamples, seed).
    """
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    parts: dict[str, list[np.ndarray]] = {}
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        for name, values in statistic(resample_weights(n, b, rng)).items():
            parts.setdefault(name, []).append(np.asarray(values, dtype=np.float64))
        done += b
    return {name: np.concatenate(values) for name, values in parts.items()}


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its 95% percentile-bootstrap interval."""

    value: float
    low: float
    high: float
    #: Resamples on which the metric was undefined (excluded from the percentiles).
    undefined: int = 0

    def as_dict(self) -> dict[str, float | int | list[float] | None]:
        """JSON-friendly form (NaN → None)."""
        return {
            "value": _json_float(self.value),
            "ci95": [_json_float(self.low), _json_float(self.high)],
            "undefined_resamples": self.undefined,
        }


def _json_float(x: float) -> float | None:
    return None if not np.isfinite(x) else float(x)


def percentile_ci(point: float, samples: np.ndarray) -> Estimate:
    """The 2.5th and 97.5th percentiles of the defined bootstrap samples."""
    defined = samples[np.isfinite(samples)]
    if defined.size == 0:
        return Estimate(float(point), float("nan"), float("nan"), int(samples.size))
    low, high = np.percentile(defined, [2.5, 97.5])
    return Estimate(float(point), float(low), float(high), int(samples.size - defined.size))


def study_metrics(
    y: np.ndarray,
    probs: np.ndarray,
    thresholds: float | np.ndarray,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Estimate]:
    """AUROC, F1, κ, sensitivity and specificity with bootstrap CIs over studies.

    ``thresholds`` is one number or one per study (per-type operating points); a study is
    abnormal when ``prob > threshold``.
    """
    y = np.asarray(y).astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs > np.asarray(thresholds, dtype=np.float64)

    def statistic(w: np.ndarray | None) -> dict[str, np.ndarray]:
        return {"auroc": auroc(y, probs, w), **binary_metrics(y, pred, w)}

    point = {name: float(v[0]) for name, v in statistic(None).items()}
    if n_resamples <= 0:
        return {name: Estimate(v, float("nan"), float("nan")) for name, v in point.items()}
    samples = bootstrap(y.size, statistic, n_resamples=n_resamples, seed=seed)
    return {name: percentile_ci(point[name], samples[name]) for name in point}


# --------------------------------------------------------------------------------------------
# Multi-reader protocol (MURA paper, section 4.2)


def majority_vote(labels: np.ndarray, tie: int = 1) -> np.ndarray:
    """Per-study majority of readers' 0/1 labels, ``labels`` shaped (readers, studies).

    A tie (possible only with an even number of readers) resolves to ``tie``; with the paper's
    six readers every group has five and ties cannot happen.
    """
    labels = np.asarray(labels)
    votes = labels.sum(axis=0) * 2
    return np.where(votes > labels.shape[0], 1, np.where(votes < labels.shape[0], 0, tie))


@dataclass(frozen=True)
class ReaderComparison:
    """Readers vs model under the leave-one-reader-out majority protocol."""

    readers: tuple[str, ...]
    #: Per metric ("f1", "kappa"): each reader's value against the majority of the others.
    reader_scores: dict[str, dict[str, float]]
    #: Per metric: the model's value against the majority of each group (keyed "A+B+…").
    model_scores: dict[str, dict[str, float]]
    #: Per metric: mean over readers, mean over groups, and model − readers, with CIs.
    reader_mean: dict[str, Estimate]
    model_mean: dict[str, Estimate]
    difference: dict[str, Estimate]
    #: Studies whose ground truth for some group was a tie, resolved to ``tie``.
    tied_studies: int
    n_studies: int

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "readers": list(self.readers),
            "n_studies": self.n_studies,
            "tied_studies": self.tied_studies,
            # NaN (F1 or kappa undefined on a group) → None, as in Estimate.as_dict.
            "reader_scores": _json_scores(self.reader_scores),
            "model_scores": _json_scores(self.model_scores),
            "reader_mean": {k: v.as_dict() for k, v in self.reader_mean.items()},
            "model_mean": {k: v.as_dict() for k, v in self.model_mean.items()},
            "model_minus_readers": {k: v.as_dict() for k, v in self.difference.items()},
        }


def _json_scores(scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    return {m: {k: _json_float(v) for k, v in by.items()} for m, by in scores.items()}


def compare_with_readers(
    reader_labels: Mapping[str, np.ndarray] | Sequence[tuple[str, np.ndarray]],
    model_pred: np.ndarray,
    *,
    metrics: Sequence[str] = ("f1", "kappa"),
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    tie: int = 1,
) -> ReaderComparison:
    """The paper's protocol for R readers on the same studies.

    Each reader is scored against the majority vote of the other R−1 readers. The model is
    scored against the majority of every group of R−1 readers (the same R groups). The summary
    is the mean over the R readers and the mean over the R groups; the CIs of both means and of
    their difference come from the same bootstrap resamples of the studies.
    """
    items = list(reader_labels.items() if isinstance(reader_labels, Mapping) else reader_labels)
    if len(items) < 3:
        raise ValueError("the protocol needs at least three readers (two per majority group)")
    names = tuple(name for name, _ in items)
    labels = np.stack([np.asarray(v).astype(int) for _, v in items])
    model_pred = np.asarray(model_pred).astype(bool)
    r, n = labels.shape
    if model_pred.shape != (n,):
        raise ValueError("model predictions and reader labels cover different studies")

    groups = list(itertools.combinations(range(r), r - 1))
    truths = [majority_vote(labels[list(g)], tie=tie).astype(bool) for g in groups]
    tied = np.zeros(n, dtype=bool)
    for g in groups:
        if len(g) % 2 == 0:
            tied |= labels[list(g)].sum(axis=0) * 2 == len(g)
    # The reader left out of group g is the one it is compared with.
    left_out = [next(i for i in range(r) if i not in g) for g in groups]

    def statistic(w: np.ndarray | None) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for gi, truth in enumerate(truths):
            reader = binary_metrics(truth, labels[left_out[gi]].astype(bool), w)
            model = binary_metrics(truth, model_pred, w)
            for m in metrics:
                out[f"reader:{gi}:{m}"] = reader[m]
                out[f"model:{gi}:{m}"] = model[m]
        for m in metrics:
            out[f"reader_mean:{m}"] = np.mean([out[f"reader:{g}:{m}"] for g in range(r)], axis=0)
            out[f"model_mean:{m}"] = np.mean([out[f"model:{g}:{m}"] for g in range(r)], axis=0)
            out[f"diff:{m}"] = out[f"model_mean:{m}"] - out[f"reader_mean:{m}"]
        return out

    point = {k: float(v[0]) for k, v in statistic(None).items()}
    samples = bootstrap(n, statistic, n_resamples=n_resamples, seed=seed) if n_resamples > 0 else {}

    def est(key: str) -> Estimate:
        if not samples:
            return Estimate(point[key], float("nan"), float("nan"))
        return percentile_ci(point[key], samples[key])

    group_names = ["+".join(names[i] for i in g) for g in groups]
    return ReaderComparison(
        readers=names,
        reader_scores={
            m: {names[left_out[g]]: point[f"reader:{g}:{m}"] for g in range(r)} for m in metrics
        },
        model_scores={
            m: {group_names[g]: point[f"model:{g}:{m}"] for g in range(r)} for m in metrics
        },
        reader_mean={m: est(f"reader_mean:{m}") for m in metrics},
        model_mean={m: est(f"model_mean:{m}") for m in metrics},
        difference={m: est(f"diff:{m}") for m in metrics},
        tied_studies=int(tied.sum()),
        n_studies=n,
    )
