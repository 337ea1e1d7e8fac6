"""Projection heads: the contrastive projectors and the CLIPin non-contrastive pathway (method.md).

Per modality CLIPin has one *shared pre-projector* (Linear d → pre_dim) from which both the
contrastive projector (Linear pre_dim → embed_dim) and the non-contrastive projector
(BatchNorm1d(affine=False) → GELU → Linear pre_dim → nc_dim) branch ("parameter compromise"), and
two predictors per modality (Linear → BatchNorm1d → ReLU → Linear, nc_dim → hidden → nc_dim).
"""

from __future__ import annotations

from torch import nn


class NonContrastiveProjector(nn.Sequential):
    """BatchNorm1d without affine → GELU → Linear(pre_dim → nc_dim)."""

    def __init__(self, pre_dim: int, nc_dim: int):
        super().__init__(nn.BatchNorm1d(pre_dim, affine=False), nn.GELU(), nn.Linear(pre_dim, nc_dim))


class Predictor(nn.Sequential):
    """Linear(nc_dim → hidden) → BatchNorm1d → ReLU → Linear(hidden → nc_dim); output normalised by the loss."""

    def __init__(self, nc_dim: int, hidden: int):
        super().__init__(nn.Linear(nc_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, nc_dim))


class ClipinPredictors(nn.Module):
    """The four CLIPin predictors: image/text × inter-modal/intra-modal."""

    def __init__(self, nc_dim: int, hidden: int):
        super().__init__()
        self.image_inter = Predictor(nc_dim, hidden)
        self.image_intra = Predictor(nc_dim, hidden)
        self.text_inter = Predictor(nc_dim, hidden)
        self.text_intra = Predictor(nc_dim, hidden)
