"""The base objectives CLIPin plugs into: CLIP's InfoNCE and SigLIP's pairwise sigmoid loss.

Each loss owns its temperature (and bias) parameters, so the model can swap one for the other without
knowing what is inside (method.md, "Base frameworks it plugs into"). Both take L2-normalised features
and support data parallelism in open_clip's local-loss form (see :mod:`medclipin.losses.distributed`).

Call :meth:`clamp_` after every optimiser step (the model's ``after_optimizer_step`` does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medclipin.config import ContrastiveConfig
from medclipin.losses.distributed import gather_features, world_info


def _scalar(module: nn.Module, name: str, value: float, learnable: bool) -> None:
    """Register a 0-d float32 tensor as a Parameter (learnable) or a buffer (saved, not trained)."""
    tensor = torch.tensor(float(value), dtype=torch.float32)
    if learnable:
        module.register_parameter(name, nn.Parameter(tensor))
    else:
        module.register_buffer(name, tensor)


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

    Args:
        init_temperature: initial temperature T; ``logit_scale`` starts at ``ln(1/T)`` (CLIP: 0.07).
        max_logit_scale: upper clamp of ``logit_scale`` (CLIP: ``ln 100``), applied by :meth:`clamp_`.
        learnable: train ``logit_scale`` (else a fixed buffer).

    Example:
        >>> loss_fn = ClipLoss()
        >>> img, txt = F.normalize(torch.randn(8, 32), dim=-1), F.normalize(torch.randn(8, 32), dim=-1)
        >>> loss = loss_fn(img, txt)
    """

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = math.log(100),
                 learnable: bool = True) -> None:
        super().__init__()
        if init_temperature <= 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        self.max_logit_scale = float(max_logit_scale)
        _scalar(self, "logit_scale", math.log(1.0 / init_temperature), learnable)

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Scaled cosine similarities ``s · I Tᵀ`` (rows: images, columns: texts), for evaluation."""
        return self.logit_scale.exp() * image_features @ text_features.T

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Loss of this rank's rows. Inputs: L2-normalised ``(B, D)`` features of matching pairs."""
        _check_pair(image_features, text_features)
        rank, _ = world_info()
        all_image = gather_features(image_features, with_grad=True)
        all_text = gather_features(text_features, with_grad=True)
        scale = self.logit_scale.exp()
        logits_per_image = _at_least_float32(scale * image_features @ all_text.T)
        logits_per_text = _at_least_float32(scale * text_features @ all_image.T)
        batch = image_features.shape[0]
        labels = torch.arange(batch, device=image_features.device) + rank * batch
        return 0.5 * (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels))

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``logit_scale`` to ``[0, max_logit_scale]`` (call after every optimiser step)."""
        self.logit_scale.clamp_(0.0, self.max_logit_scale)


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", Alg. 1).

    ``L = -1/B Σ_i Σ_j log σ(z_ij (s·x_i·y_j + b))``, ``z_ij = +1`` for a matching pair, else ``-1``;
    ``s = exp(logit_scale)``, ``b = logit_bias``.

    Under data parallelism each rank scores its ``B`` images against all ``N`` texts, gathered with
    gradients, positives at the global diagonal ``rank·B + i``, and divides by its local ``B``. This is
    the same loss as the paper's chunked (neighbour-exchange) implementation, written the simple way;
    the mean of the ranks' losses equals the single-process loss on the global batch.

    Args:
        init_logit_scale: initial ``logit_scale`` (paper: ``ln 10``).
        init_logit_bias: initial bias (paper: -10), so that the many negatives start with a small loss.
        max_logit_scale: upper clamp of ``logit_scale``, applied by :meth:`clamp_`.
        learnable: train ``logit_scale`` and ``logit_bias`` (else fixed buffers).
    """

    def __init__(self, init_logit_scale: float = math.log(10), init_logit_bias: float = -10.0,
                 max_logit_scale: float = math.log(100), learnable: bool = True) -> None:
        super().__init__()
        self.max_logit_scale = float(max_logit_scale)
        _scalar(self, "logit_scale", init_logit_scale, learnable)
        _scalar(self, "logit_bias", init_logit_bias, learnable)

    def logits(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """``s · I Tᵀ + b``; ``sigmoid`` of it is the model's probability that a pair matches."""
        return self.logit_scale.exp() * image_features @ text_features.T + self.logit_bias

    def forward(self, image_features: Tensor, text_features: Tensor) -> Tensor:
        """Loss of this rank's images. Inputs: L2-normalised ``(B, D)`` features of matching pairs."""
        _check_pair(image_features, text_features)
        rank, _ = world_info()
        all_text = gather_features(text_features, with_grad=True)
        logits = _at_least_float32(self.logits(image_features, all_text))  # (B, N)
        batch = image_features.shape[0]
        signs = -torch.ones_like(logits)
        rows = torch.arange(batch, device=logits.device)
        signs[rows, rows + rank * batch] = 1.0
        return -F.logsigmoid(signs * logits).sum() / batch

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp ``logit_scale`` to ``[0, max_logit_scale]``; the bias is not clamped."""
        self.logit_scale.clamp_(0.0, self.max_logit_scale)


def build_contrastive_loss(cfg: ContrastiveConfig) -> nn.Module:
    """The base objective named by ``cfg.kind``: ``"clip"`` → :class:`ClipLoss`, ``"siglip"`` → :class:`SigLipLoss`."""
    kind = cfg.kind.strip().lower()
    if kind == "clip":
        return ClipLoss(init_temperature=cfg.init_temperature, max_logit_scale=cfg.max_logit_scale)
    if kind == "siglip":
        return SigLipLoss(init_logit_scale=cfg.siglip_init_logit_scale,
                          init_logit_bias=cfg.siglip_init_logit_bias,
                          max_logit_scale=cfg.max_logit_scale)
    raise ValueError(f"model.contrastive.kind must be 'clip' or 'siglip', got {cfg.kind!r}")
