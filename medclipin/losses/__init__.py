"""Training objectives: CLIP InfoNCE, SigLIP, the CLIPin cosine terms, nCLIP/xCLIP; DDP feature gathering."""

from medclipin.losses.clipin import (
    LossWeights,
    clipin_inter_loss,
    clipin_intra_loss,
    combine_clipin,
    embedding_std,
    negative_cosine_pair,
)
from medclipin.losses.contrastive import ClipLoss, SigLipLoss, contrastive_loss
from medclipin.losses.distributed import all_reduce_mean, gather_features, world_info
from medclipin.losses.xclip import NclipLoss, PrototypeHead, build_nclip_loss

__all__ = [
    "ClipLoss",
    "LossWeights",
    "NclipLoss",
    "PrototypeHead",
    "SigLipLoss",
    "all_reduce_mean",
    "contrastive_loss",
    "build_nclip_loss",
    "clipin_inter_loss",
    "clipin_intra_loss",
    "combine_clipin",
    "embedding_std",
    "gather_features",
    "negative_cosine_pair",
    "world_info",
]
