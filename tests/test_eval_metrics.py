"""Classification metrics: constant label columns, bootstrap CIs, threshold rule, strict JSON."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from medclipin.eval.metrics import _auc, bootstrap_auc, classification_metrics, is_finite_json
from medclipin.eval.report import json_safe, write_json


def _data(n=60, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, (n, 3)).astype(float)
    scores = np.clip(labels * 0.3 + rng.random((n, 3)) * 0.7, 0, 1)
    return scores, labels


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        s = np.round(rng.random(40), 1)  # many ties
        if y.min() != y.max():
            assert _auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_constant_label_column_gives_none_with_note_and_no_nan(tmp_path):
    scores, labels = _data()
    labels[:, 1] = 0.0  # constant: all negative
    labels[:, 2] = 1.0  # constant: all positive
    result = classification_metrics(scores, labels, ["A", "B", "C"], "multilabel", bootstrap=100)
    assert result["per_class"]["B"]["auc"] is None and "constant" in result["per_class"]["B"]["note"]
    assert result["per_class"]["C"]["auc"] is None and result["per_class"]["C"]["auc_ci"] is None
    assert result["per_class"]["A"]["auc"] is not None
    assert result["mean_auc"] == pytest.approx(result["per_class"]["A"]["auc"])
    assert result["macro_auc_classes"] == 1 and "1 of 3" in result["note"]
    ci = result["per_class"]["A"]["auc_ci"]
    assert ci["low"] <= result["per_class"]["A"]["auc"] <= ci["high"] and 0 < ci["valid_resamples"] <= 100
    assert is_finite_json(result)
    # strict JSON (allow_nan=False) round-trips
    path = write_json(tmp_path / "m.json", result)
    assert json.loads(path.read_text())["per_class"]["B"]["auc"] is None


def test_every_column_constant_or_unlabelled():
    scores, labels = _data(n=10)
    labels[:] = 0.0
    labels[:, 2] = np.nan
    result = classification_metrics(scores, labels, ["A", "B", "C"], "multilabel", bootstrap=50)
    assert result["mean_auc"] is None and result["mean_auc_ci"] is None
    assert result["per_class"]["C"]["note"] == "no labelled rows" and result["per_class"]["C"]["n"] == 0
    assert is_finite_json(result)


def test_rare_class_bootstrap_counts_only_valid_resamples():
    scores, labels = _data(n=30)
    labels[:, 0] = 0.0
    labels[0, 0] = 1.0  # one positive: many resamples miss it
    intervals = bootstrap_auc(labels, scores, n=200, seed=0)
    valid = intervals["per_class"][0]["valid_resamples"]
    assert 0 < valid < 200  # ≈ 1 - (29/30)^30 ≈ 64% of resamples contain the positive
    assert intervals["macro"]["valid_resamples"] == 200


def test_threshold_rule_multilabel_and_multiclass():
    scores = np.array([[0.6, 0.2], [0.4, 0.9], [0.5, 0.1]])
    labels = np.array([[1, 0], [0, 1], [1, 0]], dtype=float)
    multilabel = classification_metrics(scores, labels, ["A", "B"], "multilabel", bootstrap=0)
    assert multilabel["per_class"]["A"]["accuracy"] == 1.0  # 0.5 counts as positive (>= 0.5)
    assert ">= 0.5" in multilabel["threshold_rule"] and multilabel["bootstrap"] is None
    multiclass = classification_metrics(scores, labels, ["A", "B"], "multiclass", bootstrap=0)
    assert multiclass["accuracy"] == 1.0 and multiclass["accuracy_rows"] == 3
    assert "argmax" in multiclass["threshold_rule"]


def test_bootstrap_is_seeded():
    scores, labels = _data()
    a = classification_metrics(scores, labels, ["A", "B", "C"], "multilabel", bootstrap=50, seed=3)
    b = classification_metrics(scores, labels, ["A", "B", "C"], "multilabel", bootstrap=50, seed=3)
    assert a["mean_auc_ci"] == b["mean_auc_ci"]


def test_json_safe_replaces_nan_and_numpy():
    value = json_safe({"a": np.float32(np.nan), "b": np.arange(2), "c": [float("inf"), np.int64(3)]})
    assert value == {"a": None, "b": [0, 1], "c": [None, 3]}
