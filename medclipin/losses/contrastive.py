"""The base objectives CLIPin plugs into: CLIP's InfoNCE and SigLIP's pairwise sigmoid loss.

The temperature (and SigLIP's bias) are parameters of the model (:class:`~medclipin.models.model.MedClipModel`
``logit_scale`` / ``logit_bias``), because inference needs them too; the losses take them as arguments, as
open_clip's do. Both take L2-normalised features and support data parallelism in open_clip's local-loss
form (see :mod:`medclipin.losses.distributed`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medclipin.losses.distributed import gather_features, world_info


def _check_pair(image_features: Tensor, text_features: Tensor) -> None:
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            "expected image and text features of the same shape (B, D), got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def _at_least_float32(x: Tensor) -> Tensor:
    # reductions over the batch in bf16/fp16 lose several digits; float64 (tests) stays float64
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class ClipLoss(nn.Module):
    """Symmetric InfoNCE of CLIP (Radford et al. 2021, eq. in Fig. 3); method.md "Losses", L_CLIP.

    ``L = ½ [CE(s·I Tᵀ, diag) + CE(s·T Iᵀ, diag)]`` with ``s = exp(logit_scale)``.

    Under data parallelism each rank computes the loss of its own ``B`` rows against all ``N = W·B``
    gathered features (gathered with gradients), with positives at ``rank·B + i``. The mean of the
    ranks' losses equals the single-process loss on the global batch, and DDP's gradient averaging
    then gives exactly the single-process gradients.

    Example:
        >>> loss_fn = ClipLoss()
        >>> img, txt = F.normalize(torch.randn(8, 32), dim=-1), F.normalize(torch.randn(8, 32), dim=-1)
        >>> loss = loss_fn(img, txt, torch.tensor(2.659))
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
        """Loss of this rank's rows. Inputs: L2-normalised ``(B, D)`` features of matching pairs."""
        _check_pair(image_features, text_features)
        rank, _ = world_info()
        all_image = gather_features(image_features, with_grad=True)
        all_text = gather_features(text_features, with_grad=True)
        scale = logit_scale.exp()
        logits_per_image = _at_least_float32(scale * image_features @ all_text.T)
        logits_per_text = _at_least_float32(scale * text_features @ all_image.T)
        batch = image_features.shape[0]
        labels = torch.arange(batch, device=image_features.device) + rank * batch
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Alg. 1).

    ``L = -1/B Σ_i Σ_j log σ(z_ij (s·x_i·y_j + b))``, ``z_ij = +1`` for a matching pair, else ``-1``;
    ``s = exp(logit_scale)``, ``b = logit_bias``.

    Under data parallelism each rank scores its ``B`` images against all ``N`` texts, gathered with
    gradients, positives at the global diagonal ``rank·B + i``, and divides by its local ``B``. This is
    the same loss as the paper's chunked (neighbour-exchange) implementation, written the simple way;
    the mean of the ranks' losses equals the single-process loss on the global batch.
    """

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor) -> Tensor:
        """Loss of this rank's images. Inputs: L2-normalised ``(B, D)`` features of matching pairs."""
        _check_pair(image_features, text_features)
        rank, _ = world_info()
        all_text = gather_features(text_features, with_grad=True)
        logits = _at_least_float32(logit_scale.exp() * image_features @ all_text.T + logit_bias)  # (B, N)
        batch = image_features.shape[0]
        signs = -torch.ones_like(logits)
        rows = torch.arange(batch, device=logits.device)
        signs[rows, rows + rank * batch] = 1.0
        return -F.logsigmoid(signs * logits).sum() / batch


def contrastive_loss(kind: str) -> nn.Module:
    """The base objective named ``kind``: ``"clip"`` → :class:`ClipLoss`, ``"siglip"`` → :class:`SigLipLoss`."""
    kind = kind.strip().lower()
    if kind == "clip":
        return ClipLoss()
    if kind == "siglip":
        return SigLipLoss()
    raise ValueError(f"model.contrastive.kind must be 'clip' or 'siglip', got {kind!r}")
