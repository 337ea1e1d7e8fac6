"""Per-subgroup metrics: for which patients does the model fail?

Grouping columns: ``view`` and, where the manifest has them, ``sex``, ``age`` (in bands) and ``source``
(:data:`GROUP_COLUMNS`; a column every record leaves empty is skipped). Records with an empty value form
the group ``unknown``. Within each group and class: n, positives, AUC with its bootstrap CI, and the
operating point at the threshold chosen on the whole fit set (never re-fitted per group: a subgroup's
figures answer "how does *the* deployed threshold behave on these patients").

A class in a group is flagged ``too_small`` when it has fewer than ``min_positives`` positives or
``min_negatives`` negatives (default 5 each): its intervals are too wide to say anything, and the
report says so instead of printing a number that looks like a finding. A group whose labels for a class
are all one value has AUC ``None`` with a note; a group with no labelled record for a class has n = 0.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from medclipin.data.manifest import Record
from medclipin.eval.metrics import _auc, bootstrap_auc
from medclipin.eval.operating_point import operating_point

GROUP_COLUMNS = ("view", "sex", "age", "source")
AGE_BANDS = ((0, 18, "0-17"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
UNKNOWN = "unknown"
_SEX = {"m": "M", "male": "M", "man": "M", "f": "F", "female": "F", "woman": "F"}


def age_band(value: str) -> str:
    """The band of an age as written ("67", "50+", "early 40s", "mid 50s" → first number); ``unknown``."""
    match = re.search(r"\d+(\.\d+)?", str(value or ""))
    if not match:
        return UNKNOWN
    age = float(match.group())
    return next((label for low, high, label in AGE_BANDS if low <= age < high), UNKNOWN)


def group_value(record: Record, column: str) -> str:
    """The subgroup of ``record`` for ``column`` (sex normalised to M/F, age banded)."""
    raw = str(getattr(record, column, "") or record.extra.get(column, "")).strip()
    if raw.lower() in ("", "unknown", "nan", "none", "n/a", "na"):
        return UNKNOWN
    if column == "age":
        return age_band(raw)
    if column == "sex":
        return _SEX.get(raw.lower(), raw)
    return raw


def grouping_columns(records: Sequence[Record], columns: Sequence[str] = GROUP_COLUMNS) -> list[str]:
    """The columns of ``columns`` that at least one record fills."""
    return [c for c in columns if any(group_value(r, c) != UNKNOWN for r in records)]


def subgroup_metrics(records: Sequence[Record], scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                     thresholds: dict[str, float | None], bootstrap: int = 1000, seed: int = 0,
                     columns: Sequence[str] | None = None, min_positives: int = 5, min_negatives: int = 5) -> dict:
    """``{column: {value: {"n_records", "too_small", "per_class": {class: metrics}}}}``.

    Args:
        records, scores, labels: the test set, aligned (labels (N, C) 1/0/NaN).
        thresholds: per class, the threshold chosen on the fit set (``None``: no operating point).
    """
    columns = grouping_columns(records) if columns is None else list(columns)
    out: dict = {}
    for column in columns:
        values = np.array([group_value(r, column) for r in records])
        groups: dict = {}
        for value in sorted(set(values.tolist())):
            rows = np.flatnonzero(values == value)
            groups[value] = _group(rows, scores, labels, class_names, thresholds, bootstrap, seed,
                                   min_positives, min_negatives)
        out[column] = groups
    return out


def _group(rows, scores, labels, class_names, thresholds, bootstrap, seed, min_positives, min_negatives) -> dict:
    per_class = {}
    group_scores, group_labels = scores[rows], labels[rows]
    intervals = bootstrap_auc(group_labels, group_scores, bootstrap, seed) if bootstrap and len(rows) else None
    for c, name in enumerate(class_names):
        known = ~np.isnan(group_labels[:, c])
        y, s = group_labels[known, c].astype(int), group_scores[known, c]
        positives, negatives = int(y.sum()), int(len(y) - y.sum())
        auc = _auc(y, s)
        entry = {"n": int(len(y)), "positives": positives, "negatives": negatives, "auc": auc,
                 "auc_ci": intervals["per_class"][c] if intervals is not None and auc is not None else None,
                 "operating_point": operating_point(y, s, thresholds.get(name), bootstrap=bootstrap, seed=seed),
                 "too_small": positives < min_positives or negatives < min_negatives}
        if len(y) == 0:
            entry["note"] = "no labelled records for this class in this group"
        elif auc is None:
            entry["note"] = f"labels constant ({'all positive' if y[0] == 1 else 'all negative'}): AUC undefined"
        per_class[name] = entry
    return {"n_records": int(len(rows)), "too_small": all(e["too_small"] for e in per_class.values()),
            "per_class": per_class}
