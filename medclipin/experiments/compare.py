"""Equal-compute comparison of CLIP, CLIP+CLIPin, SigLIP, SigLIP+CLIPin and xCLIP on the synthetic set.

    python -m medclipin.experiments.compare --out runs/compare --seeds 0 1 2 --steps 200 --patients 600

For every (seed, method): train the tiny config (``configs/tiny_<method>.yaml``) with :func:`pretrain`
at the same steps, batch, image size and towers; evaluate the final model on the test split with
:func:`medclipin.eval.evaluate.evaluate` (zero-shot with ``datasets/synthetic/prompts.yaml``, retrieval,
Grad-CAM pointing game) and a linear probe on the frozen image embeddings. Writes
``OUT/runs/<method>/seed<k>/result.json`` per run (a finished run is reused when the command is run
again with the same settings), ``OUT/results.json`` (every run + the summary) and ``OUT/comparison.md``
(mean ± sample standard deviation over seeds, with min–max).

"Equal compute" means equal optimiser steps, batch, image size and towers. CLIPin runs one more forward
pass per step (the EMA target on the second views) plus its heads, so it costs more FLOPs and wall time
per step; the table reports training wall time so the reader can see it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medclipin.config import load_config
from medclipin.data.manifest import read_manifest
from medclipin.data.synthetic import CLASS_NAMES, generate_synthetic_dataset
from medclipin.api import load as load_model
from medclipin.eval.embeddings import EmbeddingStore
from medclipin.eval.evaluate import evaluate
from medclipin.eval.metrics import labels_matrix
from medclipin.eval.zeroshot import load_prompts
from medclipin.train.trainer import pretrain

log = logging.getLogger(__name__)
from medclipin.config import PACKAGE_CONFIGS as CONFIG_DIR  # noqa: E402
from medclipin.eval.zeroshot import PACKAGE_PROMPTS  # noqa: E402

PROMPTS = PACKAGE_PROMPTS / "synthetic.yaml"

METHODS = {
    "clip": "CLIP",
    "clip_clipin": "CLIP + CLIPin",
    "siglip": "SigLIP",
    "siglip_clipin": "SigLIP + CLIPin",
    "xclip": "xCLIP (CLIP + nCLIP)",
}


# ------------------------------------------------------------------------------------ linear probe
def sklearn_linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                         class_names: list[str], fractions=(0.1, 1.0), seed: int = 0) -> dict:
    """One L2-regularised logistic regression per class on frozen features; test AUC per class and macro.

    ``train_y``/``test_y`` are (N, C) with 1/0 and NaN for unknown (rows with NaN are dropped per class).
    For a fraction < 1 a random subset of the training rows is used (seeded); a class whose subset is
    constant is skipped (reported as None and left out of the macro mean).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    out: dict = {}
    for fraction in fractions:
        n = max(2, int(round(fraction * len(train_x))))
        subset = np.sort(rng.permutation(len(train_x))[:n]) if fraction < 1 else np.arange(len(train_x))
        per_class: dict[str, float | None] = {}
        for c, name in enumerate(class_names):
            tr = subset[~np.isnan(train_y[subset, c])]
            te = ~np.isnan(test_y[:, c])
            y_tr, y_te = train_y[tr, c].astype(int), test_y[te, c].astype(int)
            if len(np.unique(y_tr)) < 2 or len(np.unique(y_te)) < 2:
                per_class[name] = None
                continue
            scaler = StandardScaler().fit(train_x[tr])
            clf = LogisticRegression(C=1.0, max_iter=2000).fit(scaler.transform(train_x[tr]), y_tr)
            scores = clf.predict_proba(scaler.transform(test_x[te]))[:, 1]
            per_class[name] = float(roc_auc_score(y_te, scores))
        values = [v for v in per_class.values() if v is not None]
        out[f"{fraction:g}"] = {"n_train": int(n), "per_class_auc": per_class,
                                "mean_auc": float(np.mean(values)) if values else None}
    return out


# ------------------------------------------------------------------------------------------ runs
def _overrides(args, manifest: Path, seed: int) -> list[str]:
    warmup = max(1, int(round(0.1 * args.steps)))
    return [
        f"data.manifest={manifest}", f"train.seed={seed}", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"data.image.size={args.image_size}",
        f"train.warmup_steps={warmup}", f"train.checkpoint_every={args.steps}", f"train.log_every={max(1, args.steps // 20)}",
        f"train.threads={args.threads}", "train.precision=fp32", "train.device=cpu", "train.keep_checkpoints=1",
        *args.override,
    ]


def _count(module: torch.nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def run_one(args, method: str, seed: int, manifest: Path, records: dict) -> dict:
    """Train + evaluate one (method, seed); cached in OUT/runs/<method>/seed<k>/result.json."""
    run_dir = Path(args.out) / "runs" / method / f"seed{seed}"
    result_path = run_dir / "result.json"
    overrides = _overrides(args, manifest, seed)
    if result_path.is_file():
        cached = json.loads(result_path.read_text())
        if cached.get("overrides") == overrides:
            log.info("reusing %s", result_path)
            return cached
    cfg = load_config(CONFIG_DIR / f"tiny_{method}.yaml", overrides)
    start = time.perf_counter()
    # "auto": an interrupted run continues from its checkpoint (a finished-but-unevaluated one trains 0 steps)
    train = pretrain(cfg, run_dir, resume="auto", progress=False)
    train_s = time.perf_counter() - start

    eval_start = time.perf_counter()
    model, tokenizer = load_model(train.model_dir)
    store = EmbeddingStore(model, tokenizer, batch_size=64)
    metrics = evaluate(store, records["test"], load_prompts(PROMPTS), out_dir=None, gradcam_figures=0,
                       bootstrap=args.bootstrap)
    train_x = store.images(records["train"]).numpy()
    test_x = store.images(records["test"]).numpy()
    probe = sklearn_linear_probe(train_x, labels_matrix(records["train"], list(CLASS_NAMES)), test_x,
                                 labels_matrix(records["test"], list(CLASS_NAMES)), list(CLASS_NAMES),
                                 fractions=args.probe_fractions, seed=seed)
    eval_s = time.perf_counter() - eval_start

    last_row = _last_metrics_row(run_dir / "metrics.csv")
    target = getattr(model, "target", None)
    result = {
        "method": method, "seed": seed, "overrides": overrides,
        "zeroshot_mean_auc": metrics["zeroshot"]["mean_auc"],
        "zeroshot_per_class_auc": metrics["zeroshot"]["per_class_auc"],
        "retrieval": metrics["retrieval"],
        "gradcam": {k: v for k, v in metrics.get("gradcam", {}).items() if k != "figures"},
        "linear_probe": probe,
        "train": {"steps": train.steps, "wall_s": train.wall_s, "samples_per_s": train.samples_per_s,
                  "skipped_nonfinite": train.skipped_nonfinite, "total_s": train_s},
        "eval_s": eval_s,
        "params": {"trainable": _count(model) - (_count(target) if target is not None else 0),
                   "ema_target": _count(target) if target is not None else 0},
        "final_log": last_row,
    }
    result_path.write_text(json.dumps(result, indent=2))
    return result


def _last_metrics_row(path: Path) -> dict:
    import csv

    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {k: float(v) for k, v in rows[-1].items() if v not in ("", None)} if rows else {}


# ------------------------------------------------------------------------------------- summary
HEADLINE = [
    ("zero-shot AUC", lambda r: r["zeroshot_mean_auc"]),
    ("I→T R@1", lambda r: r["retrieval"]["image_to_text"]["R@1"]),
    ("I→T R@5", lambda r: r["retrieval"]["image_to_text"]["R@5"]),
    ("I→T R@10", lambda r: r["retrieval"]["image_to_text"]["R@10"]),
    ("T→I R@1", lambda r: r["retrieval"]["text_to_image"]["R@1"]),
    ("T→I R@5", lambda r: r["retrieval"]["text_to_image"]["R@5"]),
    ("T→I R@10", lambda r: r["retrieval"]["text_to_image"]["R@10"]),
    ("probe AUC 10%", lambda r: r["linear_probe"].get("0.1", {}).get("mean_auc")),
    ("probe AUC 100%", lambda r: r["linear_probe"].get("1", {}).get("mean_auc")),
    ("pointing game", lambda r: r["gradcam"].get("pointing_game")),
    ("train wall s", lambda r: r["train"]["wall_s"]),
]


MONITORS = [
    ("final base loss", lambda r: r["final_log"].get("clip", r["final_log"].get("siglip"))),
    ("final std_image", lambda r: r["final_log"].get("std_image")),
    ("final std_text", lambda r: r["final_log"].get("std_text")),
    ("final std_nc_image", lambda r: r["final_log"].get("std_nc_image")),
    ("final loss_inter", lambda r: r["final_log"].get("loss_inter")),
    ("final lambda_clip", lambda r: r["final_log"].get("lambda_clip")),
]


def summarize(results: list[dict]) -> dict:
    summary: dict = {}
    for method in METHODS:
        runs = [r for r in results if r["method"] == method]
        if not runs:
            continue
        entry = {"seeds": [r["seed"] for r in runs], "params": runs[0]["params"]}
        for name, get in HEADLINE + MONITORS:
            values = [get(r) for r in runs]
            values = [float(v) for v in values if v is not None]
            if not values:
                entry[name] = None
                continue
            entry[name] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "min": float(np.min(values)), "max": float(np.max(values)), "values": values,
            }
        summary[method] = entry
    return summary


def _fmt(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_table(summary: dict, chance: dict) -> str:
    names = [n for n, _ in HEADLINE]
    lines = ["| method | " + " | ".join(names) + " | trainable params | EMA-target params |",
             "|---|" + "---|" * (len(names) + 2)]
    for method, entry in summary.items():
        cells = [_fmt(entry[n], 1 if n == "train wall s" else 3) for n in names]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells)
                     + f" | {entry['params']['trainable'] / 1e6:.2f} M | {entry['params']['ema_target'] / 1e6:.2f} M |")
    lines.append("")
    lines.append("Chance level: zero-shot / probe AUC 0.5; retrieval "
                 + ", ".join(f"{k} {v:.3f}" for k, v in chance.items())
                 + " (identical reports count as equivalent).")
    lines.append("")
    lines.append("Training monitors at the last step (mean ± std over seeds; std_* is the collapse monitor, "
                 "about 1/sqrt(D) when healthy: D = embed_dim for std_image/std_text, nc_dim for std_nc_image):")
    lines.append("")
    lines.append("| method | " + " | ".join(n for n, _ in MONITORS) + " |")
    lines.append("|---|" + "---|" * len(MONITORS))
    for method, entry in summary.items():
        lines.append(f"| {METHODS[method]} | " + " | ".join(_fmt(entry[n]) for n, _ in MONITORS) + " |")
    lines.append("")
    lines.append("Min–max over seeds:")
    lines.append("")
    lines.append("| method | " + " | ".join(names[:-1]) + " |")
    lines.append("|---|" + "---|" * (len(names) - 1))
    for method, entry in summary.items():
        cells = ["n/a" if entry[n] is None else f"{entry[n]['min']:.3f}–{entry[n]['max']:.3f}" for n in names[:-1]]
        lines.append(f"| {METHODS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m medclipin.experiments.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--patients", type=int, default=600, help="synthetic set size (patients)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--image-size", type=int, default=64, help="model input size (pixels)")
    parser.add_argument("--source-size", type=int, default=128, help="synthetic image size as generated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    parser.add_argument("--data", default="", help="synthetic data folder (default OUT/data; reused when present)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic set (fixed across runs)")
    parser.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for zero-shot CIs")
    parser.add_argument("--probe-fractions", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--override", action="append", default=[], help="extra dotted config override (all methods)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data) if args.data else out / "data"
    t0 = time.perf_counter()
    manifest = generate_synthetic_dataset(data_dir, n_patients=args.patients, image_size=args.source_size,
                                          seed=args.data_seed, progress=False)
    manifest_all = read_manifest(manifest)
    records = {s: manifest_all.split(s) for s in ("train", "test")}
    log.info("synthetic set: %d train / %d test studies (%.0f s)", len(records["train"]), len(records["test"]),
             time.perf_counter() - t0)

    results = []
    for seed in args.seeds:
        for method in args.methods:
            t = time.perf_counter()
            result = run_one(args, method, seed, manifest, records)
            results.append(result)
            log.info("%s seed %d: zero-shot AUC %.3f, I→T R@10 %.3f, probe AUC %s, train %.0f s (%.0f s total)",
                     method, seed, result["zeroshot_mean_auc"] or float("nan"),
                     result["retrieval"]["image_to_text"]["R@10"],
                     result["linear_probe"].get("1", {}).get("mean_auc"), result["train"]["wall_s"],
                     time.perf_counter() - t)
            summary = summarize(results)
            chance = results[0]["retrieval"]["chance"]
            _write(out, args, results, summary, chance, records, time.perf_counter() - t0)
    return summarize(results)


def _write(out: Path, args, results, summary, chance, records, wall) -> None:
    command = "python -m medclipin.experiments.compare " + " ".join(
        [f"--out {args.out}", "--seeds " + " ".join(map(str, args.seeds)), f"--steps {args.steps}",
         f"--patients {args.patients}", f"--image-size {args.image_size}", f"--batch-size {args.batch_size}",
         f"--threads {args.threads}"] + [f"--override {o}" for o in args.override])
    setting = {
        "command": command, "steps": args.steps, "batch_size": args.batch_size, "image_size": args.image_size,
        "source_size": args.source_size, "patients": args.patients, "n_train": len(records["train"]),
        "n_test": len(records["test"]), "seeds": args.seeds, "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "wall_s": wall,
    }
    (out / "results.json").write_text(json.dumps({"setting": setting, "summary": summary, "runs": results}, indent=2))
    text = [f"# Comparison on the synthetic set ({len(records['train'])} train / {len(records['test'])} test studies)",
            "", f"Command: `{command}`", "",
            f"{args.steps} steps × batch {args.batch_size}, {args.image_size} px, tiny towers, fp32 CPU, "
            f"{args.threads} thread(s); mean ± sample std over seeds {args.seeds}.", "",
            markdown_table(summary, chance), ""]
    (out / "comparison.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
