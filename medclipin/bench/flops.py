"""FLOP counting and the machine's measured matrix-multiply peak, the two halves of MFU.

``count_flops(fn)`` runs ``fn`` (one forward + backward) under :class:`torch.utils.flop_counter.FlopCounterMode`
and returns the FLOPs it saw (matmuls, convolutions, attention; element-wise work is not counted, as usual
for MFU). ``matmul_peak(dtype, device)`` times a large square matrix multiply and returns FLOP/s: the
denominator of MFU is what this machine actually reaches, not a datasheet number.
"""

from __future__ import annotations

import time
from typing import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (CUDA); nothing to wait for on CPU. Call only at timing boundaries."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs executed by ``fn()`` (e.g. one forward + backward), as counted by ``FlopCounterMode``."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


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
