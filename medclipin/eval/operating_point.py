"""Operating points: a threshold chosen on one set (validate) and applied unchanged to another (test).

Threshold rules (:func:`parse_threshold_rule`):

- ``youden`` (default): the validate score maximising Youden's J = sensitivity + specificity − 1 over the
  thresholds of scikit-learn's ``roc_curve``; ties go to the highest threshold (the more specific one).
- ``sensitivity=0.90``: the highest validate score at which validate sensitivity is ≥ the target.
- ``fixed=0.5`` (or just ``0.5``): that value, nothing fitted.

A record is called positive when its score is ≥ the threshold. The threshold only ever sees the fit
set's labels; the test set's labels are used to count TP/FP/TN/FN and nothing else.

On the test set: TP, FP, TN, FN, sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP), NPV
TN/(TN+FN), F1 2TP/(2TP+FP+FN) and Matthews' correlation coefficient (0 when a margin is empty, as in
scikit-learn). Each metric has a percentile bootstrap 95% CI over resamples of the test rows with the
threshold held fixed; a resample in which a metric is undefined (e.g. PPV with no predicted positive)
is skipped for that metric and the count of valid resamples is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medclipin.errors import MedclipinError

METRICS = ("sensitivity", "specificity", "ppv", "npv", "f1", "mcc")
BOOTSTRAP_BLOCK_CELLS = 16_000_000  # resampled row indices held at once (128 MB of int64)


class ThresholdRuleError(MedclipinError, ValueError):
    """A ``--threshold`` value that is not youden, sensitivity=X or fixed=X."""


@dataclass(frozen=True)
class ThresholdRule:
    kind: str  # youden | sensitivity | fixed
    value: float | None = None

    def describe(self) -> str:
        if self.kind == "youden":
            return "Youden's J (sensitivity + specificity − 1) maximised on the fit set"
        if self.kind == "sensitivity":
            return f"highest threshold with sensitivity ≥ {self.value:g} on the fit set"
        return f"fixed threshold {self.value:g}"

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


def parse_threshold_rule(text: str) -> ThresholdRule:
    """``youden``, ``sensitivity=0.9``, ``fixed=0.5`` or a bare number (= fixed)."""
    text = str(text).strip().lower()
    if text == "youden":
        return ThresholdRule("youden")
    kind, sep, value = text.partition("=")
    if not sep:
        kind, value = "fixed", text
    try:
        number = float(value)
    except ValueError:
        raise ThresholdRuleError(f"--threshold {text!r}: expected youden, sensitivity=0.90 or fixed=0.5") from None
    if kind not in ("sensitivity", "fixed"):
        raise ThresholdRuleError(f"--threshold {text!r}: expected youden, sensitivity=0.90 or fixed=0.5")
    if kind == "sensitivity" and not 0 < number <= 1:
        raise ThresholdRuleError(f"--threshold {text!r}: a target sensitivity must be in (0, 1]")
    return ThresholdRule(kind, number)


def choose_threshold(labels: np.ndarray, scores: np.ndarray, rule: ThresholdRule) -> float | None:
    """The threshold of ``rule`` on (labels 1/0, scores); ``None`` when it needs both classes and lacks one."""
    from sklearn.metrics import roc_curve

    if rule.kind == "fixed":
        return float(rule.value)
    labels = np.asarray(labels).astype(int)
    if len(labels) == 0 or labels.min() == labels.max():
        return None
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]  # the first threshold is +inf (nothing positive)
    if rule.kind == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    return float(thresholds[int(np.argmax(tpr >= rule.value - 1e-12))])


def _rates(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """Metric arrays from count arrays; NaN where a metric is undefined (0/0), MCC 0 on an empty margin."""
    tp, fp, tn, fn = (np.asarray(v, dtype=np.float64) for v in (tp, fp, tn, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "sensitivity": tp / (tp + fn),
            "specificity": tn / (tn + fp),
            "ppv": tp / (tp + fp),
            "npv": tn / (tn + fn),
            "f1": 2 * tp / (2 * tp + fp + fn),
        }
        denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = (tp * tn - fp * fn) / denominator
    out["mcc"] = np.where(denominator > 0, mcc, 0.0)
    return out


def _counts(positive: np.ndarray, called: np.ndarray, idx: np.ndarray | None = None):
    """(TP, FP, TN, FN) of one set, or one row per resample when ``idx`` is (B, N) row indices."""
    if idx is not None:
        positive, called = positive[idx], called[idx]
    return ((called & positive).sum(-1), (called & ~positive).sum(-1), (~called & ~positive).sum(-1),
            (~called & positive).sum(-1))


def _resampled_counts(positive: np.ndarray, calls: list[np.ndarray], n: int, seed: int) -> list[tuple]:
    """Per entry of ``calls``, (TP, FP, TN, FN) arrays over ``n`` row resamples (the same resamples for every
    entry: paired). Drawn in blocks of at most BOOTSTRAP_BLOCK_CELLS indices, so a 200k-image test set does not
    need gigabytes; the draws are the same whatever the block size."""
    rng = np.random.default_rng(seed)
    rows = len(positive)
    block = max(1, BOOTSTRAP_BLOCK_CELLS // max(rows, 1))
    parts: list[list[tuple]] = [[] for _ in calls]
    for start in range(0, n, block):
        idx = rng.integers(0, rows, (min(block, n - start), rows))
        for i, called in enumerate(calls):
            parts[i].append(_counts(positive, called, idx))
    return [tuple(np.concatenate([p[k] for p in part]) for k in range(4)) for part in parts]


def _interval(values: np.ndarray) -> dict:
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return {"low": None, "high": None, "valid_resamples": 0}
    low, high = np.percentile(values, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "valid_resamples": int(len(values))}


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float | None, bootstrap: int = 1000,
                    seed: int = 0) -> dict:
    """Counts and metrics of ``scores >= threshold`` against ``labels`` (1/0, no NaN), with bootstrap CIs.

    Returns ``{threshold, n, tp, fp, tn, fn, <metric>, <metric>_ci for each of METRICS}``; metrics that are
    undefined on this set are ``None``. With ``threshold`` ``None`` every value is ``None``.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    entry: dict = {"threshold": threshold, "n": int(len(labels))}
    if threshold is None or len(labels) == 0:
        entry.update({k: None for k in ("tp", "fp", "tn", "fn")})
        entry.update({m: None for m in METRICS})
        entry.update({f"{m}_ci": None for m in METRICS})
        return entry
    positive, called = labels == 1, scores >= threshold
    tp, fp, tn, fn = (int(v) for v in _counts(positive, called))
    entry.update(tp=tp, fp=fp, tn=tn, fn=fn)
    for name, value in _rates(tp, fp, tn, fn).items():
        entry[name] = float(value) if np.isfinite(value) else None
    if bootstrap:
        resampled = _rates(*_resampled_counts(positive, [called], bootstrap, seed)[0])
        for name in METRICS:
            entry[f"{name}_ci"] = _interval(resampled[name])
    else:
        entry.update({f"{m}_ci": None for m in METRICS})
    return entry


def paired_operating_point_deltas(labels: np.ndarray, scores_a: np.ndarray, threshold_a: float | None,
                                  scores_b: np.ndarray, threshold_b: float | None, bootstrap: int = 1000,
                                  seed: int = 0) -> dict:
    """B − A for each metric at each model's own (fit-set) threshold, with a paired bootstrap CI: the same
    resampled rows for both models, so the interval reflects the difference on the same images."""
    labels = np.asarray(labels).astype(int)
    if threshold_a is None or threshold_b is None or len(labels) == 0:
        return {m: {"delta": None, "ci": None} for m in METRICS}
    positive = labels == 1
    called_a, called_b = np.asarray(scores_a) >= threshold_a, np.asarray(scores_b) >= threshold_b
    point_a, point_b = _rates(*_counts(positive, called_a)), _rates(*_counts(positive, called_b))
    out = {}
    if bootstrap:
        counts_a, counts_b = _resampled_counts(positive, [called_a, called_b], bootstrap, seed)
        res_a, res_b = _rates(*counts_a), _rates(*counts_b)
    for name in METRICS:
        delta = float(point_b[name] - point_a[name])
        out[name] = {"delta": delta if np.isfinite(delta) else None,
                     "ci": _interval(res_b[name] - res_a[name]) if bootstrap else None}
    return out
