"""Linear probe on frozen image features (MGCA protocol: 1%, 10% and 100% of the training labels).

For each label fraction and seed, a subset of the training split is drawn once (shared by all
classes), then one logistic regression per class (one-vs-rest) is fitted on the subset's rows whose
label for that class is known (1/0; uncertain and unstated rows are left out), on standardised
features. Each model is scored by AUC on the test split; results are reported per class and as the
macro average, as mean ± std over seeds.

Subset rule (``label_subset``), seeded and deterministic:

1. size = max(1, round(fraction × N));
2. for each class, rarest first, if the subset has no positive (or no negative) for that class yet and
   the training split has one, one such row is added at random — at least one positive per class where
   possible (so a subset may exceed ``fraction`` by at most 2 × classes rows; the actual size is reported);
3. the rest is filled by proportional sampling within strata of identical label vectors (largest
   remainder), i.e. stratified where possible, random within strata.

A class whose subset (or test set) has a single label value gets ``None`` for that seed with a note;
it is never a crash or NaN.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from medclipin.eval.metrics import _auc


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded, stratified subset of ``labels`` (N, C; NaN = unknown)."""
    n_rows = len(labels)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction >= 1 or n_rows == 0:
        return np.arange(n_rows)
    rng = np.random.default_rng(seed)
    size = max(1, int(round(fraction * n_rows)))
    chosen: set[int] = set()
    positives = np.nan_to_num(labels, nan=0.0) == 1
    negatives = np.nan_to_num(labels, nan=1.0) == 0
    for c in np.argsort(positives.sum(0), kind="stable"):
        for column in (positives[:, c], negatives[:, c]):
            candidates = np.flatnonzero(column)
            if len(candidates) and not any(i in chosen for i in candidates):
                chosen.add(int(rng.choice(candidates)))
    remaining = size - len(chosen)
    if remaining > 0:
        pool = np.array([i for i in range(n_rows) if i not in chosen])
        # strata: identical label vectors (unknown coded as its own value)
        keys = [tuple(np.nan_to_num(labels[i], nan=-9.0)) for i in pool]
        strata: dict[tuple, list[int]] = {}
        for i, key in zip(pool, keys):
            strata.setdefault(key, []).append(int(i))
        groups = list(strata.values())
        quotas = np.array([remaining * len(g) / len(pool) for g in groups])
        take = np.floor(quotas).astype(int)
        order = np.argsort(-(quotas - take) + rng.random(len(groups)) * 1e-9, kind="stable")
        take[order[: remaining - int(take.sum())]] += 1
        for group, count in zip(groups, take):
            if count:
                chosen.update(int(i) for i in rng.choice(group, size=min(count, len(group)), replace=False))
    return np.array(sorted(chosen))


def _fit_score(x_train, y_train, x_test, y_test, seed: int, max_iter: int, c_value: float) -> tuple[float | None, str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(y_train) == 0 or y_train.min() == y_train.max():
        return None, "training subset has a single label value for this class"
    if len(y_test) == 0 or y_test.min() == y_test.max():
        return None, "test labels constant for this class: AUC undefined"
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c_value, max_iter=max_iter, random_state=seed))
    model.fit(x_train, y_train)
    return _auc(y_test, model.predict_proba(x_test)[:, 1]), ""


def _mean_std(values: list[float | None]) -> dict:
    defined = [v for v in values if v is not None]
    return {
        "mean": float(np.mean(defined)) if defined else None,
        "std": float(np.std(defined)) if defined else None,  # population std over seeds (0 for one seed)
        "values": values,
        "n_valid": len(defined),
    }


def linear_probe(train_features, train_labels, test_features, test_labels, class_names: Sequence[str],
                 fractions: Sequence[float] = (0.01, 0.1, 1.0), seeds: Sequence[int] = (0, 1, 2),
                 max_iter: int = 1000, c_value: float = 1.0) -> dict:
    """Train and score one-vs-rest logistic regressions on label fractions of the training set.

    Args:
        train_features, test_features: (N, D) frozen features (array or tensor).
        train_labels, test_labels: (N, C) 1/0 with NaN for unknown labels.
        class_names: the C class names, in column order.
        fractions: label fractions of the training split, each in (0, 1].
        seeds: subset (and solver) seeds; the mean ± std over seeds is reported.
        max_iter, c_value: scikit-learn LogisticRegression settings (L2, lbfgs).

    Returns:
        ``{"class_names", "seeds", "fractions": {"0.01": {"fraction", "n_train": [per seed],
        "per_class": {class: {"mean", "std", "values", "n_valid", "notes"}}, "macro_auc": {...}}}, "settings"}``.
        The macro AUC of one seed is the mean over its classes with a defined AUC.
    """
    x_train = np.asarray(train_features, dtype=np.float64)
    x_test = np.asarray(test_features, dtype=np.float64)
    y_train_all = np.asarray(train_labels, dtype=np.float64)
    y_test_all = np.asarray(test_labels, dtype=np.float64)
    if y_train_all.shape != (len(x_train), len(class_names)) or y_test_all.shape != (len(x_test), len(class_names)):
        raise ValueError("labels must be (N, C) with C = len(class_names) and N matching the features")
    result: dict = {
        "class_names": list(class_names), "seeds": list(seeds), "fractions": {},
        "n_train_total": len(x_train), "n_test": len(x_test),
        "settings": {"model": "StandardScaler + LogisticRegression (L2, lbfgs), one-vs-rest per class",
                     "C": c_value, "max_iter": max_iter},
    }
    for fraction in fractions:
        per_class_values: dict[str, list] = {name: [] for name in class_names}
        notes: dict[str, set] = {name: set() for name in class_names}
        macro_values, sizes = [], []
        for seed in seeds:
            subset = label_subset(y_train_all, float(fraction), int(seed))
            sizes.append(int(len(subset)))
            seed_aucs = []
            for c, name in enumerate(class_names):
                known_train = subset[~np.isnan(y_train_all[subset, c])]
                known_test = ~np.isnan(y_test_all[:, c])
                auc, note = _fit_score(x_train[known_train], y_train_all[known_train, c].astype(int),
                                       x_test[known_test], y_test_all[known_test, c].astype(int),
                                       int(seed), max_iter, c_value)
                per_class_values[name].append(auc)
                if note:
                    notes[name].add(note)
                if auc is not None:
                    seed_aucs.append(auc)
            macro_values.append(float(np.mean(seed_aucs)) if seed_aucs else None)
        per_class = {}
        for name in class_names:
            entry = _mean_std(per_class_values[name])
            entry["notes"] = sorted(notes[name])
            per_class[name] = entry
        result["fractions"][_fraction_key(fraction)] = {
            "fraction": float(fraction), "n_train": sizes,
            "per_class": per_class, "macro_auc": _mean_std(macro_values),
        }
    return result


def _fraction_key(fraction: float) -> str:
    return f"{fraction:g}" if not math.isclose(fraction, 1.0) else "1"


def probe_probabilities(train_features, train_labels, score_features: Sequence, class_names: Sequence[str],
                        seed: int = 0, max_iter: int = 1000, c_value: float = 1.0) -> tuple[list[np.ndarray], list[str]]:
    """One probe per class on *all* the training rows with a known label (the 100% protocol), applied to
    each array of ``score_features``: ([(N_i, C') probabilities], the C' classes that could be trained — a
    class whose training labels are one value is left out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x_train = np.asarray(train_features, dtype=np.float64)
    y_train = np.asarray(train_labels, dtype=np.float64)
    columns: list[list[np.ndarray]] = [[] for _ in score_features]
    trained = []
    for c, name in enumerate(class_names):
        known = ~np.isnan(y_train[:, c])
        y = y_train[known, c].astype(int)
        if len(y) == 0 or y.min() == y.max():
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(C=c_value, max_iter=max_iter, random_state=seed))
        model.fit(x_train[known], y)
        trained.append(name)
        for i, x in enumerate(score_features):
            x = np.asarray(x, dtype=np.float64)
            columns[i].append(model.predict_proba(x)[:, 1] if len(x) else np.zeros(0))
    return [np.stack(cols, 1) if cols else np.zeros((len(x), 0)) for cols, x in zip(columns, score_features)], trained
