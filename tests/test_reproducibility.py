"""Same configuration, same seed, same model: two runs on a CPU are bit-identical, tokenizer included."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from medclipin.config import config_to_dict
from medclipin.models.model import MedClipModel
from test_train_support import synthetic_manifest, tiny_model_config

REPO = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = {"samples_per_s"}


def _rows(run: Path) -> list[dict]:
    with (run / "metrics.csv").open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(handle)]


def test_two_runs_with_the_same_seed_are_bit_identical(tmp_path):
    # the run trains its own tokenizer (no data.text.tokenizer); CLIPin with dropout in both towers and the
    # target draws from every RNG stream; each run is its own process, as two users' runs would be
    cfg = tiny_model_config(
        f"data.manifest={synthetic_manifest()}", "train.steps=6", "train.log_every=1", "train.seed=3",
        "model.text_encoder.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
        "intermediate_size: 64, hidden_dropout_prob: 0.1, attention_probs_dropout_prob: 0.1}",
        "model.image_encoder.kwargs={patch_size: 8, depth: 1, embed_dim: 32, num_heads: 2, drop_rate: 0.1}")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
           "PYTHONHASHSEED": "random"}
    runs = [tmp_path / "first", tmp_path / "second"]
    for run in runs:
        done = subprocess.run([sys.executable, "-m", "medclipin", "pretrain", "--config", str(config), "--out", str(run),
                               "--quiet", "--no-validate"], cwd=REPO, env=env, capture_output=True, timeout=600)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
    first, second = runs
    assert (first / "tokenizer" / "tokenizer.json").read_bytes() == (second / "tokenizer" / "tokenizer.json").read_bytes()
    rows = _rows(first)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert rows == _rows(second)  # every loss term, monitor, lr and gradient norm, as written (repr of the float)
    a = MedClipModel.from_pretrained(first / "model").state_dict()
    b = MedClipModel.from_pretrained(second / "model").state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (first / "model" / "model.safetensors").read_bytes() == (second / "model" / "model.safetensors").read_bytes()
