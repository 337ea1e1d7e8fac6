"""The ``open_clip`` tower family: the image and text halves of an open_clip model (OpenAI CLIP, CheXzero,
BiomedCLIP, any ``open_clip_config.json``), run by open_clip's own modules.

Each tower is built from the open_clip ``model_cfg`` stored in its config section (``kwargs["model_cfg"]``
for the image tower, ``config["model_cfg"]`` for the text tower), so a saved model rebuilds offline.
A projection that is one linear map (a ViT's ``proj``, a timm trunk's ``head.proj``, the text tower's
``text_projection`` or an HF tower's linear ``proj``) is taken out of the tower and becomes the model's
``image_proj`` / ``text_proj``, where CLIPin's shared pre-projector can sit in front of it, as the reference
code does. Other heads (ModifiedResNet's attention pool, an MLP projection) stay inside; the model's
projection then starts as the identity.

:func:`take_projection` reads the removed projection off a loaded open_clip model; :mod:`medclipin.models.bases`
uses it to fill the model's projections.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from medclipin.models.towers import (ImageTower, TextTower, TowerError, depthwise_convs_in_fp32, freeze,
                                     register_image_tower, register_text_tower)


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise TowerError("open_clip towers need open_clip: pip install 'medclipin[open_clip]'") from None
    return open_clip


def model_cfg_of(values: dict, section: str) -> dict:
    model_cfg = (values or {}).get("model_cfg")
    if not isinstance(model_cfg, dict) or "vision_cfg" not in model_cfg or "text_cfg" not in model_cfg:
        raise TowerError(f"model.{section}: an open_clip tower needs the open_clip model_cfg "
                         "(embed_dim, vision_cfg, text_cfg) in its config; set model.base instead")
    return model_cfg


@contextlib.contextmanager
def hf_config_folder(text_cfg: dict, hf_config: dict | None):
    """open_clip's HF text tower reads its architecture with ``AutoConfig.from_pretrained(name)``: a saved
    model gives it a temporary folder holding the exact config instead of a hub name."""
    if hf_config is None:
        yield text_cfg
        return
    with tempfile.TemporaryDirectory(prefix="medclipin-hf-text-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(hf_config))
        yield {**text_cfg, "hf_model_name": folder, "hf_model_pretrained": False}


# ----------------------------------------------------------------------------------------- image
def _split_visual(visual: nn.Module) -> tuple[nn.Module, int, bool]:
    """Remove a purely linear projection from an open_clip visual tower, in place.

    Returns ``(visual, feature width, projection taken)``."""
    open_clip = _open_clip()
    if isinstance(visual, open_clip.transformer.VisionTransformer) and isinstance(visual.proj, nn.Parameter):
        width = int(visual.proj.shape[0])
        visual.proj = None
        return visual, width, True
    if isinstance(visual, open_clip.timm_model.TimmModel) and [name for name, _ in visual.head.named_children()] in (["drop", "proj"], ["proj"]):
        width = int(visual.head.proj.in_features)
        visual.head.proj = nn.Identity()
        return visual, width, True
    return visual, int(getattr(visual, "output_dim", 0) or 0), False


def take_projection(module_owner: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``(weight (out, in), bias or None)`` of the linear projection :func:`_split_visual` / the text tower
    removes, read from a loaded open_clip model *before* it is split; None where the head stays inside."""
    open_clip = _open_clip()
    if kind == "image":
        visual = module_owner.visual
        if isinstance(visual, open_clip.transformer.VisionTransformer) and isinstance(visual.proj, nn.Parameter):
            return visual.proj.detach().T.clone(), None
        if isinstance(visual, open_clip.timm_model.TimmModel) and [name for name, _ in visual.head.named_children()] in (["drop", "proj"], ["proj"]):
            proj = visual.head.proj
            return proj.weight.detach().clone(), None if proj.bias is None else proj.bias.detach().clone()
        return None
    text = getattr(module_owner, "text", None)
    if text is None:  # open_clip.CLIP keeps the text tower's parts on the model itself
        projection = module_owner.text_projection
    elif isinstance(text, open_clip.hf_model.HFTextEncoder):
        projection = text.proj if isinstance(text.proj, nn.Linear) else None
    else:
        projection = text.text_projection
    if isinstance(projection, nn.Parameter):
        return projection.detach().T.clone(), None
    if isinstance(projection, nn.Linear):
        return projection.weight.detach().clone(), None if projection.bias is None else projection.bias.detach().clone()
    return None


@register_image_tower("open_clip")
class OpenClipImageTower(ImageTower):
    """open_clip's visual tower (``VisionTransformer``, ``TimmModel`` or ``ModifiedResNet``) without its
    linear projection; ``forward`` returns the pooled feature (ViT: ``ln_post`` of the class token)."""

    def __init__(self, cfg, in_chans: int = 3, image_size: int = 224, visual: nn.Module | None = None):
        super().__init__()
        if in_chans != 3:
            raise TowerError("model.image_encoder: open_clip image towers take 3-channel input (data.image.channels: 3)")
        if visual is None:
            open_clip = _open_clip()
            model_cfg = model_cfg_of(cfg.kwargs, "image_encoder.kwargs")
            visual = open_clip.model._build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"],
                                                         quick_gelu=bool(model_cfg.get("quick_gelu", False)))
        self.visual, width, self.projection_taken = _split_visual(visual)
        self.out_dim = width
        self.in_chans = 3
        self.image_size = int(image_size)
        # convolutional towers run channels-last and may train in fp32, as the timm family's do (encoders.py)
        self.channels_last = self._vit() is None
        if self.channels_last:
            self.visual.to(memory_format=torch.channels_last)
            depthwise_convs_in_fp32(self.visual)
        self.train_fp32 = cfg.train_fp32
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)
        self._apply_freezing(cfg)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        if self.train_fp32 and torch.is_grad_enabled() and torch.is_autocast_enabled(image.device.type):
            with torch.autocast(image.device.type, enabled=False):
                return self.visual(image.float())
        return self.visual(image)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    def _vit(self):
        open_clip = _open_clip()
        return self.visual if isinstance(self.visual, open_clip.transformer.VisionTransformer) else None

    def gradcam_layer(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
        """ViT: the tokens entering the last block (its ``ln_1``), class token dropped, on the patch grid
        (14 x 14 for ViT-B/16 at 224 px); timm trunk: as the timm family; ResNet: ``layer4``."""
        from medclipin.models.encoders import patch_tokens_to_grid, timm_gradcam_layer

        vit = self._vit()
        if vit is not None:
            return vit.transformer.resblocks[-1].ln_1, patch_tokens_to_grid(1, tuple(vit.grid_size))
        trunk = getattr(self.visual, "trunk", None)
        if trunk is not None:
            return timm_gradcam_layer(trunk, self.image_size)
        if hasattr(self.visual, "layer4"):
            return self.visual.layer4, None
        raise TowerError(f"no Grad-CAM layer known for open_clip {type(self.visual).__name__}")

    def _freeze_lower(self, n_layers: int) -> None:
        """The patch embedding and the first ``n_layers`` blocks (ViT; timm trunks in timm's grouping)."""
        vit = self._vit()
        trunk = getattr(self.visual, "trunk", None)
        if vit is None and trunk is not None:  # a timm trunk (TimmModel): timm's own grouping
            from medclipin.models.encoders import freeze_timm_lower

            freeze_timm_lower(trunk, n_layers)
            return
        if vit is None:
            raise TowerError("model.image_encoder.freeze_layers: open_clip image towers support it for ViTs and "
                             "timm trunks only")
        blocks = vit.transformer.resblocks
        if not 0 <= n_layers < len(blocks):
            raise TowerError(f"model.image_encoder.freeze_layers={n_layers}: the tower has {len(blocks)} blocks "
                             "(the last one always trains)")
        for module in (vit.conv1, vit.ln_pre, *list(blocks)[:n_layers]):
            freeze(module)
        for parameter in (vit.class_embedding, vit.positional_embedding):
            parameter.requires_grad_(False)


# ------------------------------------------------------------------------------------------ text
@register_text_tower("open_clip")
class OpenClipTextTower(TextTower):
    """open_clip's text tower without its linear projection: a causal ``TextTransformer`` pooled where it
    was trained to be (``argmax``: the end-of-text token, the highest id), or an ``HFTextEncoder`` with its
    own pooler (BiomedCLIP's PubMedBERT: the [CLS] hidden state).

    The causal mask is cut to the batch's length: padding after the end-of-text token never reaches it,
    so short batches embed exactly as open_clip's fixed 77-token ones, at a fraction of the cost.
    """

    def __init__(self, cfg, vocab_size: int | None = None, hf_config: dict | None = None, text: nn.Module | None = None):
        super().__init__()
        open_clip = _open_clip()
        if text is None:
            model_cfg = model_cfg_of(cfg.config, "text_encoder.config")
            with hf_config_folder(model_cfg["text_cfg"], hf_config) as text_cfg:
                text = open_clip.model._build_text_tower(model_cfg["embed_dim"], text_cfg,
                                                         quick_gelu=bool(model_cfg.get("quick_gelu", False)))
        self.is_hf = isinstance(text, open_clip.hf_model.HFTextEncoder)
        # how open_clip held the projection taken out (export puts it back the same way): "linear" (an
        # nn.Linear), "parameter" (a matrix applied as x @ P), or None (none was taken: the head stays inside)
        self.projection_form = None
        if self.is_hf:
            if isinstance(text.proj, nn.Linear):
                width, text.proj, self.projection_form = text.proj.in_features, nn.Identity(), "linear"
            else:
                width = int(text.output_dim)
        else:
            if getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False):
                raise TowerError("model.text_encoder: open_clip text towers with a class token or a padding mask "
                                 "(CoCa-style) are not supported")
            projection = text.text_projection
            if projection is not None:
                self.projection_form = "linear" if isinstance(projection, nn.Linear) else "parameter"
            width = int(text.width)
            text.text_projection = None
        self.text = text
        self.out_dim = width
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)
        self._apply_freezing(cfg)

    def hf_config(self) -> dict | None:
        return self.text.config.to_dict() if self.is_hf else None

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if self.is_hf:
            if enable:
                self.text.transformer.gradient_checkpointing_enable()
            elif getattr(self.text.transformer, "is_gradient_checkpointing", False):
                self.text.transformer.gradient_checkpointing_disable()
        else:
            self.text.transformer.grad_checkpointing = enable

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_hidden: bool = False):
        if self.is_hf:
            return self._forward_hf(input_ids, attention_mask, return_hidden)
        from open_clip.transformer import text_global_pool

        text = self.text
        length = input_ids.shape[1]
        if length > text.num_pos:
            raise TowerError(f"text of {length} tokens is longer than the tower's context ({text.num_pos})")
        cast_dtype = text.transformer.get_cast_dtype()
        x = text.token_embedding(input_ids).to(cast_dtype) + text.positional_embedding[:length].to(cast_dtype)
        mask = text.attn_mask[:length, :length] if text.attn_mask is not None else None
        blocks = text.transformer.resblocks
        for block in list(blocks)[:-1]:
            x = block(x, attn_mask=mask)
        hidden = x
        x = text.ln_final(blocks[-1](x, attn_mask=mask))
        pooled = text_global_pool(x, input_ids, text.pool_type, eos_token_id=getattr(text, "eos_id", None))
        return (pooled, hidden) if return_hidden else pooled

    def _forward_hf(self, input_ids, attention_mask, return_hidden):
        out = self.text.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                    output_hidden_states=return_hidden)
        pooled = self.text.proj(self.text.pooler(out, attention_mask))
        return (pooled, out.hidden_states[-2]) if return_hidden else pooled

    def _freeze_lower(self, n_layers: int) -> None:
        """The token and position embeddings and the first ``n_layers`` blocks."""
        if self.is_hf:
            encoder = self.text.transformer
            layers = getattr(getattr(encoder, "encoder", None), "layer", None)
            embeddings = getattr(encoder, "embeddings", None)
        else:
            layers, embeddings = self.text.transformer.resblocks, self.text.token_embedding
        if layers is None or embeddings is None:
            raise TowerError("model.text_encoder.freeze_layers: this open_clip text tower has no layer list")
        if not 0 <= n_layers <= len(layers):
            raise TowerError(f"model.text_encoder.freeze_layers={n_layers}: the text tower has {len(layers)} layers")
        freeze(embeddings)
        if not self.is_hf:
            self.text.positional_embedding.requires_grad_(False)
        for layer in list(layers)[:n_layers]:
            freeze(layer)
