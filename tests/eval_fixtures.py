"""Session fixtures for the evaluation tests and notebooks: a small synthetic set and a tiny model
trained on it for a few steps (CPU, fp32, ~10 s). Registered in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_PROMPTS = REPO_ROOT / "datasets" / "synthetic" / "prompts.yaml"


def tiny_eval_config(manifest: Path):
    from medclipin.config import Config

    cfg = Config()
    cfg.data.manifest = str(manifest)
    cfg.data.image.size = 64
    cfg.data.text.vocab_size = 400
    cfg.data.text.max_length = 64
    cfg.model.image_encoder.name = "vit_tiny_patch16_224"
    cfg.model.image_encoder.kwargs = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    cfg.model.text_encoder.config = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                     "intermediate_size": 64}
    cfg.model.contrastive.embed_dim = 32
    cfg.model.clipin.enabled = True
    cfg.model.clipin.pre_dim = 32
    cfg.model.clipin.nc_dim = 64
    cfg.model.clipin.predictor_hidden = 32
    cfg.train.batch_size = 8
    cfg.train.steps = 30
    cfg.train.lr = 2e-3
    cfg.train.warmup_steps = 3
    cfg.train.precision = "fp32"
    cfg.train.device = "cpu"
    cfg.train.checkpoint_every = 1000
    cfg.train.log_every = 1000
    return cfg


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    """Path of the manifest of a 30-patient, 64-px synthetic set (DICOMs, reports, labels, boxes)."""
    from medclipin.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(tmp_path_factory.mktemp("eval_data"), n_patients=30, image_size=64)


@pytest.fixture(scope="session")
def eval_model(eval_data, tmp_path_factory) -> Path:
    """Folder of a tiny CLIP+CLIPin model (ViT depth 1, BERT 1 layer, dim 32) trained 30 steps on eval_data."""
    from medclipin.train.trainer import pretrain

    run_dir = tmp_path_factory.mktemp("eval_run")
    result = pretrain(tiny_eval_config(eval_data), run_dir, progress=False)
    return Path(result.model_dir)


@pytest.fixture(scope="session")
def eval_prompts() -> Path:
    if not SYNTHETIC_PROMPTS.is_file():
        pytest.skip("datasets/synthetic/prompts.yaml is not present yet")
    return SYNTHETIC_PROMPTS
