"""The training run end to end on CPU: run folder, metrics, grad checkpointing, NaN safety, validation, compile."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch

from medclipin.config import load_config
from medclipin.models.model import MedClipModel
from medclipin.train import checkpoint as ckpt
from medclipin.train.trainer import NonFiniteLossError, pretrain
from test_train_support import tiny_config


def read_metrics(run_dir) -> list[dict]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_run_folder_metrics_checkpoints_and_model(tmp_path):
    cfg = tiny_config("train.keep_checkpoints=2")
    result = pretrain(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    assert result.steps == 6 and result.skipped_nonfinite == 0 and result.samples_per_s > 0
    assert result.model_dir == run / "model"
    # resolved config saved and loadable
    assert load_config(run / "config.yaml") == cfg
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    assert {"step", "loss", "lr", "grad_norm", "samples_per_s", "clip", "loss_inter", "loss_intra",
            "std_image"} <= set(rows[0])
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    # warmup 2 then cosine: lr of step 1 is half the peak, 0 at the end
    assert float(rows[0]["lr"]) == pytest.approx(1e-3) and float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-12)
    # the newest 2 checkpoints, complete
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000004", "step_00000006"]
    assert all(ckpt.is_valid_checkpoint(p) for p in ckpt.list_checkpoints(run))
    # the final model loads without the trainer and equals the last checkpoint's weights
    model = MedClipModel.from_pretrained(result.model_dir)
    again = MedClipModel.from_pretrained(run / "checkpoints" / "step_00000006" / "model")
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert not list(run.glob("**/.*tmp*"))  # no staging folders left behind


def test_a_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    cfg = tiny_config("train.steps=2", clipin=False)
    pretrain(cfg, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="--resume auto"):
        pretrain(cfg, tmp_path / "run", progress=False)


def test_gradient_checkpointing_gives_the_same_losses(tmp_path):
    base = tiny_config("train.steps=2", clipin=False)
    pretrain(base, tmp_path / "plain", progress=False)
    checkpointed = tiny_config("train.steps=2", "model.image_encoder.grad_checkpointing=true",
                               "model.text_encoder.grad_checkpointing=true", clipin=False)
    model = MedClipModel(checkpointed.model, checkpointed.data.image, checkpointed.data.text, vocab_size=200)
    assert model.image_encoder.model.grad_checkpointing
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.text_encoder.model.modules())
    pretrain(checkpointed, tmp_path / "ckpt", progress=False)
    plain = [float(r["loss"]) for r in read_metrics(tmp_path / "plain")]
    recomputed = [float(r["loss"]) for r in read_metrics(tmp_path / "ckpt")]
    assert recomputed == pytest.approx(plain, abs=1e-5)


def test_gradient_accumulation_runs_and_counts_samples(tmp_path):
    cfg = tiny_config("train.steps=2", "train.grad_accum=2", "train.batch_size=4", clipin=False)
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.steps == 2
    state = ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path / "run"))
    assert state["micro_step"] == 4  # 2 micro-batches per optimiser step


def _poison_forward(monkeypatch, bad_calls):
    """Make MedClipModel.forward return a NaN loss on the given (1-based) call numbers."""
    original = MedClipModel.forward
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        out = original(self, batch)
        if bad_calls(calls["n"]):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MedClipModel, "forward", forward)


def test_repeated_nan_stops_the_run_without_a_bad_checkpoint(tmp_path, monkeypatch):
    _poison_forward(monkeypatch, lambda n: n >= 6)  # steps 1..5 are good
    cfg = tiny_config("train.steps=10", "train.max_nonfinite_steps=3", clipin=False)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses at step 8.*those of step 5"):
        pretrain(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    # step 6's update was skipped, so its checkpoint holds step 5's weights; at step 8 the run stops instead
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not (run / "model").exists()
    rows = read_metrics(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [int(r["skipped_nonfinite"]) for r in rows] == [0, 0, 0, 0, 0, 1, 2, 3]
    # the last checkpoint holds finite weights
    model = MedClipModel.from_pretrained(ckpt.latest_checkpoint(run) / "model")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())


def test_an_isolated_nan_is_skipped_and_counted(tmp_path, monkeypatch):
    _poison_forward(monkeypatch, lambda n: n == 3)
    cfg = tiny_config("train.steps=4", clipin=False)
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.steps == 4 and result.skipped_nonfinite == 1
    rows = read_metrics(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["skipped_nonfinite"]) for r in rows] == [0, 0, 1, 1]


def test_validation_keeps_the_best_model(tmp_path):
    cfg = tiny_config("train.steps=4", "train.validate_every=2", "train.checkpoint_every=4", clipin=False)
    scores = iter([0.2, 0.7, 0.5])
    seen = []

    def validate(model, tokenizer, step):
        assert not model.training
        seen.append(step)
        return {"score": next(scores), "retrieval_i2t_R@10": 1.0}

    result = pretrain(cfg, tmp_path / "run", progress=False, validate_fn=validate)
    assert seen == [2, 4]
    assert result.best["step"] == 4 and result.best["score"] == 0.7
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    lines = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    # the best record travels in the checkpoint, so a resumed run keeps comparing against it
    assert ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path / "run"))["best"]["score"] == 0.7


@pytest.mark.slow
def test_validate_fn_from_the_manifest_scores_retrieval_and_zero_shot(tmp_path):
    from pathlib import Path

    from medclipin.data.manifest import read_manifest
    from medclipin.train.validation import build_validate_fn

    prompts = Path(__file__).resolve().parents[1] / "datasets" / "synthetic" / "prompts.yaml"
    cfg = tiny_config("train.steps=2", f"eval.prompts={prompts}", clipin=False)
    records = read_manifest(cfg.data.manifest).split("validate")
    validate = build_validate_fn(cfg, records)
    result = pretrain(cfg, tmp_path / "run", progress=False, validate_fn=validate)
    assert set(result.best) >= {"step", "score", "retrieval_i2t_R@10", "retrieval_t2i_R@1"}
    if "zeroshot_mean_auc" in result.best:
        assert result.best["score"] == result.best["zeroshot_mean_auc"]
    assert 0.0 <= result.best["score"] <= 1.0
    assert build_validate_fn(cfg, []) is None


@pytest.mark.slow
def test_torch_compile_runs_a_step(tmp_path, monkeypatch):
    # inductor needs a C++ toolchain and minutes of CPU; the wiring (compile after DDP, save the
    # unwrapped model) is what is tested, with the eager backend
    original = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **kw: original(module, backend="eager", **kw))
    cfg = tiny_config("train.steps=2", "train.compile=true", clipin=False)
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.steps == 2
    keys = MedClipModel.from_pretrained(result.model_dir).state_dict().keys()
    assert not any("_orig_mod" in key for key in keys)


def test_resume_choices(tmp_path):
    cfg = tiny_config("train.steps=2", clipin=False)
    # auto with nothing to resume from starts at step 0 (and clears a stale log of a killed first attempt)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("step,loss\n1,9.0\n2,9.0\n3,9")
    assert pretrain(cfg, tmp_path / "run", resume="auto", progress=False).steps == 2
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == ["1", "2"]
    # an explicit checkpoint folder continues from it, here to a longer run
    longer = tiny_config("train.steps=3", clipin=False)
    start = ckpt.latest_checkpoint(tmp_path / "run")
    result = pretrain(longer, tmp_path / "run", resume=str(start), progress=False)
    assert result.steps == 3 and [r["step"] for r in read_metrics(tmp_path / "run")] == ["1", "2", "3"]
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        pretrain(cfg, tmp_path / "other", resume=str(tmp_path / "nowhere"), progress=False)
