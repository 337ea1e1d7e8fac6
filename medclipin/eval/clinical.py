"""Clinical-study metrics of one model's scores: operating points, calibration and subgroups.

The fit set (``--manifest``'s validate split) chooses each class's threshold and fits its calibrator; the
test set (a split of ``--manifest`` or every record of ``--test-manifest``) is only scored. Nothing fitted
here ever reads a test label, so changing only the test labels leaves every threshold and calibrator as
it was (tests/test_eval_clinical.py checks this).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medclipin.data.manifest import Record
from medclipin.eval.calibration import calibration_summary, fit_calibrator
from medclipin.eval.operating_point import ThresholdRule, choose_threshold, operating_point
from medclipin.eval.subgroups import subgroup_metrics


def clinical_metrics(fit_scores: np.ndarray, fit_labels: np.ndarray, test_scores: np.ndarray,
                     test_labels: np.ndarray, class_names: Sequence[str], test_records: Sequence[Record],
                     rule: ThresholdRule, calibration: str = "platt", bootstrap: int = 1000, seed: int = 0,
                     subgroup_columns: Sequence[str] | None = None) -> dict:
    """Per class ``operating_point`` and ``calibration`` on the test set, per-subgroup metrics, and the
    calibrated test probabilities (``calibrated``, (N, C), for figures: pop it before writing JSON).

    Args:
        fit_scores, fit_labels: (M, C) scores and 1/0/NaN labels of the fit set (validate).
        test_scores, test_labels: (N, C) of the test set, aligned with ``test_records``.
        rule: how thresholds are chosen (:func:`~medclipin.eval.operating_point.parse_threshold_rule`).
        calibration: ``platt``, ``temperature`` or ``none``.
    """
    per_class: dict = {}
    thresholds: dict = {}
    calibrated = np.full(test_scores.shape, np.nan)
    for c, name in enumerate(class_names):
        fit_known = ~np.isnan(fit_labels[:, c])  # an empty fit set is (0, C)
        fit_y, fit_s = fit_labels[fit_known, c].astype(int), fit_scores[fit_known, c]
        threshold = choose_threshold(fit_y, fit_s, rule)
        thresholds[name] = threshold
        known = ~np.isnan(test_labels[:, c])
        y, s = test_labels[known, c].astype(int), test_scores[known, c]
        point = operating_point(y, s, threshold, bootstrap=bootstrap, seed=seed)
        point.update(rule=str(rule), fit_n=int(len(fit_y)), fit_positives=int(fit_y.sum()))
        if threshold is None:
            point["note"] = "the fit set has no labelled records of both values for this class: no threshold"
        calibrator = fit_calibrator(fit_y, fit_s, calibration)
        calibrated[:, c] = calibrator.apply(test_scores[:, c])
        per_class[name] = {"operating_point": point, "calibration": calibration_summary(y, s, calibrator)}
    return {
        "threshold_rule": str(rule),
        "threshold_rule_text": rule.describe(),
        "calibration_method": calibration,
        "per_class": per_class,
        "subgroups": subgroup_metrics(list(test_records), test_scores, test_labels, list(class_names), thresholds,
                                      bootstrap=bootstrap, seed=seed, columns=subgroup_columns),
        "calibrated": calibrated,
    }
