"""``MedClipModel``: image and text towers, projection heads, the training objective and the EMA target.

The objective is part of the model because it owns parameters (temperature, SigLIP bias, CLIPin λ,
xCLIP prototypes) that must be saved, loaded and optimised with the towers. Configuration alone
chooses the objective: CLIP or SigLIP as the base, CLIPin and/or xCLIP on top.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medclipin.atomic import replace_directory
from medclipin.config import ImageConfig, ModelConfig, TextConfig, config_to_dict, _build
from medclipin.losses import (
    LossWeights,
    NclipLoss,
    build_contrastive_loss,
    clipin_inter_loss,
    clipin_intra_loss,
    combine_clipin,
    embedding_std,
)
from medclipin.models.encoders import ImageEncoder, TextEncoder
from medclipin.models.heads import ClipinPredictors, NonContrastiveProjector

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Online modules mirrored by the EMA target (method.md: encoders, pre-projectors, non-contrastive projectors).
TARGET_MODULES = ("image_encoder", "image_pre", "image_nc", "text_encoder", "text_pre", "text_nc")


@dataclass
class ModelOutput:
    """What one training forward pass returns.

    Attributes:
        loss: the scalar to back-propagate.
        terms: detached loss terms and weights (``clip``/``siglip``, ``inter``, ``intra``, ``lambda_*``, ``nclip``...).
        stats: detached monitors, e.g. ``std_image`` (per-dimension std of normalised embeddings; → 0 means collapse).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


class MedClipModel(nn.Module):
    """A CLIP-style medical image–text model with optional CLIPin and xCLIP objectives.

    Args:
        cfg: model configuration (towers, base objective, CLIPin, xCLIP).
        image_cfg: input geometry (size, channels) the image tower is built for.
        text_cfg: tokenisation settings stored with the model for inference.
        vocab_size: tokenizer size, needed when the text tower is built from config.
        text_hf_config: exact HF config of a saved text tower (used by :meth:`from_pretrained`).

    Example:
        >>> model = MedClipModel(cfg.model, cfg.data.image, cfg.data.text, vocab_size=len(tokenizer))
        >>> out = model(batch); out.loss.backward(); optimizer.step(); model.after_optimizer_step(step, total)
    """

    def __init__(
        self,
        cfg: ModelConfig,
        image_cfg: ImageConfig,
        text_cfg: TextConfig,
        vocab_size: int | None = None,
        text_hf_config: dict | None = None,
    ):
        super().__init__()
        self.cfg, self.image_cfg, self.text_cfg = cfg, image_cfg, text_cfg
        self.image_encoder = ImageEncoder(cfg.image_encoder, in_chans=image_cfg.channels, image_size=image_cfg.size)
        self.text_encoder = TextEncoder(cfg.text_encoder, vocab_size=vocab_size, hf_config=text_hf_config)
        d_img, d_txt = self.image_encoder.out_dim, self.text_encoder.out_dim
        clipin, embed_dim = cfg.clipin, cfg.contrastive.embed_dim
        if clipin.enabled:
            self.image_pre: nn.Module = nn.Linear(d_img, clipin.pre_dim)
            self.text_pre: nn.Module = nn.Linear(d_txt, clipin.pre_dim)
            d_img = d_txt = clipin.pre_dim
        else:
            self.image_pre = nn.Identity()
            self.text_pre = nn.Identity()
        self.image_proj = nn.Linear(d_img, embed_dim)
        self.text_proj = nn.Linear(d_txt, embed_dim)
        self.contrastive = build_contrastive_loss(cfg.contrastive)
        if clipin.enabled:
            self.image_nc = NonContrastiveProjector(clipin.pre_dim, clipin.nc_dim)
            self.text_nc = NonContrastiveProjector(clipin.pre_dim, clipin.nc_dim)
            self.predictors = ClipinPredictors(clipin.nc_dim, clipin.predictor_hidden)
            self.loss_weights = LossWeights(
                lambda_intra=clipin.lambda_intra, lambda_clip=clipin.lambda_clip,
                learnable=clipin.learnable_lambda, lambda_max=clipin.lambda_max,
            )
            self.target = nn.ModuleDict()
            self.reset_target()
        if cfg.xclip.enabled:
            x = cfg.xclip
            self.nclip = NclipLoss(
                self.image_encoder.out_dim, self.text_encoder.out_dim, x.head_hidden, x.head_dim, x.num_prototypes,
                student_temperature=x.student_temperature, teacher_temperature=x.teacher_temperature,
                entropy_weight=x.entropy_weight,
            )

    # ------------------------------------------------------------------ properties
    @property
    def uses_clipin(self) -> bool:
        return self.cfg.clipin.enabled

    @property
    def needs_two_views(self) -> bool:
        """CLIPin's target branch sees second image and text views."""
        return self.cfg.clipin.enabled

    # ------------------------------------------------------------------ EMA target
    def reset_target(self) -> None:
        """Make the target an exact copy of the online modules (call after loading pretrained weights)."""
        if not self.uses_clipin:
            return
        for name in TARGET_MODULES:
            module = copy.deepcopy(getattr(self, name))
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            _disable_grad_checkpointing(module)  # the target runs under no_grad: nothing to recompute
            self.target[name] = module
        self.train(self.training)  # the target's modes follow the model's (and clipin.target_dropout)

    def target_momentum(self, step: int, total_steps: int) -> float:
        """m for this step: fixed (reference code, 0.95) or a cosine schedule from m to 1."""
        base = self.cfg.clipin.momentum
        if self.cfg.clipin.momentum_schedule == "fixed" or total_steps <= 0:
            return base
        if self.cfg.clipin.momentum_schedule != "cosine":
            raise ValueError(f"model.clipin.momentum_schedule must be 'fixed' or 'cosine', got {self.cfg.clipin.momentum_schedule!r}")
        return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1.0) / 2.0

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """ξ ← m·ξ + (1 − m)·θ for parameters; BatchNorm running statistics are copied (they are not weights)."""
        online_params, target_params = [], []
        for name in TARGET_MODULES:
            online, target = getattr(self, name), self.target[name]
            online_params.extend(online.parameters())
            target_params.extend(target.parameters())
            for b_online, b_target in zip(online.buffers(), target.buffers()):
                b_target.copy_(b_online)
        # one fused multi-tensor op instead of a Python loop over hundreds of tensors
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)

    def train(self, mode: bool = True) -> "MedClipModel":
        """``nn.Module.train``, except that with ``model.clipin.target_dropout: false`` the target's encoders
        draw no dropout or drop-path masks (batch-norm layers, as in BYOL, still use batch statistics)."""
        super().train(mode)
        if mode and self.uses_clipin and not self.cfg.clipin.target_dropout:
            for name in ("image_encoder", "text_encoder"):
                _switch_off_dropout(self.target[name])
        return self

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Per-step bookkeeping: clamp temperatures and λ, update the EMA target."""
        self.contrastive.clamp_()
        if self.uses_clipin:
            self.loss_weights.clamp_()
            self.update_target(self.target_momentum(step, total_steps))

    # ------------------------------------------------------------------ encoding
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive image embeddings (B, embed_dim)."""
        return F.normalize(self.image_proj(self.image_pre(self.image_encoder(image))), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """L2-normalised contrastive text embeddings (B, embed_dim)."""
        return F.normalize(self.text_proj(self.text_pre(self.text_encoder(input_ids, attention_mask))), dim=-1)

    def similarity(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of paired images and texts (B,): the score Grad-CAM explains."""
        return (self.encode_image(image) * self.encode_text(input_ids, attention_mask)).sum(-1)

    # ------------------------------------------------------------------ training forward
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        h_img = self.image_encoder(batch["image"])
        h_txt = self.text_encoder(batch["input_ids"], batch["attention_mask"])
        p_img, p_txt = self.image_pre(h_img), self.text_pre(h_txt)
        c_img = F.normalize(self.image_proj(p_img), dim=-1)
        c_txt = F.normalize(self.text_proj(p_txt), dim=-1)
        base = self.contrastive(c_img, c_txt)
        base_name = self.cfg.contrastive.kind
        terms: dict[str, torch.Tensor] = {base_name: base.detach(), "logit_scale": self.contrastive.logit_scale.detach()}
        stats = {"std_image": embedding_std(c_img.detach()), "std_text": embedding_std(c_txt.detach())}

        if self.uses_clipin:
            loss, clipin_terms = self._clipin_loss(batch, p_img, p_txt, base, stats)
            terms.update(clipin_terms)
        else:
            loss = base
        if self.cfg.xclip.enabled:
            nclip, nclip_terms = self.nclip(h_img, h_txt)
            terms.update(nclip_terms)
            terms["nclip"] = nclip.detach()
            loss = loss + self.cfg.xclip.nclip_weight * nclip
        return ModelOutput(loss=loss, terms=terms, stats=stats)

    def _clipin_loss(self, batch, p_img, p_txt, base, stats):
        z_img, z_txt = self.image_nc(p_img), self.text_nc(p_txt)
        image_2 = batch.get("image_2", batch["image"])
        ids_2 = batch.get("input_ids_2", batch["input_ids"])
        mask_2 = batch.get("attention_mask_2", batch["attention_mask"])
        with torch.no_grad():
            t = self.target
            zbar_img = F.normalize(t["image_nc"](t["image_pre"](t["image_encoder"](image_2))), dim=-1)
            zbar_txt = F.normalize(t["text_nc"](t["text_pre"](t["text_encoder"](ids_2, mask_2))), dim=-1)
        pred = self.predictors
        cfg = self.cfg.clipin
        zero = base.new_zeros(())
        l_inter = (
            clipin_inter_loss(pred.image_inter(z_img), pred.text_inter(z_txt), zbar_img, zbar_txt)
            if cfg.use_inter else zero
        )
        l_intra = (
            clipin_intra_loss(pred.image_intra(z_img), pred.text_intra(z_txt), zbar_img, zbar_txt)
            if cfg.use_intra else zero
        )
        stats["std_nc_image"] = embedding_std(F.normalize(z_img.detach(), dim=-1))
        stats["std_nc_text"] = embedding_std(F.normalize(z_txt.detach(), dim=-1))
        return combine_clipin(
            l_inter, l_intra, base, self.loss_weights,
            use_inter=cfg.use_inter, use_intra=cfg.use_intra, use_contrastive=cfg.use_contrastive,
        )

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": config_to_dict(self.cfg),
            "image": config_to_dict(self.image_cfg),
            "text": config_to_dict(self.text_cfg),
            "text_hf_config": self.text_encoder.hf_config(),
        }

    def save_pretrained(self, directory: str | os.PathLike, tokenizer=None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ the tokenizer) into ``directory``, atomically.

        The folder is assembled next to its destination and renamed into place, so an interrupted save
        never leaves a half-written model where a complete one was.
        """
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp"))
        try:
            save_model(self, str(staging / WEIGHTS_NAME))
            (staging / CONFIG_NAME).write_text(json.dumps(self.config_dict(), indent=2))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            replace_directory(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "MedClipModel":
        """Rebuild a saved model from its folder without any download (weights via safetensors only)."""
        from safetensors.torch import load_model

        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory}: not a medclipin model folder (no {CONFIG_NAME})")
        saved = json.loads(config_path.read_text())
        model_cfg = _build(ModelConfig, saved["model"], "model.")
        # the saved text tower is rebuilt from its exact HF config, never re-downloaded
        model_cfg.text_encoder.pretrained = ""
        model_cfg.image_encoder.pretrained = ""
        model = cls(
            model_cfg, _build(ImageConfig, saved["image"], "image."), _build(TextConfig, saved["text"], "text."),
            text_hf_config=saved["text_hf_config"],
        )
        load_model(model, str(directory / WEIGHTS_NAME), device=map_location)
        return model


_BATCH_NORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def _switch_off_dropout(encoder: nn.Module) -> None:
    """Eval mode for a target encoder without batch norm (a ViT or BERT: its only train-mode behaviour is
    dropout, including the attention dropout HF passes to SDPA when the attention module is training);
    with batch norm (a ResNet), eval mode for its dropout and drop-path modules only."""
    if not any(isinstance(m, _BATCH_NORM) for m in encoder.modules()):
        encoder.eval()
        return
    for module in encoder.modules():
        if isinstance(module, nn.Dropout) or type(module).__name__ == "DropPath":
            module.eval()


def _disable_grad_checkpointing(module: nn.Module) -> None:
    if isinstance(module, ImageEncoder) and hasattr(module.model, "set_grad_checkpointing"):
        module.model.set_grad_checkpointing(False)
    elif isinstance(module, TextEncoder) and any(getattr(m, "gradient_checkpointing", False) is True
                                                 for m in module.model.modules()):
        disable = getattr(module.model, "activation_checkpointing_disable", None) or module.model.gradient_checkpointing_disable
        disable()
