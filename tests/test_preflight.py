"""Checks before the first training step: a run that would fail late fails before it trains, in one line."""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medclipin.data.manifest import read_manifest
from medclipin.train import preflight
from medclipin.train.preflight import PreflightError, eval_prompts
from medclipin.train.trainer import pretrain
from medclipin.train.validation import build_validate_fn
from test_train_support import synthetic_manifest, tiny_config

REPO = Path(__file__).resolve().parents[1]


def _manifest_with_classes(tmp_path: Path, classes: list[str]) -> Path:
    """The synthetic manifest with its label columns replaced by ``classes`` (values copied from the first)."""
    source = synthetic_manifest()
    with source.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    old = [c for c in rows[0] if c.startswith("label:")]
    out = tmp_path / "own.csv"
    columns = [c for c in rows[0] if c not in old] + [f"label:{c}" for c in classes]
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            row["image_path"] = str((source.parent / row["image_path"]).resolve())
            new = {k: v for k, v in row.items() if k not in old}
            new.update({f"label:{c}": row[old[0]] for c in classes})
            writer.writerow(new)
    return out


def test_prompts_naming_classes_the_manifest_lacks_stop_the_cli_in_one_line_before_training(tmp_path):
    """Issue 25: prompts of other classes used to train for minutes and die at the first validation with a
    KeyError traceback. Through the command, with a shipped tiny config: one line, exit 2, in under 45 s,
    naming the missing classes and how to pass eval.prompts; the run folder gets nothing."""
    manifest = _manifest_with_classes(tmp_path, ["COVID-19"])
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "medclipin.cli", "pretrain", "--config", "tiny_clip_clipin", "--out", str(run),
         "--quiet", f"data.manifest={manifest}", "eval.prompts=synthetic", "data.image.size=64",
         "train.batch_size=8", "train.steps=12", "train.checkpoint_every=4", "train.validate_every=4"],
        capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: eval.prompts=synthetic: classes "), done.stderr
    for needed in ("Pleural Effusion", "COVID-19", "eval.prompts=FILE", str(manifest)):
        assert needed in lines[0], needed
    assert elapsed < 45, elapsed
    assert not run.exists() or not any(p.name != ".medclipin.lock" for p in run.iterdir())


def test_auto_prompts_pick_the_shipped_set_that_fits_else_validate_by_retrieval(tmp_path, caplog):
    synthetic = read_manifest(synthetic_manifest()).label_names
    assert eval_prompts("auto", synthetic).class_names == eval_prompts("synthetic", synthetic).class_names
    with caplog.at_level(logging.INFO, logger="medclipin.train.preflight"):
        assert eval_prompts("auto", ["COVID-19"], "own.csv") is None
    assert "validation by retrieval only" in caplog.text and "COVID-19" in caplog.text
    assert eval_prompts("", synthetic) is None
    with pytest.raises(PreflightError, match=r"classes Pleural Effusion.*eval.prompts=FILE"):
        eval_prompts("synthetic", ["COVID-19"], "own.csv")


def test_shipped_cpu_configs_on_your_own_classes_validate_by_retrieval(tmp_path):
    """The shipped CPU configs ask for eval.prompts=auto: on a manifest of other classes the run trains and
    validates by retrieval (no zero-shot column) instead of failing at its first validation."""
    from medclipin.config import load_config

    assert load_config("cpu_clip_clipin").eval.prompts == "auto"
    manifest = _manifest_with_classes(tmp_path, ["COVID-19"])
    cfg = tiny_config(f"data.manifest={manifest}", "eval.prompts=auto", "train.steps=2", clipin=False)
    validate = build_validate_fn(cfg, read_manifest(manifest).split("validate"))
    assert "zeroshot_mean_auc" not in validate.columns
    result = pretrain(cfg, tmp_path / "run", progress=False, validate_fn=validate)
    assert result.best["step"] == 2 and "zeroshot_mean_auc" not in result.best


def test_a_validate_split_with_no_usable_record_is_refused_before_training(tmp_path):
    source = read_manifest(synthetic_manifest())
    from medclipin.data.manifest import write_manifest

    records = source.records
    for record in records:
        if record.split == "validate":
            record.image_path = str(tmp_path / "gone.png")
    manifest = tmp_path / "m.csv"
    write_manifest(manifest, records)
    cfg = tiny_config(f"data.manifest={manifest}")
    with pytest.raises(PreflightError,
                       match="none of the .* records of the validate split can be used.*image file missing"):
        build_validate_fn(cfg, read_manifest(manifest).split("validate"))


def test_box_classes_without_prompts_are_named_before_training(caplog):
    from medclipin.data.manifest import Box, Record

    prompts = eval_prompts("synthetic", read_manifest(synthetic_manifest()).label_names)
    record = Record(record_id="r", patient_id="p", study_id="s", image_path="x.png", view="PA", split="test",
                    findings="", impression="", text="", boxes=[Box("Atelectasis", (0, 0, 1, 1))])
    with caplog.at_level(logging.WARNING, logger="medclipin.train.preflight"):
        assert preflight.check_box_classes([record], prompts, "m.csv") == ["Atelectasis"]
    assert "box labels Atelectasis are not classes of the prompt set synthetic" in caplog.text
    assert "Grad-CAM localisation skips those boxes" in caplog.text
    assert preflight.check_box_classes([record], None, "m.csv") == []


def test_a_run_without_room_for_a_checkpoint_stops_before_training(tmp_path, monkeypatch):
    import shutil as shutil_module

    real = shutil_module.disk_usage
    monkeypatch.setattr(preflight.shutil, "disk_usage",
                        lambda path: real(path)._replace(free=1000))
    with pytest.raises(PreflightError, match="GB free, but a checkpoint and the final model take about"):
        pretrain(tiny_config(), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "metrics.csv").exists()


def test_a_tokenizer_that_does_not_cover_the_reports_is_named(caplog):
    from medclipin.config import load_config
    from medclipin.data.processor import Processor
    from medclipin.data.tokenizer import train_wordpiece_tokenizer

    import tempfile

    from medclipin.data.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        train_wordpiece_tokenizer(["the heart is normal"] * 20, vocab_size=60, out_dir=folder)
        cfg = load_config(None)
        processor = Processor(cfg.data.image, cfg.data.text, load_tokenizer(folder))
    with caplog.at_level(logging.WARNING, logger="medclipin.train.preflight"):
        assert preflight.check_tokenizer_coverage(processor, ["the heart is normal"]) == 0.0
        assert not caplog.text
        assert preflight.check_tokenizer_coverage(processor, ["心脏大小正常 肺野清晰"]) > 0.5
    assert "does not cover this text" in caplog.text


def test_a_typo_in_the_tower_settings_is_one_line_and_writes_nothing(tmp_path):
    """W11 (issue 25): a typo in model.image_encoder.kwargs was a TypeError traceback."""
    from medclipin.train.trainer import RunSetupError

    cfg = tiny_config("model.image_encoder.kwargs={patch_size: 8, depht: 1, embed_dim: 32, num_heads: 2}")
    with pytest.raises(RunSetupError, match=r"unexpected keyword argument 'depht'.*model.image_encoder.kwargs"):
        pretrain(cfg, tmp_path / "run", progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".medclipin.lock"]


def test_a_prompt_template_with_other_fields_is_named(tmp_path):
    """W11 (issue 25): the template '{} {0} {name}' passed the check and failed when formatted."""
    from medclipin.eval.zeroshot import PromptFileError, load_prompts

    path = tmp_path / "p.yaml"
    path.write_text("templates: ['{} {0} {name}']\nclasses: {A: {positive: [a], negative: [b]}}\n")
    with pytest.raises(PromptFileError, match=r"template '\{\} \{0\} \{name\}' must hold '\{\}' and no other"):
        load_prompts(path)
