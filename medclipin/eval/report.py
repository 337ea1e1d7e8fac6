"""Writers for evaluation results: JSON (no NaN, ever), Markdown reports that state exactly what ran,
and PNG figures (ROC curves). Nothing here prints report text or patient identifiers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medclipin.atomic import atomic_open


# ------------------------------------------------------------------------------------------- JSON
def json_safe(value: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays → Python, NaN/inf → None, paths → str, sets → sorted lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return [json_safe(v) for v in sorted(value)]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Write ``payload`` as strict JSON (``allow_nan=False``: a NaN that slipped through is a bug), atomically."""
    path = Path(path)
    text = json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n"  # fails before anything is written
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


# ------------------------------------------------------------------------------------------ format
def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: dict | None) -> str:
    if not interval or interval.get("low") is None:
        return "n/a"
    return f"{interval['low']:.3f}–{interval['high']:.3f} ({interval['valid_resamples']})"


def _table(header: Sequence[str], rows: list[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def _run_lines(run: dict) -> list[str]:
    lines = ["## What ran", ""]
    for key, label in (("checkpoint", "checkpoint"), ("model_fingerprint", "model fingerprint"),
                       ("manifest", "manifest"), ("manifest_sha256", "manifest sha256"),
                       ("test_manifest", "external test manifest"), ("test_manifest_sha256", "test manifest sha256"),
                       ("split", "split"),
                       ("n_records", "records evaluated"), ("embedding_cache", "embedding cache"),
                       ("medclipin_version", "medclipin version"), ("date", "date (UTC)")):
        if run.get(key) not in (None, ""):
            value = run[key]
            lines.append(f"- {label}: `{value}`" if key in ("checkpoint", "manifest", "embedding_cache", "manifest_sha256",
                                                               "model_fingerprint", "test_manifest",
                                                               "test_manifest_sha256") else f"- {label}: {value}")
    if run.get("arguments"):
        args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in run["arguments"].items()
                        if v not in (None, "", False))
        lines.append(f"- arguments: `{args}`")
    return lines + [""]


# --------------------------------------------------------------------------------------- zero-shot
def zeroshot_markdown(result: dict, run: dict, prompts: dict, roc_png: str | None = None) -> str:
    """The zero-shot report: prompts file + sha256, split, counts, per-class table with CIs, threshold rule."""
    lines = ["# Zero-shot classification", ""]
    lines += _run_lines(run)
    lines += ["## Prompts", "",
              f"- file: `{prompts.get('path') or '(built in code)'}`",
              f"- sha256: `{prompts.get('sha256') or 'n/a'}`",
              f"- name: {prompts.get('name')}; mode: **{prompts.get('mode')}**",
              f"- templates ({len(prompts.get('templates', []))}): "
              + ", ".join(f"`{t}`" for t in prompts.get("templates", [])),
              "- each class embedding is the normalised mean of the normalised embeddings of every "
              "template × description (prompt ensemble)", ""]
    if prompts.get("mode") == "multilabel":
        lines.append("- score per class: softmax over its (positive, negative) ensemble pair, scaled by the "
                     "model's learned temperature; the score is the positive probability")
    else:
        lines.append("- score: softmax over the classes' positive ensembles, scaled by the model's learned temperature")
    lines += ["", "## Threshold rule (accuracy, F1)", "", f"{result.get('threshold_rule', '')}.", ""]
    bootstrap = result.get("bootstrap")
    lines += ["## Results", ""]
    unreadable = result.get("unreadable_images") or []
    if unreadable:  # "records evaluated" counts them; the scores do not
        lines += [f"{len(unreadable)} of the {run.get('n_records', '?')} records were left out: their images could "
                  "not be read (each named with its reason under `unreadable_images` in zeroshot.json).", ""]
    lines.append(f"Macro AUC: **{_num(result.get('mean_auc'))}** (95% CI {_ci(result.get('mean_auc_ci'))}) over "
                 f"{result.get('macro_auc_classes', 0)} classes; macro F1 {_num(result.get('macro_f1'))}; "
                 f"macro accuracy {_num(result.get('macro_accuracy'))}.")
    if result.get("accuracy") is not None:
        lines.append(f"Multi-class accuracy (argmax, {result.get('accuracy_rows')} rows with exactly one positive): "
                     f"{_num(result['accuracy'])}.")
    if bootstrap:
        lines.append(f"Confidence intervals: {bootstrap['resamples']} bootstrap resamples of the rows (seed "
                     f"{bootstrap['seed']}), percentile interval; the number in brackets is the count of resamples "
                     "in which the AUC was defined.")
    else:
        lines.append("No bootstrap was run (`--bootstrap 0`).")
    lines.append("")
    rows = []
    for name, e in result["per_class"].items():
        rows.append([name, e["n"], e["positives"], _num(e["auc"]), _ci(e.get("auc_ci")), _num(e["accuracy"]),
                     _num(e["f1"]), e.get("note", "")])
    lines += _table(["class", "n", "positives", "AUC", "AUC 95% CI (valid resamples)", "accuracy", "F1", "note"], rows)
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    if roc_png:
        lines += ["", f"![ROC curves]({roc_png})"]
    if result.get("clinical"):
        lines += ["", "Operating points (threshold chosen on the fit split), calibration and subgroups: "
                      "[report.md](report.md)."]
    return "\n".join(lines) + "\n"


def plot_roc(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
             aucs: dict | None = None, title: str = "Zero-shot ROC curves") -> Path:
    """One panel: a ROC curve per class whose AUC is defined, the chance diagonal, AUCs in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = 1 if len(class_names) <= 8 else 2
    fig, ax = plt.subplots(figsize=(6.4 if columns == 1 else 9.0, 6.0), dpi=110)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance (AUC 0.5)")
    colours = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    n_colours = 10 if len(class_names) <= 10 else 20
    skipped = []
    for c, name in enumerate(class_names):
        known = ~np.isnan(labels[:, c])
        y = labels[known, c].astype(int)
        if len(y) == 0 or y.min() == y.max():
            skipped.append(name)
            continue
        fpr, tpr, _ = roc_curve(y, scores[known, c])
        auc = (aucs or {}).get(name)
        label = f"{name}: AUC {auc:.3f} ({int(y.sum())} pos / {len(y)})" if auc is not None else name
        ax.plot(fpr, tpr, color=colours(c % n_colours), linewidth=1.8, alpha=0.85, label=label, drawstyle="default")
    # a little margin so curves running along the borders stay visible
    ax.set_xlim(-0.015, 1.015)
    ax.set_ylim(-0.015, 1.015)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 − specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if skipped:  # a legend line without a curve, so it never covers one
        ax.plot([], [], " ", label="no curve, labels constant: " + ", ".join(skipped))
    fig.tight_layout()  # before the legend: the layout must not shrink the axes to make room for it
    # below the axes: a legend inside would cover the curves' lower-right corner
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=8, ncol=columns, frameon=False)
    fig.savefig(path, bbox_inches="tight")  # grows the canvas to hold the legend below the axes
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------- retrieval
def retrieval_markdown(result: dict, run: dict) -> str:
    lines = ["# Image–text retrieval", ""] + _run_lines(run)
    lines += ["## Ground truth", "",
              "Each image's own report is its match; reports identical after whitespace/case normalisation "
              "count as matches too (medical reports repeat). Rank = 1 + the number of candidates scored strictly "
              f"higher than the best correct one. {result['n']} pairs, {result['unique_texts']} distinct reports.", "",
              "## Results", ""]
    rows = []
    for direction, label in (("image_to_text", "image → text"), ("text_to_image", "text → image")):
        d = result[direction]
        rows.append([label, _num(d["R@1"]), _num(d["R@5"]), _num(d["R@10"]), _num(d["mean_rank"], 1),
                     _num(d["median_rank"], 1)])
    chance = result["chance"]
    rows.append(["chance (random ranking)", _num(chance["R@1"]), _num(chance["R@5"]), _num(chance["R@10"]), "", ""])
    lines += _table(["direction", "R@1", "R@5", "R@10", "mean rank", "median rank"], rows)
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- probe
def probe_markdown(result: dict, run: dict) -> str:
    lines = ["# Linear probe on frozen image features", ""] + _run_lines(run)
    lines += ["## Protocol", "",
              f"- features: {run.get('features', 'encoder')} (frozen, from the embedding store)",
              f"- classifier: {result['settings']['model']}, C={result['settings']['C']}",
              f"- training split: {result['n_train_total']} records; test split: {result['n_test']} records",
              f"- seeds: {', '.join(str(s) for s in result['seeds'])}; subsets drawn per (fraction, seed), "
              "stratified by label vector, at least one positive and one negative per class where possible",
              "- AUC on the test split; mean ± std (population) over seeds; a class with a single label value "
              "in its training subset or in the test set has no AUC for that seed", "", "## Results", ""]
    names = result["class_names"]
    rows = []
    for key, entry in result["fractions"].items():
        cells = [f"{float(entry['fraction']) * 100:g}%", "/".join(str(n) for n in entry["n_train"]),
                 _pm(entry["macro_auc"])]
        cells += [_pm(entry["per_class"][n]) for n in names]
        rows.append(cells)
    lines += _table(["labels", "n train (per seed)", "macro AUC"] + list(names), rows)
    clinical = result.get("clinical")
    if clinical:
        lines += ["", "## Operating points (probe trained on all the training labels)", "",
                  f"Threshold per class: {clinical['threshold_rule_text']}, on {clinical['fit_records']} "
                  f"fit-split records; calibration: {clinical['calibration_method']}. 95% bootstrap CIs.", ""]
        rows = []
        for name, e in clinical["per_class"].items():
            p, cal = e["operating_point"], e["calibration"]
            rows.append([name, "n/a" if p["threshold"] is None else f"{p['threshold']:.3g}",
                         *(_with_interval(p[m], p.get(m + "_ci")) for m in ("sensitivity", "specificity", "ppv", "npv")),
                         _num(cal.get("ece")), _num(cal.get("brier"))])
        lines += _table(["class", "threshold", "sensitivity", "specificity", "PPV", "NPV", "ECE", "Brier"], rows)
        if clinical.get("classes_not_trained"):
            lines += ["", "Not trained (one label value in the training split): "
                      + ", ".join(clinical["classes_not_trained"]) + "."]
    return "\n".join(lines) + "\n"


def _with_interval(value, interval: dict | None) -> str:
    if value is None or not interval or interval.get("low") is None:
        return _num(value)
    return f"{value:.3f} ({interval['low']:.3f}–{interval['high']:.3f})"


def _pm(entry: dict) -> str:
    if entry.get("mean") is None:
        return "n/a"
    extra = "" if entry["n_valid"] == len(entry["values"]) else f" [{entry['n_valid']}/{len(entry['values'])} seeds]"
    return f"{entry['mean']:.3f} ± {entry['std']:.3f}{extra}"


# ----------------------------------------------------------------------------------------- gradcam
def gradcam_markdown(summary: dict, run: dict) -> str:
    lines = ["# Multimodal Grad-CAM", ""] + _run_lines(run)
    lines += ["## What the colours mean", "",
              "Warm colours mark where a change of the image would most raise the similarity between the image "
              "and the text, for this model. They are relative within one image, not a diagnosis and not a "
              "segmentation; they depend on what the model learned.", "", "## Localisation", ""]
    loc = summary.get("localisation") or {}
    if loc.get("pairs"):
        lines.append(f"- pairs (image, finding with a box): {loc['pairs']}")
        lines.append(f"- pointing game (CAM maximum inside the box, {_num(loc.get('tolerance_px'), 0)} px tolerance in "
                     f"the original image, Zhang et al.): {_num(loc.get('pointing_game'))}; strict (no tolerance): "
                     f"{_num(loc.get('pointing_game_strict'))}")
        lines.append(f"- method: {loc.get('method', 'gradcam')} on layer `{loc.get('layer', '?')}`; explained: "
                     f"{loc.get('target', 'prompt')}")
        lines.append(f"- mean IoU of {{CAM ≥ {loc.get('iou_threshold')}·max}} with the box: {_num(loc.get('iou'))}")
        for name, value in (loc.get("per_class_pointing_game") or {}).items():
            lines.append(f"  - {name}: pointing game {_num(value)}")
    else:
        lines.append("No boxes: no localisation metrics.")
    figures = summary.get("figures") or []
    if figures:
        lines += ["", "## Figures", ""] + [f"- `{Path(f).name}`" for f in figures]
    return "\n".join(lines) + "\n"


def plot_learning_curves(metrics_csv: str | os.PathLike, path: str | os.PathLike, title: str = "") -> Path:
    """A PNG of a run's ``metrics.csv``: training loss terms against step (left) and the validation numbers
    (zero-shot mean AUC, image→text and text→image R@10) against step (right), when validation ran."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    def series(column: str) -> tuple[list[int], list[float]]:
        steps, values = [], []
        for row in rows:
            value = row.get(column, "")
            if value not in ("", None):
                steps.append(int(row["step"]))
                values.append(float(value))
        return steps, values

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    terms = [("loss", "total loss"), ("clip", "CLIP (InfoNCE)"), ("siglip", "SigLIP"), ("loss_inter", "CLIPin L_inter"),
             ("loss_intra", "CLIPin L_intra"), ("nclip", "nCLIP")]
    for column, label in terms:
        steps, values = series(column)
        if steps:
            left.plot(steps, values, label=label, linewidth=1.2 if column != "loss" else 2.0)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_title("training losses")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    plotted = False
    for column, label in (("val_zeroshot_mean_auc", "zero-shot mean AUC"), ("val_retrieval_i2t_R@10", "image→text R@10"),
                          ("val_retrieval_t2i_R@10", "text→image R@10")):
        steps, values = series(column)
        if steps:
            right.plot(steps, values, marker="o", label=label)
            plotted = True
    right.set_xlabel("step")
    right.set_ylim(0, 1)
    right.set_title("held-out validation split")
    right.grid(alpha=0.3)
    if plotted:
        right.axhline(0.5, color="0.6", linestyle=":", linewidth=1, label="AUC of chance (0.5)")
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no validation in this run", ha="center", va="center", transform=right.transAxes)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
