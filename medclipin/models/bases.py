"""A whole pretrained CLIP as a medclipin model: open_clip and Hugging Face CLIPs, named by one spec string.

=====================================  ===================================================================
``open_clip:<arch>`` + weights         an open_clip architecture (``ViT-B-16-quickgelu``, CheXzero's
                                       ``ViT-B-32-quickgelu``, ...) and a weights file: OpenAI's TorchScript
                                       archive, an open_clip ``epoch_N.pt``, a CheXzero ``.pt``, a
                                       ``.safetensors``; ``random`` = no weights (tests, from scratch)
``open_clip:local-dir:<folder>``       open_clip's own folder convention: ``open_clip_config.json`` + weights
                                       (BiomedCLIP's layout)
``hf:<folder>``                        a transformers ``CLIPModel`` folder (``config.json`` + weights)
=====================================  ===================================================================

The result is an ordinary :class:`~medclipin.models.model.MedClipModel` whose towers are the base library's
own modules (the ``open_clip`` / ``hf_clip`` tower families) and whose projections and temperature are the
base's, plus a :class:`~medclipin.data.processor.Processor` with the base's preprocessing (size, mean/std,
3 channels) and tokenizer. It embeds exactly as the base library does. With a CLIPin pre-projector
(``pre_dim``) the projection ``W`` is split as ``W Mᵀ · M`` (:func:`pre_projector_start`: ``M`` has orthonormal
rows spanning ``W``'s rows, random where ``pre_dim`` allows): the pre-projector starts as ``M`` and the projection
as ``W Mᵀ``, so the model at step 0 still embeds as the base does (the reference code instead drops CLIP's
projections: ``fresh_heads``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medclipin.config import ImageConfig, ImageEncoderConfig, TextConfig, TextEncoderConfig
from medclipin.errors import MedclipinError

log = logging.getLogger(__name__)

PREFIXES = ("open_clip:", "hf:")
LOCAL_DIR = "local-dir:"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class BaseError(MedclipinError, ValueError):
    """A base CLIP cannot be loaded as asked; the message names the spec or file and what is wrong."""


def is_base_spec(spec) -> bool:
    """True for ``open_clip:...`` and ``hf:...`` (anything else is a medclipin folder)."""
    return isinstance(spec, str) and spec.startswith(PREFIXES)


@dataclass(frozen=True)
class BaseSpec:
    library: str  # "open_clip" or "hf"
    name: str  # an open_clip architecture, or a folder
    local_dir: bool = False
    weights: str = ""

    def __str__(self) -> str:
        if self.library == "hf":
            return f"hf:{self.name}"
        return f"open_clip:{LOCAL_DIR}{self.name}" if self.local_dir else f"open_clip:{self.name}"


def parse_base(spec: str, weights: str = "") -> BaseSpec:
    """Check a base spec's grammar and that what it names exists (no model is built)."""
    if not is_base_spec(spec):
        raise BaseError(f"{spec!r}: not a base spec (expected open_clip:<arch>, open_clip:local-dir:<folder> or "
                        "hf:<folder>)")
    library, _, rest = spec.partition(":")
    if not rest:
        raise BaseError(f"{spec!r}: nothing after '{library}:'")
    if library == "hf":
        if weights:
            raise BaseError(f"{spec}: an hf: folder holds its own weights; do not pass weights")
        return BaseSpec("hf", os.path.expanduser(rest))
    if rest.startswith(LOCAL_DIR):
        folder = os.path.expanduser(rest[len(LOCAL_DIR):])
        if weights:
            raise BaseError(f"{spec}: a local-dir folder holds its own weights; do not pass weights")
        if not (Path(folder) / "open_clip_config.json").is_file():
            raise BaseError(f"{spec}: {folder} has no open_clip_config.json (open_clip's local-dir layout)")
        return BaseSpec("open_clip", folder, local_dir=True)
    if not weights:
        raise BaseError(f"{spec}: name a weights file for the architecture (--weights FILE / model.base_weights; "
                        "'random' for random initialisation)")
    if weights != "random" and not Path(weights).expanduser().is_file():
        raise BaseError(f"{spec}: weights file not found: {weights}")
    return BaseSpec("open_clip", rest, weights=weights if weights == "random" else os.path.expanduser(weights))


# what a training config may set on a base's towers (how they train, not what they are)
TRAINING_SETTINGS = ("freeze", "freeze_layers", "grad_checkpointing", "train_fp32")


def load_base(spec: str, weights: str = "", *, pre_dim: int = 0, kind: str | None = None, fresh_heads: bool = False,
              siglip_init_logit_bias: float = -10.0, max_logit_scale: float = math.log(100), seed: int = 0,
              image_training=None, text_training=None):
    """``(MedClipModel, Processor)`` of a base CLIP (see the module docstring for the specs).

    Args:
        pre_dim: width of a CLIPin shared pre-projector to insert (0: none); at least the rank of the base's
            projection (at most the joint width) for the model to start exactly at the base.
        kind: ``clip`` or ``siglip`` objective (default: the base's own; a CLIP base gets a SigLIP bias of
            ``siglip_init_logit_bias``).
        fresh_heads: new (random) projections, pre-projectors and temperature instead of the base's.
        seed: seeds the pre-projector's random directions.
        image_training, text_training: tower configs whose ``freeze`` / ``freeze_layers`` /
            ``grad_checkpointing`` / ``train_fp32`` apply to the base's towers (a training config's towers).
    """
    base = parse_base(spec, weights)
    try:
        parts = _open_clip_parts(base) if base.library == "open_clip" else _hf_parts(base)
    except MedclipinError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise BaseError(f"{base}: cannot load ({type(exc).__name__}: {first})") from None
    for tower_cfg, training in ((parts.image_cfg, image_training), (parts.text_cfg, text_training)):
        for name in TRAINING_SETTINGS if training is not None else ():
            if hasattr(training, name) and hasattr(tower_cfg, name):
                setattr(tower_cfg, name, getattr(training, name))
    return _assemble(parts, pre_dim=pre_dim, kind=kind, fresh_heads=fresh_heads,
                     siglip_init_logit_bias=siglip_init_logit_bias, max_logit_scale=max_logit_scale, seed=seed)


@dataclass
class _Parts:
    """What a base library's model is made of, in medclipin terms."""

    spec: str
    image_cfg: ImageEncoderConfig
    text_cfg: TextEncoderConfig
    embed_dim: int
    image_size: int
    mean: tuple
    std: tuple
    tokenizer: object
    context_length: int
    image_state: dict  # tower state dicts, named as the medclipin towers name them
    text_state: dict
    image_projection: tuple | None  # (weight (embed, width), bias or None); None: the head is inside the tower
    text_projection: tuple | None
    logit_scale: float
    logit_bias: float | None
    text_hf_config: dict | None = None


# ------------------------------------------------------------------------------------ open_clip
def read_open_clip_weights(path: str) -> dict[str, torch.Tensor]:
    """A CLIP state dict from any file open_clip users have: OpenAI's TorchScript archive, a training
    checkpoint (``{"state_dict": {"module.…"}}``), a plain state dict or ``.safetensors``. Pickled files are
    read with ``weights_only`` (tensors only, no code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())
        if scripted:  # OpenAI's release format: a TorchScript archive
            state = torch.jit.load(path, map_location="cpu").state_dict()
            return {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a file it cannot unpickle safely
        raise BaseError(f"{path}: not a weights file torch can read safely ({type(exc).__name__})") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise BaseError(f"{path}: holds no state dict")
    if next(iter(checkpoint)).startswith("module."):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def _load_into_open_clip(model, path: str) -> None:
    """open_clip's own ``load_checkpoint`` steps (format conversion, position-embedding resizing), strictly."""
    from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict, resize_pos_embed, \
        resize_text_pos_embed

    state = convert_state_dict(model, read_open_clip_weights(path))
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        if key in state and getattr(model, key, None) is not None:
            state[key] = state[key].reshape(getattr(model, key).shape)
    if "logit_bias" in state and getattr(model, "logit_bias", None) is None:
        state.pop("logit_bias")
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    expected, found = set(model.state_dict()), set(state)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise BaseError(f"{path}: weights do not fit the architecture (missing {missing[:3]}, unexpected "
                        f"{unexpected[:3]}): is it the right open_clip:<arch>?")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc)[:200])
        raise BaseError(f"{path}: weights do not fit the architecture ({detail}): is it the right open_clip:<arch>?") \
            from None


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _open_clip_parts(base: BaseSpec) -> _Parts:
    from medclipin.models.open_clip_towers import _open_clip, take_projection

    open_clip = _open_clip()
    if base.local_dir:
        values = json.loads((Path(base.name) / "open_clip_config.json").read_text(encoding="utf-8"))
        model_cfg = values.get("model_cfg")
        if not isinstance(model_cfg, dict):
            raise BaseError(f"{base}: open_clip_config.json has no model_cfg")
        # the folder holds every weight: no base text weights are fetched for an HF text tower
        model = open_clip.create_model(f"{LOCAL_DIR}{base.name}", device="cpu", pretrained_text=False)
        if open_clip.factory._find_checkpoint_in_dir(Path(base.name)) is None:
            raise BaseError(f"{base}: no weights file in {base.name} (open_clip_model.safetensors, "
                            "open_clip_pytorch_model.bin, ...)")
    else:
        model_cfg = open_clip.get_model_config(base.name)
        if model_cfg is None:
            import difflib

            close = difflib.get_close_matches(base.name, open_clip.list_models(), n=3, cutoff=0.6)
            raise BaseError(f"open_clip:{base.name} is not an open_clip architecture"
                            + (f"; did you mean {', '.join(close)}?" if close else " (open_clip.list_models())"))
        with _quiet_root_logger():  # open_clip warns that no weights were loaded: they are loaded next
            model = open_clip.create_model(base.name, pretrained=None, device="cpu")
        if base.weights != "random":
            _load_into_open_clip(model, base.weights)
    model = model.float().eval()
    if type(model).__name__ not in ("CLIP", "CustomTextCLIP"):
        raise BaseError(f"{base}: a {type(model).__name__} model is not supported (CLIP-style dual encoders only)")
    model_cfg = json.loads(json.dumps(model_cfg))  # a plain JSON copy to store in config.json
    text_cfg = model_cfg["text_cfg"]
    preprocess = getattr(model.visual, "preprocess_cfg", None) or {}
    size = model_cfg["vision_cfg"].get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    if text_cfg.get("hf_tokenizer_name"):
        from medclipin.data.tokenizer import load_tokenizer

        # as open_clip does: a local-dir folder's own tokenizer files first, else hf_tokenizer_name
        own = base.local_dir and any((Path(base.name) / f).is_file() for f in ("tokenizer.json", "vocab.txt"))
        tokenizer = load_tokenizer(base.name if own else text_cfg["hf_tokenizer_name"])
    elif text_cfg.get("hf_model_name") or text_cfg.get("vocab_size", 49408) != 49408:
        raise BaseError(f"{base}: its tokenizer is not CLIP's BPE and it names no hf_tokenizer_name")
    else:
        from medclipin.data.clip_tokenizer import clip_bpe_tokenizer

        tokenizer = clip_bpe_tokenizer(int(text_cfg.get("context_length", 77)))
    state = model.state_dict()
    custom_text = hasattr(model, "text")
    image_projection, text_projection = take_projection(model, "image"), take_projection(model, "text")
    text_hf_config = model.text.config.to_dict() if custom_text and hasattr(model.text, "config") else None
    label = base.name if not base.local_dir else Path(base.name).name
    return _Parts(
        spec=str(base),
        image_cfg=ImageEncoderConfig(family="open_clip", name=label, kwargs={"model_cfg": model_cfg}),
        text_cfg=TextEncoderConfig(family="open_clip", config={"model_cfg": model_cfg}, pooling="eot"),
        embed_dim=int(model_cfg["embed_dim"]), image_size=size,
        mean=tuple(preprocess.get("mean", OPENAI_MEAN)), std=tuple(preprocess.get("std", OPENAI_STD)),
        tokenizer=tokenizer, context_length=int(text_cfg.get("context_length", 77)),
        image_state={k: v for k, v in state.items() if k.startswith("visual.")},
        text_state=({k: v for k, v in state.items() if k.startswith("text.")} if custom_text else
                    {f"text.{k}": v for k, v in state.items()
                     if k.split(".")[0] in ("token_embedding", "positional_embedding", "transformer", "ln_final",
                                            "text_projection")}),
        image_projection=image_projection, text_projection=text_projection,
        logit_scale=float(model.logit_scale.detach().reshape(-1)[0]),
        logit_bias=None if getattr(model, "logit_bias", None) is None else float(model.logit_bias.reshape(-1)[0]),
        text_hf_config=text_hf_config,
    )


# ------------------------------------------------------------------------------------------- hf
def _hf_parts(base: BaseSpec) -> _Parts:
    from transformers import AutoConfig, CLIPModel

    folder = Path(base.name)
    if folder.exists() and not (folder / "config.json").is_file():
        raise BaseError(f"{base}: {folder} has no config.json (a transformers save_pretrained folder)")
    config = AutoConfig.from_pretrained(base.name)
    if config.model_type != "clip":
        raise BaseError(f"{base}: a {config.model_type!r} model, not a CLIPModel (model_type 'clip')")
    from medclipin.models.encoders import _quiet_transformers

    with _quiet_transformers():
        model = CLIPModel.from_pretrained(base.name, attn_implementation="sdpa").float().eval()
    vision, text = config.vision_config, config.text_config
    mean, std, size = OPENAI_MEAN, OPENAI_STD, int(vision.image_size)
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        values = json.loads(preprocessor.read_text(encoding="utf-8"))
        mean, std = tuple(values.get("image_mean", mean)), tuple(values.get("image_std", std))
    tokenizer = _hf_tokenizer(folder, int(text.vocab_size), base)
    state = model.state_dict()
    return _Parts(
        spec=str(base),
        image_cfg=ImageEncoderConfig(family="hf_clip", name="CLIPVisionModel", kwargs={"vision_config": vision.to_dict()}),
        text_cfg=TextEncoderConfig(family="hf_clip", config={"text_config": text.to_dict()}, pooling="eot"),
        embed_dim=int(config.projection_dim), image_size=size, mean=mean, std=std, tokenizer=tokenizer,
        context_length=int(text.max_position_embeddings),
        image_state={k: v for k, v in state.items() if k.startswith("vision_model.")},
        text_state={k: v for k, v in state.items() if k.startswith("text_model.")},
        image_projection=(model.visual_projection.weight.detach().clone(), None),
        text_projection=(model.text_projection.weight.detach().clone(), None),
        logit_scale=float(model.logit_scale.detach()), logit_bias=None,
    )


def _hf_tokenizer(folder: Path, vocab_size: int, base: BaseSpec):
    if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        from medclipin.data.tokenizer import load_tokenizer

        return load_tokenizer(str(folder))
    if vocab_size == 49408:
        from medclipin.data.clip_tokenizer import clip_bpe_tokenizer

        log.info("%s: no tokenizer files; using CLIP's BPE (the 49,408-token vocabulary it was built for)", base)
        return clip_bpe_tokenizer()
    raise BaseError(f"{base}: no tokenizer files in the folder, and its vocabulary ({vocab_size}) is not CLIP's BPE")


# ------------------------------------------------------------------------------------- assembly
def pre_projector_start(weight: torch.Tensor, pre_dim: int, seed: int) -> torch.Tensor:
    """A ``pre_dim × width`` matrix ``M`` with orthonormal rows whose span holds every row of ``weight``, so
    that ``(weight Mᵀ) M = weight``: the pre-projector starts as ``M``, the projection as ``weight Mᵀ``.

    ``pre_dim >= width``: a random isometry (``MᵀM = I``). Narrower: the row space of ``weight`` (its rank is
    at most the joint width) completed with random directions. Float64; ``None`` if ``pre_dim`` is below
    that rank."""
    generator = torch.Generator().manual_seed(seed)
    width = weight.shape[1]
    if pre_dim >= width:
        q, r = torch.linalg.qr(torch.randn(pre_dim, width, generator=generator, dtype=torch.float64))
        return q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    _, singular, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = int((singular > singular.max() * 1e-10).sum())
    if pre_dim < rank:
        return None
    extra = torch.randn(pre_dim - rank, width, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.cat([vh[:rank], extra]).T)  # the first columns span the row space, in order
    return q.T


def _fill_projection(pre: nn.Module, proj: nn.Linear, projection, width: int, pre_dim: int, seed: int,
                     where: str) -> None:
    """Set ``proj ∘ pre`` to the base's projection (or the identity where the head stays in the tower)."""
    weight, bias = projection if projection is not None else (torch.eye(width), None)
    weight = weight.double()
    with torch.no_grad():
        if pre_dim:
            start = pre_projector_start(weight, pre_dim, seed)
            if start is None:
                raise BaseError(f"model.clipin.pre_dim={pre_dim} is below the rank of the base's {where} projection: "
                                "the model could not start exactly at the base; use a wider pre_dim or "
                                "model.base_fresh_heads: true")
            pre.weight.copy_(start)
            proj.weight.copy_(weight @ start.T)
            if pre.bias is not None:
                pre.bias.zero_()
        else:
            proj.weight.copy_(weight)
        if proj.bias is not None:
            proj.bias.copy_(bias if bias is not None else torch.zeros(proj.out_features))


# the base library's names of the linear projections the towers hand over to the model
_PROJECTION_KEYS = {"visual.proj", "visual.head.proj.weight", "visual.head.proj.bias", "text.text_projection",
                    "text.text_projection.weight", "text.text_projection.bias", "text.proj.weight", "text.proj.bias"}


def _assemble(parts: _Parts, *, pre_dim: int, kind: str | None, fresh_heads: bool, siglip_init_logit_bias: float,
              max_logit_scale: float, seed: int):
    from medclipin.data.processor import Processor
    from medclipin.models.model import MedClipModel, ModelSpec

    kind = (kind or ("siglip" if parts.logit_bias is not None else "clip")).strip().lower()
    logit_bias = parts.logit_bias if parts.logit_bias is not None else siglip_init_logit_bias
    image_bias = parts.image_projection is not None and parts.image_projection[1] is not None
    text_bias = parts.text_projection is not None and parts.text_projection[1] is not None
    spec = ModelSpec(image_encoder=parts.image_cfg, text_encoder=parts.text_cfg, kind=kind, embed_dim=parts.embed_dim,
                     pre_dim=pre_dim, image_size=parts.image_size, in_chans=3,
                     init_logit_scale=min(parts.logit_scale, max_logit_scale), init_logit_bias=logit_bias,
                     max_logit_scale=max_logit_scale, image_proj_bias=image_bias, text_proj_bias=text_bias)
    model = MedClipModel(spec, text_hf_config=parts.text_hf_config)
    for tower, state, name in ((model.image_encoder, parts.image_state, "image"),
                               (model.text_encoder, parts.text_state, "text")):
        missing, unexpected = tower.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("attn_mask")]
        unexpected = [k for k in unexpected if k not in _PROJECTION_KEYS]  # taken out into the model's projections
        if missing or unexpected:
            raise BaseError(f"{parts.spec}: the {name} tower's weights do not map onto the {name} tower "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if not fresh_heads:
        for modality, projection in (("image", parts.image_projection), ("text", parts.text_projection)):
            width = getattr(model, f"{modality}_encoder").out_dim
            _fill_projection(getattr(model, f"{modality}_pre"), getattr(model, f"{modality}_proj"), projection, width,
                             pre_dim, seed + (0 if modality == "image" else 1), modality)
    model.float().eval()
    processor = Processor(ImageConfig(size=parts.image_size, channels=3, mean=parts.mean, std=parts.std),
                          TextConfig(max_length=parts.context_length), parts.tokenizer)
    return model, processor
