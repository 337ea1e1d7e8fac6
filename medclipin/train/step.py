"""One optimiser step: micro-batches under autocast, gradient accumulation, clipping, the finite check.

:class:`TrainStep` owns nothing about files or runs (that is :mod:`medclipin.train.trainer`): it is
handed the model, its (possibly DDP- or compile-wrapped) training module, the optimiser, scheduler
and scaler, and turns ``grad_accum`` micro-batches into one weight update, or into a skipped update
when the loss or the gradients are not finite. It never waits for the device: the skip is decided
on the device (:class:`NonFiniteGuard`), so a GPU always has the next step queued.

Gradient accumulation sums the gradients of ``grad_accum`` micro-batches before one update. For a
contrastive loss each micro-batch only sees the negatives *inside that micro-batch* (gathered over
ranks): accumulation grows the optimisation batch, not the contrastive batch. ``train.batch_size``
is the contrastive batch (all ranks together); one update sees ``batch_size × grad_accum`` samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from medclipin.errors import MedclipinError, SettingError
from medclipin.config import TrainConfig
from medclipin.train.distributed import DistInfo


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
        raise SettingError(f"train.precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return precision


def autocast_context(precision: str, device: torch.device):
    """bf16/fp16 autocast on the device (CPU bf16 autocast where supported), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise SettingError(f"train.precision must be fp32, bf16 or fp16, got {precision!r}")
    if device.type == "cpu" and dtype is torch.float16:
        raise SettingError("train.precision=fp16 needs a GPU; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class StepOutcome:
    """What one call of :class:`TrainStep` did.

    Every field is a device tensor except ``samples``: reading one synchronises with the device, so a
    caller reads them only when it logs.

    Attributes:
        applied: 0-dim bool, the weights were updated (False: skipped as non-finite).
        loss: mean loss over micro-batches and ranks (the single-process loss of the global batch).
        grad_norm: total gradient norm before clipping (after DDP's all-reduce).
        terms, stats: the model's loss terms and monitors (this rank, averaged over micro-batches / last).
        samples: samples consumed by this call on all ranks.
    """

    applied: torch.Tensor
    loss: torch.Tensor
    grad_norm: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: int = 0


class NonFiniteGuard:
    """Counts non-finite steps on the device and stops the run after ``max_consecutive`` in a row.

    A host read of each step's verdict would stall a GPU once per step (the CPU could not queue the
    next step before the last one finished). Instead the two counters (consecutive, total) live on the
    device, are copied to host memory asynchronously at the end of each step, and :meth:`check` reads
    them during the *next* step, once that step's forward and backward are queued: the GPU never waits
    for the host. The stop therefore comes at most one step late, which costs nothing, because a
    skipped step leaves the weights and optimiser state untouched. On CPU the copy is immediate.
    """

    def __init__(self, device: torch.device, max_consecutive: int, total: int = 0):
        self.max_consecutive = max_consecutive
        self._counts = torch.tensor([0, total], dtype=torch.int64, device=device)  # consecutive, total
        self._host = torch.tensor([0, total], dtype=torch.int64).pin_memory() if device.type == "cuda" \
            else torch.tensor([0, total], dtype=torch.int64)
        self._event = torch.cuda.Event() if device.type == "cuda" else None
        self._host_step = 0  # the step the host copy describes

    def update(self, nonfinite: torch.Tensor, step: int) -> None:
        """Fold step ``step``'s verdict (0-dim bool tensor) into the counters, without a host sync."""
        bad = nonfinite.to(torch.int64)
        # both counters grow by `bad`; then a finite step (bad = 0) zeroes the streak, never the total
        self._counts.add_(bad).mul_(torch.stack([bad, torch.ones_like(bad)]))
        self._host.copy_(self._counts, non_blocking=True)
        if self._event is not None:
            self._event.record()
        self._host_step = step

    def read(self) -> tuple[int, int, int]:
        """(consecutive, total, step) as of the last :meth:`update`; waits only for that step's copy."""
        if self._event is not None:
            self._event.synchronize()
        return int(self._host[0]), int(self._host[1]), self._host_step

    @property
    def total(self) -> int:
        return self.read()[1]

    def check(self) -> None:
        """Raise :class:`NonFiniteLossError` when the last ``max_consecutive`` steps were all non-finite."""
        consecutive, _, step = self.read()
        if consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{consecutive} consecutive non-finite losses at step {step}; stopping. Their updates were "
                f"skipped: the weights are those of step {step - consecutive}, the last good step, and no "
                "checkpoint holds non-finite weights. Lower train.lr, check the data, or use "
                "train.precision=fp32."
            )


class TrainStep:
    """Turns micro-batches into one optimiser step, with no host synchronisation.

    A step whose loss or gradient norm is not finite is skipped *on the device*: the fused AdamW
    kernel takes the verdict as its ``found_inf`` argument (the mechanism ``GradScaler`` uses) and
    leaves weights and moments untouched. Such a step still counts as a step (the schedule and the EMA
    move on; the EMA target lerps toward unchanged weights); :class:`NonFiniteGuard` counts it and
    stops the run after ``train.max_nonfinite_steps`` in a row. An optimiser without that argument
    (not fused) gets the same skip through a host read of the verdict.

    Args:
        model: the unwrapped :class:`~medclipin.models.model.MedClipModel` (parameters, EMA update).
        train_module: what is called on a batch: ``model`` itself, or its DDP / ``torch.compile`` wrapper.
        optimizer, scheduler, scaler: as built by :mod:`medclipin.train.optim` and ``torch.amp.GradScaler``.
        cfg: ``train`` section (grad_accum, grad_clip, max_nonfinite_steps, steps).
        precision: resolved precision (``fp32``, ``bf16``, ``fp16``).
        device: where batches go.
        dist_info: rank / world size.
        ddp: ``train_module`` is (or wraps) DistributedDataParallel, so ``no_sync`` applies.
        nonfinite_total: skipped steps so far (restored on resume).
    """

    def __init__(self, model: nn.Module, train_module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 scaler: torch.amp.GradScaler, cfg: TrainConfig, precision: str, device: torch.device,
                 dist_info: DistInfo, ddp: bool = False, nonfinite_total: int = 0):
        self.model, self.train_module = model, train_module
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.cfg, self.precision, self.device, self.dist_info, self.ddp = cfg, precision, device, dist_info, ddp
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.guard = NonFiniteGuard(device, cfg.max_nonfinite_steps, total=nonfinite_total)
        # the shared trunks the gradient monitor reports on: each modality's tower and pre-projector
        inner = getattr(model, "model", None)
        self.trunks: dict[str, list[torch.nn.Parameter]] = {}
        for trunk in ("image", "text"):
            modules = [getattr(inner, f"{trunk}_encoder", None), getattr(inner, f"{trunk}_pre", None)]
            params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
            if params:
                self.trunks[trunk] = params

    @property
    def nonfinite_total(self) -> int:
        """Skipped (non-finite) steps so far, this run and the runs it resumed."""
        return self.guard.total

    @property
    def consecutive_nonfinite(self) -> int:
        """Non-finite steps in a row, ending at the last step (reading it waits for that step)."""
        return self.guard.read()[0]

    def _no_sync(self, last: bool):
        # skip the gradient all-reduce on all but the last micro-batch: one all-reduce per update
        if self.ddp and not last:
            return self.train_module.no_sync()
        return contextlib.nullcontext()

    def _monitoring(self, step: int) -> bool:
        every = getattr(self.cfg, "grad_monitor_every", 0)
        return bool(every) and (step + 1) % every == 0 and len(getattr(self, "trunks", {})) > 0

    def _term_gradient_norms(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradient norm of each loss term alone on each shared trunk (``gnorm_<trunk>_<term>``): which term
        drives the towers. One extra backward per term, on monitored steps only (``train.grad_monitor_every``)."""
        norms: dict[str, torch.Tensor] = {}
        for term, value in parts.items():
            if not value.requires_grad:
                continue
            for trunk, params in self.trunks.items():
                grads = torch.autograd.grad(value.float(), params, retain_graph=True, allow_unused=True)
                squares = [g.float().pow(2).sum() for g in grads if g is not None]
                norms[f"gnorm_{trunk}_{term}"] = (torch.stack(squares).sum().sqrt() if squares
                                                  else torch.zeros((), device=self.device))
        return norms

    def _skips_on_device(self) -> bool:
        # re-read every step: loading an optimiser state dict replaces the groups' flags
        return all(group.get("fused") for group in self.optimizer.param_groups)

    def __call__(self, next_batch: Callable[[], dict], step: int) -> StepOutcome:
        """Run ``grad_accum`` micro-batches from ``next_batch()`` and update the weights (``step`` = steps done).

        Raises:
            NonFiniteLossError: the steps before this one were ``train.max_nonfinite_steps`` non-finite
                steps in a row (checked once this step's work is queued, so at most one step late).
        """
        accum = self.cfg.grad_accum
        stats_extra: dict[str, torch.Tensor] = {}
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
                if index == 0 and self._monitoring(step):
                    stats_extra = self._term_gradient_norms(out.parts)
                self.scaler.scale(out.loss / accum).backward()
            loss_sum += out.loss.detach().float() / accum
            for key, value in out.terms.items():
                terms_sum[key] = terms_sum.get(key, 0) + value.detach().float() / accum
            stats = {**out.stats, **stats_extra}
        self.guard.check()  # the previous steps' verdicts: this step is queued, so the device is busy
        if self.dist_info.enabled:
            # the mean of the ranks' local losses is the global-batch loss; a NaN on any rank makes the
            # sum NaN on every rank, so all ranks take the same skip decision below
            dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            loss_sum /= self.dist_info.world_size
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, clip, foreach=True)
        # under fp16 an overflowing gradient is the GradScaler's business (it skips and lowers the scale)
        nonfinite = ~torch.isfinite(loss_sum)
        if self.precision != "fp16":
            nonfinite = nonfinite | ~torch.isfinite(grad_norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips on overflow, also without a host sync when fused
            self.scaler.update()
        elif self._skips_on_device():
            self.optimizer.grad_scale, self.optimizer.found_inf = None, nonfinite.float()
            self.optimizer.step()
        elif not bool(nonfinite):  # an optimiser that cannot skip on the device: one host read
            self.optimizer.step()
        self.scheduler.step()
        self.model.after_optimizer_step(step + 1, self.cfg.steps)
        self.guard.update(nonfinite, step + 1)
        return StepOutcome(~nonfinite, loss_sum, grad_norm, terms_sum, stats, samples)
