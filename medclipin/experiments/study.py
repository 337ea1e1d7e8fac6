"""CLIPin where it claims to win: a seeded study on loose and repetitive image–report pairs.

    python -m medclipin.experiments.study --out runs/study                 # the whole plan, resumable
    python -m medclipin.experiments.study --out runs/study --grid main --settings clean loose40
    python -m medclipin.experiments.study --out runs/study --grid continued  # CLIPin on an already-trained CLIP
    python -m medclipin.experiments.study --out runs/study --report-only   # tables + plots from every finished run

Two grids, both on the offline-pretrained CPU towers (``cpu_*`` configs: ImageNet EfficientNet-Lite0 +
all-MiniLM-L6-v2) with one short, equal budget for every run (``--steps``, batch, image size):

* ``main`` — CLIP, ONLYCLIP (CLIPin's network, non-contrastive terms off), CLIP + CLIPin, SigLIP,
  SigLIP + CLIPin and xCLIP on four training sets that differ only in their train split: ``clean``,
  ``loose20`` / ``loose40`` (that share of train reports describe another study or omit findings) and
  ``repetitive`` (most normal train reports replaced by three fixed templates). Validate and test splits
  are identical in all four (``medclipin synth --loose-fraction/--repetitive-fraction``).
* ``stall`` — CLIP + CLIPin with one thing changed at a time (text view, momentum 0.99 / cosine, fixed
  λ_clip 5 / 20, the reference code's optimiser, a 3x budget — with CLIP and ONLYCLIP at 3x too — and no
  non-contrastive gradient into the shared pre-projector), and the from-scratch tiny towers where the contrastive term used to stall.
* ``continued`` — the paper's own setting: CLIPin as a plug-in on an already-trained CLIP. The main grid's CLIP
  (clean pairs, seed 0) is exported as an open_clip folder and brought back with ``model.base``; ONLYCLIP and
  CLIP + CLIPin continue it on ``loose40`` and ``repetitive`` pairs.

Every run logs per-term gradient norms on the image and text trunks and the per-dimension embedding std
(``metrics.csv``), and is scored on the held-out test split: zero-shot AUC (synthetic prompts, bootstrap
95% CI), image↔text R@10, and a linear probe on the frozen image tower at 1 / 10 / 100 % of the labels.
A finished run (``OUT/runs/<grid>/<setting>/<variant>/seed<k>/result.json``) is reused when the same
settings are asked for again, so the command can be stopped and restarted at any time.

Writes ``OUT/results.json``, ``OUT/study.md`` (mean ± 95% CI over seeds, Student t; and the paired
per-seed differences between each method and its baseline), ``OUT/auc_vs_loose.png`` and
``OUT/stall_monitors.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ the plan
SETTINGS = {  # name → (loose_fraction, repetitive_fraction) of the synthetic train split
    "clean": (0.0, 0.0),
    "loose20": (0.2, 0.0),
    "loose40": (0.4, 0.0),
    "repetitive": (0.0, 0.8),
}

METHODS = {  # variant → (shipped config, overrides, label)
    "clip": ("cpu_clip", [], "CLIP"),
    "onlyclip": ("cpu_onlyclip", [], "ONLYCLIP (CLIPin network, NC terms off)"),
    "clip_clipin": ("cpu_clip_clipin", [], "CLIP + CLIPin"),
    "siglip": ("cpu_siglip", [], "SigLIP"),
    "siglip_clipin": ("cpu_siglip_clipin", [], "SigLIP + CLIPin"),
    "xclip": ("cpu_xclip", [], "xCLIP"),
}

REFERENCE_OPTIMISER = [  # T6Yang/CLIPin main.py: one AdamW for everything, no clipping, λ decayed too
    "train.lr=3e-5", "train.image_encoder_lr=0", "train.text_encoder_lr=0", "train.betas=[0.9, 0.98]",
    "train.eps=1e-6", "train.weight_decay=0.001", "train.grad_clip=0", "train.decay_loss_weights=true",
]

STALL = {  # variant → (config, overrides, label); every one is CLIP + CLIPin with one thing changed
    "clip_clipin": ("cpu_clip_clipin", [], "CLIP + CLIPin (as shipped)"),
    "text_view": ("cpu_clip_clipin", ["data.text.view_shuffle=true", "data.text.view_drop_prob=0.2"],
                  "second text view: sentences shuffled / dropped"),
    "momentum_0.99": ("cpu_clip_clipin", ["model.clipin.momentum=0.99"], "EMA momentum 0.99"),
    "momentum_cosine": ("cpu_clip_clipin", ["model.clipin.momentum_schedule=cosine"], "EMA momentum 0.95 → 1 (cosine)"),
    "lambda_clip_5": ("cpu_clip_clipin", ["model.clipin.learnable_lambda=false", "model.clipin.lambda_clip=5"],
                      "fixed λ_clip = 5"),
    "lambda_clip_20": ("cpu_clip_clipin", ["model.clipin.learnable_lambda=false", "model.clipin.lambda_clip=20"],
                       "fixed λ_clip = 20"),
    "reference_optimiser": ("cpu_clip_clipin", REFERENCE_OPTIMISER, "the reference code's optimiser"),
    "detach_pre": ("cpu_clip_clipin", ["model.clipin.detach_pre=true"],
                   "diagnostic: no NC gradient into the shared pre-projector"),
    "long": ("cpu_clip_clipin", ["@steps*3"], "CLIP + CLIPin, 3x the budget"),
    "clip_long": ("cpu_clip", ["@steps*3"], "CLIP, 3x the budget"),
    "onlyclip_long": ("cpu_onlyclip", ["@steps*3"], "ONLYCLIP, 3x the budget"),
    # where the contrastive term used to stall: both towers from scratch (tiny ViT + 3-layer BERT)
    "scratch_clip": ("tiny_clip", ["@scratch"], "from scratch: CLIP"),
    "scratch_onlyclip": ("tiny_clip_clipin", ["@scratch", "model.clipin.use_inter=false", "model.clipin.use_intra=false"],
                         "from scratch: ONLYCLIP"),
    "scratch_clip_clipin": ("tiny_clip_clipin", ["@scratch"], "from scratch: CLIP + CLIPin"),
    "scratch_detach_pre": ("tiny_clip_clipin", ["@scratch", "model.clipin.detach_pre=true"],
                           "from scratch: CLIP + CLIPin, no NC gradient into the pre-projector"),
}


# CLIPin in its paper's setting: a plug-in on an already-trained CLIP. The trained CLIP is this study's own CLIP
# (cpu_clip, clean pairs, seed 0, the same budget), exported as an open_clip folder and loaded back through
# model.base = open_clip:local-dir:..., as a user brings in a CLIP of theirs. Each run continues it on loose or
# repetitive pairs; the CLIPin pre-projector starts as an isometry, so every run starts at the base's embeddings.
CONTINUED = {
    "cont_onlyclip": ("cpu_onlyclip", ["@base"], "continued: ONLYCLIP (CLIPin network, NC terms off)"),
    "cont_clip_clipin": ("cpu_clip_clipin", ["@base"], "continued: CLIP + CLIPin"),
}
CONTINUED_SETTINGS = ("loose40", "repetitive")


def _plan_of(grid: str) -> dict:
    return {"main": METHODS, "stall": STALL, "continued": CONTINUED}[grid]


@dataclass
class Budget:
    """What every run shares: the same steps, batch, images, text length and evaluation."""

    steps: int = 120
    batch_size: int = 32
    image_size: int = 96
    max_length: int = 48
    patients: int = 1600
    threads: int = 2
    probe_seeds: tuple[int, ...] = (0, 1, 2)
    bootstrap: int = 200
    extra: list[str] = field(default_factory=list)

    def overrides(self, manifest: Path, seed: int, special: list[str]) -> list[str]:
        steps = self.steps * 3 if "@steps*3" in special else self.steps
        size, max_length = self.image_size, self.max_length
        if "@scratch" in special:
            # from-scratch tiny towers: the setting where the stall was measured (docs/comparison.md, before
            # this study): 300 steps × batch 32 at 64 px, reports up to 96 tokens
            steps, size, max_length = 300, 64, 96
        out = [
            f"data.manifest={manifest}", f"train.seed={seed}", f"train.steps={steps}",
            f"train.batch_size={self.batch_size}", f"data.image.size={size}",
            f"data.text.max_length={max_length}", f"train.warmup_steps={max(1, steps // 10)}",
            f"train.checkpoint_every={steps}", "train.keep_checkpoints=1", f"train.log_every={max(1, steps // 12)}",
            f"train.grad_monitor_every={max(1, steps // 6)}", f"train.threads={self.threads}",
            "train.validate_every=0", "train.device=cpu", "eval.prompts=synthetic",
        ]
        return out + [o for o in special if not o.startswith("@")] + list(self.extra)


# ------------------------------------------------------------------------------------------ one run
def _settings_key(budget: Budget, config: str, overrides: list[str]) -> dict:
    # the thread count changes how fast a run goes, not what it computes (up to float summation order), so
    # runs made with 1 or 2 threads are the same run
    overrides = [o for o in overrides if not o.startswith("train.threads=")]
    return {"config": config, "overrides": overrides, "probe_seeds": list(budget.probe_seeds),
            "bootstrap": budget.bootstrap, "version": 1}


def run_one(out: Path, grid: str, setting: str, variant: str, seed: int, manifest: Path, budget: Budget) -> dict:
    """Train and evaluate one run, or return its cached result when it ran with the same settings."""
    from medclipin.api import load
    from medclipin.config import load_config
    from medclipin.data.manifest import read_manifest
    from medclipin.eval.embeddings import EmbeddingStore
    from medclipin.eval.evaluate import probe, retrieval, zero_shot
    from medclipin.eval.zeroshot import load_prompts
    from medclipin.train.trainer import pretrain

    config, special, label = _plan_of(grid)[variant]
    overrides = budget.overrides(manifest, seed, special)
    if "@base" in special:
        overrides.append(f"model.base=open_clip:local-dir:{trained_base(out, budget)}")
    run_dir = out / "runs" / grid / setting / variant / f"seed{seed}"
    result_path = run_dir / "result.json"
    key = _settings_key(budget, config, overrides)
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        old = dict(cached.get("key") or {})
        old["overrides"] = [o for o in old.get("overrides", []) if not o.startswith("train.threads=")]
        if old == key:
            return cached
    train_dir = run_dir / "run"
    if train_dir.exists():  # an interrupted run of the study's own: redo it from scratch
        shutil.rmtree(train_dir)
    cfg = load_config(config, overrides)
    torch.set_num_threads(budget.threads)
    start = time.perf_counter()
    result = pretrain(cfg, train_dir, progress=False)
    train_s = time.perf_counter() - start

    start = time.perf_counter()
    model, processor = load(result.model_dir)
    store = EmbeddingStore(model, processor, batch_size=64)
    manifest_records = read_manifest(manifest)
    test, train = manifest_records.split("test"), manifest_records.split("train")
    prompts = load_prompts("synthetic")
    zs = zero_shot(store, test, prompts, bootstrap=budget.bootstrap, seed=seed)
    zs.pop("scores"), zs.pop("labels")
    rt = retrieval(store, test)
    lp = probe(store, train, test, prompts.class_names, fractions=(0.01, 0.1, 1.0), seeds=budget.probe_seeds)
    eval_s = time.perf_counter() - start
    record = {
        "key": key, "grid": grid, "setting": setting, "variant": variant, "label": label, "seed": seed,
        "zeroshot": {"mean_auc": zs.get("mean_auc"), "mean_auc_ci": zs.get("mean_auc_ci"),
                     "per_class_auc": zs.get("per_class_auc")},
        "retrieval": {"i2t_R@10": rt["image_to_text"]["R@10"], "t2i_R@10": rt["text_to_image"]["R@10"],
                      "chance_R@10": rt["chance"]["R@10"]},
        "probe": {f: (lp["fractions"][f]["macro_auc"] or {}).get("mean") for f in lp["fractions"]},
        "training": _training_summary(train_dir / "metrics.csv"),
        "train_s": train_s, "eval_s": eval_s, "samples_per_s": result.samples_per_s,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(record, indent=2))
    # A finished run keeps its model, config.yaml and metrics.csv. Its checkpoints (60 % of a run's disk, 156 of
    # 257 MB here) only serve resuming, and the study redoes an interrupted run from scratch instead.
    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)
    return record


def trained_base(out: Path, budget: Budget) -> Path:
    """The trained CLIP the ``continued`` grid starts from, as an open_clip ``local-dir`` folder: the main
    grid's CLIP on clean pairs, seed 0 (trained here if that run is not in the study yet), exported."""
    from medclipin.api import load
    from medclipin.models.export import export_model

    folder = out / "base" / "open_clip"
    if (folder / "open_clip_config.json").is_file():
        return folder
    run_one(out, "main", "clean", "clip", 0, dataset(out, "clean", budget.patients), budget)
    model, processor = load(out / "runs" / "main" / "clean" / "clip" / "seed0" / "run")
    export_model(model, processor, folder, "open_clip")
    return folder


def _training_summary(metrics_csv: Path) -> dict:
    """First/last values of the loss terms and monitors, and the gradient-norm rows, from metrics.csv."""
    import csv

    with metrics_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}

    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None

    columns = [c for c in rows[0] if c not in ("epoch", "samples_per_s", "skipped_nonfinite", "rejected_images")]
    first, last = rows[0], rows[-1]
    summary = {"first": {c: number(first.get(c)) for c in columns}, "last": {c: number(last.get(c)) for c in columns}}
    summary["gradient_norms"] = [{c: number(r.get(c)) for c in ["step", *[c for c in r if c.startswith("gnorm_")]]}
                                 for r in rows if any(r.get(c) for c in r if c.startswith("gnorm_"))]
    summary["curve"] = [{c: number(r.get(c)) for c in ("step", "loss", "clip", "siglip", "loss_inter", "loss_intra",
                                                       "nclip", "std_image", "std_text", "std_nc_image",
                                                       "std_nc_text", "lambda_clip") if c in r} for r in rows]
    return summary


# ------------------------------------------------------------------------------------------ data
def dataset(out: Path, setting: str, patients: int) -> Path:
    from medclipin.data.synthetic import generate_synthetic_dataset

    loose, repetitive = SETTINGS[setting]
    return generate_synthetic_dataset(out / "data" / setting, n_patients=patients, loose_fraction=loose,
                                      repetitive_fraction=repetitive)


# ------------------------------------------------------------------------------------------ report
def _mean_ci(values: list[float]) -> dict:
    """Mean and the 95% confidence interval of the mean over seeds (Student t)."""
    from scipy import stats

    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "ci": None, "n": 0, "values": []}
    mean = float(np.mean(values))
    if len(values) < 2:
        return {"mean": mean, "ci": None, "n": len(values), "values": values}
    half = float(stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))
    return {"mean": mean, "ci": [mean - half, mean + half], "half": half, "n": len(values), "values": values}


METRICS = {  # column → (getter, heading)
    "auc": (lambda r: r["zeroshot"]["mean_auc"], "zero-shot AUC"),
    "i2t": (lambda r: r["retrieval"]["i2t_R@10"], "I→T R@10"),
    "t2i": (lambda r: r["retrieval"]["t2i_R@10"], "T→I R@10"),
    "probe1": (lambda r: r["probe"].get("0.01"), "probe 1%"),
    "probe10": (lambda r: r["probe"].get("0.1"), "probe 10%"),
    "probe100": (lambda r: r["probe"].get("1"), "probe 100%"),
    "clip_last": (lambda r: _final_contrastive_loss(r["training"]), "final contrastive loss"),
}


def _final_contrastive_loss(training: dict) -> float | None:
    """The contrastive term (CLIP or SigLIP) averaged over the logged batches of the last fifth of training:
    one batch's loss is noisy (±0.1 at batch 32), a mean over several is what the stall is judged by."""
    curve = training.get("curve") or []
    name = next((c for c in ("clip", "siglip") if any(row.get(c) is not None for row in curve)), None)
    if name is None:
        last = training.get("last") or {}
        return last.get("clip") or last.get("siglip")
    last_step = max(row["step"] for row in curve)
    values = [row[name] for row in curve if row.get(name) is not None and row["step"] > 0.8 * last_step]
    return float(np.mean(values))


def _label(grid: str, variant: str, recorded: str) -> str:
    plan = _plan_of(grid)
    return plan[variant][2] if variant in plan else recorded


def aggregate(results: list[dict]) -> dict:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["grid"], r["setting"], r["variant"]), []).append(r)
    table = {}
    for (grid, setting, variant), runs in sorted(groups.items()):
        table[f"{grid}/{setting}/{variant}"] = {
            # today's label (a cached run keeps the one it was made with)
            "grid": grid, "setting": setting, "variant": variant, "label": _label(grid, variant, runs[0]["label"]),
            "seeds": sorted(r["seed"] for r in runs),
            **{name: _mean_ci([get(r) for r in runs]) for name, (get, _) in METRICS.items()},
            "train_s": float(np.mean([r["train_s"] for r in runs])),
        }
    return table


# the comparisons the study is about: (method, its baseline, label); CLIPin − ONLYCLIP is the one that isolates
# the non-contrastive terms (same network), the others are reported for context
CONTRASTS = [
    ("clip_clipin", "onlyclip", "CLIP + CLIPin − ONLYCLIP (the non-contrastive terms alone)"),
    ("clip_clipin", "clip", "CLIP + CLIPin − CLIP"),
    ("onlyclip", "clip", "ONLYCLIP − CLIP (CLIPin's network, its terms off)"),
    ("siglip_clipin", "siglip", "SigLIP + CLIPin − SigLIP"),
    ("xclip", "clip", "xCLIP − CLIP"),
]
STALL_CONTRASTS = [  # within the stall grid (setting clean)
    ("scratch_clip_clipin", "scratch_onlyclip", "from scratch: CLIP + CLIPin − ONLYCLIP"),
    ("scratch_detach_pre", "scratch_clip_clipin", "from scratch: NC terms kept off the trunk − CLIP + CLIPin"),
    ("scratch_onlyclip", "scratch_clip", "from scratch: ONLYCLIP − CLIP"),
    ("long", "onlyclip_long", "3x the budget: CLIP + CLIPin − ONLYCLIP"),
    ("onlyclip_long", "clip_long", "3x the budget: ONLYCLIP − CLIP"),
    # each pretrained-tower knob against CLIP + CLIPin as shipped (same seeds, one thing changed)
    *((knob, "clip_clipin", f"{STALL[knob][2]} − as shipped")
      for knob in ("text_view", "momentum_0.99", "momentum_cosine", "lambda_clip_5", "lambda_clip_20",
                   "reference_optimiser", "detach_pre")),
]
CONTRAST_METRICS = ("auc", "t2i", "probe1", "probe10", "probe100", "clip_last")


def paired_differences(results: list[dict]) -> list[dict]:
    """Method minus baseline, seed by seed, with the 95% CI of the mean difference (Student t).

    Runs of one seed share the data order, the augmentation draws and the towers' initial weights, so the
    per-seed difference removes what the seeds have in common: a tighter test than comparing two means with
    their own intervals. Also the *robustness* of each method: its loss from ``clean`` to each noisy
    setting, and that loss compared between method and baseline; and the stall grid's from-scratch
    contrasts. A difference counts as shown when its interval excludes 0."""
    by = {(r["grid"], r["setting"], r["variant"], r["seed"]): r for r in results}
    settings = sorted({k[1] for k in by if k[0] == "main"}, key=list(SETTINGS).index)
    rows = []

    def add(kind: str, setting: str, method: str, baseline: str, label: str, value, grid: str = "main") -> None:
        seeds = sorted(k[3] for k in by if k[0] == grid and k[1] == setting and k[2] == method)
        for metric in CONTRAST_METRICS:
            get = METRICS[metric][0]
            diffs = [d for seed in seeds if (d := value(get, seed)) is not None]
            if diffs:
                rows.append({"kind": kind, "setting": setting, "method": method, "baseline": baseline,
                             "label": label, "metric": metric, **_mean_ci(diffs)})

    def level(grid: str, setting: str, method: str, baseline: str):
        def value(get, seed):
            a, b = by.get((grid, setting, method, seed)), by.get((grid, setting, baseline, seed))
            return None if a is None or b is None or get(a) is None or get(b) is None else get(a) - get(b)
        return value

    for method, baseline, label in CONTRASTS:
        for setting in settings:
            add("difference", setting, method, baseline, label, level("main", setting, method, baseline))
            if setting == "clean":
                continue

            def robustness(get, seed, s=setting):
                # (method's change from clean) − (baseline's change from clean): > 0 = the method loses less
                keys = [("main", s, method, seed), ("main", "clean", method, seed), ("main", s, baseline, seed),
                        ("main", "clean", baseline, seed)]
                runs = [by.get(k) for k in keys]
                if any(r is None or get(r) is None for r in runs):
                    return None
                return (get(runs[0]) - get(runs[1])) - (get(runs[2]) - get(runs[3]))

            add("robustness", setting, method, baseline, label, robustness)
    for method, baseline, label in STALL_CONTRASTS:
        add("stall", "clean", method, baseline, label, level("stall", "clean", method, baseline), grid="stall")
    for setting in CONTINUED_SETTINGS:
        add("continued", setting, "cont_clip_clipin", "cont_onlyclip",
            "continued from a trained CLIP: CLIP + CLIPin − ONLYCLIP",
            level("continued", setting, "cont_clip_clipin", "cont_onlyclip"), grid="continued")
    return rows


def _fmt_difference(entry: dict) -> str:
    if entry.get("half") is None:
        return f"{entry['mean']:+.3f} (n={entry['n']})"
    shown = " *" if entry["ci"][0] > 0 or entry["ci"][1] < 0 else ""
    return f"{entry['mean']:+.3f} ± {entry['half']:.3f}{shown}"


def _fmt(entry: dict) -> str:
    if entry["mean"] is None:
        return "n/a"
    if entry.get("half") is None:
        return f"{entry['mean']:.3f}"
    return f"{entry['mean']:.3f} ± {entry['half']:.3f}"


def budget_of_runs(results: list[dict]) -> str:
    """The main grid's budget as the runs themselves recorded it (their cache keys), not as the command
    that writes the report was called: ``--report-only`` may be run with other defaults."""
    wanted = {"train.steps": "steps", "train.batch_size": "batch", "data.image.size": "px",
              "data.text.max_length": "tokens"}
    seen: dict[str, set] = {name: set() for name in wanted.values()}
    for r in results:
        if r["grid"] != "main":
            continue
        for override in (r.get("key") or {}).get("overrides", []):
            name, _, value = override.partition("=")
            if name in wanted:
                seen[wanted[name]].add(value)
    if not any(seen.values()):
        return "budget: see each run's result.json"

    def one(name: str) -> str:
        return "/".join(sorted(seen[name], key=lambda v: float(v))) or "?"

    return (f"Budget per run (main grid): {one('steps')} steps × batch {one('batch')}, {one('px')} px, "
            f"max {one('tokens')} tokens")


def markdown(table: dict, budget_line: str) -> str:
    lines = ["# CLIPin study: results", "",
             f"{budget_line}. Mean ± 95% CI half-width over seeds (Student t; n in the seeds column).", ""]
    for grid in ("main", "stall", "continued"):
        rows = [e for e in table.values() if e["grid"] == grid]
        if not rows:
            continue
        lines += [f"## {grid}", "", "| setting | method | seeds | " + " | ".join(h for _, h in METRICS.values())
                  + " | train s |", "|---" * (len(METRICS) + 4) + "|"]
        for e in rows:
            lines.append(f"| {e['setting']} | {e['label']} | {len(e['seeds'])} | "
                         + " | ".join(_fmt(e[name]) for name in METRICS) + f" | {e['train_s']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def differences_markdown(rows: list[dict]) -> str:
    """The paired differences as tables: one row per (comparison, setting), one column per metric."""
    lines = []
    for kind, heading, note in (
            ("difference", "Paired differences (method − baseline, same seeds)",
             "Mean over seeds of the per-seed difference ± 95% CI half-width; * = the interval excludes 0."),
            ("robustness", "Robustness (method's change from clean − baseline's change from clean)",
             "Positive: the method loses less than its baseline when pairs become loose or repetitive; "
             "* = the interval excludes 0."),
            ("stall", "Paired differences within the stall grid",
             "Same seeds; the last column is the final contrastive loss, mean of the logged batches of the last "
             "fifth of training (chance: ln 32 = 3.466)."),
            ("continued", "Paired differences, continuing a trained CLIP (the paper's setting)",
             "Both runs of a seed start from the same trained CLIP (an open_clip folder) with the same data "
             "order; * = the interval excludes 0.")):
        picked = [r for r in rows if r["kind"] == kind]
        if not picked:
            continue
        lines += [f"## {heading}", "", note, "",
                  "| comparison | setting | " + " | ".join(METRICS[m][1] for m in CONTRAST_METRICS) + " |",
                  "|---" * (len(CONTRAST_METRICS) + 2) + "|"]
        groups: dict[tuple, dict] = {}
        for r in picked:
            groups.setdefault((r["label"], r["setting"]), {})[r["metric"]] = r
        for (label, setting), cells in groups.items():
            lines.append(f"| {label} | {setting} | "
                         + " | ".join(_fmt_difference(cells[m]) if m in cells else "n/a" for m in CONTRAST_METRICS)
                         + " |")
        lines.append("")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fractions = {"clean": 0.0, "loose20": 0.2, "loose40": 0.4}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    drawn, any_single = False, False
    for variant, (_, _, label) in METHODS.items():
        for ax, metric in zip(axes, ("auc", "probe10")):
            xs, ys, errs, single = [], [], [], []
            for setting, fraction in fractions.items():
                entry = table.get(f"main/{setting}/{variant}")
                if entry and entry[metric]["mean"] is not None:
                    xs.append(fraction * 100)
                    ys.append(entry[metric]["mean"])
                    errs.append(entry[metric].get("half") or 0.0)
                    single.append(entry[metric]["n"] < 2)
            if xs:
                line = ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
                # a point from one seed has no interval: drawn hollow, so it is not read as a tight one
                ax.scatter([x for x, s in zip(xs, single) if s], [y for y, s in zip(ys, single) if s], s=40,
                           facecolors="white", edgecolors=line.lines[0].get_color(), zorder=3)
                drawn, any_single = True, any_single or any(single)
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("held-out zero-shot mean AUC", "linear probe AUC, 10% of labels")):
        ax.set_xlabel("loose train pairs (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("CLIPin study: accuracy against the share of loose image–report pairs (mean ± 95% CI over the "
                 "seeds" + ("; hollow: one seed)" if any_single else ")"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_monitors(results: list[dict], path: Path) -> Path | None:
    """The stall, over training: each loss term's gradient norm on the image trunk and the contrastive term
    itself, for CLIP + CLIPin from pretrained towers, from scratch, and from scratch with no non-contrastive
    gradient into the shared pre-projector (seed 0 of each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = [("clip_clipin", "pretrained towers: CLIP + CLIPin"), ("scratch_clip", "from scratch: CLIP"),
             ("scratch_onlyclip", "from scratch: ONLYCLIP"), ("scratch_clip_clipin", "from scratch: CLIP + CLIPin"),
             ("scratch_detach_pre", "from scratch: CLIP + CLIPin, NC terms kept off the trunk")]
    runs = {r["variant"]: r for r in results if r["grid"] == "stall" and r["seed"] == 0}
    if not any(v in runs for v, _ in picks):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), dpi=110)
    for index, (variant, label) in enumerate(picks):
        run = runs.get(variant)
        if run is None:
            continue
        color = f"C{index}"
        grads = run["training"].get("gradient_norms") or []
        curve = run["training"].get("curve") or []
        steps = [g["step"] for g in grads]
        axes[0].plot(steps, [g.get("gnorm_image_clip") for g in grads], marker="o", color=color, label=label)
        for term, style in (("inter", "-"), ("intra", "--")):
            values = [g.get(f"gnorm_image_{term}") for g in grads]
            if any(v for v in values):  # 0 where the terms are kept off the trunk: nothing to draw on a log axis
                axes[1].plot(steps, values, marker="o", linestyle=style, color=color, label=f"{label}: L_{term}")
        axes[2].plot([c["step"] for c in curve], [c.get("clip") for c in curve], color=color, label=label)
    axes[0].set_title("gradient norm of L_CLIP on the image trunk")
    axes[1].set_title("L_inter (solid), L_intra (dashed): gradient norm, image trunk")
    axes[2].set_title("L_CLIP (chance: ln 32 = 3.47)")
    axes[2].axhline(math.log(32), color="0.6", linestyle=":", linewidth=1)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    for ax in axes[:2]:
        ax.set_yscale("log")
    fig.suptitle("The contrastive term's plateau, over training (seed 0 of each run)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medclipin.experiments.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="study folder (data, runs, results; resumable)")
    parser.add_argument("--grid", choices=["main", "stall", "continued", "all"], default="all")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=None, help="restrict to these methods / stall variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=Budget.steps)
    parser.add_argument("--image-size", type=int, default=Budget.image_size)
    parser.add_argument("--patients", type=int, default=Budget.patients)
    parser.add_argument("--threads", type=int, default=Budget.threads)
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing, only rebuild the report (it always covers every finished run in --out)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(steps=args.steps, image_size=args.image_size, patients=args.patients, threads=args.threads,
                    extra=list(args.overrides))
    plan = []
    if args.grid in ("main", "all"):
        plan += [("main", s, v, seed) for seed in args.seeds for s in args.settings for v in METHODS]
    if args.grid in ("stall", "all"):
        plan += [("stall", "clean", v, seed) for seed in args.seeds for v in STALL]
    if args.grid in ("continued", "all"):
        plan += [("continued", s, v, seed) for seed in args.seeds for s in CONTINUED_SETTINGS for v in CONTINUED
                 if s in args.settings]
    if args.variants:
        plan = [p for p in plan if p[2] in args.variants]
    if args.report_only:
        plan = []
    for index, (grid, setting, variant, seed) in enumerate(plan, 1):
        manifest = dataset(out, setting, budget.patients)
        start = time.perf_counter()
        record = run_one(out, grid, setting, variant, seed, manifest, budget)
        log.info("[%d/%d] %s/%s/%s seed %d: AUC %.3f, R@10 %.3f/%.3f, probe10 %s (%.0f s)", index, len(plan), grid,
                 setting, variant, seed, record["zeroshot"]["mean_auc"] or float("nan"),
                 record["retrieval"]["i2t_R@10"], record["retrieval"]["t2i_R@10"], record["probe"].get("0.1"),
                 time.perf_counter() - start)
        _write(out, budget)
    _write(out, budget)
    print(f"wrote {out / 'study.md'}, {out / 'results.json'}")
    return 0


def finished_runs(out: Path) -> list[dict]:
    """Every finished run in the study folder, whichever command or ``--seeds`` made it: the report always
    describes the whole folder, so running a few more seeds of one cell adds to it instead of replacing it."""
    paths = (out / "runs").glob("*/*/*/seed*/result.json")
    key = lambda p: (*p.parts[-5:-2], int(p.parent.name.removeprefix("seed")))  # noqa: E731
    return [json.loads(path.read_text()) for path in sorted(paths, key=key)]


def _write(out: Path, budget: Budget) -> None:
    results = finished_runs(out)
    table = aggregate(results)
    differences = paired_differences(results)
    (out / "results.json").write_text(json.dumps({"budget": budget.__dict__, "machine": _machine(), "table": table,
                                                  "differences": differences, "runs": results},
                                                 indent=2, default=str))
    (out / "study.md").write_text(markdown(table, budget_of_runs(results)) + "\n" + differences_markdown(differences))
    plot(table, out / "auc_vs_loose.png")
    plot_monitors(results, out / "stall_monitors.png")


def _machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor(),
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    sys.exit(main())
