"""``MedClipModel``: what inference needs — two towers, their projections to the joint space, the logit scale.

The model a user loads holds the image tower, the text tower, one projection per modality (with the
CLIPin *shared pre-projector* in front when the model was trained with one), the learnable logit
scale and, for SigLIP models, the logit bias. Training machinery — the CLIPin non-contrastive heads,
predictors, loss weights and EMA target, the xCLIP prototype heads — belongs to the training
objective (:mod:`medclipin.train.objective`), which wraps a model; an exported model folder never
holds it (open_clip's library/app split).

A model folder (``save_pretrained``) holds ``config.json`` (the architecture), ``model.safetensors``
and, when saved with one, the :class:`~medclipin.data.processor.Processor` (``processor.json`` + the
tokenizer). :func:`medclipin.load` opens a model, run or checkpoint folder in one call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medclipin.atomic import replace_directory
from medclipin.config import (ContrastiveConfig, ImageEncoderConfig, ModelConfig, TextEncoderConfig, _build,
                              config_to_dict)
from medclipin.errors import MedclipinError
from medclipin.models.towers import build_image_tower, build_text_tower
from medclipin.safe_parse import load_json

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: the model class also held the training objective (CLIPin heads, EMA target)
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
KINDS = ("clip", "siglip")

# Training-only parts that format-1 model folders stored next to the inference weights.
_FORMAT1_TRAINING_PREFIXES = ("target.", "predictors.", "image_nc.", "text_nc.", "loss_weights.", "nclip.")


class ModelFolderError(MedclipinError, FileNotFoundError):
    """A path is not a loadable medclipin model folder; the message names the path and what is missing."""


class WeightsMismatchError(ModelFolderError):
    """A weights file holds other tensors (names or shapes) than the model it is loaded into."""


# A safetensors header larger than this is refused before it is read (real ones are a few hundred KB).
MAX_HEADER_BYTES = 100 << 20
# Buffers a model holds that are not saved in its weights file (position ids and the like): far below this.
MAX_UNSAVED_BUFFER_BYTES = 256 << 20
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass
class ModelSpec:
    """The architecture of an inference model: everything ``config.json`` holds.

    Attributes:
        image_encoder, text_encoder: tower configurations (weights specs are not used when loading a folder).
        kind: ``"clip"`` (softmax over scaled cosines) or ``"siglip"`` (sigmoid of scaled cosine + bias).
        embed_dim: joint embedding size.
        pre_dim: width of the shared pre-projector in front of each projection (CLIPin's; 0 = none).
        image_size, in_chans: the image tower's input.
        init_logit_scale, init_logit_bias, max_logit_scale: the temperature's start and bound.
        image_proj_bias, text_proj_bias: the projections (and pre-projectors) have a bias. CLIP's have
            none; a model started from one keeps them bias-free so that it exports exactly.
    """

    image_encoder: ImageEncoderConfig
    text_encoder: TextEncoderConfig
    kind: str = "clip"
    embed_dim: int = 512
    pre_dim: int = 0
    image_size: int = 224
    in_chans: int = 1
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float = 0.0
    max_logit_scale: float = math.log(100)
    image_proj_bias: bool = True
    text_proj_bias: bool = True

    @classmethod
    def from_config(cls, cfg: ModelConfig, image_size: int, in_chans: int) -> "ModelSpec":
        """The inference architecture a training config describes (CLIPin's pre-projector included)."""
        contrastive: ContrastiveConfig = cfg.contrastive
        kind = contrastive.kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"model.contrastive.kind must be 'clip' or 'siglip', got {contrastive.kind!r}")
        if kind == "clip":
            if contrastive.init_temperature <= 0:
                raise ValueError(f"model.contrastive.init_temperature must be > 0, got {contrastive.init_temperature}")
            scale, bias = math.log(1.0 / contrastive.init_temperature), 0.0
        else:
            scale, bias = contrastive.siglip_init_logit_scale, contrastive.siglip_init_logit_bias
        return cls(image_encoder=cfg.image_encoder, text_encoder=cfg.text_encoder, kind=kind,
                   embed_dim=contrastive.embed_dim, pre_dim=cfg.clipin.pre_dim if cfg.clipin.enabled else 0,
                   image_size=image_size, in_chans=in_chans, init_logit_scale=scale, init_logit_bias=bias,
                   max_logit_scale=contrastive.max_logit_scale)

    def to_dict(self) -> dict:
        return {k: (config_to_dict(v) if k in ("image_encoder", "text_encoder") else v)
                for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        values = dict(values)
        image = _build(ImageEncoderConfig, _known(ImageEncoderConfig, values.pop("image_encoder", {}), "image_encoder"),
                       "image_encoder.")
        text = _build(TextEncoderConfig, _known(TextEncoderConfig, values.pop("text_encoder", {}), "text_encoder"),
                      "text_encoder.")
        known = {f for f in cls.__dataclass_fields__} - {"image_encoder", "text_encoder"}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model keys {sorted(unknown)}")
        return cls(image_encoder=image, text_encoder=text, **values)


def _known(config_class, values: dict, section: str) -> dict:
    """A saved tower section without the keys this version does not know. Tower sections also hold
    training-only settings (frozen layers, precision), which another medclipin version may name
    differently; none of them changes the architecture, so a model folder stays loadable."""
    fields = set(config_class.__dataclass_fields__)
    unknown = sorted(set(values or {}) - fields)
    if unknown:
        log.warning("model config: ignoring %s keys this medclipin version does not know: %s", section, unknown)
    return {k: v for k, v in (values or {}).items() if k in fields}


def _projection_input(in_dim: int, pre_dim: int, bias: bool) -> nn.Module:
    return nn.Linear(in_dim, pre_dim, bias=bias) if pre_dim else nn.Identity()


class MedClipModel(nn.Module):
    """A CLIP-style medical image–text model for inference: embed, compare, classify, explain.

    Args:
        spec: the architecture (:class:`ModelSpec`; :meth:`from_config` builds one from a training config).
        vocab_size: tokenizer size, needed when the text tower is built from configuration.
        text_hf_config: exact HF config of a saved text tower (loading a folder rebuilds it, no download).

    Attributes:
        image_encoder, text_encoder: the towers (pooled features).
        image_pre, text_pre: shared pre-projectors (CLIPin) or identities.
        image_proj, text_proj: linear maps into the joint space.
        logit_scale: log of the similarity scale; ``logit_bias``: SigLIP's bias (None for CLIP).

    Example:
        >>> model, processor = medclipin.load("runs/demo")
        >>> image = model.encode_image(processor.images(["chest.dcm"]))
        >>> text = model.encode_text(**processor.texts(["pleural effusion.", "no pleural effusion."]))
        >>> model.logits(image, text).softmax(-1)
    """

    def __init__(self, spec: ModelSpec, vocab_size: int | None = None, text_hf_config: dict | None = None):
        super().__init__()
        if spec.kind not in KINDS:
            raise ValueError(f"model kind must be 'clip' or 'siglip', got {spec.kind!r}")
        self.spec = spec
        self.image_encoder = build_image_tower(spec.image_encoder, in_chans=spec.in_chans, image_size=spec.image_size)
        self.text_encoder = build_text_tower(spec.text_encoder, vocab_size=vocab_size, hf_config=text_hf_config)
        d_img, d_txt = self.image_encoder.out_dim, self.text_encoder.out_dim
        self.image_pre = _projection_input(d_img, spec.pre_dim, spec.image_proj_bias)
        self.text_pre = _projection_input(d_txt, spec.pre_dim, spec.text_proj_bias)
        self.image_proj = nn.Linear(spec.pre_dim or d_img, spec.embed_dim, bias=spec.image_proj_bias)
        self.text_proj = nn.Linear(spec.pre_dim or d_txt, spec.embed_dim, bias=spec.text_proj_bias)
        self.logit_scale = nn.Parameter(torch.tensor(float(spec.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(spec.init_logit_bias))) if spec.kind == "siglip" else None

    @classmethod
    def from_config(cls, cfg: ModelConfig, image_size: int, in_chans: int, vocab_size: int | None = None,
                    ) -> "MedClipModel":
        """Build (and load pretrained tower weights) as a training config says."""
        return cls(ModelSpec.from_config(cfg, image_size, in_chans), vocab_size=vocab_size)

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def embed_dim(self) -> int:
        return self.spec.embed_dim

    # ------------------------------------------------------------------ features
    def image_features(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled tower feature, pre-projector output)`` — what training objectives branch from."""
        pooled = self.image_encoder(image)
        return pooled, self.image_pre(pooled)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, return_trunk: bool = False):
        """``(pooled tower feature, pre-projector output)`` of tokenised texts; with ``return_trunk`` also the
        output of the text tower's frozen lower layers (None when nothing is frozen), which the CLIPin
        target can reuse instead of recomputing."""
        trunk = None
        if return_trunk and self.text_encoder.has_frozen_trunk:
            trunk = self.text_encoder.trunk(input_ids, attention_mask)
            pooled = self.text_encoder.top(trunk, attention_mask)
        else:
            pooled = self.text_encoder(input_ids, attention_mask)
        return (pooled, self.text_pre(pooled), trunk) if return_trunk else (pooled, self.text_pre(pooled))

    def project_image(self, pre: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.image_proj(pre)
        return F.normalize(out, dim=-1) if normalize else out

    def project_text(self, pre: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        out = self.text_proj(pre)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings (B, embed_dim), L2-normalised unless ``normalize=False``."""
        return self.project_image(self.image_features(image)[1], normalize)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text embeddings (B, embed_dim), L2-normalised unless ``normalize=False``."""
        return self.project_text(self.text_features(input_ids, attention_mask)[1], normalize)

    # ------------------------------------------------------------------ scores
    def logits(self, image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
        """(N_images, N_texts) scaled cosines ``exp(logit_scale) · I Tᵀ`` (+ the SigLIP bias)."""
        logits = self.logit_scale.exp() * image_embeddings @ text_embeddings.T
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def similarity(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of paired images and texts (B,): the score Grad-CAM explains."""
        return (self.encode_image(image) * self.encode_text(input_ids, attention_mask)).sum(-1)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep ``logit_scale`` in ``[0, max_logit_scale]`` (the trainer calls it after every step)."""
        self.logit_scale.clamp_(0.0, self.spec.max_logit_scale)

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        values = {"format_version": FORMAT_VERSION, "model": self.spec.to_dict()}
        text_hf_config = self.text_encoder.hf_config()
        if text_hf_config is not None:
            values["text_hf_config"] = text_hf_config
        return values

    def save_pretrained(self, directory: str | os.PathLike, processor=None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (+ the processor) into ``directory``, atomically.

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
            if processor is not None:
                processor.save_pretrained(staging)
            replace_directory(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> "MedClipModel":
        """Rebuild a saved model from its folder without any download (weights via safetensors only).

        Folders written before the model/objective split (format 1) load too: their training-only tensors
        (EMA target, predictors, non-contrastive heads) are left out.
        """
        directory = Path(directory)
        saved = read_model_config(directory)
        if int(saved.get("format_version", 1)) == 1:
            return _load_format1(cls, directory, saved, map_location)
        try:
            spec = ModelSpec.from_dict(saved["model"])
        except (KeyError, TypeError, ValueError, MedclipinError) as exc:
            raise ModelFolderError(f"{directory / CONFIG_NAME}: not a valid medclipin model config ({exc})") from None
        spec.image_encoder.pretrained = spec.text_encoder.pretrained = ""  # weights come from the folder
        model = _build_checked(cls, spec, saved.get("text_hf_config"), directory)
        _load_weights(model, directory / WEIGHTS_NAME, map_location)
        return model


def read_model_config(directory: Path) -> dict:
    """``config.json`` of a model folder, with a one-line error for anything else."""
    config_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise ModelFolderError(f"{directory}: no such model folder")
    if not config_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise ModelFolderError(f"{directory}: not a medclipin model folder (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        saved = load_json(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"{config_path}: not readable JSON ({exc})") from None
    if not isinstance(saved, dict):
        raise ModelFolderError(f"{config_path}: top level must be an object")
    if "model_type" in saved and "model" not in saved:  # a transformers folder
        raise ModelFolderError(f"{directory}: a transformers {saved['model_type']!r} folder, not a medclipin model"
                               + (f"; load it as hf:{directory}" if saved["model_type"] == "clip" else ""))
    version = saved.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise ModelFolderError(f"{config_path}: format_version must be a whole number, got {version!r}")
    if version > FORMAT_VERSION:
        raise ModelFolderError(f"{config_path}: format_version {version!r} is newer than this medclipin "
                               f"understands ({FORMAT_VERSION}); upgrade medclipin")
    return saved


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors file's header, without reading any tensor data.

    Raises:
        ModelFolderError: not a well-formed safetensors file (truncated; a header longer than the file or
            than :data:`MAX_HEADER_BYTES`, or not JSON; a tensor whose shape and dtype do not fit its bytes).
    """
    import struct

    length, raw = None, b""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(8)
            if len(head) == 8:
                length = struct.unpack("<Q", head)[0]
                if length <= min(size - 8, MAX_HEADER_BYTES):
                    raw = handle.read(length)
    except OSError as exc:
        raise ModelFolderError(f"{path}: cannot read the weights file ({exc.strerror or exc})") from None
    if length is None:
        raise ModelFolderError(f"{path}: truncated weights file ({size} bytes)")
    if length > min(size - 8, MAX_HEADER_BYTES):
        raise ModelFolderError(f"{path}: corrupt weights file (header of {length} bytes in a {size}-byte file)")
    try:
        header = load_json(raw)
    except (ValueError, UnicodeDecodeError):
        raise ModelFolderError(f"{path}: corrupt weights file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"{path}: corrupt weights file (its header is not a JSON object)")
    data_bytes = size - 8 - length
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            fits = (all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(begin, int)
                    and isinstance(end, int) and 0 <= begin <= end <= data_bytes
                    and end - begin == math.prod(shape) * _DTYPE_BYTES[entry["dtype"]])
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise ModelFolderError(f"{path}: corrupt weights file (tensor {name!r} does not fit its "
                                   f"{data_bytes}-byte data: {str(entry)[:80]})")
        shapes[name] = shape
    return shapes


def _renamed(shapes: dict, drop_prefixes: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> dict:
    return {(rename or {}).get(k, k): v for k, v in shapes.items() if not k.startswith(drop_prefixes)}


def check_weights_match(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path,
                        against: str = CONFIG_NAME) -> None:
    """Names and shapes of a weights file (``found``) against a model's (``expected``), before any loading.

    Raises:
        WeightsMismatchError: naming the file and the first missing, unexpected and wrongly shaped tensors.
    """
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(f"{k} ({against} {list(expected[k])}, file {list(found[k])})"
                   for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if missing or unexpected or wrong:
        details = "; ".join(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}"
                            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                                ("wrong shape", wrong)) if keys)
        raise WeightsMismatchError(f"{path}: weights do not match the model in {against} ({details})")


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _build_checked(cls, spec: ModelSpec, text_hf_config: dict | None, directory: Path,
                   drop_prefixes: tuple[str, ...] = (), rename: dict[str, str] | None = None) -> MedClipModel:
    """Build the model ``config.json`` describes, after checking, without allocating anything, that it can be
    built and that its tensors are the ones in the weights file: the model is first built on the ``meta``
    device and compared with the file's header. A tampered ``config.json`` (an unknown architecture, a
    360 GB projection) is a one-line :class:`ModelFolderError`, not a traceback or an out-of-memory kill."""
    weights = directory / WEIGHTS_NAME
    found = _renamed(read_safetensors_header(weights), drop_prefixes, rename)
    try:
        with torch.device("meta"):
            skeleton = cls(spec, text_hf_config=text_hf_config)
    except Exception as exc:  # noqa: BLE001 - timm and transformers raise many kinds for a config they cannot build
        problem = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelFolderError(f"{directory / CONFIG_NAME}: describes a model that cannot be built "
                               f"({type(exc).__name__}: {problem})") from None
    check_weights_match(_shapes(skeleton), found, weights)
    saved = set(skeleton.state_dict())
    unsaved = sum(b.numel() * b.element_size() for name, b in skeleton.named_buffers() if name not in saved)
    if unsaved > MAX_UNSAVED_BUFFER_BYTES:
        raise ModelFolderError(f"{directory / CONFIG_NAME}: describes a model with {unsaved / 2**30:.1f} GiB of "
                               f"buffers that are not in {WEIGHTS_NAME}; refused")
    return cls(spec, text_hf_config=text_hf_config)


def _load_weights(model: nn.Module, path: Path, map_location, drop_prefixes: tuple[str, ...] = (),
                  rename: dict[str, str] | None = None) -> None:
    """Strictly load a safetensors file into ``model``; names and shapes are checked from the file's header
    before any tensor is read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_weights_match(_shapes(model), _renamed(read_safetensors_header(path), drop_prefixes, rename), path)
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelFolderError(f"{path}: cannot read weights ({exc})") from None
    state = _renamed(state, drop_prefixes, rename)
    own = model.state_dict()
    # same shape and bytes, another kind of number (an F32 tensor relabelled I32): copying would load garbage
    swapped = sorted(f"{k} (file {v.dtype}, model {own[k].dtype})" for k, v in state.items()
                     if k in own and v.dtype.is_floating_point != own[k].dtype.is_floating_point)
    if swapped:
        raise WeightsMismatchError(f"{path}: wrong dtype: {', '.join(swapped[:4])}{' …' if len(swapped) > 4 else ''}")
    model.load_state_dict(state, strict=True)


def _load_format1(cls, directory: Path, saved: dict, map_location) -> MedClipModel:
    """A model folder written before the model/objective split: inference weights only, renamed."""
    try:
        model_cfg = _build(ModelConfig, saved["model"], "model.")
        image = saved["image"]
        spec = ModelSpec.from_config(model_cfg, int(image.get("size", 224)), int(image.get("channels", 1)))
    except (KeyError, TypeError, ValueError, MedclipinError) as exc:
        raise ModelFolderError(f"{directory / CONFIG_NAME}: not a valid medclipin model config ({exc})") from None
    spec.image_encoder.pretrained = spec.text_encoder.pretrained = ""
    rename = {"contrastive.logit_scale": "logit_scale", "contrastive.logit_bias": "logit_bias"}
    model = _build_checked(cls, spec, saved.get("text_hf_config"), directory, _FORMAT1_TRAINING_PREFIXES, rename)
    _load_weights(model, directory / WEIGHTS_NAME, map_location, drop_prefixes=_FORMAT1_TRAINING_PREFIXES,
                  rename=rename)
    log.info("%s: a format-1 model folder (before medclipin 0.2); loaded its inference weights", directory)
    return model
