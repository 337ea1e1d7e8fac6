"""Feature gathering across data-parallel ranks, for losses that compare against the global batch.

The contrastive losses use the *local-loss* form of open_clip (Cherti et al. 2023, ``open_clip/loss.py``):
each rank scores its own rows against the features of every rank, gathered with gradients, so no rank
ever builds the full ``N x N`` logit matrix and the loss still sees every negative in the global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(x: Tensor, with_grad: bool = True) -> Tensor:
    """All-gather ``x`` (shape ``(B, ...)``) from every rank and concatenate along dim 0, in rank order.

    Every rank must pass the same ``B`` (use ``drop_last=True`` in the sampler).

    Args:
        x: this rank's tensor.
        with_grad: if True (open_clip's ``gather_with_grad``) use ``torch.distributed.nn.functional.all_gather``,
            whose backward sums the gradients from every rank into the owner's rows, so each rank's
            features receive the gradient of the losses computed on *all* ranks. If False, the other
            ranks' rows are constants and only this rank's slot (``x`` itself) carries a gradient.

    Returns:
        ``x`` unchanged when not distributed, else a ``(world_size * B, ...)`` tensor.
    """
    rank, world_size = world_info()
    if world_size == 1:
        return x
    if with_grad:
        # imported here: torch.distributed.nn is absent from some builds without distributed support
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x), dim=0)
    gathered = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(gathered, x.contiguous())
    gathered[rank] = x  # keep the local rows in the graph
    return torch.cat(gathered, dim=0)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks, differentiable (backward sums the ranks' gradients); ``x`` when not distributed."""
    _, world_size = world_info()
    if world_size == 1:
        return x
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x, op=dist.ReduceOp.SUM) / world_size
