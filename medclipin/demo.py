"""``medclipin demo``: synthetic data → CLIPin pretraining → held-out evaluation, in minutes on a CPU.

Writes ``OUT/metrics.json``, ``OUT/config.yaml`` (resolved), the run folder with checkpoints and the
final model, and Grad-CAM overlay PNGs under ``OUT/gradcam/``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import torch

from medclipin.config import Config, load_config
from medclipin.data.manifest import read_manifest
from medclipin.data.synthetic import generate_synthetic_dataset
from medclipin.api import load
from medclipin.eval.embeddings import EmbeddingStore
from medclipin.eval.evaluate import evaluate
from medclipin.eval.zeroshot import load_prompts
from medclipin.eval.report import plot_learning_curves
from medclipin.train.run_folder import check_folder as check_run_folder, discard as discard_run
from medclipin.train.supervised import read_ceiling
from medclipin.train.step import resolve_device, resolve_precision
from medclipin.train.trainer import pretrain
from medclipin.train.validation import build_validate_fn

log = logging.getLogger(__name__)
DEMO_CONFIG = "demo"  # medclipin/configs/demo.yaml, shipped with the package
SYNTHETIC_PROMPTS = "synthetic"  # medclipin/prompts/synthetic.yaml

# What `make demo` is to reach (issue 24) on the project's machine: 2 vCPUs with AVX512-BF16, no GPU.
DEMO_TARGETS = {
    "total_s": 210.0,                 # the whole command, data generation included
    "zeroshot_mean_auc": 0.90,
    "class_auc": 0.72,                # every class, nodule included
    "retrieval_r10_vs_chance": 10.0,  # both directions
    "pointing_game": 0.65,
}


def run_demo(out_dir: str | Path, config_path: str | Path | None = None, overrides: list[str] | None = None,
             data_dir: str | Path | None = None, patients: int | None = None, progress: bool = True,
             ceiling: bool = False) -> dict:
    """Generate the synthetic set if absent, pretrain, evaluate on the test split, write metrics.json.

    Args:
        out_dir: output folder.
        config_path: YAML config (default: the shipped ``demo`` config — ImageNet EfficientNet-Lite0 +
            all-MiniLM-L6-v2 from their weight packages, CLIP + CLIPin).
        overrides: dotted overrides, e.g. ``["train.steps=50"]``.
        data_dir: where the synthetic dataset lives (default ``OUT/data``); generated when absent.
        patients: synthetic dataset size (default: the generator's).
        ceiling: also train the supervised ceiling (the same image tower on the labels) into ``OUT/ceiling``
            after the demo; the summary shows it beside zero-shot whenever ``OUT/ceiling`` holds one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = out_dir / "run"
    check_run_folder(run_dir, resume="auto")  # a user's folder in OUT/run is refused before any work
    start = time.perf_counter()
    config_path = config_path or DEMO_CONFIG
    data_dir = Path(data_dir) if data_dir else out_dir / "data"
    kwargs = {"n_patients": patients} if patients else {}
    # refuses a data folder of the user's (never replaced) before the previous run goes
    manifest_path = generate_synthetic_dataset(data_dir, progress=progress, **kwargs)
    generate_s = time.perf_counter() - start
    # a demo is a fresh run (its data folder is what gets reused): the previous demo run goes, anything else stays
    if discard_run(run_dir):
        log.warning("removed the previous demo run in %s", run_dir)

    cfg: Config = load_config(config_path, [f"data.manifest={manifest_path}", *(overrides or [])])
    if cfg.eval.prompts in ("", "auto"):  # the demo's data is the synthetic set
        cfg.eval.prompts = SYNTHETIC_PROMPTS
    train_start = time.perf_counter()
    validate_fn = build_validate_fn(cfg, read_manifest(manifest_path).split("validate"))
    result = pretrain(cfg, run_dir, progress=progress, validate_fn=validate_fn)
    train_s = time.perf_counter() - train_start

    eval_start = time.perf_counter()
    model, processor = load(result.model_dir)
    store = EmbeddingStore(model, processor, batch_size=cfg.eval.batch_size)
    test_records = read_manifest(manifest_path).split("test")
    metrics = evaluate(store, test_records, load_prompts(cfg.eval.prompts), out_dir / "gradcam",
                       gradcam_figures=cfg.eval.gradcam_examples, bootstrap=cfg.eval.bootstrap)
    eval_s = time.perf_counter() - eval_start
    metrics["train"] = {
        "steps": result.steps,
        "samples_per_s": result.samples_per_s,
        "wall_s": result.wall_s,
        "batch_size": cfg.train.batch_size,
        "skipped_nonfinite_steps": result.skipped_nonfinite,
        "skipped_records": result.skipped_records,
        "threads": torch.get_num_threads(),
        "precision": resolve_precision(cfg.train.precision, resolve_device(cfg.train.device)),
    }
    metrics["timing_s"] = {"generate": generate_s, "train": train_s, "evaluate": eval_s,
                           "total": time.perf_counter() - start}
    metrics["paths"] = {"config": str(run_dir / "config.yaml"), "model": str(result.model_dir),
                        "manifest": str(manifest_path), "gradcam": str(out_dir / "gradcam")}
    metrics["learning_curves"] = str(plot_learning_curves(
        run_dir / "metrics.csv", out_dir / "learning_curves.png",
        title=f"medclipin demo: {_method_name(cfg)}, {cfg.train.steps} steps x batch {cfg.train.batch_size}"))
    (out_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    if ceiling:
        metrics["timing_s"]["ceiling"] = _ceiling(cfg, out_dir / "ceiling", progress)
    found = read_ceiling(out_dir / "ceiling")
    if found is not None:
        metrics["ceiling"] = {"mean_auc": found.get("mean_auc"), "per_class_auc": found.get("per_class_auc"),
                              "path": str(out_dir / "ceiling" / "metrics.json")}
    missed = check_targets(metrics)
    metrics["targets"] = {"targets": DEMO_TARGETS, "met": not missed, "missed": missed}
    with (out_dir / "metrics.json").open("w") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def check_targets(metrics: dict, targets: dict = DEMO_TARGETS) -> list[str]:
    """Each target of :data:`DEMO_TARGETS` this demo missed, as a sentence with the measured figure and the
    likely reason (a supervised ceiling, where computed, tells a resolution limit from a training one);
    empty when all are met. A run with other settings (fewer steps, other data) is held to the same
    targets: the sentences say by how much it differs."""
    missed = []
    zs, rt, gc = metrics.get("zeroshot") or {}, metrics.get("retrieval") or {}, metrics.get("gradcam") or {}
    ceiling = metrics.get("ceiling") or {}

    def against_ceiling(value: float, reached: float | None) -> str:
        if reached is None:
            return "no supervised ceiling in this run (medclipin demo --ceiling) to tell resolution from training"
        if value >= reached - 0.03:
            return (f"the supervised ceiling with the same tower and images reaches {reached:.3f}: the image "
                    "resolution limits it, not the image-text training")
        return f"the supervised ceiling reaches {reached:.3f}: the image-text training falls short of it"

    mean = zs.get("mean_auc")
    if mean is not None and mean < targets["zeroshot_mean_auc"]:
        missed.append(f"zero-shot mean AUC {mean:.3f} < {targets['zeroshot_mean_auc']:.2f}: "
                      + against_ceiling(mean, ceiling.get("mean_auc")))
    for name, auc in (zs.get("per_class_auc") or {}).items():
        if auc is not None and auc < targets["class_auc"]:
            missed.append(f"zero-shot AUC of {name} {auc:.3f} < {targets['class_auc']:.2f}: "
                          + against_ceiling(auc, (ceiling.get("per_class_auc") or {}).get(name)))
    chance = (rt.get("chance") or {}).get("R@10")
    for direction in ("image_to_text", "text_to_image"):
        r10 = (rt.get(direction) or {}).get("R@10")
        if chance and r10 is not None and r10 < targets["retrieval_r10_vs_chance"] * chance:
            missed.append(f"{direction.replace('_to_', '→')} R@10 {r10:.3f} is {r10 / chance:.1f}× chance "
                          f"(target {targets['retrieval_r10_vs_chance']:.0f}×)")
    pointing = gc.get("pointing_game")
    if pointing is not None and pointing < targets["pointing_game"]:
        per_class = gc.get("per_class_pointing_game") or {}
        worst = sorted(per_class.items(), key=lambda item: item[1])[:2]
        missed.append(f"Grad-CAM pointing game {pointing:.3f} < {targets['pointing_game']:.2f}"
                      + (": lowest " + ", ".join(f"{k} {v:.2f}" for k, v in worst) if worst else ""))
    timing, train = metrics.get("timing_s") or {}, metrics.get("train") or {}
    total = timing.get("total")
    if total is not None and total > targets["total_s"]:
        missed.append(
            f"total {total:.0f} s > {targets['total_s']:.0f} s (generation {timing.get('generate', 0):.0f} s, "
            f"training {timing.get('train', 0):.0f} s at {train.get('samples_per_s', 0):.1f} samples/s, "
            f"evaluation {timing.get('evaluate', 0):.0f} s; {train.get('threads')} "
            f"thread{'' if train.get('threads') == 1 else 's'}, "
            f"{train.get('precision', '?')}): the target is for 2 CPUs with AVX512-BF16 and nothing else running")
    return missed


def _ceiling(cfg: Config, folder: Path, progress: bool) -> float:
    from medclipin.train.supervised import train_supervised

    start = time.perf_counter()
    train_supervised(copy.deepcopy(cfg), folder, progress=progress)
    return time.perf_counter() - start


def _method_name(cfg: Config) -> str:
    base = {"clip": "CLIP", "siglip": "SigLIP"}.get(cfg.model.contrastive.kind, cfg.model.contrastive.kind)
    if cfg.model.clipin.enabled:
        nc = cfg.model.clipin.use_inter or cfg.model.clipin.use_intra
        return f"{base} + CLIPin" if nc else f"{base} (CLIPin network, non-contrastive terms off)"
    return f"{base} + nCLIP (xCLIP)" if cfg.model.xclip.enabled else base


def format_summary(metrics: dict) -> str:
    """A readable table of the headline numbers."""
    zs, rt = metrics.get("zeroshot", {}), metrics["retrieval"]
    gc, tr = metrics.get("gradcam", {}), metrics["train"]
    lines = ["", "medclipin demo — held-out test split", "=" * 52]

    def row(name: str, value) -> None:
        text = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(f"{name:<38}{text:>14}")

    ceiling = metrics.get("ceiling") or {}
    row("zero-shot mean AUC", zs.get("mean_auc"))
    if ceiling:
        row("  supervised ceiling mean AUC", ceiling.get("mean_auc"))
    for name, auc in zs.get("per_class_auc", {}).items():
        ceiling_auc = (ceiling.get("per_class_auc") or {}).get(name)
        row(f"  {name}" + (f" (ceiling {ceiling_auc:.3f})" if ceiling_auc is not None else ""), auc)
    for direction in ("image_to_text", "text_to_image"):
        label = direction.replace("_to_", "→").replace("image", "image").replace("text", "text")
        for k in ("R@1", "R@5", "R@10"):
            row(f"retrieval {label} {k}", rt[direction][k])
    row("retrieval chance R@10", rt["chance"]["R@10"])
    row("Grad-CAM pointing game (15 px tol.)", gc.get("pointing_game"))
    row("Grad-CAM pointing game, strict", gc.get("pointing_game_strict"))
    row(f"Grad-CAM IoU (CAM ≥ {gc.get('iou_threshold', 0.5)}·max)", gc.get("iou"))
    row("train steps", tr["steps"])
    row("train samples/s", tr["samples_per_s"])
    row("train wall (s)", tr["wall_s"])
    row("total wall (s)", metrics["timing_s"]["total"])
    lines.append("=" * 52)
    targets = metrics.get("targets")
    if targets is not None:
        lines.append("demo targets: all met" if targets["met"] else "demo targets missed:")
        lines += [f"  - {reason}" for reason in targets["missed"]]
    if metrics.get("learning_curves"):
        lines.append(f"learning curves: {metrics['learning_curves']}")
    if not ceiling:
        lines.append("supervised ceiling: not computed (medclipin demo --ceiling, outside the 10-minute budget)")
    return "\n".join(lines)
