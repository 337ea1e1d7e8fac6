"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

Every value has one home here. ``load_config("configs/x.yaml", ["train.batch_size=128"])`` returns a
:class:`Config`; an unknown key is an error that names it and suggests the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medclipin.errors import MedclipinError
from medclipin.safe_parse import load_yaml


class ConfigError(MedclipinError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


# --------------------------------------------------------------------------------------------- data
@dataclass
class AugmentConfig:
    """Training-time augmentation strengths (albumentations). Evaluation is always deterministic."""

    enabled: bool = True
    rotate_limit: float = 7.0  # degrees; chest X-rays are never flipped vertically
    scale_min: float = 0.8  # random resized crop area range
    scale_max: float = 1.0
    translate: float = 0.04
    brightness_contrast: float = 0.15
    gamma: tuple[float, float] = (85.0, 115.0)
    horizontal_flip: float = 0.0  # cxr: 0 (laterality matters); fundus configs set 0.5
    vertical_flip: float = 0.0
    color_jitter: float = 0.0  # fundus only


@dataclass
class ImageConfig:
    """How an image becomes a tensor."""

    domain: str = "cxr"  # "cxr" (aspect-preserving resize + pad) or "fundus" (field-of-view crop + pad)
    size: int = 224
    channels: int = 1
    window: str = "first"  # DICOM VOI: "first" window/VOI LUT, "percentile", or "none"
    # input normalisation (x - mean) / std, one value or one per channel; empty = what the image tower's
    # pretrained weights were trained with (timm's pretrained config; 0.5 / 0.25 for random init)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    # images larger than this many pixels are refused from their header, before decoding (a decompression
    # bomb: a 390 KB PNG can declare 20000 x 20000); 0 = no limit
    max_pixels: int = 100_000_000
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TextConfig:
    """Which report text is used and how it is tokenised."""

    # a weights spec (models/weights.py: package:<name>, a local folder, a hub id); empty = the pretrained
    # text tower's own tokenizer, or (towers built from config) a WordPiece tokenizer trained on the train split
    tokenizer: str = ""
    vocab_size: int = 8000  # for the trained WordPiece tokenizer
    # the trained tokenizer learns a token only from a piece seen this many times in the train reports: names,
    # record numbers and other identifiers that occur in a few reports stay out of the vocabulary, which is
    # saved with the model (docs/reliability.md, "Security")
    min_frequency: int = 5
    sections: tuple[str, ...] = ("findings", "impression")
    max_length: int = 128
    # which end is cut when a text exceeds max_length: "right" keeps the start (findings first),
    # "left" keeps the end (the impression, when sections = findings, impression)
    truncation_side: str = "right"
    # CLIPin's second text view. Default t2 = t1, as the reference code (its second caption is commented out):
    # the target branch sees the same report. Sentence shuffle / drop make t2 an augmented view instead.
    view_shuffle: bool = False
    view_drop_prob: float = 0.0


@dataclass
class DataConfig:
    """Where records come from."""

    manifest: str = ""
    cache: str = ""  # decode-once cache folder (medclipin preprocess); empty = decode the originals
    num_workers: int = 0
    # unreadable training images are skipped and listed in RUN/rejects.csv; above this share the run stops
    max_bad_fraction: float = 0.01
    image: ImageConfig = field(default_factory=ImageConfig)
    text: TextConfig = field(default_factory=TextConfig)


# -------------------------------------------------------------------------------------------- model
@dataclass
class ImageEncoderConfig:
    """An image tower: ``family`` picks the library (models/towers.py registry), ``name`` the architecture.

    ``timm``: ``name`` is any timm architecture, ``pretrained`` a weights spec. ``open_clip`` / ``hf_clip``
    (the image half of a whole CLIP, set by ``model.base``): ``kwargs`` holds the library's own architecture
    config, so a saved model rebuilds without a download.
    """

    family: str = "timm"
    name: str = "vit_tiny_patch16_224"
    # weights spec (models/weights.py): "" = random init; package:<pip name> (offline weight package);
    # a local file or folder; "hub" = timm's pretrained tag of `name` (downloads once)
    pretrained: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm create_model kwargs (depth, embed_dim, ...)
    grad_checkpointing: bool = False
    freeze: bool = False
    # freeze the stem and the first N stages/blocks (timm's group_matcher order): pretrained low-level
    # features kept, and backward skips the high-resolution layers, which cost most on a CNN
    freeze_layers: int = 0
    # true: passes that train the tower (gradients on) run in fp32 inside a bf16 run, forward-only passes
    # (EMA target, evaluation) keep bf16. Depthwise-conv CNNs back-propagate faster in fp32 on CPUs (measured)
    train_fp32: bool = False


@dataclass
class TextEncoderConfig:
    """A text tower: ``family`` picks the library (models/towers.py registry).

    ``hf``: a Hugging Face BERT-family model, built from ``config`` offline or loaded from ``pretrained``.
    ``open_clip`` / ``hf_clip`` (the text half of a whole CLIP, set by ``model.base``): ``config`` holds the
    library's own architecture config.
    """

    family: str = "hf"
    # weights spec (models/weights.py): package:<pip name>, a local from_pretrained folder, or a hub id;
    # empty = build from `config` (random init)
    pretrained: str = ""
    config: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
    })
    # "mean" or "cls". Mean by default: a randomly initialised BERT gives nearly the same [CLS] vector for
    # every report, and CLIP trained from there collapses to a constant embedding (loss stuck at ln B).
    # [CLS] suits pretrained towers (the full-size BioClinicalBERT configs set it).
    pooling: str = "mean"
    grad_checkpointing: bool = False
    freeze: bool = False
    # freeze the embeddings and the first N layers (pretrained towers: cheaper backward, less forgetting)
    freeze_layers: int = 0
    trust_remote_code: bool = False


@dataclass
class ContrastiveConfig:
    """The base objective CLIPin sits on: ``clip`` (InfoNCE) or ``siglip`` (pairwise sigmoid)."""

    kind: str = "clip"
    embed_dim: int = 512
    init_temperature: float = 0.07  # clip: logit_scale = ln(1/T); siglip uses init_logit_scale/bias
    max_logit_scale: float = 4.605170185988092  # ln 100
    siglip_init_logit_scale: float = 2.302585092994046  # ln 10
    siglip_init_logit_bias: float = -10.0


@dataclass
class ClipinConfig:
    """The CLIPin non-contrastive plug-in (method.md). Dimensions default to the ViT-B setting."""

    enabled: bool = False
    pre_dim: int = 1024
    nc_dim: int = 8192
    predictor_hidden: int = 2048
    momentum: float = 0.95
    momentum_schedule: str = "fixed"  # "fixed" or "cosine" (m → 1 over training)
    use_inter: bool = True
    use_intra: bool = True
    use_contrastive: bool = True
    learnable_lambda: bool = True
    lambda_intra: float = 1.0
    lambda_clip: float = 1.0
    lambda_max: float = 20.0
    sync_batchnorm: bool = False
    # diagnostic: the non-contrastive terms get a detached copy of the shared pre-projector's output, so
    # they train their own heads but send no gradient into the pre-projector and the towers
    detach_pre: bool = False
    # Dropout / drop-path in the EMA target's encoders. true: the target runs in train mode like the online
    # branch, so it draws the towers' own dropout masks (the reference code's target runs in train mode too,
    # but its towers have no dropout at all). false: a deterministic target, as DINO-style EMA teachers have.
    target_dropout: bool = True


@dataclass
class XclipConfig:
    """xCLIP = CLIP + nCLIP (prototype distributions). Defaults are this toolkit's choices (method.md)."""

    enabled: bool = False
    num_prototypes: int = 4096
    head_hidden: int = 2048
    head_dim: int = 256
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    entropy_weight: float = 1.0
    nclip_weight: float = 1.0


@dataclass
class ModelConfig:
    # A whole pretrained CLIP to start from (models/bases.py): "open_clip:<arch>" (weights in base_weights),
    # "open_clip:local-dir:<folder>", "hf:<folder>" (a transformers CLIPModel folder); a medclipin model is
    # continued with train.init_from instead. It replaces both towers (their freeze settings still apply), their
    # projections, the temperature and the processor's image and text settings; empty = towers from
    # image_encoder / text_encoder.
    base: str = ""
    base_weights: str = ""  # open_clip:<arch>: an OpenAI TorchScript archive, epoch_N.pt, .safetensors; "random"
    # true: the base's towers with new projections and temperature (the reference code's choice)
    base_fresh_heads: bool = False
    image_encoder: ImageEncoderConfig = field(default_factory=ImageEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    clipin: ClipinConfig = field(default_factory=ClipinConfig)
    xclip: XclipConfig = field(default_factory=XclipConfig)


# -------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig:
    seed: int = 0
    batch_size: int = 32  # the global contrastive batch, split across processes under DDP
    steps: int = 1000  # optimiser steps
    # micro-batches summed per optimiser step: grows the optimisation batch, not the contrastive one
    # (each micro-batch's loss only sees its own negatives; docs/scaling.md)
    grad_accum: int = 1
    lr: float = 5e-4  # heads, temperature, CLIPin/xCLIP parts; and the towers unless set below
    # learning rates of pretrained towers (0 = train.lr): they need far smaller steps than fresh heads
    image_encoder_lr: float = 0.0
    text_encoder_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 = no clipping (the reference code does not clip)
    # "auto" (bf16 where the hardware runs it fast: CUDA, or a CPU with AVX512-BF16/AMX; else fp32),
    # "fp32", "bf16" (autocast) or "fp16" (autocast + GradScaler; GPU only)
    precision: str = "auto"
    compile: bool = False
    device: str = "auto"  # "auto", "cpu", "cuda"
    threads: int = 0  # torch intra-op threads on CPU; 0 = torch default
    # CPU runs: glibc's malloc keeps freed blocks instead of unmapping every block above 32 MB, so large
    # activations are not page-faulted in again at every step (train/cpu_runtime.py); the process keeps its peak heap
    retain_freed_memory: bool = True
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    validate_every: int = 0  # 0 = only at the end
    max_nonfinite_steps: int = 5
    deterministic: bool = False
    # start from a trained medclipin model (a model, run or checkpoint folder; same architecture), e.g. to
    # fine-tune the demo model on your own data; "" = the towers' pretrained weights
    init_from: str = ""
    # every N steps log each loss term's gradient norm on the image and text trunks (tower + pre-projector):
    # gnorm_<trunk>_<term> in metrics.csv; one extra backward per term on those steps (0 = off)
    grad_monitor_every: int = 0
    # weight decay on CLIPin's learnable λ too (the reference code decays every tensor but norms, biases and
    # the logit scale); default false: decaying a loss weight toward 0 silently reweights the objective
    decay_loss_weights: bool = False


@dataclass
class EvalConfig:
    # prompt YAML (or a shipped set's name) for zero-shot validation; its classes must be label:<class> columns of
    # the manifest. "auto": the shipped set that fits the manifest's classes, else validation by retrieval only
    prompts: str = ""
    batch_size: int = 64
    gradcam_examples: int = 8
    bootstrap: int = 1000


@dataclass
class Config:
    """The whole run: data → model → training → evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------------------------- loading
def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, with an error naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return _build(annotation, value, key + ".")
    if annotation is Any:
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = load_yaml(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and len(args) == 2 and args[1] is Ellipsis:
            value = [value]  # a scalar where a variable-length tuple is expected: one value (e.g. image.mean: 0.5)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, key) for v in value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    try:
        if annotation is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "1", "yes", "on"):
                    return True
                if lowered in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if annotation is float:
            return float(value)
        if annotation is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config key '{key}' expects {annotation.__name__}, got {value!r}") from exc
    return value


def _unknown_key_error(key: str, valid: list[str], prefix: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key '{prefix}{key}'{hint}")


def _build(cls, values: dict, prefix: str = ""):
    types = _field_types(cls)
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in types:
            raise _unknown_key_error(key, list(types), prefix)
        kwargs[key] = _coerce(value, types[key], prefix + key)
    return cls(**kwargs)


def config_to_dict(config) -> dict:
    """A plain, YAML-serialisable dict (tuples become lists)."""

    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value

    return convert(config)


def config_from_dict(values: dict) -> Config:
    return _build(Config, values)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists) to a nested dict."""
    values = dict(values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        # validate the path against the dataclass tree so typos get a suggestion
        cls, node, prefix = Config, values, ""
        for i, part in enumerate(parts):
            types = _field_types(cls) if cls is not None else None
            if types is not None and part not in types:
                raise _unknown_key_error(part, list(types), prefix)
            last = i == len(parts) - 1
            if last:
                try:
                    node[part] = load_yaml(raw) if raw.strip() != "" else ""
                except yaml.YAMLError as exc:
                    raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None
            else:
                child = node.get(part)
                node[part] = dict(child) if isinstance(child, dict) else {}
                node = node[part]
                annotation = types[part] if types is not None else None
                cls = annotation if annotation is not None and dataclasses.is_dataclass(annotation) else None
            prefix += part + "."
    return values


PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str | os.PathLike) -> Path:
    """A config file: the path as given when it exists, else a config shipped with medclipin by name
    (``demo``, ``demo.yaml`` or ``configs/demo.yaml`` all find ``medclipin/configs/demo.yaml``)."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.name if given.suffix in (".yaml", ".yml") else f"{given.name}.yaml"
    packaged = PACKAGE_CONFIGS / name
    if packaged.is_file() and (len(given.parts) == 1 or given.parent.name == "configs"):
        return packaged
    shipped = ", ".join(sorted(p.stem for p in PACKAGE_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {path} (configs shipped with medclipin: {shipped})")


def list_configs() -> list[Path]:
    """The configs shipped inside the package (``medclipin/configs/*.yaml``)."""
    return sorted(PACKAGE_CONFIGS.glob("*.yaml"))


def _read_yaml_mapping(path: Path) -> dict:
    try:
        with path.open(encoding="utf-8") as handle:
            values = load_yaml(handle) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML for a config ({_yaml_problem(exc)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return values


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + str(getattr(exc, "problem", None) or exc).splitlines()[0]


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "kwargs" and key != "config":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_values(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """The values of a config file with its ``inherit:`` chain applied (a parent file, relative to this one
    or shipped by name; this file's values override the parent's, mapping by mapping)."""
    path = resolve_config_path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'inherit' loops back to itself")
    values = _read_yaml_mapping(path)
    parent = values.pop("inherit", None)
    if parent:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: 'inherit' must be a config file name")
        parent_path = path.parent / parent if (path.parent / parent).is_file() else Path(parent)
        values = _merge(read_config_values(parent_path, (*_seen, path.resolve())), values)
    return values


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply dotted overrides.

    ``path`` is a file, or the name of a config shipped with medclipin (``"demo"``, ``"cpu_clip_clipin"``;
    see ``medclipin/configs/``). A config may start from another with ``inherit: <file>``.

    Example:
        >>> cfg = load_config("cpu_clip_clipin", ["train.batch_size=16"])
    """
    values: dict = {}
    if path is not None:
        values = read_config_values(path)
    try:
        values = apply_overrides(values, overrides or [])
        return config_from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def save_config(config: Config, path: str | os.PathLike) -> None:
    """Write the resolved configuration as YAML (replaced in one rename: never half a file)."""
    from medclipin.atomic import atomic_open

    with atomic_open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)
