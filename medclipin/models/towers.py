"""Tower families: what an image or text tower must offer, and the registry that builds one by name.

A tower turns pixels or tokens into one pooled feature vector; the model's projections map it into the
joint space. Every family offers the same small contract, so training, evaluation and Grad-CAM never
ask which library a tower came from:

* image: ``forward(image) -> (B, out_dim)``, ``gradcam_layer()`` (module + reshape to (B, C, h, w)),
  ``gradcam_layer_name()``, ``set_grad_checkpointing(bool)``; built frozen or with its lower layers
  frozen from the config's ``freeze`` / ``freeze_layers``.
* text: ``forward(input_ids, attention_mask, return_hidden=False)`` -> pooled (B, out_dim), and with
  ``return_hidden`` also the hidden states entering the last block (B, L, H) for text-side relevance;
  ``has_frozen_trunk`` (+ ``trunk``/``top`` when true), ``hf_config()`` (an exact HF config to rebuild
  from, or None), ``set_grad_checkpointing(bool)``.

A family is one module that defines a class and registers it (timm's ``register_model`` pattern)::

    @register_image_tower("my_family")
    class MyImageTower(ImageTower):
        def __init__(self, cfg, in_chans, image_size): ...

and is chosen with ``model.image_encoder.family: my_family``. Families shipped: ``timm`` and ``hf``
(:mod:`medclipin.models.encoders`), ``open_clip`` (:mod:`medclipin.models.open_clip_towers`) and
``hf_clip`` (:mod:`medclipin.models.hf_clip_towers`).
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from medclipin.errors import MedclipinError


class TowerError(MedclipinError, ValueError):
    """A tower family is unknown or cannot build what its config asks; the message names the setting."""


class _Tower(nn.Module):
    """What both tower kinds share: gradient checkpointing and freezing from their config section."""

    section = "encoder"

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass

    def _apply_freezing(self, cfg) -> None:
        if cfg.freeze:
            freeze(self)
        elif cfg.freeze_layers:
            self._freeze_lower(cfg.freeze_layers)

    def _freeze_lower(self, n_layers: int) -> None:
        raise TowerError(f"model.{self.section}.freeze_layers: not supported by {type(self).__name__}")


class ImageTower(_Tower):
    """Base of image towers. Subclasses set ``out_dim``, ``image_size``, ``in_chans`` and implement
    ``forward``, ``gradcam_layer`` and ``_freeze_lower``."""

    section = "image_encoder"
    out_dim: int
    image_size: int
    in_chans: int
    train_fp32: bool = False

    def gradcam_layer(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
        raise NotImplementedError(f"{type(self).__name__} has no Grad-CAM layer")

    def gradcam_layer_name(self) -> str:
        """Dotted name of :meth:`gradcam_layer`'s module inside this tower."""
        layer = self.gradcam_layer()[0]
        return next((name for name, module in self.named_modules() if module is layer), type(layer).__name__)


class TextTower(_Tower):
    """Base of text towers. Subclasses set ``out_dim`` and implement ``forward``."""

    section = "text_encoder"
    out_dim: int

    @property
    def has_frozen_trunk(self) -> bool:
        """Lower layers frozen and exposed as ``trunk``/``top`` (the CLIPin target reuses their output)."""
        return False

    def hf_config(self) -> dict | None:
        """An exact Hugging Face config of the text model, saved beside the weights (None: the tower's own
        config section is enough to rebuild it)."""
        return None


def freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


_FP32_CONV_CLASSES: dict[type, type] = {}


def _fp32_on_cpu_class(conv_class: type) -> type:
    """A subclass of ``conv_class`` whose forward leaves CPU autocast while gradients are recorded."""
    if conv_class not in _FP32_CONV_CLASSES:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.device.type == "cpu" and torch.is_grad_enabled() and torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    return conv_class.forward(self, x.float())
            return conv_class.forward(self, x)

        _FP32_CONV_CLASSES[conv_class] = type(f"Fp32OnCpu{conv_class.__name__}", (conv_class,), {
            "forward": forward, "__doc__": f"{conv_class.__name__}, in fp32 under CPU autocast with grad."})
    return _FP32_CONV_CLASSES[conv_class]


def depthwise_convs_in_fp32(module: nn.Module) -> int:
    """Run ``module``'s depthwise convolutions in fp32 when training under a CPU bf16 autocast; returns how many.

    On AVX512-BF16/AMX CPUs oneDNN's bf16 backward of a depthwise convolution measures 3-5x its fp32 one,
    while pointwise convolutions gain from bf16: an EfficientNet trains fastest with only its depthwise
    layers in fp32 (docs/performance.md). Forward-only passes (no grad) and GPUs keep autocast's choice.
    The layers change class, not parameters: state dicts and copies are unaffected."""
    count = 0
    for layer in module.modules():
        if (isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels
                and type(layer) not in _FP32_CONV_CLASSES.values()):
            layer.__class__ = _fp32_on_cpu_class(type(layer))
            count += 1
    return count


_IMAGE_TOWERS: dict[str, type] = {}
_TEXT_TOWERS: dict[str, type] = {}
# the modules that register the shipped families, imported on first use (optional libraries stay lazy)
_FAMILY_MODULES = ("medclipin.models.encoders", "medclipin.models.open_clip_towers", "medclipin.models.hf_clip_towers")


def register_image_tower(family: str):
    """Class decorator: make ``family`` a value of ``model.image_encoder.family``."""
    def register(cls):
        _IMAGE_TOWERS[family] = cls
        return cls
    return register


def register_text_tower(family: str):
    """Class decorator: make ``family`` a value of ``model.text_encoder.family``."""
    def register(cls):
        _TEXT_TOWERS[family] = cls
        return cls
    return register


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        importlib.import_module(module)


def image_tower_families() -> list[str]:
    _load_families()
    return sorted(_IMAGE_TOWERS)


def text_tower_families() -> list[str]:
    _load_families()
    return sorted(_TEXT_TOWERS)


def _family(registry: dict[str, type], family: str, section: str) -> type:
    if family not in registry:
        _load_families()
    if family not in registry:
        raise TowerError(f"model.{section}.family={family!r} is not a registered tower family "
                         f"(known: {', '.join(sorted(registry))})")
    return registry[family]


def build_image_tower(cfg, in_chans: int, image_size: int) -> ImageTower:
    """The image tower ``cfg.family`` names, built from ``cfg`` (weights as its ``pretrained`` spec says)."""
    return _family(_IMAGE_TOWERS, cfg.family, "image_encoder")(cfg, in_chans=in_chans, image_size=image_size)


def build_text_tower(cfg, vocab_size: int | None = None, hf_config: dict | None = None) -> TextTower:
    """The text tower ``cfg.family`` names; ``hf_config`` rebuilds a saved HF text model exactly."""
    return _family(_TEXT_TOWERS, cfg.family, "text_encoder")(cfg, vocab_size=vocab_size, hf_config=hf_config)
