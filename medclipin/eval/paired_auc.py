"""Two models scored on the same images: is B's AUC really different from A's?

- DeLong's test (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837–845) for two correlated AUCs,
  computed with the midrank algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21:1389–1393).
  With m positives X and n negatives Y, each model's structural components are
  V10(X_i) = mean_j ψ(X_i, Y_j) and V01(Y_j) = mean_i ψ(X_i, Y_j) (ψ = 1 if X > Y, ½ if equal, 0 else);
  S = cov(V10)/m + cov(V01)/n (2 × 2, sample covariances), var(AUC_B − AUC_A) = S_AA + S_BB − 2 S_AB,
  z = (AUC_B − AUC_A) / sqrt(var), two-sided p = 2·(1 − Φ(|z|)). Identical scores give z = 0, p = 1.
- A paired bootstrap interval of ΔAUC = AUC_B − AUC_A: resample the rows (both models together), the
  percentile interval [2.5%, 97.5%] over resamples holding both classes.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata

from medclipin.eval.metrics import _auc


def _structural_components(positives: np.ndarray, negatives: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(AUC, V10 over positives, V01 over negatives) via midranks, O((m + n) log(m + n))."""
    m, n = len(positives), len(negatives)
    rank_all = rankdata(np.concatenate([positives, negatives]))
    rank_pos, rank_neg = rankdata(positives), rankdata(negatives)
    v10 = (rank_all[:m] - rank_pos) / n
    v01 = 1.0 - (rank_all[m:] - rank_neg) / m
    auc = (rank_all[:m].sum() - m * (m + 1) / 2.0) / (m * n)
    return float(auc), v10, v01


def delong_test(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> dict:
    """DeLong's test of AUC_B = AUC_A on paired scores (labels 1/0, no NaN).

    Returns ``{auc_a, auc_b, delta_auc, se, z, p_value, ci}`` (``ci``: the normal-approximation 95% interval
    of ΔAUC, DeLong's variance); every value ``None`` when the labels are constant.
    """
    labels = np.asarray(labels).astype(int)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    empty = {k: None for k in ("auc_a", "auc_b", "delta_auc", "se", "z", "p_value", "ci")}
    if len(labels) == 0 or labels.min() == labels.max():
        return empty
    positive = labels == 1
    m, n = int(positive.sum()), int((~positive).sum())
    auc_a, v10_a, v01_a = _structural_components(a[positive], a[~positive])
    auc_b, v10_b, v01_b = _structural_components(b[positive], b[~positive])
    s10 = np.cov(np.vstack([v10_a, v10_b])) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.vstack([v01_a, v01_b])) if n > 1 else np.zeros((2, 2))
    s = s10 / m + s01 / n
    variance = float(s[0, 0] + s[1, 1] - 2 * s[0, 1])
    delta = auc_b - auc_a
    if variance <= 1e-15:
        z, p, se = 0.0 if abs(delta) < 1e-15 else None, 1.0 if abs(delta) < 1e-15 else None, 0.0
    else:
        se = float(np.sqrt(variance))
        z = delta / se
        p = float(2 * norm.sf(abs(z)))
    ci = None if se is None or z is None else [delta - 1.959963984540054 * se, delta + 1.959963984540054 * se]
    return {"auc_a": auc_a, "auc_b": auc_b, "delta_auc": delta, "se": se, "z": z, "p_value": p, "ci": ci}


def paired_bootstrap_delta_auc(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n: int = 1000,
                               seed: int = 0) -> dict:
    """Percentile 95% interval of AUC_B − AUC_A over ``n`` paired row resamples (constant resamples skipped)."""
    labels = np.asarray(labels).astype(int)
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(n):
        idx = rng.integers(0, len(labels), len(labels))
        auc_a = _auc(labels[idx], a[idx])
        if auc_a is not None:
            deltas.append(_auc(labels[idx], b[idx]) - auc_a)
    if not deltas:
        return {"low": None, "high": None, "valid_resamples": 0}
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "valid_resamples": len(deltas)}
