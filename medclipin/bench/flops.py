"""FLOP counting and the machine's measured matrix-multiply peak, the two halves of MFU.

``count_flops(fn)`` runs ``fn`` (one forward + backward) under :class:`torch.utils.flop_counter.FlopCounterMode`
and returns the FLOPs it saw (matmuls, convolutions, attention; element-wise work is not counted, as usual
for MFU), with torch's weight-gradient formula corrected for grouped convolutions (:func:`conv_backward_flops`);
``count_flops_by_dtype`` splits them by the precision they ran in. ``matmul_peak(dtype, device)`` times a
large square matrix multiply and returns FLOP/s: the denominator of MFU is what this machine actually
reaches, not a datasheet number. :func:`mfu` combines the two and refuses a figure above 1.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA); nothing to wait for on CPU. Call only at timing boundaries."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the input gradient plus the weight gradient.

    torch's own formula (``torch.utils.flop_counter.conv_backward_flop``, torch 2.x) ignores ``groups`` in
    the weight gradient and so counts a depthwise convolution's weight gradient ``channels`` times over
    (x32 to x1152 in EfficientNet-Lite0): on the demo's EfficientNet-Lite0 the image tower's backward came out
    39x its forward, and MFU above 1. Each of the ``groups`` groups correlates only its own
    ``C_in/groups`` input channels with its ``C_out/groups`` output channels, hence the division.
    """
    from torch.utils.flop_counter import conv_flop_count

    def swap(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:  # grad_input: a transposed convolution of grad_out with the weight (groups already in w)
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:  # grad_weight: a convolution of the input with grad_out, per group
        if transposed:
            full = conv_flop_count(swap(grad_out_shape), swap(x_shape), swap(out_shape[1]), transposed=False)
        else:
            full = conv_flop_count(swap(x_shape), swap(grad_out_shape), swap(out_shape[1]), transposed=False)
        flops += full // max(1, int(groups))
    return flops


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs executed by ``fn()`` (e.g. one forward + backward), as counted by ``FlopCounterMode`` with the
    grouped-convolution backward corrected (:func:`conv_backward_flops`)."""
    return sum(count_flops_by_dtype(fn).values())


def count_flops_by_dtype(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs executed by ``fn()``, split by the dtype the operations ran in (``{"float32": ..., "bfloat16": ...}``).

    A mixed step (bf16 autocast with an image tower trained in fp32, ``model.image_encoder.train_fp32``) does
    part of its work at the fp32 rate: MFU must weigh each part by its own precision's peak (:func:`mfu`).
    The split reads the dtype of each counted operation's first floating-point input (after autocast);
    where torch's counter has no per-operation hook, everything is reported under ``"unknown"``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    class DtypeFlopCounter(FlopCounterMode):
        def __init__(self):
            super().__init__(display=False,
                             custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
            self.by_dtype: dict[str, int] = {}

        def _count_flops(self, func_packet, out, args, kwargs):
            before = self.flop_counts["Global"].get(func_packet, 0)
            result = super()._count_flops(func_packet, out, args, kwargs)
            added = self.flop_counts["Global"].get(func_packet, 0) - before
            if added:
                dtype = next((str(a.dtype).replace("torch.", "") for a in args
                              if isinstance(a, torch.Tensor) and a.is_floating_point()), "unknown")
                self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + int(added)
            return result

    counter = DtypeFlopCounter()
    with counter:
        fn()
    total = int(counter.get_total_flops())
    split = dict(counter.by_dtype)
    if sum(split.values()) != total:  # no _count_flops hook in this torch: the total alone
        split = {"unknown": total}
    return split


def mfu(flops_by_dtype: dict[str, int], step_s: float, peaks: dict[str, float],
        default_dtype: str) -> tuple[float | None, str | None]:
    """Model FLOP utilisation of one step, or ``(None, why)`` where it is not meaningful.

    MFU = (the time the counted FLOPs need at the measured peak of the dtype each ran in) / the step's time,
    i.e. ``sum(flops[d] / peak[d]) / step_s``; for a single-precision step this is the usual
    ``flops / step_s / peak``. FLOPs of a dtype without a measured peak (``"unknown"``) are charged at
    ``default_dtype``'s, the precision the run uses. A utilisation above 1 means over-counted FLOPs or an
    under-measured peak (the machine was loaded while the peak was timed; a kernel faster than the
    square-matmul yardstick): it is dropped with its reason rather than reported.
    """
    if not (step_s and step_s == step_s and step_s > 0) or sum(flops_by_dtype.values()) <= 0:
        return None, "no timed step or no counted FLOPs"
    ideal_s = 0.0
    for dtype, flops in flops_by_dtype.items():
        peak = peaks.get(dtype) or peaks.get(default_dtype)
        if not peak:
            return None, f"no measured {dtype if dtype in peaks else default_dtype} matmul peak"
        ideal_s += flops / peak
    value = ideal_s / step_s
    if value > 1.0:
        return None, (f"the counted FLOPs would need {value:.2f}x the step time at the measured peaks: over-counted "
                      "FLOPs or an under-measured peak, so no MFU is reported")
    return value, None


def vit_flops_estimate(depth: int, dim: int, tokens: int, mlp_ratio: float = 4.0, patch_dim: int = 0,
                       patches: int = 0) -> int:
    """Analytic forward FLOPs of a ViT (2 per multiply-add): per block QKV + proj (8·T·D²),
    attention scores and weighted sum (4·T²·D), MLP (4·r·T·D²); plus the patch embedding (2·P·patch_dim·D)."""
    per_block = 8 * tokens * dim * dim + 4 * tokens * tokens * dim + 4 * mlp_ratio * tokens * dim * dim
    return int(depth * per_block + 2 * patches * patch_dim * dim)


def matmul_peak(dtype: torch.dtype, device: torch.device, max_n: int | None = None,
                target_s: float = 0.25, repeats: int = 3) -> dict:
    """Measured FLOP/s of a large square ``n×n @ n×n`` matmul in ``dtype`` (best of ``repeats``).

    ``n`` doubles from 256 (or ``max_n`` if smaller) until one multiply takes about ``target_s / 4`` or reaches ``max_n`` (CPU 2048,
    CUDA 8192), so a precision the hardware only emulates (bf16 on an AVX2 CPU: ~100x slower than fp32)
    is measured in seconds instead of minutes.
    """
    if max_n is None:
        max_n = 8192 if device.type == "cuda" else 2048
    n, elapsed = min(256, max_n), 0.0
    while True:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        torch.matmul(a, b)  # warm-up (kernel selection, page faults)
        synchronize(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= target_s / 4 or n >= max_n:
            break
        n *= 2
    inner = max(1, int(target_s / max(elapsed, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / inner)
    flops = 2.0 * n ** 3
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "seconds": best, "flops_per_s": flops / best}
