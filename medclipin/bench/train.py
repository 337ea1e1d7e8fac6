"""``medclipin bench train``: training-step speed of medclipin CLIP, CLIP+CLIPin and open_clip, side by side.

The three contenders train the *same towers* (the config's timm image tower and HF BERT text tower)
on the same synthetic batch shape, in the same precision, with the same AdamW implementation:

* ``clip``      — medclipin ``MedClipModel`` with CLIPin switched off;
* ``clipin``    — medclipin ``MedClipModel`` with CLIPin on (two views; EMA target);
* ``open_clip`` — open_clip's ``CustomTextCLIP`` (``TimmModel`` + ``HFTextEncoder``) with its ``ClipLoss``.

Their steps are **alternated** (clip, clipin, open_clip, then clipin, open_clip, clip, ...: the first
contender rotates every round) so that the noise of a shared machine
falls on all of them alike; each step is timed alone (device synchronised only at its two ends). Inputs
are random tensors created once: this measures the model + optimiser step, not data loading.

medclipin's step is the trainer's own :class:`medclipin.train.step.TrainStep` (one micro-batch):
zero_grad → autocast forward ``model(batch)`` → backward → unscale → clip_grad_norm_ → finite check
(on the device, no host sync) → fused AdamW (``train.optim.build_optimizer``) → scheduler →
``model.after_optimizer_step`` (λ/temperature clamps, EMA).

open_clip's step is ``open_clip_train``'s, optimiser included: ``torch.optim.AdamW`` with torch's
default implementation, as ``open_clip_train.main`` builds it (multi-tensor on CUDA, a per-parameter
loop on CPU). The towers themselves run at parity (docs/performance.md); the optimiser and the step
around the towers are where the two differ.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import os
import platform
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from medclipin.bench.flops import count_flops_by_dtype, matmul_peak, mfu, synchronize
from medclipin.config import Config, apply_overrides, config_from_dict, config_to_dict
from medclipin.train.distributed import DistInfo
from medclipin.train.cpu_runtime import configure_cpu
from medclipin.train.optim import build_optimizer, build_scheduler
from medclipin.train.step import TrainStep, autocast_context, resolve_device, resolve_precision

CONTENDERS = ("clip", "clipin", "open_clip")


# ---------------------------------------------------------------------------------------- inputs
def synthetic_batch(cfg: Config, device: torch.device, two_views: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random normalised images and token ids shaped like a collated batch.

    Texts have random lengths in ``[L/2, L]`` (``L = data.text.max_length``), right-padded with id 0
    (BERT's pad id) so the attention mask is real; position 0 is a [CLS]-like id.
    """
    g = torch.Generator().manual_seed(seed)
    b, size, ch = cfg.train.batch_size, cfg.data.image.size, cfg.data.image.channels
    length, vocab = cfg.data.text.max_length, vocab_size(cfg)

    def text():
        ids = torch.randint(5, vocab, (b, length), generator=g)
        ids[:, 0] = 2
        lengths = torch.randint(max(2, length // 2), length + 1, (b,), generator=g)
        lengths[0] = length  # the longest text sets the padded length, as the collator pads to the longest
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        return ids * mask, mask

    batch = {"image": torch.randn(b, ch, size, size, generator=g)}
    batch["input_ids"], batch["attention_mask"] = text()
    if two_views:
        batch["image_2"] = torch.randn(b, ch, size, size, generator=g)
        if cfg.data.text.view_shuffle or cfg.data.text.view_drop_prob > 0:  # else t2 = t1, as the dataset does
            batch["input_ids_2"], batch["attention_mask_2"] = text()
    return {k: v.to(device) for k, v in batch.items()}


def text_hf_config(cfg: Config):
    """The text tower's Hugging Face config: a pretrained tower's own (read from its folder, no weights), or
    a BERT built from ``model.text_encoder.config`` with the configured WordPiece vocabulary."""
    from transformers import AutoConfig, BertConfig

    encoder = cfg.model.text_encoder
    if encoder.pretrained:
        from medclipin.models.weights import parse_weights

        return AutoConfig.from_pretrained(parse_weights(encoder.pretrained, "text").location)
    return BertConfig(vocab_size=int(cfg.data.text.vocab_size), **encoder.config)


def vocab_size(cfg: Config) -> int:
    """The text tower's vocabulary: the configured WordPiece size, a pretrained tower's own, or a base
    CLIP's tokenizer's (``model.base``)."""
    if cfg.model.base:
        from medclipin.train.trainer import load_configured_base

        return len(load_configured_base(cfg)[1].tokenizer)
    return int(text_hf_config(cfg).vocab_size)


# ---------------------------------------------------------------------------------------- medclipin
def _model_config(cfg: Config, clipin: bool) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.model.clipin.enabled = clipin
    cfg.model.xclip.enabled = False
    cfg.train.grad_accum = 1  # one micro-batch per step, like the open_clip contender
    return cfg


# ---------------------------------------------------------------------------------------- contenders
@dataclass
class Contender:
    name: str
    model: nn.Module
    step: Callable[[], object]  # one full optimiser step
    loss_backward: Callable[[], object]  # forward + backward only (FLOP counting)
    optimizer: torch.optim.Optimizer
    info: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per step (all threads)
    peak_bytes: int = 0  # CUDA max allocated / RSS, during this contender's steps
    peak_step_bytes: int = 0  # increase over the level at the start of the step
    steps_done: int = 0


def build_medclipin_contender(name: str, cfg: Config, device: torch.device, precision: str, seed: int) -> Contender:
    from medclipin.models.model import MedClipModel
    from medclipin.models.weights import resolve_normalization
    from medclipin.train.objective import TrainingObjective
    from medclipin.train.optim import tower_learning_rates

    clipin = name == "clipin"
    mcfg = _model_config(cfg, clipin)
    resolve_normalization(mcfg)
    torch.manual_seed(seed)
    if mcfg.model.base:  # an imported CLIP (open_clip / HF), with the config's objective on top
        from medclipin.train.trainer import load_configured_base

        net = copy.deepcopy(load_configured_base(mcfg)[0]).train()
    else:
        net = MedClipModel.from_config(mcfg.model, mcfg.data.image.size, mcfg.data.image.channels,
                                       vocab_size=vocab_size(cfg))
    model = TrainingObjective(net, mcfg.model).to(device)
    model.train()
    optimizer = build_optimizer(model, mcfg.train, device, lrs=tower_learning_rates(net, mcfg.train))
    scheduler = build_scheduler(optimizer, mcfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    batch = synthetic_batch(cfg, device, two_views=model.needs_two_views, seed=seed + 1)
    train_module = torch.compile(model) if mcfg.train.compile else model
    train_step = TrainStep(model, train_module, optimizer, scheduler, scaler, mcfg.train, precision, device,
                           DistInfo())
    c = Contender(name, model, lambda: None, lambda: None, optimizer)

    def step():
        outcome = train_step(lambda: batch, c.steps_done)
        c.steps_done += 1
        return outcome  # its tensors are not read here: reading would add a host sync to the timed step

    def loss_backward():
        with autocast_context(precision, device):
            out = model(batch)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    c.step, c.loss_backward = step, loss_backward
    c.info = _contender_info("medclipin MedClipModel + train.objective.TrainingObjective + train.optim.build_optimizer"
                             " + train.step.TrainStep", model, optimizer, _tower_module(net.image_encoder),
                             _tower_module(net.text_encoder))
    return c


def open_clip_available() -> bool:
    try:
        import open_clip  # noqa: F401
    except Exception:  # ImportError, or a broken optional dependency
        return False
    return True


def _tower_module(tower: nn.Module) -> nn.Module:
    """The library model inside a tower (timm model, HF model, open_clip module), for the attention report."""
    for name in ("model", "visual", "text", "vision_model", "text_model"):
        inner = getattr(tower, name, None)
        if isinstance(inner, nn.Module):
            return getattr(inner, "trunk", None) or getattr(inner, "transformer", None) or inner
    return tower


def build_open_clip_base(cfg: Config) -> nn.Module:
    """open_clip's own model of ``model.base`` (an ``open_clip:`` spec), loaded as open_clip loads it, with the
    config's frozen layers frozen the same way as medclipin freezes them."""
    import open_clip

    from medclipin.models.bases import LOCAL_DIR, _load_into_open_clip, parse_base

    base = parse_base(cfg.model.base, cfg.model.base_weights)
    if base.library != "open_clip":
        raise ValueError(f"model.base={cfg.model.base}: the open_clip contender needs an open_clip: base")
    if base.local_dir:
        model = open_clip.create_model(f"{LOCAL_DIR}{base.name}", pretrained_text=False)
    else:
        model = open_clip.create_model(base.name)
        if base.weights != "random":
            _load_into_open_clip(model, base.weights)
    from medclipin.train.trainer import load_configured_base

    frozen = {name for name, p in load_configured_base(cfg)[0].named_parameters() if not p.requires_grad}
    for name, parameter in model.named_parameters():  # the same tensors, named as open_clip names them
        ours = (f"image_encoder.{name}" if name.startswith("visual.") else
                f"text_encoder.{name}" if name.startswith("text.") else f"text_encoder.text.{name}")
        if ours in frozen:
            parameter.requires_grad_(False)
    return model


def build_open_clip_model(cfg: Config) -> nn.Module:
    """open_clip ``CustomTextCLIP`` with the same towers as medclipin's config.

    The text tower is open_clip's ``HFTextEncoder`` built (offline) from a ``config.json`` holding the
    same ``BertConfig``; the config's pooling (CLS without BERT's pooler layer, or masked mean) and a linear
    projection, as medclipin does.
    The image tower is open_clip's ``TimmModel`` (token pooling, linear projection) whose timm trunk is
    created with the same keyword arguments medclipin passes (``in_chans``, ``img_size``, ``depth``...),
    which ``TimmModel`` itself does not forward.
    """
    from open_clip.model import CustomTextCLIP
    from transformers import BertConfig

    from medclipin.models.encoders import ImageEncoder, is_vit_like

    embed_dim = cfg.model.contrastive.embed_dim
    enc = cfg.model.image_encoder
    # medclipin's pooling, in open_clip's pooler names (BERT's own pooler layer is left out, as in medclipin)
    pooler = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler"}[cfg.model.text_encoder.pooling]
    # the very timm trunk medclipin builds (same create_model kwargs), wrapped by open_clip's TimmModel
    medclipin_image = ImageEncoder(enc, in_chans=cfg.data.image.channels, image_size=cfg.data.image.size)
    timm_pool = "token" if is_vit_like(medclipin_image.model) else "avg"
    with tempfile.TemporaryDirectory() as folder:
        text_hf_config(cfg).save_pretrained(folder)
        model = CustomTextCLIP(
            embed_dim,
            vision_cfg={"timm_model_name": enc.name, "timm_model_pretrained": False, "timm_pool": timm_pool,
                        "timm_proj": "linear", "image_size": cfg.data.image.size},
            text_cfg={"hf_model_name": folder, "hf_model_pretrained": False, "hf_proj_type": "linear",
                      "hf_pooler_type": pooler,
                      "context_length": cfg.data.text.max_length, "vocab_size": vocab_size(cfg)},
        )
    if getattr(medclipin_image, "replicate_channels", 1) > 1:
        raise ValueError(f"{enc.name} does not take {cfg.data.image.channels}-channel input natively")
    trunk = medclipin_image.model
    if hasattr(trunk, "reset_classifier"):
        trunk.reset_classifier(0, global_pool="token" if hasattr(trunk, "cls_token") else "avg")
    model.visual.trunk = trunk  # frozen stages (model.image_encoder.freeze_layers) stay frozen: the same module
    model.visual.head.proj = nn.Linear(model.visual.trunk.num_features, embed_dim, bias=False)
    frozen = cfg.model.text_encoder.freeze_layers
    if frozen:
        # the same frozen lower layers (open_clip's HFTextEncoder.lock(unlocked_layers) does this for the
        # architectures its arch_dict lists with a layer attribute; BERT is not among them in open_clip 3.x)
        transformer = model.text.transformer
        for module in [transformer.embeddings, *list(transformer.encoder.layer)[:frozen]]:
            for parameter in module.parameters():
                parameter.requires_grad_(False)
    return model


def _open_clip_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # open_clip_train.main: no decay for ndim < 2, "bn", "ln", "bias", "logit_scale"
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay},
    ]


def build_open_clip_contender(cfg: Config, device: torch.device, precision: str, seed: int) -> Contender:
    """open_clip's training step (``open_clip_train.train.train_one_epoch``, no accumulation):
    lr schedule → zero_grad → autocast forward + ``ClipLoss`` → backward → clip_grad_norm_ (open_clip's
    ``--grad-clip-norm``, set to the config's value) → AdamW step → clamp ``logit_scale`` to ln 100.
    The optimiser is built as ``open_clip_train.main`` builds it: ``torch.optim.AdamW(groups, lr, betas,
    eps)`` with torch's default implementation for the device."""
    from open_clip.loss import ClipLoss

    torch.manual_seed(seed)
    model = (build_open_clip_base(cfg) if cfg.model.base else build_open_clip_model(cfg)).to(device)
    model.train()
    forward = torch.compile(model) if cfg.train.compile else model
    loss_fn = ClipLoss()
    tc = cfg.train
    optimizer = torch.optim.AdamW(_open_clip_param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas),
                                  eps=1e-6)
    batch = synthetic_batch(cfg, device, two_views=False, seed=seed + 1)
    images, texts = batch["image"], batch["input_ids"]
    context = getattr(model, "context_length", None)
    if context and getattr(model, "attn_mask", None) is not None and texts.shape[1] < context:
        # open_clip's causal text tower takes exactly its context (77 tokens), padded; medclipin's cuts the mask
        texts = torch.nn.functional.pad(texts, (0, context - texts.shape[1]))
    c = Contender("open_clip", model, lambda: None, lambda: None, optimizer)

    def lr_at(step: int) -> float:  # open_clip_train.scheduler.cosine_lr
        from medclipin.train.optim import warmup_cosine

        return tc.lr * warmup_cosine(step, tc.warmup_steps, tc.steps)

    def loss():
        with autocast_context(precision, device):
            image_features, text_features, logit_scale = forward(images, texts)
            return loss_fn(image_features, text_features, logit_scale)

    def step():
        for group in optimizer.param_groups:
            group["lr"] = lr_at(c.steps_done)
        optimizer.zero_grad()
        total = loss()
        total.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        c.steps_done += 1

    def loss_backward():
        loss().backward()
        model.zero_grad(set_to_none=True)

    c.step, c.loss_backward = step, loss_backward
    import open_clip

    c.info = _contender_info(
        f"open_clip {open_clip.__version__} {type(model).__name__} + open_clip.loss.ClipLoss", model, optimizer,
        getattr(model.visual, "trunk", model.visual), getattr(getattr(model, "text", None), "transformer", model))
    return c


def _contender_info(implementation: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    vit: nn.Module, hf_model: nn.Module) -> dict:
    """What a contender is: implementation, parameter counts, optimiser flags, attention kernels."""
    return {
        "implementation": implementation,
        "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params_total": sum(p.numel() for p in model.parameters()),
        "optimizer": _describe_optimizer(optimizer),
        "attention": {"image_fused_attn": _timm_fused_attn(vit), "text_attn_implementation": _hf_attn(hf_model)},
    }


def _describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    d = optimizer.defaults
    flags = [k for k in ("fused", "foreach") if d.get(k)]
    if not flags and d.get("foreach") is None:  # torch's default: multi-tensor on CUDA, a loop on CPU
        device = optimizer.param_groups[0]["params"][0].device.type
        flags = [f"torch default: {'foreach' if device in ('cuda', 'xpu') else 'for-loop'}"]
    return f"{type(optimizer).__name__}({', '.join(flags) or 'for-loop'})"


def _timm_fused_attn(tower: nn.Module):
    """Whether a timm ViT uses fused attention; None for towers without attention blocks (CNNs)."""
    blocks = getattr(tower, "blocks", None)
    attention = getattr(blocks[0], "attn", None) if blocks else None
    if attention is None:
        return None
    return bool(getattr(attention, "fused_attn", False))


def _hf_attn(hf_model: nn.Module):
    config = getattr(hf_model, "config", None)  # None for towers that are not Hugging Face models
    return getattr(config, "_attn_implementation", None)


# ---------------------------------------------------------------------------------------- memory
class RssSampler:
    """Samples this process's resident set size every few ms in a thread; ``peak()`` since the last ``reset()``.

    On CPU the contenders share one process, so their peaks all include every contender's weights and
    optimiser states; ``reset()`` before a step and ``peak() − start`` isolates that step's own growth.
    """

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self._peak, self._stop = interval_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        try:
            with open("/proc/self/statm") as handle:
                return int(handle.read().split()[1]) * self._page
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, self.current())

    def start(self):
        self._thread.start()
        return self

    def reset(self) -> int:
        now = self.current()
        self._peak = now
        return now

    def peak(self) -> int:
        self._peak = max(self._peak, self.current())
        return self._peak

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=1.0)


# ---------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "mkldnn_bf16_supported": _mkldnn_bf16(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda})
    for module in ("timm", "transformers", "open_clip"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            info[module] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mkldnn_bf16():
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


# ---------------------------------------------------------------------------------------- runner
def _matmul_peaks(device: torch.device, precision: str, peak_max_n: int | None, say) -> dict:
    """The measured matmul peaks (fp32, bf16; fp16 too when the run uses it): MFU's denominator."""
    say("measuring matmul peaks (fp32, bf16)")
    dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if precision == "fp16" else [])
    return {str(dtype).replace("torch.", ""): matmul_peak(dtype, device, max_n=peak_max_n) for dtype in dtypes}


def _time_rounds(built: list[Contender], device: torch.device, warmup: int, steps: int, say) -> None:
    """One step of each contender per round, the first contender rotating; each step timed alone (wall and
    process CPU time) with its peak memory."""
    sampler = RssSampler().start() if device.type == "cpu" else None
    last: dict[str, float] = {}
    try:
        for round_index in range(warmup + steps):
            timed = round_index >= warmup
            # rotate who goes first each round: a step's speed depends a little (2-3 % measured) on which
            # contender ran just before it (caches, allocator), so every contender takes every position
            shift = round_index % len(built)
            for c in built[shift:] + built[:shift]:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    start_bytes = torch.cuda.memory_allocated(device)
                else:
                    start_bytes = sampler.reset()
                synchronize(device)
                t0, cpu0 = time.perf_counter(), time.process_time()
                c.step()
                synchronize(device)
                dt, cpu_dt = time.perf_counter() - t0, time.process_time() - cpu0
                peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else sampler.peak()
                c.peak_bytes = max(c.peak_bytes, peak)
                c.peak_step_bytes = max(c.peak_step_bytes, peak - start_bytes)
                last[c.name] = dt
                if timed:
                    c.times.append(dt)
                    c.cpu_times.append(cpu_dt)
            say(f"round {round_index + 1}/{warmup + steps}" + ("" if timed else " (warm-up)") + ": "
                + ", ".join(f"{name} {t:.3f}s" for name, t in last.items()))
    finally:
        if sampler is not None:
            sampler.stop()


def _summarise(built: list[Contender], cfg: Config, device: torch.device, peaks: dict[str, float],
               precision_dtype: str) -> dict:
    """Per-contender medians, rates, MFU and memory, and the ratios the documentation quotes.

    ``peaks``: measured matmul FLOP/s per dtype name; each contender's FLOPs are charged at the peak of the
    dtype they ran in (:func:`medclipin.bench.flops.mfu`), and an MFU above 1 is replaced by its reason."""
    result: dict = {}
    per = {}
    for c in built:
        median = statistics.median(c.times) if c.times else float("nan")
        achieved = c.info["flops_per_step"] / median if c.times else float("nan")
        utilisation, why_not = (mfu(c.info["flops_by_dtype"], median, peaks, precision_dtype) if peaks
                                else (None, "matmul peak not measured"))
        per[c.name] = {
            **c.info,
            "step_times_s": [round(t, 5) for t in c.times],
            "median_step_s": median,
            "step_cpu_times_s": [round(t, 5) for t in c.cpu_times],
            "median_step_cpu_s": statistics.median(c.cpu_times) if c.cpu_times else float("nan"),
            "samples_per_s": c.info.get("batch_size", cfg.train.batch_size) / median,
            "achieved_flops_per_s": achieved,
            "mfu": utilisation,
            **({"mfu_note": why_not} if why_not else {}),
            "peak_memory_bytes": c.peak_bytes,
            "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_rss_sampled",
            "step_memory_increase_bytes": c.peak_step_bytes,
        }
    result["contenders"] = per
    if device.type == "cpu":
        import resource

        result["process_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for name in CONTENDERS:
        result[f"{name}_samples_per_s"] = per[name]["samples_per_s"] if name in per else None
        result[f"{name}_mfu"] = per[name]["mfu"] if name in per else None
    result["mfu"] = {name: per[name]["mfu"] for name in per}
    notes = {name: per[name]["mfu_note"] for name in per if "mfu_note" in per[name]}
    if notes:
        result["mfu_notes"] = notes
    if "clip" in per and "open_clip" in per:
        result["clip_vs_open_clip"] = per["clip"]["samples_per_s"] / per["open_clip"]["samples_per_s"]
    by_name = {c.name: c.times for c in built}
    cpu = {name: per[name]["median_step_cpu_s"] for name in per}
    if "clip" in per and "open_clip" in per:
        # process CPU time per step: on a shared, oversubscribed machine it moves far less with other jobs'
        # load than wall time (with 1 torch thread it is the step's own work)
        result["clip_vs_open_clip_cpu_time"] = cpu["open_clip"] / cpu["clip"]
    if "clip" in per and "clipin" in per:
        result["clipin_step_vs_clip_step_cpu_time"] = cpu["clipin"] / cpu["clip"]
    if "clip" in per and "open_clip" in per:
        # the same ratio from each round's own pair of steps (robust to load drifting during the run)
        result["clip_vs_open_clip_paired_median"] = statistics.median(
            o / m for m, o in zip(by_name["clip"], by_name["open_clip"]))
    if "clip" in per and "clipin" in per:
        result["clipin_step_vs_clip_step"] = per["clipin"]["median_step_s"] / per["clip"]["median_step_s"]
        result["clipin_step_vs_clip_step_paired_median"] = statistics.median(
            b / a for a, b in zip(by_name["clip"], by_name["clipin"]))
        result["clipin_flops_vs_clip_flops"] = per["clipin"]["flops_per_step"] / per["clip"]["flops_per_step"]
    return result


def run_train_benchmark(cfg: Config, out_json: str | os.PathLike | None = None, steps: int = 10, warmup: int = 2,
                        contenders: tuple[str, ...] = CONTENDERS, device: str | torch.device | None = None,
                        config_path: str = "", seed: int = 0, measure_peak: bool = True,
                        peak_max_n: int | None = None, progress: Callable[[str], None] | None = None,
                        variants: dict[str, list[str]] | None = None) -> dict:
    """Alternate the contenders' training steps and write/return the result dictionary.

    Args:
        cfg: the model/data/train configuration (batch size, image size, towers, precision).
        out_json: where to write the JSON (optional).
        steps, warmup: timed steps per contender, after ``warmup`` untimed rounds.
        contenders: any of ``clip``, ``clipin``, ``open_clip``; ``open_clip`` is skipped (and reported
            unavailable) when the ``open_clip_torch`` package cannot be imported.
        device: ``None`` = ``cfg.train.device``.
        measure_peak: time the bf16 and fp32 matmul peaks (MFU needs the one in use).
        peak_max_n: largest matmul side for the peak (default: CPU 2048, CUDA 8192; tests use small).
        variants: ``{name: [dotted overrides]}``: each contender is built once per variant (named
            ``clipin@name``) and all are alternated in the same rounds, so a change (image size, batch,
            ``train_fp32``, ``target_dropout``...) is measured side by side as a ratio against the first
            variant (``variant_ratios``). Settings fixed per process (``train.threads``, the device) cannot vary.
    """
    say = progress or (lambda message: None)
    if cfg.model.base:  # the base's image and text settings, as a training run takes them
        from medclipin.train.trainer import apply_base_settings

        cfg = copy.deepcopy(cfg)
        apply_base_settings(cfg)
    device = resolve_device(cfg.train.device if device is None else str(device))
    precision = resolve_precision(cfg.train.precision, device)
    configure_cpu(cfg.train.threads, cfg.train.retain_freed_memory, device)
    result: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "torch": torch.__version__,
        "config_path": str(config_path),
        "config": {"data": config_to_dict(cfg.data), "model": config_to_dict(cfg.model),
                   "train": config_to_dict(cfg.train)},
        "precision": precision,
        "batch_size": cfg.train.batch_size,
        "image_size": cfg.data.image.size,
        "text_length": cfg.data.text.max_length,
        "steps": steps,
        "warmup": warmup,
        "schedule": "round-robin: one step of each contender in turn, the starting contender rotating every "
                    "round; each step timed alone",
        "inputs": "synthetic random tensors created once (no data loading)",
        "medclipin_step": "train.step.TrainStep, the trainer's own step (grad_accum 1): zero_grad, autocast "
                          "forward, backward, unscale, clip_grad_norm_, finite check on the device (no host "
                          "sync), fused AdamW, scheduler, after_optimizer_step (EMA)",
        "open_clip_step": "open_clip_train's step: lr schedule, zero_grad, autocast forward + ClipLoss, backward, "
                          "clip_grad_norm_ when train.grad_clip > 0, AdamW as open_clip_train.main builds it "
                          "(torch's default implementation), logit_scale clamp",
        "compile": bool(cfg.train.compile),
        "mfu_method": "FLOPs of one forward + backward (FlopCounterMode, grouped-convolution weight gradients "
                      "counted by their real work), each charged at the measured matmul peak of the dtype it "
                      "ran in, over the median step time; not reported (mfu_notes says why) where it would "
                      "exceed 1",
    }

    peaks = _matmul_peaks(device, precision, peak_max_n, say) if measure_peak else {}
    result["matmul_peak"] = peaks
    used = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    peak_flops = peaks.get(used, {}).get("flops_per_s")
    result["peak_flops_per_s"] = peak_flops
    result["peak_precision"] = used

    wanted = [c for c in contenders if c in CONTENDERS]
    unknown = [c for c in contenders if c not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contenders {unknown}; choose from {CONTENDERS}")
    result["open_clip_available"] = open_clip_available()
    if "open_clip" in wanted and not result["open_clip_available"]:
        wanted.remove("open_clip")
        result["open_clip_note"] = "open_clip_torch is not installed (pip install medclipin[bench]); contender skipped"

    built: list[Contender] = []
    configs = {"": cfg} if not variants else {
        f"@{variant}": config_from_dict(apply_overrides(config_to_dict(cfg), list(overrides)))
        for variant, overrides in variants.items()}
    for name in wanted:
        for suffix, vcfg in configs.items():
            say(f"building {name}{suffix}")
            vprecision = resolve_precision(vcfg.train.precision, device)
            if name == "open_clip":
                c = build_open_clip_contender(vcfg, device, vprecision, seed)
            else:
                c = build_medclipin_contender(name, vcfg, device, vprecision, seed)
            c.name += suffix
            c.info["batch_size"] = vcfg.train.batch_size
            c.info["precision"] = vprecision
            built.append(c)

    for c in built:
        say(f"counting FLOPs of {c.name}")
        c.info["flops_by_dtype"] = count_flops_by_dtype(c.loss_backward)
        c.info["flops_per_step"] = sum(c.info["flops_by_dtype"].values())
        c.info["flops_per_sample"] = c.info["flops_per_step"] / c.info["batch_size"]

    _time_rounds(built, device, warmup, steps, say)

    if measure_peak:
        # the peak again after the timed steps (a shared machine's load changes): keep the better of the two
        for key, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            again = matmul_peak(dtype, device, max_n=peak_max_n)
            peaks[key]["flops_per_s_after"] = again["flops_per_s"]
            if again["flops_per_s"] > peaks[key]["flops_per_s"]:
                peaks[key].update({k: again[k] for k in ("n", "seconds", "flops_per_s")})
        peak_flops = peaks[used]["flops_per_s"] if used in peaks else peak_flops
        result["peak_flops_per_s"] = peak_flops
        result["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result.update(_summarise(built, cfg, device, {k: v["flops_per_s"] for k, v in peaks.items()}, used))
    if variants:
        result["variants"] = {name: list(overrides) for name, overrides in variants.items()}
        result["variant_ratios"] = _variant_ratios(built, list(variants))
    if out_json:
        path = Path(out_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
    return result


def _variant_ratios(built: list[Contender], names: list[str]) -> dict:
    """Per contender and variant: samples/s relative to the first variant (medians; the median of each
    round's own ratio, robust to load drifting during the run; and per-sample process CPU time)."""
    by_name = {c.name: c for c in built}
    ratios: dict = {}
    for base in dict.fromkeys(c.name.split("@")[0] for c in built):
        first = by_name[f"{base}@{names[0]}"]
        for variant in names[1:]:
            other = by_name[f"{base}@{variant}"]
            rate_first = first.info["batch_size"] / statistics.median(first.times)
            rate_other = other.info["batch_size"] / statistics.median(other.times)
            paired = statistics.median((other.info["batch_size"] / b) / (first.info["batch_size"] / a)
                                       for a, b in zip(first.times, other.times))
            # process CPU seconds per sample: with train.threads=1 the step's own work, far less moved by
            # other jobs' load than wall time on a shared machine
            cpu = ((statistics.median(first.cpu_times) / first.info["batch_size"])
                   / (statistics.median(other.cpu_times) / other.info["batch_size"]))
            ratios[f"{base}@{variant} / {base}@{names[0]}"] = {"samples_per_s": rate_other / rate_first,
                                                               "paired_median": paired, "cpu_time": cpu}
    return ratios


# ---------------------------------------------------------------------------------------- profile
def profile_contender(cfg: Config, name: str = "clipin", steps: int = 3, warmup: int = 1, row_limit: int = 25,
                      device: str | torch.device | None = None) -> str:
    """torch.profiler table (by self CPU/CUDA time) of ``steps`` training steps of one contender."""
    from torch.profiler import ProfilerActivity, profile

    device = resolve_device(cfg.train.device if device is None else str(device))
    precision = resolve_precision(cfg.train.precision, device)
    if name == "open_clip":
        c = build_open_clip_contender(cfg, device, precision, 0)
    else:
        c = build_medclipin_contender(name, cfg, device, precision, 0)
    for _ in range(warmup):
        c.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for _ in range(steps):
            c.step()
        synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=row_limit)
