"""The training objective around a :class:`~medclipin.models.model.MedClipModel`: CLIP or SigLIP as the base,
the CLIPin non-contrastive plug-in and/or xCLIP's nCLIP on top.

Everything here exists only while training: the CLIPin non-contrastive projectors, the four predictors,
the loss weights λ and the EMA target; xCLIP's prototype heads. The model holds what inference needs
(towers, projections, logit scale), so an exported model folder holds no training state; a checkpoint
holds both (``model/`` plus ``objective.safetensors``).

:class:`TrainingObjective` is the module the trainer optimises and DistributedDataParallel wraps: its
parameters are the model's plus the objective's own.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medclipin.config import ClipinConfig, ModelConfig
from medclipin.losses import (
    LossWeights,
    build_nclip_loss,
    clipin_inter_loss,
    clipin_intra_loss,
    combine_clipin,
    contrastive_loss,
    embedding_std,
)
from medclipin.models.towers import ImageTower, TextTower
from medclipin.train.heads import ClipinPredictors, NonContrastiveProjector
from medclipin.models.model import MedClipModel

# Online modules mirrored by the EMA target (method.md: encoders, pre-projectors, non-contrastive
# projectors): (target name, owner, attribute) — the model owns the towers and pre-projectors.
TARGET_MODULES = (
    ("image_encoder", "model", "image_encoder"), ("image_pre", "model", "image_pre"), ("image_nc", "clipin", "image_nc"),
    ("text_encoder", "model", "text_encoder"), ("text_pre", "model", "text_pre"), ("text_nc", "clipin", "text_nc"),
)


@dataclass
class ObjectiveOutput:
    """What one training forward pass returns.

    Attributes:
        loss: the scalar to back-propagate.
        terms: detached loss terms and weights (``clip``/``siglip``, ``loss_inter``, ``loss_intra``,
            ``lambda_*``, ``nclip``, ``logit_scale``...).
        stats: detached monitors, e.g. ``std_image`` (per-dimension std of normalised embeddings; → 0
            means collapse).
        parts: undetached loss terms by name (for the gradient monitor; not logged).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


class ClipinPathway(nn.Module):
    """CLIPin's non-contrastive pathway (Yang et al. 2025; method.md): projectors, predictors, λ, EMA target.

    The non-contrastive projectors branch off the model's shared pre-projector. With both
    non-contrastive terms switched off (``use_inter`` and ``use_intra`` false: the reference code's
    ``ONLYCLIP`` baseline) only λ_clip exists: no heads, no target, nothing computed for them.
    """

    def __init__(self, model: MedClipModel, cfg: ClipinConfig):
        super().__init__()
        if not model.spec.pre_dim:
            raise ValueError("CLIPin needs the model's shared pre-projector (model.clipin.pre_dim > 0)")
        self.cfg = cfg
        self.loss_weights = LossWeights(lambda_intra=cfg.lambda_intra, lambda_clip=cfg.lambda_clip,
                                        learnable=cfg.learnable_lambda, lambda_max=cfg.lambda_max)
        self.active = cfg.use_inter or cfg.use_intra
        if self.active:
            self.image_nc = NonContrastiveProjector(cfg.pre_dim, cfg.nc_dim)
            self.text_nc = NonContrastiveProjector(cfg.pre_dim, cfg.nc_dim)
            self.predictors = ClipinPredictors(cfg.nc_dim, cfg.predictor_hidden)
            self.target = nn.ModuleDict()

    def online(self, model: MedClipModel, name: str) -> nn.Module:
        for target_name, owner, attribute in TARGET_MODULES:
            if target_name == name:
                return getattr(model if owner == "model" else self, attribute)
        raise KeyError(name)

    def reset_target(self, model: MedClipModel) -> None:
        """Make the target an exact copy of the online modules (after pretrained weights are loaded)."""
        if not self.active:
            return
        for name, _, _ in TARGET_MODULES:
            module = copy.deepcopy(self.online(model, name))
            for parameter in module.parameters():
                parameter.requires_grad_(False)
            _disable_grad_checkpointing(module)  # the target runs under no_grad: nothing to recompute
            self.target[name] = module

    def momentum(self, step: int, total_steps: int) -> float:
        """m for this step: fixed (reference code, 0.95) or a cosine schedule from m to 1."""
        base, schedule = self.cfg.momentum, self.cfg.momentum_schedule
        if schedule == "fixed" or total_steps <= 0:
            return base
        if schedule != "cosine":
            raise ValueError(f"model.clipin.momentum_schedule must be 'fixed' or 'cosine', got {schedule!r}")
        return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1.0) / 2.0

    def frozen_target_parameters(self, model: MedClipModel) -> dict[str, nn.Parameter]:
        """Target parameters whose online twin is frozen (``freeze``/``freeze_layers``), by their name in
        ``target``, mapped to that online parameter.

        An EMA of a constant is that constant: ξ starts as a copy of θ and lerp(θ, θ) = θ exactly, so these
        target tensors always equal the online ones. They are neither updated nor written to checkpoints
        (half of BioClinicalBERT with ``freeze_layers: 6``); loading fills them from the model.
        """
        if not self.active:
            return {}
        return {f"{name}.{pname}": parameter for name, _, _ in TARGET_MODULES
                for pname, parameter in self.online(model, name).named_parameters() if not parameter.requires_grad}

    @torch.no_grad()
    def update_target(self, model: MedClipModel, momentum: float) -> None:
        """ξ ← m·ξ + (1 − m)·θ for parameters; BatchNorm running statistics are copied (they are not weights).
        Frozen online parameters are skipped: their target copies already equal them."""
        if not self.active:
            return
        online_params, target_params = [], []
        for name, _, _ in TARGET_MODULES:
            online, target = self.online(model, name), self.target[name]
            for (_, p_online), (_, p_target) in zip(online.named_parameters(), target.named_parameters()):
                if p_online.requires_grad:
                    online_params.append(p_online)
                    target_params.append(p_target)
            for b_online, b_target in zip(online.buffers(), target.buffers()):
                b_target.copy_(b_online)
        # one fused multi-tensor op instead of a Python loop over hundreds of tensors
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)

    def forward(self, batch: dict[str, torch.Tensor], p_img: torch.Tensor, p_txt: torch.Tensor,
                base: torch.Tensor, stats: dict, text_trunk: torch.Tensor | None = None) -> tuple[torch.Tensor, dict, dict]:
        cfg = self.cfg
        if not self.active:
            total, terms = combine_clipin(None, None, base, self.loss_weights, use_inter=False, use_intra=False,
                                          use_contrastive=cfg.use_contrastive)
            return total, terms, {}
        if cfg.detach_pre:  # diagnostic: the non-contrastive terms train their heads, not the shared trunk
            p_img, p_txt = p_img.detach(), p_txt.detach()
        z_img, z_txt = self.image_nc(p_img), self.text_nc(p_txt)
        image_2 = batch.get("image_2", batch["image"])
        ids_2 = batch.get("input_ids_2", batch["input_ids"])
        mask_2 = batch.get("attention_mask_2", batch["attention_mask"])
        with torch.no_grad():
            t = self.target
            zbar_img = F.normalize(t["image_nc"](t["image_pre"](t["image_encoder"](image_2))), dim=-1)
            if text_trunk is not None and "input_ids_2" not in batch:
                # t2 = t1 and the lower text layers are frozen: the target's frozen layers equal the online
                # ones (an EMA of constants), so their output is reused and only the top layers run again
                h_txt_2 = t["text_encoder"].top(text_trunk, mask_2)
            else:
                h_txt_2 = t["text_encoder"](ids_2, mask_2)
            zbar_txt = F.normalize(t["text_nc"](t["text_pre"](h_txt_2)), dim=-1)
        pred = self.predictors
        l_inter = (clipin_inter_loss(pred.image_inter(z_img), pred.text_inter(z_txt), zbar_img, zbar_txt)
                   if cfg.use_inter else None)
        l_intra = (clipin_intra_loss(pred.image_intra(z_img), pred.text_intra(z_txt), zbar_img, zbar_txt)
                   if cfg.use_intra else None)
        stats["std_nc_image"] = embedding_std(F.normalize(z_img.detach(), dim=-1))
        stats["std_nc_text"] = embedding_std(F.normalize(z_txt.detach(), dim=-1))
        total, terms = combine_clipin(l_inter, l_intra, base, self.loss_weights, use_inter=cfg.use_inter,
                                      use_intra=cfg.use_intra, use_contrastive=cfg.use_contrastive)
        parts = {k: v for k, v in (("inter", l_inter), ("intra", l_intra)) if v is not None}
        return total, terms, parts


class TrainingObjective(nn.Module):
    """The objective a model is trained with; configuration alone chooses it.

    Args:
        model: the inference model (owns towers, projections, logit scale / bias).
        cfg: ``model`` section (``contrastive.kind``, ``clipin``, ``xclip``).

    Example:
        >>> objective = TrainingObjective(model, cfg.model)
        >>> out = objective(batch); out.loss.backward(); optimizer.step(); objective.after_optimizer_step(1, 100)
    """

    def __init__(self, model: MedClipModel, cfg: ModelConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.base = contrastive_loss(model.kind)
        self.clipin = ClipinPathway(model, cfg.clipin) if cfg.clipin.enabled else None
        self.nclip = (build_nclip_loss(cfg.xclip, model.image_encoder.out_dim, model.text_encoder.out_dim)
                      if cfg.xclip.enabled else None)
        self.reset_target()

    # ------------------------------------------------------------------ structure
    @property
    def needs_two_views(self) -> bool:
        """CLIPin's target branch sees second image and text views."""
        return self.clipin is not None and self.clipin.active

    @property
    def has_unused_parameters(self) -> bool:
        """Some parameters get no gradient in a step (DDP must be told): a CLIPin term switched off."""
        c = self.cfg.clipin
        return self.clipin is not None and self.clipin.active and not (c.use_inter and c.use_intra and c.use_contrastive)

    def frozen_target_parameters(self) -> dict[str, nn.Parameter]:
        """EMA-target parameters that always equal a frozen online parameter, by state-dict name
        (see :meth:`ClipinPathway.frozen_target_parameters`): not part of :meth:`training_state_dict`."""
        if self.clipin is None:
            return {}
        return {f"clipin.target.{k}": v for k, v in self.clipin.frozen_target_parameters(self.model).items()}

    def training_state_dict(self) -> dict[str, torch.Tensor]:
        """The objective's own tensors (everything but the model's, and but the EMA target's copies of frozen
        layers, which equal the model's): what a checkpoint adds to ``model/``."""
        frozen = self.frozen_target_parameters()
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.") and k not in frozen}

    def load_training_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`training_state_dict` returned (after the model's weights). The target's copies of
        frozen layers come from the model; a checkpoint that still holds them (written before they were left
        out) loads too."""
        expected, frozen = self.training_state_dict(), self.frozen_target_parameters()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected) - set(frozen))
        if missing or unexpected:
            raise ValueError(f"checkpoint objective does not match this config (missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}): resume with the run's own config.yaml")
        frozen_copies = {k: v.detach() for k, v in frozen.items()}
        self.load_state_dict({**{f"model.{k}": v for k, v in self.model.state_dict().items()},
                              **frozen_copies, **state}, strict=True)

    def reset_target(self) -> None:
        """Copy the online modules into the EMA target (call after loading pretrained weights)."""
        if self.clipin is not None:
            self.clipin.reset_target(self.model)
            self.train(self.training)

    def convert_sync_batchnorm(self, device: torch.device) -> None:
        """SyncBatchNorm in the CLIPin heads (non-contrastive projectors, predictors, and their EMA copies).

        With it the heads' BatchNorms normalise over the global batch, as one process would; without it
        each rank uses its own batch statistics (the usual DDP behaviour). torch's SyncBatchNorm is GPU-only.
        """
        if not self.needs_two_views:
            return
        if device.type != "cuda":
            raise ValueError("model.clipin.sync_batchnorm needs CUDA devices (torch's SyncBatchNorm is GPU-only); "
                             "set it to false for CPU runs")
        convert = torch.nn.SyncBatchNorm.convert_sync_batchnorm
        for name in ("image_nc", "text_nc", "predictors"):
            setattr(self.clipin, name, convert(getattr(self.clipin, name)))
        for name in ("image_nc", "text_nc"):
            self.clipin.target[name] = convert(self.clipin.target[name])

    def train(self, mode: bool = True) -> "TrainingObjective":
        """``nn.Module.train``, except that with ``model.clipin.target_dropout: false`` the target's encoders
        draw no dropout or drop-path masks (batch-norm layers, as in BYOL, still use batch statistics)."""
        super().train(mode)
        if mode and self.needs_two_views and not self.cfg.clipin.target_dropout:
            for name in ("image_encoder", "text_encoder"):
                _switch_off_dropout(self.clipin.target[name])
        return self

    @torch.no_grad()
    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Per-step bookkeeping: clamp the temperature and λ, update the EMA target."""
        self.model.clamp_logit_scale_()
        if self.clipin is not None:
            self.clipin.loss_weights.clamp_()
            self.clipin.update_target(self.model, self.clipin.momentum(step, total_steps))

    # ------------------------------------------------------------------ forward
    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        model = self.model
        h_img, p_img = model.image_features(batch["image"])
        reuse = self.needs_two_views and "input_ids_2" not in batch
        h_txt, p_txt, trunk = model.text_features(batch["input_ids"], batch["attention_mask"], return_trunk=True) \
            if reuse else (*model.text_features(batch["input_ids"], batch["attention_mask"]), None)
        c_img, c_txt = model.project_image(p_img), model.project_text(p_txt)
        if model.kind == "siglip":
            base = self.base(c_img, c_txt, model.logit_scale, model.logit_bias)
        else:
            base = self.base(c_img, c_txt, model.logit_scale)
        terms: dict[str, torch.Tensor] = {model.kind: base.detach(), "logit_scale": model.logit_scale.detach()}
        stats = {"std_image": embedding_std(c_img.detach()), "std_text": embedding_std(c_txt.detach())}
        parts = {model.kind: base}
        if self.clipin is not None:
            loss, clipin_terms, clipin_parts = self.clipin(batch, p_img, p_txt, base, stats, text_trunk=trunk)
            terms.update(clipin_terms)
            parts.update(clipin_parts)
        else:
            loss = base
        if self.nclip is not None:
            nclip, nclip_terms = self.nclip(h_img, h_txt)
            terms.update(nclip_terms)
            terms["nclip"] = nclip.detach()
            parts["nclip"] = nclip
            loss = loss + self.cfg.xclip.nclip_weight * nclip
        return ObjectiveOutput(loss=loss, terms=terms, stats=stats, parts=parts)


_BATCH_NORM = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def _switch_off_dropout(encoder: nn.Module) -> None:
    """Eval mode for a target encoder without batch norm (a ViT or BERT: its only train-mode behaviour is
    dropout, including the attention dropout HF passes to SDPA when the attention module is training);
    with batch norm (a CNN), eval mode for its dropout and drop-path modules only."""
    if not any(isinstance(m, _BATCH_NORM) for m in encoder.modules()):
        encoder.eval()
        return
    for module in encoder.modules():
        if isinstance(module, nn.Dropout) or type(module).__name__ == "DropPath":
            module.eval()


def _disable_grad_checkpointing(module: nn.Module) -> None:
    if isinstance(module, (ImageTower, TextTower)):
        module.set_grad_checkpointing(False)
