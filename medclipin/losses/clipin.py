"""The CLIPin non-contrastive terms (Yang et al. 2025, arXiv 2508.06434; method.md "Losses").

BYOL-style (Grill et al. 2020) negative-cosine losses between online predictions and stop-gradient
EMA targets, inter-modal (image predicts text target and vice versa) and intra-modal (each modality
predicts its own second view), combined with the base objective:

    L = L_inter + λ_intra · L_intra + λ_clip · L_base

No negatives, centering or queue: predictor asymmetry, the EMA target and the stop-gradient prevent
collapse, which :func:`embedding_std` monitors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def negative_cosine_pair(pred_a: Tensor, target_b: Tensor, pred_b: Tensor, target_a: Tensor) -> Tensor:
    """``2 − mean_i[cos(pred_a_i, target_b_i) + cos(pred_b_i, target_a_i)]`` (method.md, L_inter / L_intra).

    The targets are detached here (stop-gradient), whatever the caller passes, so no gradient can
    reach the target branch. Inputs need not be normalised. Range ``[0, 4]``; 0 = perfect agreement.

    Args:
        pred_a, pred_b: online predictions ``(B, D)``.
        target_b, target_a: targets ``(B, D)`` that ``pred_a`` and ``pred_b`` must match, row by row.
    """
    for name, x in (("target_b", target_b), ("pred_b", pred_b), ("target_a", target_a)):
        if x.shape != pred_a.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(pred_a.shape)} like pred_a")
    cos_a = F.cosine_similarity(_at_least_float32(pred_a), _at_least_float32(target_b.detach()), dim=-1)
    cos_b = F.cosine_similarity(_at_least_float32(pred_b), _at_least_float32(target_a.detach()), dim=-1)
    return 2.0 - (cos_a + cos_b).mean()


def clipin_inter_loss(q_img_inter: Tensor, q_txt_inter: Tensor, target_img: Tensor, target_txt: Tensor) -> Tensor:
    """Inter-modal term: ``Q_I^inter(z_I)`` vs ``z̄_T`` and ``Q_T^inter(z_T)`` vs ``z̄_I`` (stop-gradient targets).

    Args:
        q_img_inter, q_txt_inter: online image / text inter-modal predictions ``(B, D_nc)``.
        target_img, target_txt: EMA targets ``z̄_I`` (from x2) and ``z̄_T`` (from t2).
    """
    return negative_cosine_pair(q_img_inter, target_txt, q_txt_inter, target_img)


def clipin_intra_loss(q_img_intra: Tensor, q_txt_intra: Tensor, target_img: Tensor, target_txt: Tensor) -> Tensor:
    """Intra-modal term: ``Q_I^intra(z_I)`` vs ``z̄_I(x2)`` and ``Q_T^intra(z_T)`` vs ``z̄_T(t2)`` (stop-gradient targets).

    Args:
        q_img_intra, q_txt_intra: online image / text intra-modal predictions ``(B, D_nc)`` (from x1, t1).
        target_img, target_txt: EMA targets ``z̄_I`` (from x2) and ``z̄_T`` (from t2).
    """
    return negative_cosine_pair(q_img_intra, target_img, q_txt_intra, target_txt)


class LossWeights(nn.Module):
    """``λ_intra`` and ``λ_clip`` of the CLIPin total loss.

    Learnable (the reference code: scalars initialised to 1, clamped to ``[0, 20]`` by :meth:`clamp_`)
    or fixed buffers. Since every term is ≥ 0, gradient descent can only shrink a learnable λ, which is
    why fixed weights are offered (method.md).
    """

    def __init__(self, lambda_intra: float = 1.0, lambda_clip: float = 1.0, learnable: bool = True,
                 lambda_max: float = 20.0) -> None:
        super().__init__()
        for name, value in (("lambda_intra", lambda_intra), ("lambda_clip", lambda_clip)):
            if not 0.0 <= value <= lambda_max:
                raise ValueError(f"{name}={value} is outside [0, lambda_max={lambda_max}]")
            tensor = torch.tensor(float(value), dtype=torch.float32)
            if learnable:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor)
        self.learnable = learnable
        self.lambda_max = float(lambda_max)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp both λ to ``[0, lambda_max]`` (call after every optimiser step)."""
        self.lambda_intra.clamp_(0.0, self.lambda_max)
        self.lambda_clip.clamp_(0.0, self.lambda_max)


def combine_clipin(l_inter: Tensor | None, l_intra: Tensor | None, l_clip: Tensor | None, weights: LossWeights,
                   use_inter: bool = True, use_intra: bool = True,
                   use_contrastive: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """``L = L_inter + λ_intra·L_intra + λ_clip·L_base`` with the paper's ablation switches.

    A switched-off term is left out of the total entirely (no gradient flows through it); it may be
    passed as ``None``. A switched-on term must be given.

    Returns:
        ``(total, terms)``; ``terms`` holds detached values: ``loss_inter``, ``loss_intra``,
        ``loss_contrastive`` for each term that was given (so a switched-off term can still be logged),
        and ``lambda_intra`` / ``lambda_clip`` for the switched-on weighted terms.
    """
    parts: list[Tensor] = []
    terms: dict[str, Tensor] = {}
    for name, value, used, weight in (
        ("loss_inter", l_inter, use_inter, None),
        ("loss_intra", l_intra, use_intra, "lambda_intra"),
        ("loss_contrastive", l_clip, use_contrastive, "lambda_clip"),
    ):
        if value is not None:
            terms[name] = value.detach()
        if not used:
            continue
        if value is None:
            raise ValueError(f"{name} is switched on but was not given")
        if weight is None:
            parts.append(value)
        else:
            lam = getattr(weights, weight)
            parts.append(lam * value)
            terms[weight] = lam.detach()
    if not parts:
        raise ValueError("all CLIPin loss terms are switched off (use_inter, use_intra, use_contrastive)")
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total, terms


@torch.no_grad()
def embedding_std(z: Tensor) -> Tensor:
    """Collapse monitor: mean over dimensions of the per-dimension std of the L2-normalised rows of ``z``.

    About ``1/sqrt(D)`` for healthy, spread-out embeddings; tends to 0 when they collapse to one point
    (as in SimSiam, Chen & He 2021, Fig. 2). Needs at least two rows.
    """
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"embedding_std needs a (B >= 2, D) tensor, got shape {tuple(z.shape)}")
    return F.normalize(_at_least_float32(z), dim=-1).std(dim=0).mean()
