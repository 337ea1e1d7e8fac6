"""``medclipin bench gpu``: a lent GPU measured in one short run (a few minutes), with no preparation.

Three correctness checks of the paths only a GPU run takes, each against a CPU fp32 reference, then the
training-step throughput of the GPU benchmark config:

1. **bf16 autocast** — the same model (same weights, eval mode so dropout is off) on the device under
   bf16 autocast against CPU fp32: per-row cosine of the image and text embeddings, relative difference
   of the contrastive loss, cosine of the whole gradient vector.
2. **fused AdamW** — ``train.optim.build_optimizer`` (fused) on the device against torch's reference
   for-loop AdamW on CPU, three steps on the same gradients: largest parameter difference.
3. **collectives** — a one-rank process group (NCCL on CUDA, gloo on CPU) through the calls the losses
   and DDP make (``torch.distributed.nn.functional.all_gather`` with its backward, ``all_reduce``,
   ``broadcast``): values and gradients must come back unchanged. With one GPU this shows that NCCL
   initialises and runs these calls; that several ranks equal one process is tested with gloo on CPU
   (``tests/test_distributed.py``).
4. **throughput** — :func:`medclipin.bench.train.run_train_benchmark` on
   ``configs/bench_gpu_vitb16_bert.yaml`` (ViT-B/16 + BERT-base, batch 128, bf16): samples/s, MFU and
   peak memory of medclipin CLIP, CLIP+CLIPin and open_clip, plus every ``--model`` config.

``dry_run=True`` runs all of it on the CPU at a tiny size (the same code, shrunken configs, gloo), so that
CI exercises the script and it cannot rot between GPU sessions.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from medclipin.config import Config, load_config

GPU_CONFIG = "bench_gpu_vitb16_bert"  # medclipin/configs/bench_gpu_vitb16_bert.yaml, shipped with the package
# the open_clip ViT-B/16 imported as a medclipin base (model.base), timed beside open_clip's own step on it
IMPORTED_CLIP_CONFIG = "bench_gpu_openai_vitb16"

# The dry run shrinks every config to this size (CPU, seconds); the code paths stay the GPU run's.
DRY_RUN_OVERRIDES = [
    "data.image.size=32", "data.image.channels=1", "data.text.max_length=8", "data.text.vocab_size=100",
    "model.image_encoder.name=vit_tiny_patch16_224", "model.image_encoder.pretrained=",
    "model.image_encoder.kwargs={patch_size: 16, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.text_encoder.pretrained=", "model.image_encoder.freeze_layers=0", "model.text_encoder.freeze_layers=0",
    "model.text_encoder.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "intermediate_size: 64}",
    "model.contrastive.embed_dim=16", "model.clipin.pre_dim=32", "model.clipin.nc_dim=32",
    "model.clipin.predictor_hidden=16", "train.batch_size=4", "train.device=cpu", "train.precision=bf16",
    "train.warmup_steps=1", "train.steps=10",
]

# Limits of the checks. bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operation): through 12
# transformer layers embeddings stay at cosine > 0.99 of fp32 and gradients at > 0.9; a wrong mask,
# a wrong cast or a broken kernel falls far below. fp32 AdamW agrees to rounding.
LIMITS = {"embedding_cosine_min": 0.99, "loss_relative_diff_max": 0.05, "gradient_cosine_min": 0.9,
          "adamw_max_abs_diff": 1e-5, "collective_max_abs_diff": 0.0}


# ------------------------------------------------------------------------------------------ checks
def _model_and_batch(cfg: Config, batch_size: int, seed: int = 0):
    from medclipin.bench.train import synthetic_batch, vocab_size
    from medclipin.models.model import MedClipModel
    from medclipin.models.weights import resolve_normalization

    cfg = copy.deepcopy(cfg)
    cfg.train.batch_size = batch_size
    resolve_normalization(cfg)
    torch.manual_seed(seed)
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels,
                                     vocab_size=vocab_size(cfg))
    return model.eval(), synthetic_batch(cfg, torch.device("cpu"), two_views=False, seed=seed + 1)


def _clip_loss(model, batch):
    image = model.encode_image(batch["image"])
    text = model.encode_text(batch["input_ids"], batch["attention_mask"])
    logits = model.logits(image.float(), text.float())
    labels = torch.arange(logits.shape[0], device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return image.float(), text.float(), loss


def _flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten().cpu() for p in model.parameters()
                      if p.requires_grad and p.grad is not None])


def check_bf16(cfg: Config, device: torch.device, batch_size: int = 4) -> dict:
    """The model under bf16 autocast on ``device`` against the same model in fp32 on CPU (forward + backward)."""
    reference, batch = _model_and_batch(cfg, batch_size)
    candidate = copy.deepcopy(reference).to(device)
    image_ref, text_ref, loss_ref = _clip_loss(reference, batch)
    loss_ref.backward()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        image, text, loss = _clip_loss(candidate, {k: v.to(device) for k, v in batch.items()})
    loss.backward()
    cosine = min(F.cosine_similarity(image.cpu(), image_ref).min().item(),
                 F.cosine_similarity(text.cpu(), text_ref).min().item())
    values = {"embedding_cosine_min": cosine,
              "loss_relative_diff_max": abs(loss.item() - loss_ref.item()) / max(abs(loss_ref.item()), 1e-6),
              "gradient_cosine_min": F.cosine_similarity(_flat_grad(candidate), _flat_grad(reference), dim=0).item()}
    return _verdict("bf16 autocast on the device vs fp32 on CPU", values)


def check_fused_adamw(cfg: Config, device: torch.device, steps: int = 3) -> dict:
    """medclipin's fused AdamW on ``device`` against torch's for-loop AdamW on CPU, the same gradients."""
    from medclipin.train.optim import build_optimizer

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 32))
    candidate = copy.deepcopy(reference).to(device)
    fused = build_optimizer(candidate, cfg.train, device, lrs=[])
    hyper = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")  # the implementation flags stay default
    groups = [{**{k: g[k] for k in hyper if k in g},
               "params": [dict(reference.named_parameters())[n] for n in _names(candidate, g["params"])]}
              for g in fused.param_groups]
    plain = torch.optim.AdamW(groups, foreach=False, fused=False)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p_ref, p in zip(reference.parameters(), candidate.parameters()):
            grad = torch.randn(p_ref.shape, generator=generator)
            p_ref.grad, p.grad = grad, grad.to(device)
        plain.step()
        fused.step()
    diff = max((p.detach().cpu() - p_ref.detach()).abs().max().item()
               for p_ref, p in zip(reference.parameters(), candidate.parameters()))
    return _verdict("fused AdamW on the device vs for-loop AdamW on CPU", {"adamw_max_abs_diff": diff},
                    {"optimizer": f"fused={fused.defaults.get('fused')}", "steps": steps})


def _names(module: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id[id(p)] for p in params]


def check_collectives(device: torch.device) -> dict:
    """all_gather (with its backward), all_reduce and broadcast through a one-rank process group."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather, all_reduce

    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        return {"name": "collectives", "ok": True, "skipped": "a process group already exists", "values": {}}
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings():
            # deprecated in recent torch (FutureWarning); still the calls losses/distributed.py makes
            warnings.simplefilter("ignore", FutureWarning)
            diffs = []
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(8, 16, device=device, dtype=dtype, requires_grad=True)
                gathered = torch.cat(all_gather(x), dim=0)
                weight = torch.randn_like(gathered)
                (gathered * weight).sum().backward()
                reduced = all_reduce(x.detach().clone(), op=dist.ReduceOp.SUM)
                copy_ = x.detach().clone()
                dist.broadcast(copy_, src=0)
                diffs += [(gathered - x).abs().max(), (x.grad - weight).abs().max(), (reduced - x).abs().max(),
                          (copy_ - x).abs().max()]
            value = max(d.float().item() for d in diffs)
    finally:
        dist.destroy_process_group()
    return _verdict(f"collectives through a one-rank {backend} group", {"collective_max_abs_diff": value},
                    {"backend": backend})


def _verdict(name: str, values: dict, extra: dict | None = None) -> dict:
    ok = {}
    for key, value in values.items():
        limit = LIMITS[key]
        ok[key] = value >= limit if key.endswith("_min") else value <= limit
    return {"name": name, "values": values, "limits": {k: LIMITS[k] for k in values}, "ok": all(ok.values()),
            **(extra or {})}


# ------------------------------------------------------------------------------------------ run
def run_gpu_benchmark(config: str = GPU_CONFIG, models: Sequence[str] = (), out_json: str | Path | None = None,
                      dry_run: bool = False, steps: int = 10, warmup: int = 3,
                      contenders: Sequence[str] = ("clip", "clipin", "open_clip"),
                      progress: Callable[[str], None] | None = None) -> dict:
    """The checks, then the throughput of ``config`` and of each ``models`` config; returns (and writes) the result.

    Args:
        config: the benchmark config (default: ViT-B/16 + BERT-base, ``configs/bench_gpu_vitb16_bert.yaml``).
        models: more configs to time with the medclipin contenders (``clip``, ``clipin``), and with open_clip's
            own step too where the config's ``model.base`` is an open_clip model. The imported open_clip
            ViT-B/16 (:data:`IMPORTED_CLIP_CONFIG`) is always timed; the dry run gives it a tiny open_clip
            folder instead (the same code path).
        dry_run: everything on CPU at a tiny size (CI); without it a CUDA device is required.
        steps, warmup: timed steps per contender and untimed rounds before them.
    """
    from medclipin.bench.train import run_train_benchmark

    say = progress or (lambda message: None)
    if not dry_run and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here: medclipin bench gpu measures a GPU; --dry-run runs the same "
                           "checks and benchmark on the CPU at a tiny size")
    device = torch.device("cpu" if dry_run else "cuda")
    overrides = DRY_RUN_OVERRIDES if dry_run else ["train.device=cuda"]
    start = time.perf_counter()
    cfg = load_config(config, overrides)
    result: dict = {"device": str(device), "dry_run": dry_run, "config": str(config), "models": list(models)}

    say("checking bf16 autocast against CPU fp32")
    checks = [check_bf16(cfg, device)]
    say("checking fused AdamW against CPU for-loop AdamW")
    checks.append(check_fused_adamw(cfg, device))
    say("checking collectives")
    checks.append(check_collectives(device))
    result["checks"] = checks
    result["checks_ok"] = all(c["ok"] for c in checks)

    peak_max_n = 128 if dry_run else None
    runs = []
    scratch = tempfile.TemporaryDirectory(prefix="medclipin-bench-gpu-")
    for path in [config, *dict.fromkeys([*models, IMPORTED_CLIP_CONFIG])]:
        run_cfg = cfg if path == config else load_config(path, overrides)
        if dry_run and run_cfg.model.base:
            run_cfg.model.base, run_cfg.model.base_weights = f"open_clip:local-dir:{_tiny_open_clip(scratch.name)}", ""
        imported = run_cfg.model.base.startswith("open_clip:")
        wanted = tuple(c for c in contenders if c != "open_clip" or path == config or imported)
        say(f"timing {path}: {', '.join(wanted)}")
        bench = run_train_benchmark(run_cfg, None, steps=steps, warmup=warmup, contenders=wanted, device=device,
                                    config_path=str(path), peak_max_n=peak_max_n, progress=say)
        runs.append({"config": str(path), "precision": bench["precision"], "batch_size": bench["batch_size"],
                     "peak_flops_per_s": bench["peak_flops_per_s"], "machine": bench["machine"],
                     "contenders": {name: {k: c.get(k) for k in ("samples_per_s", "median_step_s", "mfu", "mfu_note",
                                                                  "flops_per_sample", "peak_memory_bytes")}
                                    for name, c in bench["contenders"].items()},
                     "open_clip_note": bench.get("open_clip_note")})
    scratch.cleanup()
    result["throughput"] = runs
    result["wall_s"] = time.perf_counter() - start
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def _tiny_open_clip(folder: str) -> str:
    """An open_clip ``local-dir`` folder of a tiny CLIP (ViT + causal text transformer, random weights) for the
    dry run: the imported-CLIP code path at CPU size."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 16, "quick_gelu": True,
                 "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = Path(folder) / "tiny_open_clip"
    path.mkdir(exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    model = open_clip.model.CLIP(**model_cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return str(path)


def format_gpu_report(result: dict) -> str:
    """The checks and the throughput table as text."""
    lines = [f"medclipin bench gpu ({'dry run on CPU, tiny configs' if result['dry_run'] else result['device']})"]
    for check in result["checks"]:
        values = ", ".join(f"{k} {v:.3g} (limit {check['limits'][k]:g})" for k, v in check["values"].items())
        lines.append(f"  [{'ok' if check['ok'] else 'FAILED'}] {check['name']}: {values or check.get('skipped')}")
    lines.append(f"  {'config':<40} {'contender':<10} {'samples/s':>10} {'MFU':>6} {'peak GiB':>9}")
    for run in result["throughput"]:
        for name, c in run["contenders"].items():
            mfu = "n/a" if c["mfu"] is None else f"{c['mfu']:.2f}"
            lines.append(f"  {Path(run['config']).name:<40.40} {name:<10} {c['samples_per_s']:>10.1f} {mfu:>6} "
                         f"{c['peak_memory_bytes'] / 2**30:>9.2f}")
        if run.get("open_clip_note"):
            lines.append(f"  ({run['open_clip_note']})")
    lines.append(f"  wall {result['wall_s']:.0f} s; checks {'passed' if result['checks_ok'] else 'FAILED'}")
    return "\n".join(lines)
