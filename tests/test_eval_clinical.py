"""Clinical-study metrics: operating points, calibration, DeLong, subgroups (against scikit-learn and a
published worked example)."""

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (brier_score_loss, confusion_matrix, f1_score, matthews_corrcoef, precision_score,
                             recall_score, roc_auc_score)

from medclipin.data.manifest import Record
from medclipin.eval.calibration import Calibrator, calibration_summary, expected_calibration_error, fit_calibrator
from medclipin.eval.clinical import clinical_metrics
from medclipin.eval.operating_point import (ThresholdRuleError, choose_threshold, operating_point,
                                            paired_operating_point_deltas, parse_threshold_rule)
from medclipin.eval.paired_auc import _structural_components, delong_test, paired_bootstrap_delta_auc
from medclipin.eval.subgroups import age_band, subgroup_metrics

Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 1])
S = np.array([.9, .8, .35, .7, .2, .1, .6, .3, .05, .55, .4, .95, .65, .15, .25])


def test_operating_point_matches_sklearn():
    point = operating_point(Y, S, 0.5, bootstrap=200)
    predicted = (S >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(Y, predicted).ravel()
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (tp, fp, tn, fn)
    assert point["sensitivity"] == pytest.approx(recall_score(Y, predicted))
    assert point["specificity"] == pytest.approx(recall_score(1 - Y, 1 - predicted))
    assert point["ppv"] == pytest.approx(precision_score(Y, predicted))
    assert point["npv"] == pytest.approx(precision_score(1 - Y, 1 - predicted))
    assert point["f1"] == pytest.approx(f1_score(Y, predicted))
    assert point["mcc"] == pytest.approx(matthews_corrcoef(Y, predicted))
    for metric in ("sensitivity", "specificity", "ppv", "npv", "f1", "mcc"):
        ci = point[f"{metric}_ci"]
        assert ci["low"] <= point[metric] <= ci["high"] and ci["valid_resamples"] > 100


def test_bootstrap_blocks_do_not_change_the_intervals(monkeypatch):
    from medclipin.eval import operating_point as module

    whole = operating_point(Y, S, 0.5, bootstrap=300, seed=4)
    monkeypatch.setattr(module, "BOOTSTRAP_BLOCK_CELLS", len(Y) * 7)  # 43 blocks of 7 resamples
    assert operating_point(Y, S, 0.5, bootstrap=300, seed=4) == whole


def test_undefined_metrics_are_none_and_mcc_zero_like_sklearn():
    point = operating_point(np.array([0, 0, 1]), np.array([.1, .2, .3]), 0.9, bootstrap=50)
    assert point["ppv"] is None  # nothing called positive
    assert point["mcc"] == matthews_corrcoef([0, 0, 1], [0, 0, 0]) == 0.0
    assert operating_point(Y, S, None)["sensitivity"] is None


def test_threshold_rules():
    youden = choose_threshold(Y, S, parse_threshold_rule("youden"))
    j = [recall_score(Y, S >= t) + recall_score(1 - Y, S < t) - 1 for t in S]
    assert recall_score(Y, S >= youden) + recall_score(1 - Y, S < youden) - 1 == pytest.approx(max(j))
    t90 = choose_threshold(Y, S, parse_threshold_rule("sensitivity=0.9"))
    assert recall_score(Y, S >= t90) >= 0.9
    assert all(recall_score(Y, S >= t) < 0.9 for t in S if t > t90)  # the highest such threshold
    assert choose_threshold(Y, S, parse_threshold_rule("fixed=0.3")) == 0.3
    assert choose_threshold(Y, S, parse_threshold_rule("0.7")) == 0.7
    assert choose_threshold(np.ones(3), S[:3], parse_threshold_rule("youden")) is None
    with pytest.raises(ThresholdRuleError, match="--threshold"):
        parse_threshold_rule("sensitivity=2")
    with pytest.raises(ThresholdRuleError, match="--threshold"):
        parse_threshold_rule("best")


def test_threshold_and_calibration_never_see_test_labels():
    rng = np.random.default_rng(0)
    fit_y = rng.integers(0, 2, (40, 2)).astype(float)
    fit_s = np.clip(fit_y * 0.3 + rng.random((40, 2)) * 0.7, 0, 1)
    test_s = rng.random((30, 2))
    records = [Record(f"r{i}", "p", "s", "x.png", "test", view="PA" if i % 2 else "AP") for i in range(30)]
    rule = parse_threshold_rule("youden")
    first = clinical_metrics(fit_s, fit_y, test_s, rng.integers(0, 2, (30, 2)).astype(float), ["a", "b"], records,
                             rule, bootstrap=20)
    second = clinical_metrics(fit_s, fit_y, test_s, rng.integers(0, 2, (30, 2)).astype(float), ["a", "b"], records,
                              rule, bootstrap=20)
    for name in ("a", "b"):
        assert first["per_class"][name]["operating_point"]["threshold"] == \
            second["per_class"][name]["operating_point"]["threshold"] is not None
        assert first["per_class"][name]["calibration"]["params"] == second["per_class"][name]["calibration"]["params"]
    np.testing.assert_array_equal(first["calibrated"], second["calibrated"])
    # ...while changing the fit labels does move them
    third = clinical_metrics(fit_s, 1 - fit_y, test_s, np.zeros((30, 2)), ["a", "b"], records, rule, bootstrap=0)
    assert third["per_class"]["a"]["calibration"]["params"] != first["per_class"]["a"]["calibration"]["params"]


def test_ece_and_brier_match_sklearn_calibration_curve():
    rng = np.random.default_rng(1)
    p = rng.random(500)
    y = (rng.random(500) < p ** 2).astype(int)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p), minlength=10)
    reference = float(np.sum(counts[counts > 0] * np.abs(observed - predicted)) / len(y))
    assert expected_calibration_error(y, p, 10) == pytest.approx(reference)
    summary = calibration_summary(y, p, Calibrator("none"))
    assert summary["brier"] == pytest.approx(brier_score_loss(y, p))
    assert summary["ece"] == pytest.approx(reference)
    assert set(summary) >= {"ece", "brier", "method"}


def test_calibrators_fix_a_known_miscalibration():
    rng = np.random.default_rng(2)
    z = rng.normal(0, 3, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z / 2.5))).astype(int)  # true probability = sigmoid(z / 2.5)
    scores = 1 / (1 + np.exp(-z))  # overconfident by a temperature of 2.5
    temperature = fit_calibrator(y[:2000], scores[:2000], "temperature")
    assert temperature.params["temperature"] == pytest.approx(2.5, rel=0.15)
    platt = fit_calibrator(y[:2000], scores[:2000], "platt")
    assert platt.params["a"] == pytest.approx(1 / 2.5, rel=0.15)
    for calibrator in (temperature, platt):
        after = calibration_summary(y[2000:], scores[2000:], calibrator)
        assert after["ece"] < after["ece_uncalibrated"] / 2
        assert after["brier"] < after["brier_uncalibrated"]
        assert roc_auc_score(y, calibrator.apply(scores)) == pytest.approx(roc_auc_score(y, scores))  # monotone
    assert fit_calibrator(np.ones(5), scores[:5], "platt").note  # one label value: identity, said so


# Hanley & McNeil (1982), Radiology 143:29-36, Table 1: CT ratings (1 = definitely normal ... 5 = definitely
# abnormal) of 58 normal and 51 abnormal patients; the paper's worked example gives area 0.893 and, from its
# exponential approximation, SE 0.032.
HM_NEGATIVE = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2]).astype(float)
HM_POSITIVE = np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33]).astype(float)


def _brute_force_delong(labels, a, b):
    """DeLong et al. (1988) straight from the definitions: ψ placements, O(m·n)."""
    pos, neg = labels == 1, labels == 0
    v10, v01 = [], []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
    s_matrix = np.cov(v10) / pos.sum() + np.cov(v01) / neg.sum()
    delta = v10[1].mean() - v10[0].mean()
    return delta / np.sqrt(s_matrix[0, 0] + s_matrix[1, 1] - 2 * s_matrix[0, 1])


def test_delong_on_the_hanley_mcneil_worked_example():
    auc, v10, v01 = _structural_components(HM_POSITIVE, HM_NEGATIVE)
    assert auc == pytest.approx(0.893, abs=5e-4)  # the published area
    se = np.sqrt(v10.var(ddof=1) / len(HM_POSITIVE) + v01.var(ddof=1) / len(HM_NEGATIVE))
    assert se == pytest.approx(0.032, abs=0.002)  # DeLong's SE (0.0307) against the paper's approximation
    labels = np.r_[np.ones(51), np.zeros(58)]
    scores = np.r_[HM_POSITIVE, HM_NEGATIVE]
    same = delong_test(labels, scores, scores)
    assert same["z"] == 0.0 and same["p_value"] == 1.0 and same["auc_a"] == pytest.approx(auc)


def test_delong_paired_matches_the_definition_and_sklearn():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 120)
    a = labels * 0.8 + rng.normal(0, 1, 120)
    b = labels * 1.4 + rng.normal(0, 1, 120) + 0.3 * a
    b[:10] = np.round(b[:10])  # some ties
    result = delong_test(labels, a, b)
    assert result["auc_a"] == pytest.approx(roc_auc_score(labels, a))
    assert result["auc_b"] == pytest.approx(roc_auc_score(labels, b))
    assert result["z"] == pytest.approx(_brute_force_delong(labels, a, b))
    from scipy.stats import norm

    assert result["p_value"] == pytest.approx(2 * norm.sf(abs(result["z"])))
    assert result["ci"][0] < result["delta_auc"] < result["ci"][1]
    boot = paired_bootstrap_delta_auc(labels, a, b, n=300)
    assert boot["low"] < result["delta_auc"] < boot["high"]
    # the bootstrap and DeLong agree on the spread, roughly
    assert (boot["high"] - boot["low"]) == pytest.approx(result["ci"][1] - result["ci"][0], rel=0.35)
    assert delong_test(np.ones(5), a[:5], b[:5])["p_value"] is None


def test_paired_operating_point_deltas():
    deltas = paired_operating_point_deltas(Y, S, 0.5, S, 0.3, bootstrap=100)
    assert deltas["sensitivity"]["delta"] == pytest.approx(recall_score(Y, S >= 0.3) - recall_score(Y, S >= 0.5))
    assert deltas["sensitivity"]["ci"]["low"] >= 0  # a lower threshold never loses sensitivity on the same rows
    same = paired_operating_point_deltas(Y, S, 0.5, S, 0.5, bootstrap=50)
    assert same["mcc"]["delta"] == 0 and same["mcc"]["ci"]["high"] == 0


def test_age_bands():
    assert [age_band(v) for v in ("33", "50+", "early 40s", "mid 50s", "77", "", "unknown", "92", "5")] == \
        ["18-39", "40-59", "40-59", "40-59", "60-79", "unknown", "unknown", "80+", "0-17"]


def test_subgroups_with_empty_and_single_class_groups():
    records = [Record(f"r{i}", "p", "s", "x.png", "test", view=view, sex=sex, age=age)
               for i, (view, sex, age) in enumerate([("PA", "M", "70")] * 12 + [("AP", "female", "")] * 4
                                                    + [("LL", "F", "30")] * 2)]
    labels = np.array([[1.0, np.nan]] * 6 + [[0.0, np.nan]] * 6 + [[1.0, 0.0]] * 4 + [[np.nan, np.nan]] * 2)
    scores = np.linspace(0, 1, 18)[:, None].repeat(2, 1)
    groups = subgroup_metrics(records, scores, labels, ["a", "b"], {"a": 0.5, "b": None}, bootstrap=50)
    assert set(groups) == {"view", "sex", "age"}  # no record has a source
    assert set(groups["sex"]) == {"M", "F"} and groups["sex"]["F"]["n_records"] == 6
    assert set(groups["age"]) == {"60-79", "18-39", "unknown"}
    pa = groups["view"]["PA"]["per_class"]["a"]
    assert pa["n"] == 12 and pa["auc"] == pytest.approx(roc_auc_score([1] * 6 + [0] * 6, scores[:12, 0]))
    assert not pa["too_small"] and pa["auc_ci"]["valid_resamples"] > 0
    ap = groups["view"]["AP"]["per_class"]["a"]  # single class: every label positive
    assert ap["auc"] is None and "constant" in ap["note"] and ap["too_small"]
    assert ap["operating_point"]["sensitivity"] == 1.0 and ap["operating_point"]["specificity"] is None
    ll = groups["view"]["LL"]["per_class"]["a"]  # empty: no labelled record
    assert ll["n"] == 0 and ll["auc"] is None and ll["operating_point"]["tp"] is None and ll["too_small"]
    assert groups["view"]["LL"]["too_small"]
