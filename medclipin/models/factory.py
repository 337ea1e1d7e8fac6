"""``create_model`` and ``list_models``: one call from a name to ``(model, processor)``, as open_clip's
``create_model_and_transforms`` / ``list_models``.

A name is a shipped config (``demo``, ``cpu_clip_clipin``, ...: the untrained model it describes, towers with
their offline pretrained weights), a YAML config file, a medclipin model/run/checkpoint folder, or a base CLIP
spec (``open_clip:ARCH`` with ``weights``, ``open_clip:local-dir:DIR``, ``hf:DIR``).
"""

from __future__ import annotations

import os
from pathlib import Path

from medclipin.errors import MedclipinError


def list_models() -> list[str]:
    """Names :func:`create_model` takes without a path: the shipped configs, then ``open_clip:<arch>`` for every
    open_clip architecture (when open_clip is installed; each needs a weights file)."""
    from medclipin.config import list_configs

    names = [path.stem for path in list_configs()]
    try:
        import open_clip
    except ImportError:
        return names
    return names + [f"open_clip:{arch}" for arch in open_clip.list_models()]


def create_model(name: str | os.PathLike, weights: str = "", device: str = "cpu", overrides: list[str] | None = None):
    """``(model, processor)`` for ``name`` (see the module docstring); the model is in eval mode, fp32.

    Args:
        weights: the weights file of an ``open_clip:ARCH`` spec.
        overrides: dotted ``key=value`` overrides of a config (``["model.clipin.enabled=false"]``).
    """
    from medclipin.api import load
    from medclipin.models.bases import is_base_spec

    text = os.fspath(name)
    if is_base_spec(text) or Path(text).is_dir():
        return load(text, device=device, weights=weights)
    return _from_config(text, overrides or [], device)


def _from_config(name: str, overrides: list[str], device: str):
    from medclipin.config import load_config
    from medclipin.data.processor import Processor
    from medclipin.data.tokenizer import load_tokenizer
    from medclipin.models.model import MedClipModel
    from medclipin.models.weights import resolve_normalization
    from medclipin.train.trainer import apply_base_settings, load_configured_base

    cfg = load_config(name, overrides)
    if cfg.model.base:
        apply_base_settings(cfg)
        model, processor = load_configured_base(cfg)
        return model.to(device).eval(), processor
    tokenizer_spec = cfg.data.text.tokenizer or cfg.model.text_encoder.pretrained
    if not tokenizer_spec:
        raise MedclipinError(f"config {name!r} trains its own tokenizer on a manifest's reports: pretrain it "
                             "(medclipin pretrain), or name one with data.text.tokenizer=...")
    resolve_normalization(cfg)
    tokenizer = load_tokenizer(tokenizer_spec)
    processor = Processor(cfg.data.image, cfg.data.text, tokenizer)
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels,
                                     vocab_size=len(tokenizer))
    return model.to(device).eval(), processor
