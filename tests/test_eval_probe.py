"""Linear probe: label subsets (seeded, stratified, one positive per class) and AUC mean ± std over seeds."""

import numpy as np
import pytest

from medclipin.eval.metrics import is_finite_json
from medclipin.eval.probe import label_subset, linear_probe


def _features(n, seed, classes=3, dim=8):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, classes)) < np.array([0.5, 0.2, 0.03])[:classes]).astype(float)
    features = rng.normal(size=(n, dim))
    features[:, :classes] += 2.0 * labels  # each class is linearly separable-ish on its own axis
    return features, labels


def test_label_subset_seeded_sized_and_keeps_a_positive_per_class():
    _, labels = _features(400, 0)
    labels[5, 2] = np.nan  # unknown labels are allowed
    subset = label_subset(labels, 0.01, seed=1)
    assert np.array_equal(subset, label_subset(labels, 0.01, seed=1))
    assert not np.array_equal(subset, label_subset(labels, 0.01, seed=2))
    assert len(subset) >= 4 and len(subset) <= 4 + 2 * labels.shape[1]
    assert len(set(subset.tolist())) == len(subset)
    for c in range(labels.shape[1]):
        assert (labels[subset, c] == 1).any() and (labels[subset, c] == 0).any()
    assert np.array_equal(label_subset(labels, 1.0, seed=5), np.arange(400))
    ten = label_subset(labels, 0.1, seed=0)
    assert 40 <= len(ten) <= 46
    # stratified: the common class's prevalence is close to the whole set's
    assert abs(labels[ten, 0].mean() - labels[:, 0].mean()) < 0.08
    with pytest.raises(ValueError):
        label_subset(labels, 0.0, seed=0)


def test_linear_probe_reports_mean_std_over_seeds():
    x_train, y_train = _features(300, 1)
    x_test, y_test = _features(200, 2)
    result = linear_probe(x_train, y_train, x_test, y_test, ["A", "B", "C"], fractions=(0.1, 1.0), seeds=(0, 1, 2))
    full, tenth = result["fractions"]["1"], result["fractions"]["0.1"]
    assert full["per_class"]["A"]["mean"] > 0.85 and full["macro_auc"]["mean"] > 0.8
    assert full["per_class"]["A"]["std"] == pytest.approx(0.0, abs=1e-9)  # 100%: same subset every seed
    assert len(tenth["per_class"]["A"]["values"]) == 3 and tenth["n_train"][0] >= 30
    assert tenth["macro_auc"]["std"] >= 0 and is_finite_json(result)


def test_linear_probe_survives_constant_classes():
    x_train, y_train = _features(60, 3)
    x_test, y_test = _features(40, 4)
    y_train[:, 2] = 0.0  # no positive to train on
    y_test[:, 1] = 1.0  # constant test column
    result = linear_probe(x_train, y_train, x_test, y_test, ["A", "B", "C"], fractions=(0.5,), seeds=(0, 1))
    entry = result["fractions"]["0.5"]
    assert entry["per_class"]["B"]["mean"] is None and "constant" in entry["per_class"]["B"]["notes"][0]
    assert entry["per_class"]["C"]["mean"] is None and "single label value" in entry["per_class"]["C"]["notes"][0]
    assert entry["macro_auc"]["n_valid"] == 2 and is_finite_json(result)
