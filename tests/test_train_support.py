"""Helpers shared by the training-engine tests (this module holds no tests).

A tiny CLIP(+CLIPin) model — ViT depth 1 / width 32 on 32-px images, a 1-layer BERT of width 32 without
dropout — and a 30-patient synthetic dataset generated once per test session.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from medclipin.config import Config, load_config

TINY_OVERRIDES = [
    "data.image.size=32",
    "data.image.channels=1",
    "data.text.max_length=32",
    "data.text.vocab_size=200",
    "model.image_encoder.name=vit_tiny_patch16_224",
    "model.image_encoder.kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.text_encoder.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
    "intermediate_size: 64, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}",
    "model.contrastive.embed_dim=16",
    "model.clipin.pre_dim=32",
    "model.clipin.nc_dim=32",
    "model.clipin.predictor_hidden=32",
    "train.batch_size=8",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.lr=1e-3",
    "train.precision=fp32",
    "train.device=cpu",
    "train.threads=1",
    "train.log_every=1",
    "train.checkpoint_every=2",
]

_CACHE: dict[str, Path] = {}


def synthetic_manifest() -> Path:
    """The manifest of a 30-patient, 64-px synthetic set (31 train / 4 validate / 9 test records), made once."""
    if "manifest" not in _CACHE:
        from medclipin.data.synthetic import generate_synthetic_dataset

        root = Path(tempfile.mkdtemp(prefix="medclipin-train-tests-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _CACHE["manifest"] = generate_synthetic_dataset(root / "synthetic", n_patients=30, image_size=64)
    return _CACHE["manifest"]


def shared_tokenizer() -> str:
    """A WordPiece tokenizer folder trained once on the synthetic train reports (stable ids across runs)."""
    if "tokenizer" not in _CACHE:
        from medclipin.data.manifest import read_manifest
        from medclipin.data.reports import record_text
        from medclipin.data.tokenizer import train_wordpiece_tokenizer

        folder = synthetic_manifest().parent.parent / "tokenizer"
        texts = [record_text(r) for r in read_manifest(synthetic_manifest()).split("train")]
        train_wordpiece_tokenizer(texts, vocab_size=200, out_dir=folder)
        _CACHE["tokenizer"] = folder
    return str(_CACHE["tokenizer"])


def tiny_config(*overrides: str, clipin: bool = True) -> Config:
    """The tiny configuration on the synthetic manifest, with extra dotted overrides applied last."""
    return tiny_model_config(f"data.manifest={synthetic_manifest()}", f"data.text.tokenizer={shared_tokenizer()}",
                             *overrides, clipin=clipin)


def tiny_model_config(*overrides: str, clipin: bool = True) -> Config:
    """The tiny configuration without data (for model-level tests; vocabulary size 200)."""
    return load_config(None, [*TINY_OVERRIDES, f"model.clipin.enabled={str(clipin).lower()}", *overrides])
