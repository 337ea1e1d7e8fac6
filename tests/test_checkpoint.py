"""Checkpoints that survive anything: atomic writes, keep-K, incomplete folders ignored, exact resume after SIGKILL."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from medclipin.config import config_to_dict
from medclipin.models.model import WEIGHTS_NAME, MedClipModel
from medclipin.train import checkpoint as ckpt
from medclipin.train.objective import TrainingObjective
from medclipin.train.trainer import pretrain
from test_train_support import shared_tokenizer, tiny_config, tiny_model_config

REPO = Path(__file__).resolve().parents[1]


def build_objective(cfg, seed: int = 0) -> TrainingObjective:
    torch.manual_seed(seed)
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels, vocab_size=200)
    return TrainingObjective(model, cfg.model)


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny CLIP+CLIPin training objective (its ``model`` is what a checkpoint's ``model/`` holds)."""
    return build_objective(tiny_model_config())


@pytest.fixture(scope="module")
def tiny_processor():
    from medclipin.data.processor import Processor
    from medclipin.data.tokenizer import load_tokenizer

    cfg = tiny_model_config()
    return Processor(cfg.data.image, cfg.data.text, load_tokenizer(shared_tokenizer()))


def fake_state():
    return {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {"last_epoch": 3}, "scaler": {},
            "rng": ckpt.rng_state(), "micro_step": 7}


def test_checkpoint_holds_weights_with_the_ema_target_and_training_state(tmp_path, tiny_model, tiny_processor):
    import medclipin
    from safetensors import safe_open

    path = ckpt.save_checkpoint(tmp_path, 4, tiny_model, tiny_processor, fake_state())
    assert path.name == "step_00000004" and ckpt.is_valid_checkpoint(path)
    with safe_open(str(path / "model" / WEIGHTS_NAME), "pt") as handle:
        model_keys = set(handle.keys())
    with safe_open(str(path / ckpt.OBJECTIVE_NAME), "pt") as handle:
        objective_keys = set(handle.keys())
    # model/ is an inference model folder: the model's tensors only, no training state
    assert model_keys == set(tiny_model.model.state_dict())
    assert not [k for k in model_keys if k.startswith(("target.", "predictors.", "image_nc.", "text_nc.", "clipin."))]
    # the EMA target (parameters and BatchNorm statistics), heads and λ are in objective.safetensors
    assert objective_keys == set(tiny_model.training_state_dict())
    assert {k for k in tiny_model.state_dict() if k.startswith("clipin.target.")} <= objective_keys
    assert any(k.startswith("clipin.target.image_encoder.") for k in objective_keys)
    assert any(k.startswith("clipin.target.text_nc.") and "running_mean" in k for k in objective_keys)
    assert {"clipin.loss_weights.lambda_intra", "clipin.loss_weights.lambda_clip"} <= objective_keys
    state = ckpt.load_training_state(path)
    assert state["step"] == 4 and state["micro_step"] == 7 and state["scheduler"] == {"last_epoch": 3}
    # weights load back strictly, target included
    copy = build_objective(tiny_model_config(), seed=1)
    assert not torch.equal(copy.model.image_proj.weight, tiny_model.model.image_proj.weight)
    ckpt.load_checkpoint_weights(copy, path)
    assert copy.state_dict().keys() == tiny_model.state_dict().keys()
    for (name, a), b in zip(tiny_model.state_dict().items(), copy.state_dict().values()):
        assert torch.equal(a, b), name
    # the checkpoint's model/ is a complete model folder (with its processor): it loads for evaluation
    model, processor = medclipin.load(path)
    for name, tensor in tiny_model.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert processor.to_dict() == tiny_processor.to_dict()


def test_the_ema_targets_copies_of_frozen_layers_are_not_stored_and_come_back_from_the_model(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = tiny_model_config("model.text_encoder.freeze_layers=1", "model.image_encoder.freeze_layers=1",
                            "model.image_encoder.kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}")
    objective = build_objective(cfg)
    frozen = objective.frozen_target_parameters()
    assert any(".text_encoder.model.embeddings." in k for k in frozen)
    assert any(".image_encoder.model.blocks.0." in k for k in frozen)
    assert not any(".blocks.1." in k or "_nc." in k for k in frozen)  # trainable layers keep their EMA copy
    own = objective.training_state_dict()
    assert not set(own) & set(frozen) and any(k.startswith("clipin.target.image_encoder.model.blocks.1.") for k in own)
    # training moves the trainable target weights; the frozen copies stay equal to the model's
    optimizer = torch.optim.SGD([p for p in objective.parameters() if p.requires_grad], lr=0.5)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 1, 32, 32, generator=g), "image_2": torch.randn(4, 1, 32, 32, generator=g),
             "input_ids": torch.randint(5, 200, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    before = {k: v.clone() for k, v in objective.state_dict().items()}
    for step in range(2):
        objective(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        objective.after_optimizer_step(step + 1, 2)
    state = objective.state_dict()
    assert not torch.equal(state["clipin.target.image_encoder.model.blocks.1.attn.qkv.weight"],
                           before["clipin.target.image_encoder.model.blocks.1.attn.qkv.weight"])
    for name in frozen:
        assert torch.equal(state[name], state["model." + name.removeprefix("clipin.target.")]), name
    # the checkpoint leaves them out and a fresh objective gets every tensor back exactly
    path = ckpt.save_checkpoint(tmp_path, 2, objective, None, fake_state())
    with safe_open(str(path / ckpt.OBJECTIVE_NAME), "pt") as handle:
        assert set(handle.keys()) == set(own)
    resumed = build_objective(cfg, seed=1)
    ckpt.load_checkpoint_weights(resumed, path)
    for name, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    # a checkpoint written when they were still stored resumes too
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("model.")}, str(path / ckpt.OBJECTIVE_NAME))
    older = build_objective(cfg, seed=2)
    ckpt.load_checkpoint_weights(older, path)
    for name, tensor in older.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_a_checkpoint_of_another_objective_or_format_is_refused(tmp_path, tiny_model):
    import json

    path = ckpt.save_checkpoint(tmp_path, 2, tiny_model, None, fake_state())
    # another objective (no CLIPin) cannot take this checkpoint's weights
    other = build_objective(tiny_model_config(clipin=False))
    with pytest.raises(ckpt.CheckpointError, match="does not match"):
        ckpt.load_checkpoint_weights(other, path)
    # a checkpoint written before the model/objective split (format 1) cannot be resumed
    config = json.loads((path / "model" / "config.json").read_text())
    (path / "model" / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    with pytest.raises(ckpt.CheckpointError, match="format 1"):
        ckpt.load_checkpoint_weights(build_objective(tiny_model_config()), path)
    (path / "model" / "config.json").write_text(json.dumps(config))
    (path / ckpt.OBJECTIVE_NAME).unlink()
    with pytest.raises(ckpt.CheckpointError, match="format 1"):
        ckpt.load_checkpoint_weights(build_objective(tiny_model_config()), path)


def test_rng_states_round_trip(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save(ckpt.rng_state(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    ckpt.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_keep_last_k(tmp_path, tiny_model):
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, step, tiny_model, None, fake_state(), keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000006", "step_00000008"]


def test_half_written_checkpoints_are_ignored(tmp_path, tiny_model):
    ckpt.save_checkpoint(tmp_path, 2, tiny_model, None, fake_state())
    folder = tmp_path / "checkpoints"
    # a save killed while staging: a temporary folder with a newer step
    staging = folder / ".step_00000006.tmpab12cd"
    (staging / "model").mkdir(parents=True)
    (staging / "model" / WEIGHTS_NAME).write_bytes(b"partial")
    # a step folder missing a file (e.g. copied by hand, or a filesystem without atomic rename)
    broken = folder / "step_00000004"
    (broken / "model").mkdir(parents=True)
    (broken / ckpt.STATE_NAME).write_bytes(b"")
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    # a save never removes another save's staging folder (it could belong to a live run) ...
    ckpt.save_checkpoint(tmp_path, 8, tiny_model, None, fake_state(), keep=5)
    assert staging.exists() and ckpt.latest_checkpoint(tmp_path).name == "step_00000008"
    # ... the next run does, once it holds the folder's lock
    from medclipin.train.run_folder import claim

    claim(tmp_path, tiny_model_config(), resume="auto").release()
    assert not staging.exists() and ckpt.latest_checkpoint(tmp_path).name == "step_00000008"
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None


def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    ckpt.save_checkpoint(tmp_path, 2, tiny_model, None, fake_state())

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 4, tiny_model, None, fake_state())
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000002"
    assert not list((tmp_path / "checkpoints").glob(".step_*"))


def test_weights_load_only_through_safetensors_or_weights_only():
    """Grep-able guarantee: no pickle loading of weights, no trust_remote_code the user did not ask for."""
    offenders = []
    for path in sorted((REPO / "medclipin").rglob("*.py")):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in match.group(1):
                offenders.append(f"{path.relative_to(REPO)}: {match.group(0)}")
        if re.search(r"trust_remote_code\s*=\s*True", text):
            offenders.append(f"{path.relative_to(REPO)}: trust_remote_code=True")
    assert not offenders, offenders


# ------------------------------------------------------------------ data position on resume
class IndexDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.epoch = n, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return {"index": index, "epoch": self.epoch}


def _collate(items):
    return {"index": tuple(item["index"] for item in items), "epoch": items[0]["epoch"]}


def _stream(consumed):
    from torch.utils.data import DistributedSampler

    from medclipin.train.trainer import BatchStream

    dataset = IndexDataset(10)  # batches of 3: 3 per epoch, the 10th sample dropped
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=5, drop_last=True)
    return BatchStream(dataset, sampler, 3, _collate, num_workers=0, pin_memory=False, seed=5, consumed=consumed)


def test_batch_stream_resumes_at_the_exact_batch_across_epochs():
    full = _stream(0)
    reference = [full() for _ in range(8)]
    assert [b["epoch"] for b in reference] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert reference[0]["index"] != reference[3]["index"]  # reshuffled every epoch (set_epoch)
    for consumed in (1, 3, 4, 6):
        resumed = _stream(consumed)
        assert [resumed() for _ in range(8 - consumed)] == reference[consumed:], consumed
        assert resumed.consumed == 8


def test_batch_stream_never_draws_from_the_global_rng():
    # dropout draws from torch's global RNG, which checkpoints restore: opening a loader must not move it
    torch.manual_seed(0)
    before = torch.get_rng_state()
    stream = _stream(2)
    for _ in range(5):
        stream()
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------ kill -9 and resume
def _losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)), "every step logged once, in order"
    return {int(r["step"]): float(r["loss"]) for r in rows}


def _last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.csv").read_text().splitlines()
    except FileNotFoundError:
        return 0
    last = lines[-1].split(",")[0] if len(lines) > 1 else ""
    return int(last) if last.isdigit() else 0


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_auto_repeats_the_uninterrupted_losses(tmp_path):
    steps = 16
    # CLIPin (two views, EMA target) with dropout on: resuming must restore the RNG streams exactly
    cfg = tiny_config(f"train.steps={steps}", "train.checkpoint_every=2", "train.keep_checkpoints=2",
                      "train.log_every=1", "train.deterministic=true",
                      "model.text_encoder.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                      "intermediate_size: 64, hidden_dropout_prob: 0.1, attention_probs_dropout_prob: 0.1}")
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    try:
        reference = pretrain(cfg, tmp_path / "reference", progress=False)
    finally:
        torch.use_deterministic_algorithms(False)  # train.deterministic is process-wide: do not leak it
    assert reference.steps == steps

    run = tmp_path / "killed"
    command = [sys.executable, "-m", "medclipin", "pretrain", "--config", str(config_path), "--out", str(run),
               "--quiet", "--no-validate"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while _last_logged_step(run) < 5 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    killed_at = _last_logged_step(run)
    assert 5 <= killed_at < steps, "the run must be killed mid-training"
    assert not (run / "model").exists()

    resumed = subprocess.run([*command, "--resume", "auto"], cwd=REPO, env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert b"resumed from step_" in resumed.stderr

    expected, got = _losses(tmp_path / "reference"), _losses(run)
    assert sorted(got) == list(range(1, steps + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), f"step {step} (killed at {killed_at})"
    final = MedClipModel.from_pretrained(run / "model").state_dict()
    for name, tensor in MedClipModel.from_pretrained(reference.model_dir).state_dict().items():
        assert torch.allclose(tensor, final[name], atol=1e-6), name
