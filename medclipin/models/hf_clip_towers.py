"""The ``hf_clip`` tower family: the vision and text transformers of a Hugging Face ``CLIPModel``.

Built from the CLIP config stored in the tower's config section (``kwargs["vision_config"]`` /
``config["text_config"]``), so a saved model rebuilds offline. The towers return transformers' own pooled
outputs (vision: ``post_layernorm`` of the class token; text: the final-norm state at the end-of-text token,
as ``CLIPTextTransformer`` pools it); ``visual_projection`` / ``text_projection`` become the model's
bias-free projections (:mod:`medclipin.models.bases`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from medclipin.models.towers import ImageTower, TextTower, TowerError, freeze, register_image_tower, register_text_tower


def _config(values: dict, key: str, section: str) -> dict:
    config = (values or {}).get(key)
    if not isinstance(config, dict):
        raise TowerError(f"model.{section}: an hf_clip tower needs the CLIP {key} in its config; set model.base instead")
    return config


@register_image_tower("hf_clip")
class HFClipImageTower(ImageTower):
    """``CLIPVisionTransformer``; ``forward`` returns its ``pooler_output``."""

    def __init__(self, cfg, in_chans: int = 3, image_size: int = 224, vision_model: nn.Module | None = None):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModel

        if in_chans != 3:
            raise TowerError("model.image_encoder: hf_clip image towers take 3-channel input (data.image.channels: 3)")
        if vision_model is None:
            config = CLIPVisionConfig(**_config(cfg.kwargs, "vision_config", "image_encoder.kwargs"))
            config._attn_implementation = "sdpa"
            vision_model = CLIPVisionModel(config)
            vision_model = getattr(vision_model, "vision_model", vision_model)  # transformers 4 wraps it
        self.vision_model = vision_model
        config = vision_model.config
        self.out_dim = int(config.hidden_size)
        self.in_chans = 3
        self.image_size = int(config.image_size)
        self.grid = (self.image_size // int(config.patch_size),) * 2
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)
        self._apply_freezing(cfg)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values=image).pooler_output

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise TowerError("grad_checkpointing: not supported by hf_clip towers; use the open_clip family")

    def gradcam_layer(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
        """The tokens entering the last encoder layer (its ``layer_norm1``), class token dropped."""
        from medclipin.models.encoders import patch_tokens_to_grid

        return self.vision_model.encoder.layers[-1].layer_norm1, patch_tokens_to_grid(1, self.grid)

    def _freeze_lower(self, n_layers: int) -> None:
        layers = self.vision_model.encoder.layers
        if not 0 <= n_layers < len(layers):
            raise TowerError(f"model.image_encoder.freeze_layers={n_layers}: the tower has {len(layers)} layers "
                             "(the last one always trains)")
        for module in (self.vision_model.embeddings, self.vision_model.pre_layrnorm, *list(layers)[:n_layers]):
            freeze(module)


@register_text_tower("hf_clip")
class HFClipTextTower(TextTower):
    """``CLIPTextTransformer``; ``forward`` returns its ``pooler_output`` (causal, end-of-text pooled)."""

    def __init__(self, cfg, vocab_size: int | None = None, hf_config: dict | None = None,
                 text_model: nn.Module | None = None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if text_model is None:
            config = CLIPTextConfig(**_config(cfg.config, "text_config", "text_encoder.config"))
            config._attn_implementation = "sdpa"
            text_model = CLIPTextModel(config)
            text_model = getattr(text_model, "text_model", text_model)  # transformers 4 wraps it
        self.text_model = text_model
        self.out_dim = int(text_model.config.hidden_size)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)
        self._apply_freezing(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_hidden: bool = False):
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=return_hidden)
        return (out.pooler_output, out.hidden_states[-2]) if return_hidden else out.pooler_output

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise TowerError("grad_checkpointing: not supported by hf_clip towers; use the open_clip family")

    def _freeze_lower(self, n_layers: int) -> None:
        layers = self.text_model.encoder.layers
        if not 0 <= n_layers <= len(layers):
            raise TowerError(f"model.text_encoder.freeze_layers={n_layers}: the text tower has {len(layers)} layers")
        freeze(self.text_model.embeddings)
        for layer in list(layers)[:n_layers]:
            freeze(layer)
