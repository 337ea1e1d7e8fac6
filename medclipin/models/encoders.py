"""The ``timm`` image tower family and the ``hf`` (BERT-family) text tower family.

Both build from configuration alone (no download), load from a local folder, or — for a user who is
online — from a hub name. The tower contract and the registry are in :mod:`medclipin.models.towers`.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from medclipin.config import ImageEncoderConfig, TextEncoderConfig
from medclipin.models.towers import (ImageTower, TextTower, TowerError, depthwise_convs_in_fp32, freeze as _freeze,
                                     register_image_tower, register_text_tower)
from medclipin.models.weights import WeightsError, parse_weights, timm_pretrained_overlay, _offline


# one error class for everything about pretrained weights (a spec that names nothing, a missing package, ...)
EncoderLoadError = WeightsError


def is_vit_like(model: nn.Module) -> bool:
    """A timm model that works on patch tokens (ViT, DeiT, EVA, ...) rather than feature maps."""
    return hasattr(model, "patch_embed") and hasattr(model, "blocks")


@register_image_tower("timm")
class ImageEncoder(ImageTower):
    """A timm model without its classifier; ``forward`` returns the pooled feature (ViT: CLS after the final norm).

    Any timm family works: CNNs (EfficientNet, ResNet, ConvNeXt, ...) and ViTs.

    Args:
        cfg: ``name`` is any timm architecture; ``kwargs`` override its hyper-parameters
            (``depth``, ``embed_dim``, ``num_heads``, ...); ``pretrained`` is a weights spec
            (:mod:`medclipin.models.weights`: ``""``, ``package:<name>``, a local file/folder, ``hub``).
        in_chans: 1 for radiographs, 3 for colour. Pretrained 3-channel weights are adapted the standard
            timm way (the stem's RGB filters summed for one channel).
        image_size: input resolution (ViT position embeddings are sized, or resampled, for it).

    CNNs run in channels-last memory format (oneDNN's and cuDNN's fast layout for convolutions: 2.4x
    faster for EfficientNet-Lite0 in fp32 on this project's CPUs); the input is converted in ``forward``.
    """

    def __init__(self, cfg: ImageEncoderConfig, in_chans: int = 1, image_size: int = 224):
        super().__init__()
        import timm

        kwargs: dict[str, Any] = {"num_classes": 0, **cfg.kwargs}
        source = parse_weights(cfg.pretrained, "image")
        if source.pretrained:
            overlay = timm_pretrained_overlay(source, cfg.name)
            if overlay is not None:
                kwargs["pretrained_cfg_overlay"] = overlay
        self.weights = source.spec
        # One-channel input natively (timm adapts the stem, summing pretrained RGB filters) where the
        # architecture takes ``in_chans``; otherwise a 3-channel model is built and the input replicated.
        accepts = _timm_constructor_arguments(timm, cfg.name, kwargs)
        self.replicate_channels = 1
        if "in_chans" in accepts or in_chans == 3:
            kwargs["in_chans"] = in_chans
        else:
            self.replicate_channels = 3 // in_chans
        if "img_size" in accepts:  # ViT-style models size (or resample) their position embeddings for it
            kwargs["img_size"] = image_size
        self.model = self._create(timm, cfg, source.pretrained, kwargs)
        self.in_chans = in_chans
        self.image_size = int(image_size)
        self.out_dim = int(self.model.num_features)
        self.channels_last = not is_vit_like(self.model)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
            depthwise_convs_in_fp32(self.model)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.train_fp32 = cfg.train_fp32
        if cfg.freeze:
            _freeze(self.model)
        elif cfg.freeze_layers:
            self._freeze_lower(cfg.freeze_layers)

    def _freeze_lower(self, n_layers: int) -> None:
        freeze_timm_lower(self.model, n_layers)

    @staticmethod
    def _create(timm, cfg: ImageEncoderConfig, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
        """``timm.create_model``; a failure to get pretrained weights becomes an :class:`EncoderLoadError`
        naming what was tried."""
        try:
            return timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
        except (TypeError, WeightsError):
            raise
        except Exception as exc:  # timm raises several types for offline/unknown weights
            if isinstance(exc, RuntimeError) and str(exc).startswith("Unknown model"):
                import difflib

                close = difflib.get_close_matches(cfg.name, timm.list_models(), n=3, cutoff=0.6)
                hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
                raise EncoderLoadError(f"model.image_encoder.name={cfg.name!r} is not a timm architecture{hint}") from None
            if pretrained:
                hint = ("running offline (HF_HUB_OFFLINE) and the weights are not in the local cache: "
                        if cfg.pretrained.startswith("hub") and _offline() else "")
                raise EncoderLoadError(
                    f"image encoder {cfg.name!r}: could not load pretrained weights ({cfg.pretrained!r}): {hint}{exc}. "
                    "Offline, pass a local weights file or folder, or package:<name>; online, use pretrained: hub."
                ) from exc
            raise

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.replicate_channels > 1:
            image = image.repeat(1, self.replicate_channels, 1, 1)
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        if self.train_fp32 and torch.is_grad_enabled() and torch.is_autocast_enabled(image.device.type):
            with torch.autocast(image.device.type, enabled=False):
                return self.model(image.float())
        return self.model(image)

    def gradcam_layer_name(self) -> str:
        """Dotted name (inside the timm model) of :meth:`gradcam_layer`'s module."""
        layer = self.gradcam_layer()[0]
        return next((name for name, module in self.model.named_modules() if module is layer), type(layer).__name__)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if hasattr(self.model, "set_grad_checkpointing"):
            self.model.set_grad_checkpointing(enable)

    # A class-activation map is as fine as the layer it is read from. Classic Grad-CAM reads ResNet-50's
    # last stage at 224 px: 7 x 7. At smaller inputs a CNN's last stage shrinks to 4 x 4, where most cells
    # touch the zero padding (measured on the demo model: pointing game 0.02, against 0.42 one stage up).
    MIN_CAM_SIDE = 7

    def gradcam_layer(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
        """The layer whose activations Grad-CAM uses and the transform from its output to (B, C, h, w).

        ViT: the patch tokens entering the last block (its ``norm1``; class and register tokens dropped,
        reshaped to the patch grid). With class-token pooling the last block's patch *outputs* never
        reach the pooled feature, so their gradient would be zero. CNN: the last feature stage timm lists
        in ``feature_info`` whose map is at least 7 x 7 at this tower's input size (ResNet ``layer4`` and
        EfficientNet ``blocks.6`` at 224 px; one stage up, at stride 16, at 128 px), already spatial.
        """
        return timm_gradcam_layer(self.model, self.image_size, self.MIN_CAM_SIDE)


def _timm_constructor_arguments(timm, name: str, kwargs: dict[str, Any]) -> set[str]:
    """The keyword arguments ``name``'s model class takes, read from its signature: the architecture is built
    once on the ``meta`` device (no memory, no weights) to find its class. An unknown name or a wrong
    keyword in ``kwargs`` is left for the real build to report."""
    import inspect

    arguments = {k: v for k, v in kwargs.items() if k != "pretrained_cfg_overlay"}
    for device in ("meta", "cpu"):  # an architecture whose init cannot run on meta tensors is built for real
        try:
            with torch.device(device):
                probe = timm.create_model(name, pretrained=False, **arguments)
            return set(inspect.signature(type(probe).__init__).parameters)
        except Exception:  # noqa: BLE001 - an unknown name or a bad keyword: ImageEncoder._create reports it
            continue
    return set()


def freeze_timm_lower(model: nn.Module, n_layers: int) -> None:
    """Freeze the stem and the first ``n_layers`` stages/blocks of a timm model, in timm's own grouping
    (``group_matcher``)."""
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=True))
    # groups are ordered: the stem (0), then the stages/blocks; the last group (the last stage, with the
    # final norm or head where timm groups them together) always trains, so something adapts
    ordered = sorted(groups.items(), key=lambda item: item[0])
    if not 0 <= n_layers < len(ordered) - 1:
        raise ValueError(f"model.image_encoder.freeze_layers={n_layers}: {model.__class__.__name__} can "
                         f"freeze its stem and up to {len(ordered) - 2} of its {len(ordered) - 1} later groups "
                         "(the last one always trains)")
    names = {name for _, members in ordered[:n_layers + 1] for name in members}
    for name, parameter in model.named_parameters():
        if name in names:
            parameter.requires_grad_(False)


def patch_tokens_to_grid(prefix: int, grid: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, prefix + h*w, C) tokens → (B, C, h, w) patch map (class/register tokens dropped)."""
    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        batch, _, channels = patches.shape
        return patches.reshape(batch, grid[0], grid[1], channels).permute(0, 3, 1, 2)

    return reshape


def timm_gradcam_layer(model: nn.Module, image_size: int, min_side: int = ImageEncoder.MIN_CAM_SIDE):
    """Grad-CAM layer of a timm model (see :meth:`ImageEncoder.gradcam_layer`); shared with towers that
    wrap a timm trunk (open_clip's ``TimmModel``)."""
    if is_vit_like(model):
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        return model.blocks[-1].norm1, patch_tokens_to_grid(prefix, tuple(model.patch_embed.grid_size))
    info = getattr(model, "feature_info", None)
    if info:
        stages = info if isinstance(info, list) else [{"module": m, "reduction": r}
                                                     for m, r in zip(info.module_name(), info.reduction())]
        chosen = stages[-1]
        for stage in reversed(stages):
            if math.ceil(image_size / int(stage["reduction"])) >= min_side:
                chosen = stage
                break
        return model.get_submodule(chosen["module"]), None
    for name in ("stages", "layer4"):
        if hasattr(model, name):
            module = getattr(model, name)
            return (module[-1] if name == "stages" else module), None
    raise NotImplementedError(f"no Grad-CAM layer known for {type(model).__name__}")


def _hf_build_arguments(config) -> dict:
    """No pooler where the architecture has one (we pool ourselves; an unused pooler only adds parameters
    without gradients) and SDPA attention where it supports it: read from the model class ``AutoModel`` maps
    ``config`` to (its constructor's signature, its ``_supports_sdpa``), not by trying and catching."""
    import inspect

    from transformers import AutoModel

    try:
        model_class = AutoModel._model_mapping[type(config)]
    except KeyError:
        model_class = None
    if model_class is None:  # remote code or an architecture AutoModel does not map: its own defaults
        return {}
    arguments = {}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        arguments["add_pooling_layer"] = False
    if getattr(model_class, "_supports_sdpa", False):
        arguments["attn_implementation"] = "sdpa"
    return arguments


def _model_from_config(config):
    """A randomly initialised HF encoder (:func:`_hf_build_arguments`)."""
    from transformers import AutoModel

    return AutoModel.from_config(config, **_hf_build_arguments(config))


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' warnings and progress bars off for one load (errors still raise)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _model_from_pretrained(name_or_path: str, trust_remote_code: bool = False):
    """``AutoModel.from_pretrained`` from a local folder or (online) a hub name, without a pooler and with
    SDPA attention where the architecture supports them; a clear :class:`EncoderLoadError` otherwise."""
    from transformers import AutoConfig, AutoModel

    local = Path(os.path.expanduser(name_or_path))
    if local.is_dir() and not (local / "config.json").is_file():
        raise EncoderLoadError(
            f"text encoder: cannot load {name_or_path!r}: the local folder holds no loadable from_pretrained model "
            "(no config.json)"
        )
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        with _quiet_transformers():  # its load report lists the pooler we leave out on purpose
            return AutoModel.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                             **_hf_build_arguments(config))
    except ValueError as exc:  # an architecture transformers does not know, a config it cannot read
        raise EncoderLoadError(f"text encoder: cannot load {name_or_path!r}: {exc}") from None
    except OSError as exc:
        local = Path(os.path.expanduser(name_or_path)).exists()
        offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
                      for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
        if local:
            reason = "the local folder holds no loadable from_pretrained model (config.json + weights)"
        elif offline:
            reason = ("not a local folder, and running offline (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) forbids "
                      "the hub: download it once online, or pass a local from_pretrained folder")
        else:
            reason = "not a local folder and not reachable on the hub"
        raise EncoderLoadError(f"text encoder: cannot load {name_or_path!r}: {reason} ({exc})") from exc


@register_text_tower("hf")
class TextEncoder(TextTower):
    """A Hugging Face BERT-family encoder with CLS or mean pooling.

    Built from ``cfg.config`` (a ``BertConfig`` dict; ``vocab_size`` comes from the tokenizer) when
    ``cfg.pretrained`` is empty, otherwise ``AutoModel.from_pretrained`` of what the weights spec names
    (:mod:`medclipin.models.weights`: ``package:<name>``, a local folder, or a hub id). ``hf_config``
    rebuilds an identical architecture without the weights (used when loading a saved medclipin model).

    ``cfg.freeze_layers = N`` freezes the embeddings and the first N transformer layers (MGCA and
    GLoRIA freeze the lower half of BioClinicalBERT the same way): they keep their pretrained
    weights and, as no gradient flows below layer N, backward costs only the layers above it.
    """

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int | None = None, hf_config: dict | None = None):
        super().__init__()
        from transformers import AutoConfig, BertConfig

        self.pooling = cfg.pooling
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"model.text_encoder.pooling must be 'cls' or 'mean', got {cfg.pooling!r}")
        if hf_config is not None:
            self.model = _model_from_config(AutoConfig.for_model(**hf_config))
        elif cfg.pretrained:
            source = parse_weights(cfg.pretrained, "text")
            self.model = _model_from_pretrained(source.location, cfg.trust_remote_code)
        else:
            if vocab_size is None:
                raise ValueError("building a text encoder from config needs the tokenizer's vocab_size")
            self.model = _model_from_config(BertConfig(vocab_size=vocab_size, **cfg.config))
        _check_bidirectional(self.model.config, cfg.pretrained)
        self.out_dim = int(self.model.config.hidden_size)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)
        self.frozen_layers = 0
        if cfg.freeze:
            _freeze(self.model)
        elif cfg.freeze_layers:
            self._freeze_lower(cfg.freeze_layers)

    def _freeze_lower(self, n_layers: int) -> None:
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        embeddings = getattr(self.model, "embeddings", None)
        if layers is None or embeddings is None:
            raise ValueError(f"model.text_encoder.freeze_layers needs a BERT-style encoder (embeddings + "
                             f"encoder.layer); {type(self.model).__name__} has none")
        if not 0 <= n_layers <= len(layers):
            raise ValueError(f"model.text_encoder.freeze_layers={n_layers}: the text tower has {len(layers)} layers")
        _freeze(embeddings)
        for layer in list(layers)[:n_layers]:
            _freeze(layer)
        self.frozen_layers = n_layers
        if n_layers < len(layers):
            # Two views of the same modules: the frozen trunk (embeddings + lower layers) and the trainable
            # top. Kept out of the module tree (no duplicate parameters); deepcopy keeps the sharing.
            self.__dict__["_split"] = _split_bert(self.model, n_layers)

    @property
    def has_frozen_trunk(self) -> bool:
        """The embeddings and lower layers are frozen and run deterministically (:meth:`trunk`)."""
        return "_split" in self.__dict__

    def train(self, mode: bool = True) -> "TextEncoder":
        """Frozen lower layers always run in eval mode: a fixed feature extractor, no dropout noise; so the
        trunk's output is the same for every pass over the same text (the CLIPin target reuses it)."""
        super().train(mode)
        if self.has_frozen_trunk:
            self._split[0].eval()
        return self

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen layers (B, L, H); no gradient (nothing below them trains)."""
        with torch.no_grad():
            return self._split[0](input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def top(self, trunk: torch.Tensor, attention_mask: torch.Tensor, return_hidden: bool = False):
        """The trainable layers on a :meth:`trunk` output, then pooling: the same as :meth:`forward`."""
        outputs = self._split[1](inputs_embeds=trunk, attention_mask=attention_mask, output_hidden_states=return_hidden)
        pooled = self._pool(outputs.last_hidden_state, attention_mask)
        return (pooled, outputs.hidden_states[-2]) if return_hidden else pooled

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def hf_config(self) -> dict:
        return self.model.config.to_dict()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers >= 5 renamed these (the old names still work, with a deprecation warning)
        if enable:
            (getattr(self.model, "activation_checkpointing_enable", None) or self.model.gradient_checkpointing_enable)()
        elif any(getattr(m, "gradient_checkpointing", False) is True for m in self.model.modules()):
            (getattr(self.model, "activation_checkpointing_disable", None) or self.model.gradient_checkpointing_disable)()

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Pooled feature (B, H); with ``return_hidden`` also the hidden states entering the last block
        (B, L, H), the layer text-side relevance is computed on."""
        if self.has_frozen_trunk:
            return self.top(self.trunk(input_ids, attention_mask), attention_mask, return_hidden)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=return_hidden)
        pooled = self._pool(outputs.last_hidden_state, attention_mask)
        return (pooled, outputs.hidden_states[-2]) if return_hidden else pooled


# Text models that read left to right (causal attention): a [CLS] or mean pool of them is not the feature
# they were trained to produce, and every text can come out with the same [CLS] vector.
_CAUSAL_TYPES = {"gpt2", "gpt_neo", "gptj", "llama", "mistral", "opt", "bloom", "falcon", "qwen2", "phi", "gemma"}


def _check_bidirectional(config, spec: str) -> None:
    """Refuse, in one line, a text model the ``hf`` family would pool wrongly: CLIP text towers (causal,
    pooled at the end-of-text token: the ``hf_clip`` family or ``model.base: hf:DIR``) and decoders."""
    model_type = getattr(config, "model_type", "")
    where = f"model.text_encoder.pretrained={spec!r}" if spec else "model.text_encoder"
    if model_type in ("clip", "clip_text_model", "siglip", "siglip_text_model"):
        raise TowerError(f"{where}: a {model_type} model is causal and pooled at its end-of-text token, not by "
                         "cls/mean pooling; load the whole CLIP with model.base: hf:<folder>, or set "
                         "model.text_encoder.family: hf_clip")
    if getattr(config, "is_decoder", False) or model_type in _CAUSAL_TYPES:
        raise TowerError(f"{where}: a causal ({model_type or 'decoder'}) model cannot be pooled by cls/mean "
                         "as the hf family does; use a bidirectional (BERT-family) encoder")


class _Passthrough(nn.Module):
    """Stands in for BERT's embeddings in the trainable top: its input already is a hidden state."""

    def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, **kwargs):
        return inputs_embeds


def _split_bert(model: nn.Module, n_layers: int) -> tuple[nn.Module, nn.Module]:
    """Two Hugging Face models sharing ``model``'s modules: embeddings + layers[:n] and layers[n:].

    Built from the model's own config class, so masks, SDPA and layer calls stay the library's own code;
    each view only swaps in the shared embeddings / layers.
    """
    from transformers import AutoModel

    layers = model.encoder.layer

    def view(count: int) -> nn.Module:
        config = model.config.__class__.from_dict({**model.config.to_dict(), "num_hidden_layers": count})
        config._attn_implementation = model.config._attn_implementation
        try:
            part = AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            part = AutoModel.from_config(config)
        return part

    lower = view(n_layers)
    lower.embeddings = model.embeddings
    lower.encoder.layer = nn.ModuleList(list(layers)[:n_layers])
    upper = view(len(layers) - n_layers)
    upper.embeddings = _Passthrough()
    upper.encoder.layer = nn.ModuleList(list(layers)[n_layers:])
    for part in (lower, upper):
        part.pooler = None
    return lower, upper
