"""One optimiser step: micro-batches under autocast, gradient accumulation, clipping, the finite check.

:class:`TrainStep` owns nothing about files or runs (that is :mod:`medclipin.train.trainer`): it is
handed the model, its (possibly DDP- or compile-wrapped) training module, the optimiser, scheduler
and scaler, and turns ``grad_accum`` micro-batches into one weight update, or into a skipped update
when the loss or the gradients are not finite.

Gradient accumulation sums the gradients of ``grad_accum`` micro-batches before one update. For a
contrastive loss each micro-batch only sees the negatives *inside that micro-batch* (gathered over
ranks): accumulation grows the optimisation batch, not the contrastive batch. ``train.batch_size``
is the contrastive batch (all ranks together); one update sees ``batch_size × grad_accum`` samples.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from medclipin.errors import MedclipinError
from medclipin.config import TrainConfig
from medclipin.train.distributed import DistInfo

log = logging.getLogger(__name__)


class NonFiniteLossError(MedclipinError, RuntimeError):
    """Too many consecutive steps had a non-finite loss; the run stopped without writing a checkpoint."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fast_bf16_available(device: torch.device) -> bool:
    """True where bf16 matrix multiplies are native: CUDA with bf16, or a CPU with AVX512-BF16/AMX.

    Elsewhere (e.g. AVX2-only CPUs) oneDNN emulates bf16 and a matmul is ~100x slower than fp32.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into ``bf16`` or ``fp32`` for this device; pass explicit choices through."""
    if precision == "auto":
        return "bf16" if fast_bf16_available(device) else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast on the device (CPU bf16 autocast where supported), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"train.precision must be fp32, bf16 or fp16, got {precision!r}")
    if device.type == "cpu" and dtype is torch.float16:
        raise ValueError("train.precision=fp16 needs a GPU; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class StepOutcome:
    """What one call of :class:`TrainStep` did.

    Attributes:
        applied: the weights were updated (False: the step was skipped as non-finite).
        loss: mean loss over micro-batches and ranks (the single-process loss of the global batch).
        grad_norm: total gradient norm before clipping (after DDP's all-reduce).
        terms, stats: the model's loss terms and monitors (this rank, averaged over micro-batches / last).
        samples: samples consumed by this call on all ranks.
    """

    applied: bool
    loss: torch.Tensor
    grad_norm: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0


class TrainStep:
    """Turns micro-batches into one optimiser step.

    Args:
        model: the unwrapped :class:`~medclipin.models.model.MedClipModel` (parameters, EMA update).
        train_module: what is called on a batch: ``model`` itself, or its DDP / ``torch.compile`` wrapper.
        optimizer, scheduler, scaler: as built by :mod:`medclipin.train.optim` and ``torch.amp.GradScaler``.
        cfg: ``train`` section (grad_accum, grad_clip, max_nonfinite_steps, steps).
        precision: resolved precision (``fp32``, ``bf16``, ``fp16``).
        device: where batches go.
        dist_info: rank / world size.
        ddp: ``train_module`` is (or wraps) DistributedDataParallel, so ``no_sync`` applies.
    """

    def __init__(self, model: nn.Module, train_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 scaler: torch.amp.GradScaler, cfg: TrainConfig, precision: str, device: torch.device,
                 dist_info: DistInfo, ddp: bool = False):
        self.model, self.train_module = model, train_module
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.cfg, self.precision, self.device, self.dist_info, self.ddp = cfg, precision, device, dist_info, ddp
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.consecutive_nonfinite = 0
        self.nonfinite_total = 0

    def _no_sync(self, last: bool):
        # skip the gradient all-reduce on all but the last micro-batch: one all-reduce per update
        if self.ddp and not last:
            return self.train_module.no_sync()
        return contextlib.nullcontext()

    def __call__(self, next_batch: Callable[[], dict], step: int) -> StepOutcome:
        """Run ``grad_accum`` micro-batches from ``next_batch()`` and update the weights (``step`` = steps done).

        Raises:
            NonFiniteLossError: ``train.max_nonfinite_steps`` consecutive non-finite steps.
        """
        accum = self.cfg.grad_accum
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        terms_sum: dict[str, torch.Tensor] = {}
        stats: dict[str, torch.Tensor] = {}
        samples = 0
        for index in range(accum):
            batch = next_batch()
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if k != "index"}
            samples += batch["image"].shape[0] * self.dist_info.world_size
            with self._no_sync(index == accum - 1):
                with autocast_context(self.precision, self.device):
                    out = self.train_module(batch)
                self.scaler.scale(out.loss / accum).backward()
            loss_sum += out.loss.detach().float() / accum
            for key, value in out.terms.items():
                terms_sum[key] = terms_sum.get(key, 0) + value.detach().float() / accum
            stats = out.stats
        if self.dist_info.enabled:
            # the mean of the ranks' local losses is the global-batch loss; a NaN on any rank makes the
            # sum NaN on every rank, so all ranks take the same skip decision below
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum /= self.dist_info.world_size
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, clip, foreach=True)
        # one host sync per optimiser step: the finite check guards every weight update. Under fp16
        # an overflowing gradient is the GradScaler's business (it skips and lowers the scale).
        finite = bool(torch.isfinite(loss_sum).item())
        if self.precision != "fp16":
            finite = finite and bool(torch.isfinite(grad_norm).item())
        if not finite:
            self._skip(step)
            return StepOutcome(False, loss_sum, grad_norm, terms_sum, stats, samples)
        self.consecutive_nonfinite = 0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.model.after_optimizer_step(step + 1, self.cfg.steps)
        return StepOutcome(True, loss_sum, grad_norm, terms_sum, stats, samples)

    def _skip(self, step: int) -> None:
        self.nonfinite_total += 1
        self.consecutive_nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():
            self.scaler.update()  # closes this step's unscale_ (and lowers the fp16 scale on inf)
        log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)",
                    step + 1, self.consecutive_nonfinite)
        if self.consecutive_nonfinite >= self.cfg.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.consecutive_nonfinite} consecutive non-finite losses at step {step + 1}; stopping. "
                f"No checkpoint was written after the last good step ({step}). Lower train.lr, check the "
                "data, or use train.precision=fp32."
            )
