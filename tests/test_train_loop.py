"""The training run end to end on CPU: run folder, metrics, grad checkpointing, NaN safety, validation, compile,
unreadable training images, and the processor's tokenisation in training, validation and evaluation."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from medclipin.config import load_config
from medclipin.models.model import MedClipModel
from medclipin.train import checkpoint as ckpt
from medclipin.train.objective import TrainingObjective
from medclipin.train.trainer import NonFiniteLossError, pretrain
from test_train_support import tiny_config

TRAINING_PREFIXES = ("target.", "predictors.", "image_nc.", "text_nc.", "loss_weights.", "nclip.", "clipin.")


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
    # the exported model holds no training tensors, and carries its processor; the checkpoint holds the
    # objective's own state (EMA target, CLIPin heads, λ) beside its model/
    from safetensors import safe_open

    with safe_open(str(result.model_dir / "model.safetensors"), "pt") as handle:
        exported = set(handle.keys())
    assert exported == set(model.state_dict())
    assert not [k for k in exported if k.startswith(TRAINING_PREFIXES)]
    assert (result.model_dir / "processor.json").is_file() and (result.model_dir / "tokenizer.json").is_file()
    with safe_open(str(run / "checkpoints" / "step_00000006" / ckpt.OBJECTIVE_NAME), "pt") as handle:
        objective_keys = set(handle.keys())
    assert any(k.startswith("clipin.target.image_encoder.") for k in objective_keys)
    assert any(k.startswith("clipin.predictors.") for k in objective_keys)
    assert result.rejects_path is None and not (run / "rejects.csv").exists()


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
    model = MedClipModel.from_config(checkpointed.model, checkpointed.data.image.size,
                                     checkpointed.data.image.channels, vocab_size=200)
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
    """Make TrainingObjective.forward return a NaN loss on the given (1-based) call numbers."""
    original = TrainingObjective.forward
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        out = original(self, batch)
        if bad_calls(calls["n"]):
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(TrainingObjective, "forward", forward)


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
    cfg = tiny_config("train.steps=6", "train.validate_every=2", "train.checkpoint_every=2",
                      "train.keep_checkpoints=3", clipin=False)
    scores = iter([0.2, 0.7, 0.5])
    seen = []

    def validate(model, processor, step):
        from medclipin.data.processor import Processor

        assert isinstance(model, MedClipModel) and isinstance(processor, Processor)  # the inference model
        assert not model.training
        seen.append(step)
        return {"score": next(scores), "retrieval_i2t_R@10": 1.0}

    result = pretrain(cfg, tmp_path / "run", progress=False, validate_fn=validate)
    assert seen == [2, 4, 6]
    assert result.best["step"] == 4 and result.best["score"] == 0.7
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "best" / "processor.json").is_file()  # a complete model folder (medclipin.load)
    best_model = MedClipModel.from_pretrained(tmp_path / "run" / "best")
    step4 = MedClipModel.from_pretrained(tmp_path / "run" / "checkpoints" / "step_00000004" / "model")
    for name, tensor in step4.state_dict().items():  # RUN/best is the step-4 model, not the later, worse one
        assert torch.equal(best_model.state_dict()[name], tensor), name
    lines = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6]
    # the best record travels in the checkpoint, so a resumed run keeps comparing against it
    assert ckpt.load_training_state(tmp_path / "run" / "checkpoints" / "step_00000004")["best"]["score"] == 0.7
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
    run = tmp_path / "run"

    # a first attempt that died before its first checkpoint (here: its first validation failed)
    def crash(model, processor, step):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        pretrain(tiny_config("train.steps=2", "train.validate_every=1", "train.checkpoint_every=5", clipin=False),
                 run, progress=False, validate_fn=crash)
    assert not ckpt.list_checkpoints(run) and (run / "config.yaml").is_file()
    (run / "metrics.csv").write_text("step,loss\n1,9.0\n2,9.0\n3,9")  # and a torn log
    # auto with nothing to resume from starts at step 0 and redoes the attempt's files; validate_every and
    # checkpoint_every only change how the run is watched, so they may differ
    assert pretrain(cfg, run, resume="auto", progress=False).steps == 2
    assert [r["step"] for r in read_metrics(run)] == ["1", "2"]
    # an explicit checkpoint folder continues from it, here to a longer run: another run's math, so another folder
    longer = tiny_config("train.steps=3", clipin=False)
    start = ckpt.latest_checkpoint(run)
    result = pretrain(longer, tmp_path / "longer", resume=str(start), progress=False)
    assert result.steps == 3 and [r["step"] for r in read_metrics(tmp_path / "longer")] == ["3"]
    assert load_config(tmp_path / "longer" / "config.yaml").train.steps == 3
    with pytest.raises(ckpt.CheckpointError, match="not a complete checkpoint"):
        pretrain(cfg, tmp_path / "other", resume=str(tmp_path / "nowhere"), progress=False)


def test_the_final_model_is_written_before_the_final_validation(tmp_path):
    """A final validation that fails leaves the finished run usable: RUN/model and the last checkpoint exist."""
    cfg = tiny_config("train.steps=2", "train.checkpoint_every=5", clipin=False)

    def validate(model, processor, step):
        assert (tmp_path / "run" / "model" / "model.safetensors").is_file()
        assert ckpt.latest_checkpoint(tmp_path / "run").name == "step_00000002"
        raise RuntimeError("validation crashed")

    with pytest.raises(RuntimeError, match="validation crashed"):
        pretrain(cfg, tmp_path / "run", progress=False, validate_fn=validate)
    import medclipin

    model, processor = medclipin.load(tmp_path / "run")
    final = ckpt.latest_checkpoint(tmp_path / "run")
    for name, tensor in MedClipModel.from_pretrained(final / "model").state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def _manifest_with_unreadable_images(tmp_path, count: int):
    """The synthetic manifest with the first ``count`` training images replaced by files that cannot be decoded."""
    import dataclasses

    from medclipin.data.manifest import read_manifest, write_manifest

    manifest = read_manifest(tiny_config().data.manifest)
    records, broken = [], []
    for record in manifest.records:
        if record.split == "train" and len(broken) < count:
            bad = tmp_path / f"broken_{len(broken)}.dcm"
            bad.write_bytes(b"\x00 not an image \x00" * 20)
            broken.append(str(bad))
            record = dataclasses.replace(record, image_path=str(bad))
        records.append(record)
    path = write_manifest(tmp_path / "manifest.csv", records, manifest.label_names, relative_paths=False)
    return path, broken


def test_unreadable_training_images_are_listed_in_rejects_csv(tmp_path):
    path, broken = _manifest_with_unreadable_images(tmp_path, 1)
    cfg = tiny_config("train.steps=8", "data.max_bad_fraction=0.1", f"data.manifest={path}", clipin=False)
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result.steps == 8  # 8 batches of 8 from 31 records: every image is read at least once
    assert result.rejects_path == tmp_path / "run" / "rejects.csv"
    with result.rejects_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["image_path"] for r in rows] == broken and rows[0]["reason"]
    assert result.skipped_records.get("image unreadable") == 1
    assert int(read_metrics(tmp_path / "run")[-1]["rejected_images"]) == 1


def test_too_many_unreadable_training_images_stop_the_run(tmp_path):
    from medclipin.train.trainer import UnreadableImagesError

    path, broken = _manifest_with_unreadable_images(tmp_path, 3)
    cfg = tiny_config("train.steps=8", "data.max_bad_fraction=0.05", f"data.manifest={path}", clipin=False)
    with pytest.raises(UnreadableImagesError, match="max_bad_fraction=0.05"):
        pretrain(cfg, tmp_path / "run", progress=False)
    with (tmp_path / "run" / "rejects.csv").open(newline="") as handle:
        named = {r["image_path"] for r in csv.DictReader(handle)}
    assert named and named <= set(broken)


def test_training_validation_and_evaluation_tokenise_a_long_report_identically(tmp_path, monkeypatch):
    """``data.text.truncation_side: left`` holds for the training batches, for validation (the trainer's
    processor) and for the saved model (medclipin.load), before and after a validation pass; no
    collator or store changes it (the old bug: the collator set a shared tokenizer's truncation side)."""
    import medclipin
    from medclipin.eval.embeddings import EmbeddingStore
    from medclipin.train import trainer

    cfg = tiny_config("train.steps=4", "train.validate_every=2", "train.checkpoint_every=4",
                      "data.text.truncation_side=left", "data.text.max_length=12", clipin=False)
    long_report = " ".join(f"finding number {i} is stable." for i in range(40))
    seen_batches, seen_validation = [], []

    class RecordingCollator(trainer.TextImageCollator):
        def __call__(self, items):
            batch = super().__call__(items)
            seen_batches.append(([item["text"] for item in items], batch["input_ids"].clone(),
                                 self.processor.texts([long_report])["input_ids"].clone()))
            return batch

    monkeypatch.setattr(trainer, "TextImageCollator", RecordingCollator)

    def validate(model, processor, step):
        before = processor.texts([long_report])["input_ids"].clone()
        store = EmbeddingStore(model, processor)
        store.texts([long_report, "no pleural effusion."])  # the evaluation path, inside training
        seen_validation.append((step, before, processor.texts([long_report])["input_ids"].clone(),
                                processor.tokenizer.truncation_side))
        return {"score": float(step)}

    pretrain(cfg, tmp_path / "run", progress=False, validate_fn=validate)
    assert [s for s, *_ in seen_validation] == [2, 4] and len(seen_batches) == 4
    _, processor = medclipin.load(tmp_path / "run")
    assert processor.text_cfg.truncation_side == "left" and processor.tokenizer.truncation_side == "left"
    expected = processor.texts([long_report])["input_ids"]
    full = processor.tokenizer([long_report], truncation=False)["input_ids"][0]
    assert expected.shape[1] == 12 and expected[0].tolist()[-11:] == full[-11:]  # the end of the report kept
    for _, before, after, side in seen_validation:
        assert side == "left" and torch.equal(before, expected) and torch.equal(after, expected)
    for texts, input_ids, long_ids in seen_batches:  # steps 1-2 before the first validation, 3-4 after it
        assert torch.equal(long_ids, expected)
        assert torch.equal(input_ids, processor.texts(texts)["input_ids"])
    # the synthetic reports are longer than 12 tokens: the batches really were cut on the left
    right = processor.with_text(truncation_side="right")
    assert any(not torch.equal(ids, right.texts(texts)["input_ids"]) for texts, ids, _ in seen_batches)


def test_resume_after_a_checkpoint_with_validation_repeats_the_uninterrupted_losses(tmp_path):
    """Validation runs between steps and draws from torch's global RNG (its DataLoader seeds itself from it):
    a checkpoint must hold the RNG state *after* that step's validation, so that a run resumed from it
    continues exactly like the uninterrupted run (dropout on)."""
    from medclipin.data.manifest import read_manifest
    from medclipin.train.validation import build_validate_fn

    cfg = tiny_config("train.steps=4", "train.checkpoint_every=2", "train.validate_every=2",
                      "train.keep_checkpoints=3", "train.deterministic=true",
                      "model.text_encoder.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
                      "intermediate_size: 64, hidden_dropout_prob: 0.1, attention_probs_dropout_prob: 0.1}")
    validate = build_validate_fn(cfg, read_manifest(cfg.data.manifest).split("validate"))
    try:
        pretrain(cfg, tmp_path / "reference", progress=False, validate_fn=validate)
        # the same run killed after its step-2 checkpoint: copy it and drop what came later
        run = tmp_path / "resumed"
        shutil.copytree(tmp_path / "reference", run)
        shutil.rmtree(run / "checkpoints" / "step_00000004")
        shutil.rmtree(run / "model")
        result = pretrain(cfg, run, resume="auto", progress=False, validate_fn=validate)
    finally:
        torch.use_deterministic_algorithms(False)  # train.deterministic is process-wide: do not leak it
    assert result.steps == 4
    expected = {int(r["step"]): float(r["loss"]) for r in read_metrics(tmp_path / "reference")}
    got = {int(r["step"]): float(r["loss"]) for r in read_metrics(run)}
    assert sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-6), step
    lines = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]


def test_validation_does_not_change_the_training_run(tmp_path):
    """How often a run is validated only changes how it is watched (a resume may change train.validate_every):
    validation leaves every RNG stream as it found it, so the losses are those of a run never validated."""
    import random

    import numpy as np

    from medclipin.data.manifest import read_manifest
    from medclipin.train.validation import build_validate_fn

    dropout = ("model.text_encoder.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
               "intermediate_size: 64, hidden_dropout_prob: 0.1, attention_probs_dropout_prob: 0.1}")
    plain = tiny_config("train.steps=4", dropout)
    validated = tiny_config("train.steps=4", "train.validate_every=1", dropout)
    validate = build_validate_fn(validated, read_manifest(validated.data.manifest).split("validate"))

    def validate_and_draw(model, processor, step):  # a validation that draws from every global stream
        torch.rand(3), np.random.rand(3), random.random()
        return validate(model, processor, step)

    pretrain(plain, tmp_path / "plain", progress=False)
    pretrain(validated, tmp_path / "validated", progress=False, validate_fn=validate_and_draw)
    assert len((tmp_path / "validated" / "validation.jsonl").read_text().splitlines()) == 4
    expected = [r["loss"] for r in read_metrics(tmp_path / "plain")]
    assert [r["loss"] for r in read_metrics(tmp_path / "validated")] == expected


def test_a_resume_redoes_a_final_validation_that_failed(tmp_path):
    cfg = tiny_config("train.steps=2", "train.checkpoint_every=5", clipin=False)

    def crash(model, processor, step):
        raise RuntimeError("validation crashed")

    with pytest.raises(RuntimeError, match="validation crashed"):
        pretrain(cfg, tmp_path / "run", progress=False, validate_fn=crash)
    seen = []

    def validate(model, processor, step):
        seen.append(step)
        return {"score": 0.5}

    result = pretrain(cfg, tmp_path / "run", resume="auto", progress=False, validate_fn=validate)
    assert result.steps == 2 and seen == [2] and result.best == {"step": 2, "score": 0.5}
    assert [json.loads(line)["step"] for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()] == [2]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    # done once: a further resume has nothing left to do
    assert pretrain(cfg, tmp_path / "run", resume="auto", progress=False, validate_fn=validate).steps == 2
    assert seen == [2]


def test_gradient_monitor_logs_each_terms_pull_on_the_trunks(tmp_path):
    """train.grad_monitor_every: metrics.csv gets gnorm_<trunk>_<term> on monitored steps; with detach_pre the
    non-contrastive terms reach no trunk (the diagnostic of the CLIPin study), while the contrastive one does."""
    import csv

    from medclipin.train.trainer import pretrain
    from test_train_support import tiny_config

    def monitored(folder, *overrides):
        cfg = tiny_config("train.steps=4", "train.log_every=4", "train.grad_monitor_every=2", *overrides)
        pretrain(cfg, tmp_path / folder, progress=False)
        with (tmp_path / folder / "metrics.csv").open(newline="") as handle:
            return {int(r["step"]): r for r in csv.DictReader(handle)}

    rows = monitored("plain")
    assert set(rows) == {2, 4}  # a monitored step is logged even between log steps
    for step in (2, 4):
        for trunk in ("image", "text"):
            for term in ("clip", "inter", "intra"):
                assert float(rows[step][f"gnorm_{trunk}_{term}"]) > 0, (step, trunk, term)
    detached = monitored("detached", "model.clipin.detach_pre=true")
    for trunk in ("image", "text"):
        assert float(detached[2][f"gnorm_{trunk}_clip"]) > 0
        assert float(detached[2][f"gnorm_{trunk}_inter"]) == 0 and float(detached[2][f"gnorm_{trunk}_intra"]) == 0


class _Killed(BaseException):
    """Stands for a SIGKILL or Ctrl-C at one point of the run: nothing after it runs."""


def _kill_in_save(monkeypatch, name: str):
    real = MedClipModel.save_pretrained

    def save(self, directory, processor=None):
        if Path(directory).name == name:
            raise _Killed(name)
        return real(self, directory, processor=processor)

    monkeypatch.setattr(MedClipModel, "save_pretrained", save)


@pytest.mark.parametrize("where", ["final validation", "final model write", "final best save"])
def test_a_kill_after_the_final_checkpoint_is_completed_by_the_resume(tmp_path, monkeypatch, where):
    """B1-B3 (issue 25): a kill during the final validation, the final model write or the final RUN/best save
    used to leave a run that `--resume auto` called finished without its last metrics row, RUN/model or
    RUN/best. The resume completes each, once, with the uninterrupted run's numbers."""
    cfg = tiny_config("train.steps=2", "train.checkpoint_every=5", "train.log_every=5", clipin=False)

    def validate(model, processor, step):
        return {"score": 0.5, "retrieval_i2t_R@10": 0.25}

    validate.columns = ["score", "retrieval_i2t_R@10"]
    reference = pretrain(cfg, tmp_path / "reference", progress=False, validate_fn=validate)
    run = tmp_path / "run"

    def crash(model, processor, step):
        raise _Killed("validation")

    with monkeypatch.context() as patch:
        if where == "final model write":
            _kill_in_save(patch, "model")
        elif where == "final best save":
            _kill_in_save(patch, "best")
        with pytest.raises(_Killed):
            pretrain(cfg, run, progress=False, validate_fn=crash if where == "final validation" else validate)
    assert not (run / "metrics.csv").exists() or [r["step"] for r in read_metrics(run)] != ["2"]

    result = pretrain(cfg, run, resume="auto", progress=False, validate_fn=validate)
    assert result.steps == 2 and result.best == reference.best == {"step": 2, "score": 0.5, "retrieval_i2t_R@10": 0.25}
    for folder in ("model", "best"):
        saved = MedClipModel.from_pretrained(run / folder).state_dict()
        for name, tensor in MedClipModel.from_pretrained(tmp_path / "reference" / folder).state_dict().items():
            assert torch.equal(saved[name], tensor), (folder, name)
    rows, expected = read_metrics(run), read_metrics(tmp_path / "reference")
    assert [r["step"] for r in rows] == ["2"] and rows[0]["val_score"] == "0.5"
    for key in ("loss", "lr", "grad_norm", "val_retrieval_i2t_R@10"):
        assert rows[0][key] == expected[0][key], key
    assert [json.loads(line)["step"] for line in (run / "validation.jsonl").read_text().splitlines()] == [2]
    # done once: a further resume changes nothing
    again = pretrain(cfg, run, resume="auto", progress=False, validate_fn=validate)
    assert again.best == result.best and [r["step"] for r in read_metrics(run)] == ["2"]
