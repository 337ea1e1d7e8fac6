"""``medclipin demo``: synthetic data → CLIPin pretraining → held-out evaluation, in minutes on a CPU.

Writes ``OUT/metrics.json``, ``OUT/config.yaml`` (resolved), the run folder with checkpoints and the
final model, and Grad-CAM overlay PNGs under ``OUT/gradcam/``.
"""

from __future__ import annotations

import json
import logging
import shutil
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
from medclipin.train.trainer import pretrain

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
SYNTHETIC_PROMPTS = REPO_ROOT / "datasets" / "synthetic" / "prompts.yaml"


def run_demo(out_dir: str | Path, config_path: str | Path | None = None, overrides: list[str] | None = None,
             data_dir: str | Path | None = None, patients: int | None = None, progress: bool = True) -> dict:
    """Generate the synthetic set if absent, pretrain, evaluate on the test split, write metrics.json.

    Args:
        out_dir: output folder.
        config_path: YAML config (default ``configs/demo.yaml``: tiny ViT + BERT, CLIP + CLIPin).
        overrides: dotted overrides, e.g. ``["train.steps=50"]``.
        data_dir: where the synthetic dataset lives (default ``OUT/data``); generated when absent.
        patients: synthetic dataset size (default: the generator's).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    config_path = Path(config_path) if config_path else DEMO_CONFIG
    data_dir = Path(data_dir) if data_dir else out_dir / "data"
    kwargs = {"n_patients": patients} if patients else {}
    manifest_path = generate_synthetic_dataset(data_dir, progress=progress, **kwargs)
    generate_s = time.perf_counter() - start

    cfg: Config = load_config(config_path, [f"data.manifest={manifest_path}", *(overrides or [])])
    if not cfg.eval.prompts:
        cfg.eval.prompts = str(SYNTHETIC_PROMPTS)
    run_dir = out_dir / "run"
    if run_dir.exists():  # a demo is a fresh run; its data folder is what gets reused
        log.warning("replacing the previous demo run in %s", run_dir)
        shutil.rmtree(run_dir)
    train_start = time.perf_counter()
    result = pretrain(cfg, run_dir, progress=progress)
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
    }
    metrics["timing_s"] = {"generate": generate_s, "train": train_s, "evaluate": eval_s,
                           "total": time.perf_counter() - start}
    metrics["paths"] = {"config": str(run_dir / "config.yaml"), "model": str(result.model_dir),
                        "manifest": str(manifest_path), "gradcam": str(out_dir / "gradcam")}
    (out_dir / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with (out_dir / "metrics.json").open("w") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def format_summary(metrics: dict) -> str:
    """A readable table of the headline numbers."""
    zs, rt = metrics.get("zeroshot", {}), metrics["retrieval"]
    gc, tr = metrics.get("gradcam", {}), metrics["train"]
    lines = ["", "medclipin demo — held-out test split", "=" * 52]

    def row(name: str, value) -> None:
        text = "n/a" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))
        lines.append(f"{name:<38}{text:>14}")

    row("zero-shot mean AUC", zs.get("mean_auc"))
    for name, auc in zs.get("per_class_auc", {}).items():
        row(f"  {name}", auc)
    for direction in ("image_to_text", "text_to_image"):
        label = direction.replace("_to_", "→").replace("image", "image").replace("text", "text")
        for k in ("R@1", "R@5", "R@10"):
            row(f"retrieval {label} {k}", rt[direction][k])
    row("retrieval chance R@10", rt["chance"]["R@10"])
    row("Grad-CAM pointing game", gc.get("pointing_game"))
    row(f"Grad-CAM IoU (CAM ≥ {gc.get('iou_threshold', 0.5)}·max)", gc.get("iou"))
    row("train steps", tr["steps"])
    row("train samples/s", tr["samples_per_s"])
    row("train wall (s)", tr["wall_s"])
    row("total wall (s)", metrics["timing_s"]["total"])
    lines.append("=" * 52)
    return "\n".join(lines)
