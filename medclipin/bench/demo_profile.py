"""``medclipin bench demo``: where the demo's time goes, stage by stage, from a shortened real demo run.

The demo (:func:`medclipin.demo.run_demo`) runs as a user runs it, with fewer training steps, while the
functions that make up its stages are wrapped with timers: synthetic generation, set-up (towers, tokenizer),
data loading (image read, augmentation, tokenisation), the training step (each tower's forward, the EMA
target's no-grad forward, backward, optimiser, EMA update), validation, checkpoints, the final evaluation
(embeddings, zero-shot, retrieval, Grad-CAM) and the learning-curve plot. Time is *exclusive*: a stage
nested in another (the image tower's forward inside the training step) is subtracted from its parent, so
the rows add up to the run's wall time.

A shortened run shifts the shares (validation and evaluation do not shrink with the steps), so each row
also gets a projection to the full demo: per-step stages × (full steps − 1) / (profiled steps − 1) (the
first step, with its one-off costs, is a stage of its own), validation × (full validations / profiled
validations), checkpoints likewise, the rest as measured.

Backward is one call for both towers; :func:`step_anatomy` splits it per tower by timing each tower's
forward and forward + backward alone on a batch of the demo's shape, alternated in rounds.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Sequence

import torch


class StageTimer:
    """Exclusive wall time per stage path (``("training step", "backward")``), main thread only."""

    def __init__(self):
        self.seconds: dict[tuple[str, ...], float] = defaultdict(float)
        self.calls: dict[tuple[str, ...], int] = defaultdict(int)
        self._stack: list[list] = []  # [path, start, time spent in children]
        self._main = threading.main_thread()

    def _parent(self):
        return next((frame for frame in reversed(self._stack) if frame is not None), None)

    def begin(self, label: str) -> None:
        """Enter a stage (pair with :meth:`end`): for hooks that come as a pre/post pair."""
        if threading.current_thread() is not self._main:  # a sampler or loader thread: not a stage
            return
        parent = self._parent()
        if parent is not None and parent[0][-1] == label:  # TextEncoder.forward → trunk: counted once
            self._stack.append(None)
            return
        self._stack.append([(parent[0] if parent else ()) + (label,), time.perf_counter(), 0.0])

    def end(self) -> None:
        if threading.current_thread() is not self._main:
            return
        frame = self._stack.pop()
        if frame is None:
            return
        path, start, children = frame
        elapsed = time.perf_counter() - start
        self.seconds[path] += elapsed - children
        self.calls[path] += 1
        parent = self._parent()
        if parent is not None:
            parent[2] += elapsed

    @contextlib.contextmanager
    def stage(self, label: str):
        self.begin(label)
        try:
            yield
        finally:
            self.end()

    def wrap(self, owner, name: str, label: str | Callable[[], str]) -> Callable[[], None]:
        """Time every call of ``owner.name`` as ``label``; returns the function that undoes it."""
        original = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            with self.stage(label() if callable(label) else label):
                return original(*args, **kwargs)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


def _first_then(first: str, then: str) -> Callable[[], str]:
    """``first`` for the first call, ``then`` after: the first step pays one-off costs (kernel selection,
    allocations) that the projection must not multiply by the number of steps."""
    calls = []

    def label() -> str:
        calls.append(None)
        return first if len(calls) == 1 else then

    return label


def _grad_label(name: str) -> Callable[[], str]:
    return lambda: name if torch.is_grad_enabled() else f"{name} (no grad)"


def _instrument(timer: StageTimer) -> list[Callable[[], None]]:
    """Wrap the demo's stages; returns the undo functions (a name that moved is skipped, not fatal)."""
    from medclipin import demo
    from medclipin.data import dataset, processor
    from medclipin.eval import embeddings, evaluate
    from medclipin.models import encoders, model
    from medclipin.train import objective, step, trainer

    targets = [
        (demo, "generate_synthetic_dataset", "synthetic data generation"),
        (demo, "load", "loading the saved model"),
        (demo, "plot_learning_curves", "learning-curve plot"),
        (trainer, "_set_up", "set-up: towers, tokenizer, optimiser"),
        (trainer, "prepare_processor", "tokenizer + processor"),
        (trainer.BatchStream, "__call__", "data loading"),
        (dataset.ImageTextDataset, "_pixels", "image read"),
        (processor.Processor, "texts", "tokenise"),
        (step.TrainStep, "__call__", _first_then("first training step (warm-up)", "training step")),
        (encoders.ImageEncoder, "forward", _grad_label("image tower forward")),
        (encoders.TextEncoder, "forward", _grad_label("text tower forward")),
        (encoders.TextEncoder, "trunk", _grad_label("text tower forward")),
        (encoders.TextEncoder, "top", _grad_label("text tower forward")),
        (torch.Tensor, "backward", "backward (both towers, heads)"),
        (torch.nn.utils, "clip_grad_norm_", "gradient clipping"),
        (objective.TrainingObjective, "after_optimizer_step", "EMA update + clamps"),
        (trainer, "_validate", "validation"),
        (trainer, "_checkpoint", "checkpoints"),
        (model.MedClipModel, "save_pretrained", "saving the model"),
        (demo, "evaluate", "evaluation"),
        (evaluate, "zero_shot", "zero-shot"),
        (evaluate, "retrieval", "retrieval"),
        (evaluate, "gradcam_localisation", "Grad-CAM"),
        (evaluate, "_pair_figure", "Grad-CAM figures"),
        (embeddings.EmbeddingStore, "images", "image embeddings"),
        (embeddings.EmbeddingStore, "texts", "text embeddings"),
    ]
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    handles = [register_optimizer_step_pre_hook(lambda *args: timer.begin("optimiser")),
               register_optimizer_step_post_hook(lambda *args: timer.end())]
    undo = [handle.remove for handle in handles]
    for owner, name, label in targets:
        present = name in owner.__dict__ if isinstance(owner, type) else hasattr(owner, name)
        if present:
            undo.append(timer.wrap(owner, name, label))
    return undo


def profile_demo(out_dir: str | Path, steps: int = 30, overrides: Sequence[str] = (), patients: int | None = None,
                 full_steps: int | None = None, anatomy_rounds: int = 3,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Run the demo with ``train.steps=steps`` (and ``overrides``) under the stage timers; return the table.

    Args:
        out_dir: the demo's output folder (its ``data/`` is reused when present: generation then shows ~0).
        steps: training steps of the profiled run; ``full_steps``: those of the demo the projection is for
            (default: the demo config's ``train.steps``).
        anatomy_rounds: rounds of :func:`step_anatomy` (0 = skip).
    """
    from medclipin.config import load_config
    from medclipin.demo import DEMO_CONFIG, run_demo

    say = progress or (lambda message: None)
    full = load_config(DEMO_CONFIG, list(overrides))
    full_steps = full_steps or full.train.steps
    shortened = [*overrides, f"train.steps={steps}"]
    if full.train.validate_every:
        # validate as often (relative to the run's length) as the full demo, at least once before the end
        shortened.append(f"train.validate_every={max(1, steps * full.train.validate_every // full_steps)}")
    short = load_config(DEMO_CONFIG, shortened)

    timer = StageTimer()
    undo = _instrument(timer)
    say(f"profiling a {steps}-step demo in {out_dir}")
    start = time.perf_counter()
    try:
        with timer.stage("demo"):
            metrics = run_demo(out_dir, overrides=shortened, patients=patients, progress=False)
    finally:
        for restore in reversed(undo):
            restore()
    wall = time.perf_counter() - start

    def validations(cfg, n_steps):
        every = cfg.train.validate_every
        return (n_steps // every if every else 0) + (0 if every and n_steps % every == 0 else 1)

    def checkpoints(cfg, n_steps):
        every = cfg.train.checkpoint_every
        return n_steps // every + (1 if n_steps % every else 0)

    scales = {"training step": (full_steps - 1) / max(1, steps - 1),
              "validation": validations(full, full_steps) / max(1, validations(short, steps)),
              "checkpoints": checkpoints(full, full_steps) / max(1, checkpoints(short, steps))}
    rows = []
    for path, seconds in timer.seconds.items():
        scale = next((scales[p] for p in path if p in scales), 1.0)
        rows.append({"path": list(path[1:]) or ["other"], "seconds": seconds, "calls": timer.calls[path],
                     "projected_s": seconds * scale})
    projected = sum(r["projected_s"] for r in rows)
    summary = _summarise(rows, wall, projected)
    result = {"steps": steps, "full_steps": full_steps, "wall_s": wall, "projected_full_s": projected,
              "validations": validations(short, steps), "full_validations": validations(full, full_steps),
              "threads": torch.get_num_threads(), "overrides": list(shortened), "summary": summary, "rows": rows,
              "demo_timing_s": metrics.get("timing_s"), "train_samples_per_s": metrics["train"]["samples_per_s"]}
    if anatomy_rounds:
        say("timing the step's parts alone (step anatomy)")
        result["step_anatomy"] = step_anatomy(short, rounds=anatomy_rounds)
    return result


def step_anatomy(cfg, rounds: int = 3, seed: int = 0) -> dict:
    """Median seconds of each part of the demo's training step, timed alone on a batch of its shape.

    Parts: each tower's forward (train mode, with grad) and forward + backward (of its pooled output's sum),
    the whole objective's forward + backward, the fused AdamW step and the EMA update; alternated in
    ``rounds`` rounds after one warm-up round, so a shared machine's load falls on all of them alike.
    """
    from medclipin.bench.train import build_medclipin_contender
    from medclipin.train.cpu_runtime import configure_cpu
    from medclipin.train.step import autocast_context, resolve_device, resolve_precision

    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    configure_cpu(cfg.train.threads, cfg.train.retain_freed_memory, device)
    c = build_medclipin_contender("clipin" if cfg.model.clipin.enabled else "clip", cfg, device, precision, seed)
    from medclipin.bench.train import synthetic_batch

    objective = c.model
    net = objective.model
    batch = synthetic_batch(cfg, device, two_views=objective.needs_two_views, seed=seed + 1)

    def image(backward: bool):
        with autocast_context(precision, device):
            out = net.image_encoder(batch["image"])
        if backward:
            out.float().sum().backward()

    def text(backward: bool):
        with autocast_context(precision, device):
            out = net.text_encoder(batch["input_ids"], batch["attention_mask"])
        if backward:
            out.float().sum().backward()

    def whole():
        with autocast_context(precision, device):
            loss = objective(batch).loss
        loss.backward()

    parts: dict[str, Callable[[], object]] = {
        "image tower forward": lambda: image(False), "image tower forward + backward": lambda: image(True),
        "text tower forward": lambda: text(False), "text tower forward + backward": lambda: text(True),
        "whole objective forward + backward": whole,
        "optimiser": c.optimizer.step,
        "EMA update + clamps": lambda: objective.after_optimizer_step(1, cfg.train.steps),
    }
    times: dict[str, list[float]] = defaultdict(list)
    for index in range(rounds + 1):
        for name, fn in parts.items():
            if name.startswith(("image", "text", "whole")):
                objective.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            if index:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    for tower in ("image", "text"):
        median[f"{tower} tower backward"] = median[f"{tower} tower forward + backward"] - median[f"{tower} tower forward"]
    return {"precision": precision, "batch_size": cfg.train.batch_size, "rounds": rounds, "median_s": median}


def _summarise(rows: list[dict], wall: float, projected: float) -> list[dict]:
    """Per top-level stage and its parts one level down (the training step's forwards, backward, optimiser...;
    evaluation's zero-shot, retrieval, Grad-CAM), each with its inclusive time; stages and parts by time."""
    stages: dict[str, dict] = {}
    for r in rows:
        top, leaf = r["path"][0], r["path"][1] if len(r["path"]) > 1 else "(itself)"
        stage = stages.setdefault(top, {"stage": top, "seconds": 0.0, "projected_s": 0.0, "parts": {}})
        stage["seconds"] += r["seconds"]
        stage["projected_s"] += r["projected_s"]
        part = stage["parts"].setdefault(leaf, {"part": leaf, "seconds": 0.0, "projected_s": 0.0})
        part["seconds"] += r["seconds"]
        part["projected_s"] += r["projected_s"]
    out = []
    for stage in sorted(stages.values(), key=lambda x: -x["projected_s"]):
        parts = sorted(stage.pop("parts").values(), key=lambda x: -x["projected_s"])
        for item in [stage, *parts]:
            item["share"] = item["seconds"] / wall
            item["projected_share"] = item["projected_s"] / projected
        out.append({**stage, "parts": parts})
    return out


def format_profile(result: dict, min_share: float = 0.005) -> str:
    """The stage table as Markdown (what docs/performance.md quotes); parts under ``min_share`` of the
    projected demo are left out of the table (the JSON has them all)."""
    lines = [f"| stage › part | s in the {result['steps']}-step run | share | "
             f"share projected to {result['full_steps']} steps |", "|---|---|---|---|"]
    for stage in result["summary"]:
        lines.append(f"| **{stage['stage']}** | {stage['seconds']:.1f} | {100 * stage['share']:.1f} % | "
                     f"**{100 * stage['projected_share']:.1f} %** |")
        if len(stage["parts"]) > 1:
            for part in stage["parts"]:
                if part["projected_share"] >= min_share:
                    lines.append(f"| &nbsp;&nbsp;› {part['part']} | {part['seconds']:.1f} | "
                                 f"{100 * part['share']:.1f} % | {100 * part['projected_share']:.1f} % |")
    lines.append(f"| total | {result['wall_s']:.1f} | 100 % | 100 % (≈ {result['projected_full_s']:.0f} s "
                 "at this run's speed) |")
    anatomy = result.get("step_anatomy")
    if anatomy:
        lines += ["", f"Step anatomy ({anatomy['precision']}, batch {anatomy['batch_size']}, each part timed alone, "
                      f"median of {anatomy['rounds']} rounds): " + ", ".join(
                          f"{k} {v:.3f} s" for k, v in anatomy["median_s"].items()) + "."]
    return "\n".join(lines)


def write_profile(result: dict, out_json: str | Path) -> None:
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=2, default=str) + "\n")
