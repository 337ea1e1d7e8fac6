"""Calibration: turning scores into probabilities one can read as "the chance this image is positive".

A calibrator is fitted on the fit set (validate) and applied unchanged to the test set, on the score's
logit z = log(s / (1 − s)) (for a zero-shot multi-label score, z is the scaled similarity difference
between the class's positive and negative prompt ensembles):

- ``temperature``: p = σ(z / T), T > 0 minimising the fit set's log-loss (Guo et al. 2017). One
  parameter; it keeps 0.5 where it was, so it sharpens or softens scores but cannot shift them.
- ``platt``: p = σ(a·z + b), a logistic regression on z (Platt 1999), L2-regularised (C = 1) so that a
  fit on a small or separable validate set stays finite. It can move the 0.5 point, which zero-shot
  scores usually need (default).
- ``none``: the scores as they are.

Both are monotone (for a > 0), so AUC and the ranking are unchanged. Reported on the test set:

- Brier score: mean (p − y)² (scikit-learn's ``brier_score_loss``);
- ECE: Σ_bins (n_bin / N) · |mean(y) − mean(p)| over ``n_bins`` equal-width bins of p, with the bin edges
  and bin assignment of scikit-learn's ``calibration_curve(strategy="uniform")`` (its reference).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

METHODS = ("platt", "temperature", "none")
_EPS = 1e-7


def logit(scores: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(scores, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass
class Calibrator:
    """A fitted calibration map; ``params`` holds T (temperature) or a, b (Platt)."""

    method: str
    params: dict = field(default_factory=dict)
    n_fit: int = 0
    note: str = ""

    def apply(self, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=np.float64)
        if self.method == "temperature" and "temperature" in self.params:
            return _sigmoid(logit(scores) / self.params["temperature"])
        if self.method == "platt" and "a" in self.params:
            return _sigmoid(self.params["a"] * logit(scores) + self.params["b"])
        return scores


def fit_calibrator(labels: np.ndarray, scores: np.ndarray, method: str = "platt") -> Calibrator:
    """Fit ``method`` on (labels 1/0, scores in [0, 1]). Without both classes it falls back to the identity
    (``params`` empty) and says so in ``note``."""
    from scipy.optimize import minimize_scalar

    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {METHODS}, got {method!r}")
    labels = np.asarray(labels).astype(int)
    if method == "none":
        return Calibrator("none", n_fit=len(labels))
    if len(labels) == 0 or labels.min() == labels.max():
        return Calibrator(method, n_fit=len(labels),
                          note="fit set has a single label value: scores left uncalibrated")
    z = logit(scores)
    if method == "temperature":
        def nll(log_t: float) -> float:
            p = np.clip(_sigmoid(z / np.exp(log_t)), _EPS, 1 - _EPS)
            return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))

        best = minimize_scalar(nll, bounds=(-6.0, 6.0), method="bounded")
        return Calibrator("temperature", {"temperature": float(np.exp(best.x))}, n_fit=len(labels))
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0).fit(z[:, None], labels)
    return Calibrator("platt", {"a": float(model.coef_[0, 0]), "b": float(model.intercept_[0])}, n_fit=len(labels))


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, n_bins: int = 10) -> float | None:
    """ECE over equal-width bins (scikit-learn's ``calibration_curve`` binning); ``None`` for no rows."""
    labels = np.asarray(labels, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if len(labels) == 0:
        return None
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], probabilities)  # as sklearn.calibration.calibration_curve
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() * abs(labels[inside].mean() - probabilities[inside].mean())
    return float(total / len(labels))


def calibration_summary(labels: np.ndarray, scores: np.ndarray, calibrator: Calibrator, n_bins: int = 10) -> dict:
    """``{method, ece, brier, ece_uncalibrated, brier_uncalibrated, params, n_fit, n, n_bins}`` on a test set."""
    from sklearn.metrics import brier_score_loss

    labels = np.asarray(labels).astype(int)
    probabilities = calibrator.apply(scores)
    entry = {"method": calibrator.method, "params": dict(calibrator.params), "n_fit": calibrator.n_fit,
             "n": int(len(labels)), "n_bins": n_bins}
    if len(labels) == 0:
        entry.update(ece=None, brier=None, ece_uncalibrated=None, brier_uncalibrated=None)
    else:
        entry.update(
            ece=expected_calibration_error(labels, probabilities, n_bins),
            brier=float(brier_score_loss(labels, probabilities, pos_label=1)),
            ece_uncalibrated=expected_calibration_error(labels, scores, n_bins),
            brier_uncalibrated=float(brier_score_loss(labels, np.asarray(scores, dtype=np.float64), pos_label=1)),
        )
    if calibrator.note:
        entry["note"] = calibrator.note
    return entry


def plot_reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, n_bins: int = 10,
                     title: str = "Reliability diagram") -> Path:
    """Observed fraction positive against mean predicted probability per bin, one line per class
    (``curves[name] = (labels, probabilities)``), the diagonal of perfect calibration, and a histogram of
    the probabilities underneath (where the predictions lie)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(6.4, 7.2), dpi=110, sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfectly calibrated")
    colours = plt.get_cmap("tab10")
    for c, (name, (labels, probabilities)) in enumerate(curves.items()):
        labels = np.asarray(labels).astype(int)
        if len(labels) == 0 or labels.min() == labels.max():
            continue
        observed, predicted = calibration_curve(labels, probabilities, n_bins=n_bins, strategy="uniform")
        ax.plot(predicted, observed, marker="o", color=colours(c % 10), label=f"{name} ({len(labels)} images)")
        hist.hist(probabilities, bins=np.linspace(0, 1, n_bins + 1), histtype="step", color=colours(c % 10))
    ax.set_xlim(-0.015, 1.015)
    ax.set_ylim(-0.015, 1.015)
    ax.set_ylabel("observed fraction positive")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    hist.set_xlabel("predicted probability (calibrated)")
    hist.set_ylabel("images")
    hist.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
