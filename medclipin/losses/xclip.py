"""nCLIP, the non-contrastive half of xCLIP (Zhou et al., CVPR 2023, "Non-Contrastive Learning Meets
Language-Image Pre-Training"); method.md "nCLIP / xCLIP".

Each modality's embedding is mapped by a :class:`PrototypeHead` to logits over K learnable prototypes.
The sharpened (teacher temperature), stop-gradient distribution of one modality is the target of the
other modality's prediction (cross-entropy), and the entropy of the batch-mean prediction is maximised
so that the heads cannot collapse onto one prototype. xCLIP adds this to the CLIP loss with its own heads:
``L_xCLIP = L_CLIP + nclip_weight · L_nCLIP``.

The paper's exact K, temperatures and weights were not found; the defaults here (K = 4096, τ_s = 0.1,
τ_t = 0.04, entropy weight 1, see :class:`medclipin.config.XclipConfig`) are this toolkit's choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medclipin.config import XclipConfig
from medclipin.losses.distributed import all_reduce_mean


class PrototypeHead(nn.Module):
    """MLP → L2-normalise → cosine logits against K weight-normalised prototypes (as DINO's head).

    ``Linear(in_dim, hidden_dim) → GELU → Linear(hidden_dim, head_dim)``, normalised, then a bias-free
    ``Linear(head_dim, K)`` whose rows are normalised in every forward (weight norm with the gain fixed
    at 1), so each logit is a cosine in ``[-1, 1]`` and the temperatures alone set the sharpness.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, head_dim: int = 256, num_prototypes: int = 4096) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, head_dim))
        self.prototypes = nn.Linear(head_dim, num_prototypes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_dim)`` → prototype logits ``(B, K)``."""
        h = F.normalize(self.mlp(x), dim=-1)
        return F.linear(h, F.normalize(self.prototypes.weight, dim=-1))


def _at_least_float32(x: Tensor) -> Tensor:
    # softmax at τ_t = 0.04 in bf16 is too coarse; float64 (tests) stays float64
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _entropy(p: Tensor) -> Tensor:
    # 0·log 0 = 0; the clamp only guards log against exact zeros
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


class NclipLoss(nn.Module):
    """The nCLIP objective with an image and a text :class:`PrototypeHead`.

    With ``p = softmax(logits / τ_s)`` (student) and ``q = stopgrad(softmax(logits / τ_t))`` (teacher)
    for each modality:

        L = ½ [CE(q_T, p_I) + CE(q_I, p_T)] − entropy_weight · ½ [H(mean_b p_I) + H(mean_b p_T)]

    where ``CE(q, p) = −mean_b Σ_k q_bk log p_bk`` and ``H`` is the Shannon entropy (at most ``ln K``),
    so the loss can be negative. Under data parallelism the batch-mean predictions are averaged over
    ranks (differentiably) before the entropy, so the regulariser sees the global batch.
    """

    def __init__(self, in_dim_image: int, in_dim_text: int, hidden_dim: int = 2048, head_dim: int = 256,
                 num_prototypes: int = 4096, student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                 entropy_weight: float = 1.0) -> None:
        super().__init__()
        if student_temperature <= 0 or teacher_temperature <= 0:
            raise ValueError("nCLIP temperatures must be > 0")
        self.image_head = PrototypeHead(in_dim_image, hidden_dim, head_dim, num_prototypes)
        self.text_head = PrototypeHead(in_dim_text, hidden_dim, head_dim, num_prototypes)
        self.student_temperature = float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.entropy_weight = float(entropy_weight)

    def forward(self, image_features: Tensor, text_features: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Returns ``(loss, terms)``; ``terms`` (detached): ``nclip_ce``, ``nclip_entropy`` (mean of the two H)."""
        logits_img = _at_least_float32(self.image_head(image_features))
        logits_txt = _at_least_float32(self.text_head(text_features))
        log_p_img = F.log_softmax(logits_img / self.student_temperature, dim=-1)
        log_p_txt = F.log_softmax(logits_txt / self.student_temperature, dim=-1)
        with torch.no_grad():
            q_img = F.softmax(logits_img / self.teacher_temperature, dim=-1)
            q_txt = F.softmax(logits_txt / self.teacher_temperature, dim=-1)
        cross_entropy = 0.5 * (-(q_txt * log_p_img).sum(-1).mean() - (q_img * log_p_txt).sum(-1).mean())
        mean_p_img = all_reduce_mean(log_p_img.exp().mean(dim=0))
        mean_p_txt = all_reduce_mean(log_p_txt.exp().mean(dim=0))
        entropy = 0.5 * (_entropy(mean_p_img) + _entropy(mean_p_txt))
        loss = cross_entropy - self.entropy_weight * entropy
        return loss, {"nclip_ce": cross_entropy.detach(), "nclip_entropy": entropy.detach()}


def build_nclip_loss(cfg: XclipConfig, in_dim_image: int, in_dim_text: int) -> NclipLoss:
    """:class:`NclipLoss` with the heads and temperatures of ``cfg`` (``cfg.nclip_weight`` is the caller's)."""
    return NclipLoss(in_dim_image, in_dim_text, hidden_dim=cfg.head_hidden, head_dim=cfg.head_dim,
                     num_prototypes=cfg.num_prototypes, student_temperature=cfg.student_temperature,
                     teacher_temperature=cfg.teacher_temperature, entropy_weight=cfg.entropy_weight)
