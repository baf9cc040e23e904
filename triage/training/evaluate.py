"""Study-level evaluation of a model, as the daemon scores: per study type and in aggregate.

A study's probability is the mean of its views' probabilities; it is abnormal when that is
``> threshold`` (the card's, per study type where the card tunes one). Each group gets AUROC,
F1, Cohen's κ, sensitivity and specificity with 95% bootstrap CIs (10,000 seeded resamples of
the group's studies, as in the MURA paper). With several readers' labels, the paper's
reader-vs-model protocol (:func:`triage.training.metrics.compare_with_readers`) runs on the
studies they read.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.study_types import StudyType
from triage.training.data import DataError, View, normalise_study_key, studies_of
from triage.training.metrics import (
    DEFAULT_RESAMPLES,
    compare_with_readers,
    roc_curve,
    study_metrics,
    threshold_for_sensitivity,
)

AGGREGATE = "aggregate"
METRICS = ("auroc", "f1", "kappa", "sensitivity", "specificity")
#: Card thresholds must be strictly inside (0, 1): the nearest such numbers to 0 and to 1.
_THRESHOLD_FLOOR = float(np.nextafter(0.0, 1.0))
_THRESHOLD_CEILING = float(np.nextafter(1.0, 0.0))
#: The suffix :func:`operating_point_version` appends, e.g. ``+t0.4935.3fa9c1``.
_OPERATING_POINT_SUFFIX = re.compile(r"\+t[0-9.]+\.[0-9a-f]{6}$")


@dataclass(frozen=True)
class StudyTable:
    """One row per study: id, type, label (1 = abnormal), probability, number of views."""

    study_ids: list[str]
    study_types: list[StudyType]
    labels: np.ndarray
    probs: np.ndarray
    n_views: np.ndarray

    def __len__(self) -> int:
        return len(self.study_ids)

    def subset(self, mask: np.ndarray) -> StudyTable:
        """The rows where ``mask`` is true."""
        idx = np.flatnonzero(mask)
        return StudyTable(
            [self.study_ids[i] for i in idx],
            [self.study_types[i] for i in idx],
            self.labels[idx],
            self.probs[idx],
            self.n_views[idx],
        )

    def of_type(self, study_type: StudyType) -> StudyTable:
        """The studies of one type."""
        return self.subset(np.array([t == study_type for t in self.study_types], dtype=bool))

    def types(self) -> list[StudyType]:
        """The study types present, in enum order."""
        present = set(self.study_types)
        return [t for t in StudyType if t in present]


def study_table(views: Sequence[View], view_probs: np.ndarray) -> StudyTable:
    """Average view probabilities into study probabilities (the daemon's rule)."""
    view_probs = np.asarray(view_probs, dtype=np.float64)
    if view_probs.shape != (len(views),):
        raise ValueError("one probability per view is needed")
    groups = studies_of(views)
    ids = list(groups)
    return StudyTable(
        study_ids=ids,
        study_types=[views[groups[s][0]].study_type for s in ids],
        labels=np.array([views[groups[s][0]].label for s in ids], dtype=np.int64),
        probs=np.array([view_probs[groups[s]].mean() for s in ids], dtype=np.float64),
        n_views=np.array([len(groups[s]) for s in ids], dtype=np.int64),
    )


def per_study_thresholds(
    table: StudyTable, threshold: float, thresholds: Mapping[StudyType, float] | None
) -> np.ndarray:
    """Each study's operating threshold: its type's if tuned, else the global one."""
    thresholds = thresholds or {}
    return np.array([thresholds.get(t, threshold) for t in table.study_types], dtype=np.float64)


def tune_thresholds(
    table: StudyTable, target_sensitivity: float
) -> tuple[float, dict[StudyType, float]]:
    """Thresholds reaching ``target_sensitivity`` on ``table``: global, and per study type.

    A type without abnormal studies gets no threshold of its own (it falls back to the
    global one). Thresholds are kept inside (0, 1) as model cards require.
    """

    def clamp(t: float) -> float:
        # Only a threshold outside (0, 1) is moved, and only just inside: a floor such as 1e-6
        # put the threshold above an abnormal study scored 5e-7, which was then missed and the
        # card's operating point fell short of the sensitivity it was tuned for.
        return float(min(max(t, _THRESHOLD_FLOOR), _THRESHOLD_CEILING))

    overall = clamp(threshold_for_sensitivity(table.labels, table.probs, target_sensitivity))
    per_type: dict[StudyType, float] = {}
    for t in table.types():
        sub = table.of_type(t)
        if sub.labels.any():
            per_type[t] = clamp(
                threshold_for_sensitivity(sub.labels, sub.probs, target_sensitivity)
            )
    return overall, per_type


def _group_report(
    table: StudyTable, thresholds: np.ndarray, *, n_resamples: int, seed: int
) -> dict[str, Any]:
    metrics = study_metrics(
        table.labels, table.probs, thresholds, n_resamples=n_resamples, seed=seed
    )
    fpr, tpr, _ = roc_curve(table.labels, table.probs)
    unique = np.unique(thresholds)
    return {
        "n_studies": len(table),
        "n_abnormal": int(table.labels.sum()),
        "n_views": int(table.n_views.sum()),
        "threshold": float(unique[0]) if unique.size == 1 else "per study type",
        "metrics": {name: metrics[name].as_dict() for name in METRICS},
        "operating_point": {
            "fpr": _finite(1.0 - metrics["specificity"].value),
            "tpr": _finite(metrics["sensitivity"].value),
        },
        "roc": {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()},
    }


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def evaluate_table(
    table: StudyTable,
    *,
    threshold: float = 0.5,
    thresholds: Mapping[StudyType, float] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """Metrics with bootstrap CIs per study type and in aggregate (JSON-ready dict).

    Each group is resampled on its own studies, as in the paper. The aggregate uses every
    study's own threshold, i.e. the decisions the daemon would make.
    """
    if len(table) == 0:
        raise DataError("no studies to evaluate")
    per_study = per_study_thresholds(table, threshold, thresholds)
    groups: dict[str, Any] = {}
    for t in table.types():
        mask = np.array([s == t for s in table.study_types], dtype=bool)
        groups[t.value] = _group_report(
            table.subset(mask), per_study[mask], n_resamples=n_resamples, seed=seed
        )
    groups[AGGREGATE] = _group_report(table, per_study, n_resamples=n_resamples, seed=seed)
    return {
        "n_studies": len(table),
        "n_views": int(table.n_views.sum()),
        "threshold": threshold,
        "thresholds": {t.value: v for t, v in (thresholds or {}).items()},
        "bootstrap": {"resamples": n_resamples, "seed": seed, "interval": "95% percentile"},
        "groups": groups,
        "studies": [
            {
                "study": sid,
                "study_type": st.value,
                "label": int(lab),
                "probability": float(p),
                "views": int(nv),
            }
            for sid, st, lab, p, nv in zip(
                table.study_ids,
                table.study_types,
                table.labels,
                table.probs,
                table.n_views,
                strict=True,
            )
        ],
    }


def card_metrics(report: Mapping[str, Any]) -> dict[str, float | dict[str, float]]:
    """The point estimates (and aggregate CIs) of a report, in the model card's shape."""

    def flat(group: Mapping[str, Any], with_ci: bool) -> dict[str, float]:
        out: dict[str, float] = {
            "n_studies": float(group["n_studies"]),
            "n_abnormal": float(group["n_abnormal"]),
        }
        for name, m in group["metrics"].items():
            if m["value"] is not None:
                out[name] = round(float(m["value"]), 6)
            if with_ci and m["ci95"][0] is not None:
                out[f"{name}_ci95_low"] = round(float(m["ci95"][0]), 6)
                out[f"{name}_ci95_high"] = round(float(m["ci95"][1]), 6)
        return out

    groups = report["groups"]
    metrics: dict[str, float | dict[str, float]] = dict(flat(groups[AGGREGATE], True))
    for name, group in groups.items():
        if name != AGGREGATE:
            metrics[name] = flat(group, False)
    return metrics


# --------------------------------------------------------------------------------------------
# Readers


def read_reader_labels(path: str | Path) -> tuple[list[str], dict[str, list[int]]]:
    """Readers' labels: (reader names, study key → one 0/1 label per reader).

    CSV with a header: the first column is the study (a MURA study path or a
    StudyInstanceUID), every other column one reader; a column named ``label`` or ``truth``
    is ignored (the ground truth comes from the data set).
    """
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if len(rows) < 2:
        raise DataError(f"{path}: needs a header and at least one study")
    header = [h.strip() for h in rows[0]]
    columns = [i for i, h in enumerate(header) if i > 0 and h.lower() not in ("label", "truth")]
    names = [header[i] for i in columns]
    if len(names) < 3:
        raise DataError(f"{path}: the protocol needs at least three reader columns")
    labels: dict[str, list[int]] = {}
    for lineno, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise DataError(f"{path} line {lineno}: {len(row)} cells, header has {len(header)}")
        values = []
        for i in columns:
            cell = row[i].strip()
            if cell not in ("0", "1"):
                raise DataError(f"{path} line {lineno}: {header[i]} = {cell!r}, expected 0 or 1")
            values.append(int(cell))
        key = normalise_study_key(row[0])
        if key in labels:
            raise DataError(f"{path} line {lineno}: study {row[0]!r} listed twice")
        labels[key] = values
    return names, labels


def evaluate_readers(
    table: StudyTable,
    names: Sequence[str],
    reader_labels: Mapping[str, Sequence[int]],
    *,
    threshold: float = 0.5,
    thresholds: Mapping[StudyType, float] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    tie: int = 1,
) -> dict[str, Any]:
    """The reader protocol per study type and in aggregate, on the studies the readers read."""
    index = {normalise_study_key(s): i for i, s in enumerate(table.study_ids)}
    missing = [k for k in reader_labels if k not in index]
    if missing:
        raise DataError(
            f"{len(missing)} studies in the readers' file are not in the evaluated data, "
            f"e.g. {missing[0]}"
        )
    rows = np.array(sorted(index[k] for k in reader_labels), dtype=np.int64)
    mask = np.zeros(len(table), dtype=bool)
    mask[rows] = True
    read = table.subset(mask)
    matrix = np.array(
        [reader_labels[normalise_study_key(s)] for s in read.study_ids], dtype=np.int64
    )
    model_pred = read.probs > per_study_thresholds(read, threshold, thresholds)

    def compare(sel: np.ndarray) -> dict[str, Any]:
        result = compare_with_readers(
            [(name, matrix[sel, j]) for j, name in enumerate(names)],
            model_pred[sel],
            n_resamples=n_resamples,
            seed=seed,
            tie=tie,
        )
        return result.as_dict()

    out: dict[str, Any] = {}
    for t in read.types():
        out[t.value] = compare(np.array([s == t for s in read.study_types], dtype=bool))
    out[AGGREGATE] = compare(np.ones(len(read), dtype=bool))
    return {"readers": list(names), "tie_resolves_to": tie, "groups": out}


# --------------------------------------------------------------------------------------------
# Text output


def _fmt(m: Mapping[str, Any]) -> str:
    if m["value"] is None:
        return "n/a".ljust(21)
    lo, hi = m["ci95"]
    ci = "(n/a)" if lo is None else f"({lo:.3f}, {hi:.3f})"
    return f"{m['value']:.3f} {ci}".ljust(21)


def format_report(report: Mapping[str, Any]) -> str:
    """A table for people: one line per study type and the aggregate."""
    head = (
        f"{'group':<12} {'studies':>7} {'abn':>5}  "
        + "".join(f"{name + ' (95% CI)':<21} " for name in ("AUROC", "F1", "kappa", "sens", "spec"))
        + "threshold"
    )
    lines = [head, "-" * len(head)]
    for name, group in report["groups"].items():
        thr = group["threshold"]
        thr_text = f"{thr:.4f}" if isinstance(thr, float) else str(thr)
        lines.append(
            f"{name:<12} {group['n_studies']:>7} {group['n_abnormal']:>5}  "
            + "".join(_fmt(group["metrics"][m]) + " " for m in METRICS)
            + thr_text
        )
    b = report["bootstrap"]
    lines.append(
        f"95% CIs: percentile bootstrap, {b['resamples']} resamples of each group's studies, "
        f"seed {b['seed']}."
    )
    readers = report.get("readers")
    if readers:
        lines += [
            "",
            f"Readers ({', '.join(readers['readers'])}): each against the majority of "
            "the others; the model against the majority of each such group.",
        ]
        sub = f"{'group':<12} {'studies':>7}  "
        for m in ("f1", "kappa"):
            sub += f"{'readers ' + m:<21} {'model ' + m:<21} {'model-readers ' + m:<24} "
        lines += [sub.rstrip(), "-" * len(sub.rstrip())]
        for name, g in readers["groups"].items():
            line = f"{name:<12} {g['n_studies']:>7}  "
            for m in ("f1", "kappa"):
                line += (
                    _fmt(g["reader_mean"][m])
                    + " "
                    + _fmt(g["model_mean"][m])
                    + " "
                    + _fmt(g["model_minus_readers"][m]).ljust(24)
                    + " "
                )
            lines.append(line.rstrip())
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Operating point into the model card


def operating_point_version(
    version: str, threshold: float, thresholds: Mapping[StudyType, float]
) -> str:
    """``version`` marked with an operating point: ``2025.11.1+t0.4935.3fa9c1``.

    The global threshold to four places for people, then six hex digits of a digest of every
    threshold at full precision, so operating points that differ only in a per-type threshold
    or past the fourth place get different versions too (barring a one-in-16-million digest
    clash). A suffix from an earlier tuning is replaced, not stacked. The same operating point
    gives the same version, as it should: the same weights make the same decisions there.
    """
    base = _OPERATING_POINT_SUFFIX.sub("", version) or version
    point = ";".join(
        [repr(float(threshold))]
        + [
            f"{t.value}={float(v)!r}"
            for t, v in sorted(thresholds.items(), key=lambda i: i[0].value)
        ]
    )
    digest = hashlib.sha256(point.encode()).hexdigest()[:6]
    return f"{base}+t{threshold:.4f}.{digest}"


def write_operating_point(
    card: Any,
    *,
    threshold: float,
    thresholds: Mapping[StudyType, float],
    target_sensitivity: float,
    report: Mapping[str, Any],
    data_description: str,
) -> Any:
    """Rewrite ``card`` (a ModelCard) with tuned thresholds and the metrics they give.

    The card becomes unvalidated: a validation covers an operating point, and this changes it.
    Its version gets the operating point's suffix (:func:`operating_point_version`): results
    at another operating point are other results, and the SRs name the version. Its metrics
    become this evaluation's only. Returns the card as reloaded.
    """
    from triage.scoring.card import write_card

    if card.weights_path is None:
        raise DataError(f"{card.path}: a card without a weights file cannot be tuned")
    note = (
        f"Operating point: sensitivity {target_sensitivity:g} on {data_description}, "
        f"global threshold {threshold:.6g}, per-type thresholds for "
        f"{', '.join(t.value for t in thresholds) or 'no type'}."
    )
    measured = f"Metrics: {data_description}, at this operating point (optimistic: tuned there)."
    kept = [
        line
        for line in card.training_notes.splitlines()
        if not line.startswith(("Operating point:", "Metrics:"))
    ]
    covered = {t: v for t, v in thresholds.items() if t in card.study_types}
    return write_card(
        card.path,
        name=card.name,
        version=operating_point_version(card.version, threshold, covered),
        weights_file=card.weights_path,
        training_data=card.training_data,
        architecture=card.architecture,
        input_size=card.input_size,
        mean=card.mean,
        std=card.std,
        threshold=threshold,
        thresholds=covered,
        study_types=card.study_types,
        validated=False,
        # This evaluation's metrics only. Merging kept earlier ones this data could not
        # replace (CIs it did not compute, study types it lacks) under a note saying all are
        # at this operating point. The training validation loss goes too: it is not
        # threshold-dependent, but it was measured on other data; the training notes and
        # valid_report.json keep it.
        metrics=card_metrics(report),
        description=card.description,
        training_notes="\n".join([*kept, note, measured]),
        created=card.created,
    )
