"""AdamW with parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from medclipin.config import TrainConfig

# Scalars that set the objective's scale rather than a feature map: decaying them toward 0 would
# bias the temperature / loss weights, so they never get weight decay.
NO_DECAY_NAMES = ("logit_scale", "logit_bias", "lambda", "prototypes")


def no_decay_names(model: nn.Module) -> set[str]:
    """Full names of parameters a submodule lists in ``no_weight_decay()`` (timm: pos_embed, cls_token, ...)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        method = getattr(module, "no_weight_decay", None)
        if callable(method):
            names.update(f"{prefix}.{name}" if prefix else name for name in method())
    return names


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; norms, biases, temperatures, λ, prototypes and the position
    embeddings / class tokens a timm model lists in ``no_weight_decay()`` without.

    Parameters that do not require gradients (the EMA target, frozen towers) are left out.
    """
    decay, no_decay = [], []
    exempt = no_decay_names(model)
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim < 2 or name in exempt or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused: one kernel per step on CUDA and on CPU.

    Fused rather than multi-tensor (foreach) for two reasons: on CPU it is ~3x faster (8 vs 25 ms per
    step for the demo's 4.6 M parameters, measured), and its ``found_inf`` argument is what lets
    :class:`~medclipin.train.step.TrainStep` skip a non-finite step without a host synchronisation.
    ``device`` is kept for symmetry with the other builders (fused AdamW runs on CPU, CUDA, MPS, XPU).
    """
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             fused=True)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate: linear warmup from 0, then cosine decay to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    )
