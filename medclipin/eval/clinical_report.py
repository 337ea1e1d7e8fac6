"""``report.md``: one evaluation written for a clinician, and ``compare.md`` for two models.

The report leads with what a reader asks first (on which images, at which threshold, with what
sensitivity and specificity), then calibration, subgroups, ROC curves with their 95% bands, and a few
Grad-CAM examples of true positives, false positives and false negatives. Every number has its interval;
anything computed on too few images says so. No record ids, patient ids or report text are written.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from medclipin.eval.calibration import plot_reliability
from medclipin.eval.operating_point import METRICS
from medclipin.eval.report import _run_lines, _table

log = logging.getLogger(__name__)
METRIC_LABELS = {"sensitivity": "sensitivity", "specificity": "specificity", "ppv": "PPV", "npv": "NPV",
                 "f1": "F1", "mcc": "MCC"}


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _with_ci(value, interval, percent: bool = True) -> str:
    shown = _pct(value) if percent else ("n/a" if value is None else f"{value:.2f}")
    if value is None or not interval or interval.get("low") is None:
        return shown
    if percent:
        return f"{shown} ({100 * interval['low']:.0f}–{100 * interval['high']:.0f})"
    return f"{shown} ({interval['low']:.2f} to {interval['high']:.2f})"


def _auc_text(value, interval) -> str:
    if value is None:
        return "n/a"
    if not interval or interval.get("low") is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({interval['low']:.2f}–{interval['high']:.2f})"


def plot_roc_bands(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                   operating_points: dict | None = None, bootstrap: int = 200, seed: int = 0, title: str = "") -> Path:
    """One panel per class: the ROC curve, its 95% bootstrap band (sensitivity at each false-positive rate,
    percentile over row resamples) and the operating point chosen on the fit set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = min(3, max(1, len(class_names)))
    rows = int(np.ceil(len(class_names) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.4 * rows), dpi=110, squeeze=False)
    grid = np.linspace(0, 1, 101)
    rng = np.random.default_rng(seed)
    for c, name in enumerate(class_names):
        ax = axes[c // columns][c % columns]
        ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1)
        known = ~np.isnan(labels[:, c])
        y, s = labels[known, c].astype(int), scores[known, c]
        ax.set_title(name, fontsize=10)
        ax.set_xlim(-0.015, 1.015)
        ax.set_ylim(-0.015, 1.015)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_xlabel("1 − specificity")
        ax.set_ylabel("sensitivity")
        if len(y) == 0 or y.min() == y.max():
            ax.text(0.5, 0.5, "no curve:\nlabels constant", ha="center", va="center", fontsize=9)
            continue
        fpr, tpr, _ = roc_curve(y, s)
        curves = []
        for _ in range(bootstrap):
            idx = rng.integers(0, len(y), len(y))
            if y[idx].min() == y[idx].max():
                continue
            f, t, _ = roc_curve(y[idx], s[idx])
            curves.append(np.interp(grid, f, t))
        if curves:
            low, high = np.percentile(curves, [2.5, 97.5], axis=0)
            ax.fill_between(grid, low, high, color="tab:blue", alpha=0.2, linewidth=0, label="95% band")
        from sklearn.metrics import roc_auc_score

        ax.plot(fpr, tpr, color="tab:blue", linewidth=1.8, label=f"AUC {roc_auc_score(y, s):.2f} "
                                                                  f"({int(y.sum())} pos / {len(y)})")
        point = (operating_points or {}).get(name) or {}
        if point.get("sensitivity") is not None and point.get("specificity") is not None:
            ax.plot([1 - point["specificity"]], [point["sensitivity"]], marker="o", color="tab:red", markersize=7,
                    linestyle="none", label=f"threshold {point['threshold']:.3g}")
        ax.legend(loc="lower right", fontsize=8)
    for c in range(len(class_names), rows * columns):
        axes[c // columns][c % columns].axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_subgroup_forest(subgroups: dict, class_names: Sequence[str], path: str | os.PathLike,
                         overall: dict | None = None) -> Path | None:
    """Forest plot: per finding (one panel each), the AUC and its 95% CI of every subgroup, the whole set's AUC
    as a dashed line; groups too small to conclude anything are drawn in grey. ``None`` without subgroups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(column, value) for column, groups in subgroups.items() for value in groups]
    if not rows:
        return None
    path = Path(path)
    fig, axes = plt.subplots(1, len(class_names), figsize=(2.2 + 2.6 * len(class_names), 0.9 + 0.32 * len(rows)),
                             dpi=110, sharey=True, squeeze=False)
    positions = np.arange(len(rows))[::-1]
    for ax, name in zip(axes[0], class_names):
        for y, (column, value) in zip(positions, rows):
            e = subgroups[column][value]["per_class"][name]
            if e["auc"] is None:
                ax.text(0.5, y, "n/a", ha="center", va="center", fontsize=7, color="0.5")
                continue
            colour = "0.65" if e["too_small"] else "tab:blue"
            ci = e.get("auc_ci") or {}
            if ci.get("low") is not None:
                ax.plot([ci["low"], ci["high"]], [y, y], color=colour, linewidth=1.5)
            ax.plot([e["auc"]], [y], marker="s", color=colour, markersize=5)
        auc = ((overall or {}).get(name) or {}).get("auc")
        if auc is not None:
            ax.axvline(auc, color="tab:red", linestyle="--", linewidth=1)
        ax.axvline(0.5, color="0.8", linewidth=1)
        ax.set_xlim(-0.03, 1.03)  # a group at AUC 0 or 1 stays visible
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("AUC (95% CI)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    labels = [f"{column}: {value} (n={subgroups[column][value]['n_records']})" for column, value in rows]
    axes[0][0].set_yticks(positions, labels, fontsize=8)
    fig.suptitle("AUC by subgroup (grey: too few positives or negatives; red dashed: all images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_gradcam_examples(store, prompts, records, scores: np.ndarray, labels: np.ndarray, per_class: dict,
                     out_dir: Path, limit: int = 3) -> list[dict]:
    """Up to ``limit`` Grad-CAM figures for the class with most positives: its most confident true positive,
    most confident false positive, and least confident false negative at the chosen threshold."""
    from medclipin.eval.evaluate import _file_safe
    from medclipin.eval.gradcam import explain, save_explanation

    if limit <= 0 or not len(scores):
        return []
    candidates = [(e["positives"], c, name) for c, (name, e) in enumerate(per_class.items())
                  if (e.get("operating_point") or {}).get("threshold") is not None]
    if not candidates:
        return []
    _, c, name = max(candidates)
    threshold = per_class[name]["operating_point"]["threshold"]
    y, s = labels[:, c], scores[:, c]
    chosen = []
    for kind, mask, order in (("true positive", (y == 1) & (s >= threshold), -1),
                              ("false positive", (y == 0) & (s >= threshold), -1),
                              ("false negative", (y == 1) & (s < threshold), 1)):
        rows = np.flatnonzero(mask)
        if len(rows):
            chosen.append((kind, int(rows[np.argsort(order * s[rows])[0]])))
    contrast = prompts.templates[0].format(prompts.negative[name][0]) if prompts.negative.get(name) else None
    examples = []
    for kind, row in chosen[:limit]:
        png = out_dir / f"example_{kind.replace(' ', '_')}_{_file_safe(name)}.png"
        try:
            explanation = explain(store.model, store.processor, records[row].image_path, prompts.first_prompt(name),
                                  image_cache=store.image_cache, store=store, contrast=contrast)
        except Exception as exc:  # noqa: BLE001 - a figure must not sink the report
            log.warning("Grad-CAM example (%s) skipped: %s", kind, type(exc).__name__)
            continue
        save_explanation(explanation, png, title=f"{kind} for {name}: score {s[row]:.3f}, threshold {threshold:.3f}")
        examples.append({"kind": kind, "class": name, "score": float(s[row]), "png": png.name})
    return examples


def write_clinical_report(out: Path, result: dict, run: dict, prompts, records, scores: np.ndarray,
                          labels: np.ndarray, calibrated: np.ndarray, store=None, gradcam_examples: int = 3,
                          bootstrap: int = 1000, seed: int = 0) -> Path:
    """Figures (``report_roc.png``, ``report_reliability.png``, ``report_subgroups.png``, Grad-CAM examples) and
    ``report.md`` in ``out``."""
    out = Path(out)
    names = prompts.class_names
    per_class = result["per_class"]
    clinical = result.get("clinical") or {}
    points = {n: per_class[n].get("operating_point") for n in names}
    external = bool(run.get("test_manifest"))
    where = "an external test set (every record of the test manifest)" if external else f"split `{run.get('split')}`"
    roc = plot_roc_bands(scores, labels, names, out / "report_roc.png", points, bootstrap=min(bootstrap, 200) or 0,
                         seed=seed, title=f"ROC curves with 95% bands — {where.split(' (')[0]}")
    curves = {}
    for c, n in enumerate(names):
        known = ~np.isnan(labels[:, c])
        ece = (per_class[n].get("calibration") or {}).get("ece")
        curves[n if ece is None else f"{n}, ECE {ece:.3f}"] = (labels[known, c], calibrated[known, c])
    reliability = plot_reliability(curves, out / "report_reliability.png",
                                   title=f"Reliability after {clinical.get('calibration_method', 'no')} calibration")
    examples = []
    if store is not None and gradcam_examples:
        examples = write_gradcam_examples(store, prompts, records, scores, labels, per_class, out, gradcam_examples)

    lines = [f"# Evaluation report — {prompts.name}", ""]
    lines += [f"**Images scored:** {len(records)} from {where}. **Model:** `{run.get('checkpoint')}`. "
              f"**Task:** {len(names)} finding(s) scored zero-shot from the prompt file `{prompts.name}` "
              f"({prompts.mode}).", ""]
    lines += [f"**How each threshold was chosen:** {clinical.get('threshold_rule_text', 'n/a')}, on split "
              f"`{clinical.get('fit_split')}` of `{run.get('manifest')}` ({clinical.get('fit_records', 0)} images), "
              "then applied unchanged to the images scored here. A score at or above the threshold is called "
              "positive. Numbers in brackets are 95% bootstrap confidence intervals "
              f"({bootstrap} resamples of the images).", ""]
    for note in clinical.get("notes") or []:
        lines += [f"> **Caution:** {note}.", ""]
    lines += ["## Results at the chosen threshold", ""]
    rows = []
    for n in names:
        e, p = per_class[n], points[n] or {}
        rows.append([n, e.get("n", 0), e.get("positives", 0), _auc_text(e.get("auc"), e.get("auc_ci")),
                     "n/a" if p.get("threshold") is None else f"{p['threshold']:.3g}",
                     _with_ci(p.get("sensitivity"), p.get("sensitivity_ci")),
                     _with_ci(p.get("specificity"), p.get("specificity_ci")),
                     _with_ci(p.get("ppv"), p.get("ppv_ci")), _with_ci(p.get("npv"), p.get("npv_ci"))])
    lines += _table(["finding", "labelled images", "positive", "AUC", "threshold", "sensitivity", "specificity",
                     "PPV", "NPV"], rows)
    lines += ["", "Labelled images: those whose label for the finding is stated (1 or 0); uncertain and unstated "
              "labels are left out of that finding's figures."]
    lines += ["", "Counts and the remaining metrics:", ""]
    rows = []
    for n in names:
        p = points[n] or {}
        rows.append([n, *(("n/a" if p.get(k) is None else p[k]) for k in ("tp", "fp", "tn", "fn")),
                     _with_ci(p.get("f1"), p.get("f1_ci"), percent=False),
                     _with_ci(p.get("mcc"), p.get("mcc_ci"), percent=False), p.get("note", "")])
    lines += _table(["finding", "true pos.", "false pos.", "true neg.", "false neg.", "F1", "MCC", "note"], rows)
    lines += ["", "PPV and NPV depend on how common the finding is in this set; they carry over to another "
              "population only if its prevalence is similar.", ""]
    lines += ["## ROC curves", "", "Each panel: the curve, its 95% band, and (red dot) the chosen operating point.",
              "", f"![ROC curves with 95% bands]({roc.name})", ""]
    lines += ["## Can the score be read as a probability? (calibration)", "",
              f"Scores were mapped to probabilities by {clinical.get('calibration_method')} scaling fitted on the "
              "fit split. ECE is the average gap between predicted probability and observed frequency (0 = "
              "perfect); Brier is the mean squared error of the probability (lower is better).", ""]
    rows = []
    for n in names:
        cal = per_class[n].get("calibration") or {}
        rows.append([n, _num2(cal.get("ece_uncalibrated")), _num2(cal.get("ece")), _num2(cal.get("brier_uncalibrated")),
                     _num2(cal.get("brier")), cal.get("note", "")])
    lines += _table(["finding", "ECE raw score", "ECE calibrated", "Brier raw", "Brier calibrated", "note"], rows)
    lines += ["", f"![Reliability diagram]({reliability.name})", ""]
    forest = plot_subgroup_forest(result.get("subgroups") or {}, names, out / "report_subgroups.png", per_class)
    lines += _subgroup_lines(result.get("subgroups") or {}, names, forest.name if forest else None)
    if examples:
        lines += ["## Examples (Grad-CAM)", "",
                  "Warm colours mark the image regions that pushed the model towards the finding rather than its "
                  "absence. They show what this model looked at, not where the disease is.", ""]
        for ex in examples:
            lines += [f"**{ex['kind'].capitalize()}** ({ex['class']}, score {ex['score']:.3f}):", "",
                      f"![{ex['kind']}]({ex['png']})", ""]
    lines += _run_lines(run)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path



def _num2(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _subgroup_lines(subgroups: dict, names: Sequence[str], forest_png: str | None = None) -> list[str]:
    lines = ["## Subgroups", ""]
    if not subgroups:
        return lines + ["The scored records have no view, sex, age or source values: no subgroups.", ""]
    if forest_png:
        lines += [f"![AUC by subgroup]({forest_png})", ""]
    lines += ["The same threshold for every group. *Too few* = fewer than 5 positive or 5 negative images for "
              "that finding in that group: the intervals are too wide to conclude anything.", ""]
    for column, groups in subgroups.items():
        lines += [f"### By {column}" + (" (bands of years)" if column == "age" else ""), ""]
        rows = []
        for value, group in groups.items():
            for n in names:
                e = group["per_class"][n]
                p = e.get("operating_point") or {}
                rows.append([value, n, e["n"], e["positives"], _auc_text(e.get("auc"), e.get("auc_ci")),
                             _with_ci(p.get("sensitivity"), p.get("sensitivity_ci")),
                             _with_ci(p.get("specificity"), p.get("specificity_ci")),
                             "too few" if e["too_small"] else "", e.get("note", "")])
        lines += _table([column, "finding", "labelled images", "positive", "AUC", "sensitivity", "specificity", "flag", "note"],
                        rows) + [""]
    return lines


# ---------------------------------------------------------------------------------------- compare
def compare_markdown(payload: dict) -> str:
    """``compare.md``: per finding, both AUCs, ΔAUC (B − A) with its paired bootstrap CI and DeLong's p, then the
    operating-point differences at each model's own validate-chosen threshold."""
    a, b = payload["models"]["a"], payload["models"]["b"]
    lines = ["# Comparing two models on the same images", "",
             f"- **A:** `{a['checkpoint']}` (fingerprint `{a['model_fingerprint']}`)",
             f"- **B:** `{b['checkpoint']}` (fingerprint `{b['model_fingerprint']}`)",
             f"- images: {payload['n_records']} ({payload['test_set']}); prompts `{payload['prompts']['name']}` "
             f"(sha256 `{payload['prompts']['sha256'] or 'n/a'}`)",
             f"- manifest `{payload['manifest']}` (sha256 `{payload['manifest_sha256']}`)"
             + (f"; external test manifest `{payload['test_manifest']}` (sha256 `{payload['test_manifest_sha256']}`)"
                if payload.get("test_manifest") else ""),
             f"- thresholds: {payload['threshold_rule_text']}, each model its own, on split `{payload['fit_split']}`",
             ""]
    for note in payload.get("notes") or []:
        lines += [f"> **Caution:** {note}.", ""]
    lines += ["## AUC", "",
             "Δ = B − A. The interval is a paired bootstrap (the same resampled images for both models, "
             f"{payload['bootstrap']} resamples); p is DeLong's test for two correlated AUCs (DeLong et al. 1988).", ""]
    rows = []
    for name, e in payload["classes"].items():
        ci = e.get("delta_auc_ci") or {}
        rows.append([name, e["n"], e["positives"], _num2(e["auc_a"]), _num2(e["auc_b"]),
                     "n/a" if e["delta_auc"] is None else f"{e['delta_auc']:+.3f}",
                     "n/a" if ci.get("low") is None else f"{ci['low']:+.3f} to {ci['high']:+.3f}",
                     "n/a" if e["p_value"] is None else f"{e['p_value']:.3g}", e.get("note", "")])
    lines += _table(["finding", "labelled images", "positive", "AUC A", "AUC B", "Δ AUC", "95% CI", "DeLong p", "note"], rows)
    lines += ["", "## At each model's operating point", "",
              "Δ = B − A as a difference of proportions (+0.10 = 10 percentage points), with its paired bootstrap "
              "95% CI.", ""]
    rows = []
    for name, e in payload["classes"].items():
        cells = [name]
        for metric in METRICS:
            d = e["operating_point_delta"][metric]
            ci = d.get("ci") or {}
            if d["delta"] is None:
                cells.append("n/a")
            elif ci.get("low") is None:
                cells.append(f"{d['delta']:+.2f}")
            else:
                cells.append(f"{d['delta']:+.2f} ({ci['low']:+.2f} to {ci['high']:+.2f})")
        rows.append(cells)
    lines += _table(["finding", *(METRIC_LABELS[m] for m in METRICS)], rows)
    missing = [n for n, e in payload["classes"].items() if e["threshold_a"] is None or e["threshold_b"] is None]
    if missing:
        lines += ["", f"n/a: no threshold for {', '.join(missing)} (the fit split lacks positive or negative "
                      "images of it)."]
    lines += ["", "A difference whose interval contains 0 is not shown to be real on these images.", ""]
    return "\n".join(lines) + "\n"
