"""A run folder is never lost: a new run never overwrites a folder, one run at a time holds it, a resume keeps
the run's configuration, and a run that cannot start writes nothing."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medclipin.cli import main
from medclipin.config import Config, config_to_dict, load_config
from medclipin.train import checkpoint as ckpt
from medclipin.train.run_folder import (LOCK_NAME, RESUME_MAY_CHANGE, ResumeConfigError, RunFolderInUseError,
                                        RunLock, changed_math)
from medclipin.train.trainer import pretrain
from test_train_support import synthetic_manifest, tiny_config, tiny_model_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}


def config_file(folder: Path, cfg: Config, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(config_to_dict(cfg)))
    return path


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def pretrain_cli(config: Path, out: Path, *extra: str) -> int:
    return main(["pretrain", "--config", str(config), "--out", str(out), "--quiet", "--no-validate", *extra])


# ------------------------------------------------------------------------ 1. no deletion of user files
def users_folder(folder: Path) -> Path:
    """A folder holding what a user made: another model, their metrics and configuration, a tokenizer."""
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.safetensors").write_bytes(b"the user's weights")
    (folder / "model" / "config.json").write_text('{"theirs": true}')
    (folder / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (folder / "validation.jsonl").write_text('{"step": 1, "score": 0.9}\n')
    (folder / "config.yaml").write_text("# the user's own notes\nlr: 0.1\n")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    return folder


def test_a_new_run_refuses_a_folder_that_is_not_empty_and_touches_nothing(tmp_path, capsys):
    config = config_file(tmp_path, tiny_config("train.steps=2", clipin=False))
    folder = users_folder(tmp_path / "results")
    before = snapshot(folder)
    assert pretrain_cli(config, folder) == 2
    err = one_line_error(capsys)
    assert str(folder) in err and "not empty" in err and "new or empty folder" in err and "--resume auto" in err
    # --resume auto does not make a user's folder a run folder either
    assert pretrain_cli(config, folder, "--resume", "auto") == 2
    assert "not a medclipin run folder" in one_line_error(capsys)
    assert snapshot(folder) == before and not (folder / LOCK_NAME).exists()


def test_a_new_run_takes_a_missing_or_empty_folder_and_refuses_a_finished_run(tmp_path, capsys):
    config = config_file(tmp_path, tiny_config("train.steps=1", clipin=False))
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "new" / "nested"):
        assert pretrain_cli(config, folder) == 0, capsys.readouterr().err
        assert (folder / "model" / "model.safetensors").is_file() and (folder / "config.yaml").is_file()
    before = snapshot(tmp_path / "empty")
    assert pretrain_cli(config, tmp_path / "empty") == 2
    err = one_line_error(capsys)
    assert "already holds a medclipin run" in err and "--resume auto" in err
    assert snapshot(tmp_path / "empty") == before


# ------------------------------------------------------------------------------------- 2. the lock
def _metrics_rows(run: Path) -> int:
    try:
        return max(len((run / "metrics.csv").read_text().splitlines()) - 1, 0)
    except FileNotFoundError:
        return 0


def test_two_runs_on_one_folder_the_second_fails_at_once_naming_the_holder(tmp_path):
    cfg = tiny_config("train.steps=100000", "train.checkpoint_every=100000", "train.log_every=1", clipin=False)
    config = config_file(tmp_path, cfg)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "medclipin", "pretrain", "--config", str(config), "--out", str(run), "--quiet",
               "--no-validate"]
    holder = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while _metrics_rows(run) < 2 and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder.poll() is None and _metrics_rows(run) >= 2, "the first run must be training"
        # a checkpoint save of the live run, in progress: a second run must not clean it up
        staging = run / "checkpoints" / ".step_00000050.tmpabcdef"
        (staging / "model").mkdir(parents=True)
        for extra in (["--resume", "auto"], []):
            started = time.monotonic()
            second = subprocess.run([*command, *extra], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            err = second.stderr.strip()
            assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(run) in err, err
            if extra:
                assert f"in use by another medclipin run (pid {holder.pid} " in err
            assert time.monotonic() - started < 60
        assert staging.is_dir() and holder.poll() is None
        rows = _metrics_rows(run)
        deadline = time.monotonic() + 60
        while _metrics_rows(run) == rows and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _metrics_rows(run) > rows, "the first run goes on undisturbed"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=60)
    # the operating system released the killed run's lock: the folder is free again
    with RunLock(run) as lock:
        assert lock.held


def test_the_lock_is_exclusive_within_one_process_too_and_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderInUseError, match=f"pid {os.getpid()} "):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunFolderInUseError):
            pretrain(tiny_config("train.steps=1", clipin=False), tmp_path, resume="auto", progress=False)
    assert pretrain(tiny_config("train.steps=1", clipin=False), tmp_path, resume="auto", progress=False).steps == 1


# ---------------------------------------------------------------------------- 3. pinned configuration
def test_resume_with_a_changed_configuration_is_refused_naming_the_keys(tmp_path, capsys):
    cfg = tiny_config("train.steps=2", clipin=False)
    run = tmp_path / "run"
    pretrain(cfg, run, progress=False)
    pinned = (run / "config.yaml").read_bytes()
    other_manifest = tmp_path / "other.csv"
    other_manifest.write_bytes(Path(cfg.data.manifest).read_bytes())
    changed = tiny_config("train.steps=2", "train.lr=2e-3", "train.batch_size=4", "train.seed=1",
                          f"data.manifest={other_manifest}", clipin=False)
    with pytest.raises(ResumeConfigError) as refused:
        pretrain(changed, run, resume="auto", progress=False)
    message = str(refused.value)
    for key in ("train.lr", "train.batch_size", "train.seed", "data.manifest"):
        assert key in message, key
    assert "train.steps" not in message and "0.001 -> 0.002" in message
    # the same through the command: one line; an architecture change is refused the same way
    config = config_file(tmp_path, tiny_config("train.steps=2", "model.contrastive.embed_dim=8", clipin=False))
    assert pretrain_cli(config, run, "--resume", "auto") == 2
    assert "model.contrastive.embed_dim: 16 -> 8" in one_line_error(capsys)
    # what only changes how the run is watched, paced or stored may differ; config.yaml is never rewritten
    watched = tiny_config("train.steps=2", "train.log_every=5", "train.checkpoint_every=7", "train.keep_checkpoints=1",
                          "train.validate_every=3", "train.threads=2", "data.num_workers=1", "eval.bootstrap=10",
                          "data.max_bad_fraction=0.5", clipin=False)
    assert pretrain(watched, run, resume="auto", progress=False).steps == 2
    assert (run / "config.yaml").read_bytes() == pinned


def test_resume_may_change_names_real_keys_and_nothing_of_the_math():
    keys = set(_flat_keys(config_to_dict(Config())))
    for allowed in RESUME_MAY_CHANGE:
        assert allowed in keys or any(k.startswith(allowed + ".") for k in keys), allowed
    base = Config()
    for section, field in (("train", "lr"), ("train", "steps"), ("train", "precision"), ("train", "device"),
                           ("data", "cache"), ("train", "grad_accum")):
        other = Config()
        value = getattr(other, section)
        setattr(other, section, dataclasses.replace(value, **{field: "x" if isinstance(getattr(value, field), str)
                                                              else getattr(value, field) + 1}))
        assert [k for k, _, _ in changed_math(base, other)] == [f"{section}.{field}"]


def _flat_keys(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict) and value:
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


# ------------------------------------------------------------------------- 5. a run that cannot start
def test_a_run_that_cannot_start_writes_nothing_into_its_folder(tmp_path, capsys):
    from medclipin.data.manifest import read_manifest, write_manifest

    manifest = read_manifest(synthetic_manifest())
    no_train = write_manifest(tmp_path / "no_train.csv",
                              [dataclasses.replace(r, split="test") for r in manifest.records], manifest.label_names,
                              relative_paths=False)
    run = tmp_path / "run"
    # a tokenizer trained by the run itself (no data.text.tokenizer): it must not be left behind either
    for overrides, expected in (([f"data.manifest={no_train}"], f"{no_train}: no records in the train split"),
                                ([f"data.manifest={synthetic_manifest()}", "train.batch_size=64"],
                                 "31 usable records")):
        cfg = tiny_model_config("train.steps=1", *overrides, clipin=False)
        assert pretrain_cli(config_file(tmp_path, cfg), run) == 2
        err = one_line_error(capsys)
        assert expected in err, err
        assert "train.batch_size" in err or "train split" in err
        assert not (run / "config.yaml").exists() and not (run / "tokenizer").exists()
        assert [p.name for p in run.iterdir()] in ([], [LOCK_NAME])
    # a later run with settings that work is a fresh run in that folder, with its own config and tokenizer
    good = tiny_model_config("train.steps=1", f"data.manifest={synthetic_manifest()}", clipin=False)
    assert pretrain_cli(config_file(tmp_path, good), run) == 0, capsys.readouterr().err
    assert load_config(run / "config.yaml").train.batch_size == 8 and (run / "tokenizer" / "tokenizer.json").is_file()


def test_resuming_a_checkpoint_of_another_architecture_is_one_line_and_writes_nothing(tmp_path, capsys):
    cfg = tiny_config("train.steps=2", clipin=False)
    pretrain(cfg, tmp_path / "run", progress=False)
    start = ckpt.latest_checkpoint(tmp_path / "run")
    other = config_file(tmp_path, tiny_config("train.steps=4", "model.contrastive.embed_dim=8", clipin=False))
    assert pretrain_cli(other, tmp_path / "continued", "--resume", str(start)) == 2
    err = one_line_error(capsys)
    assert str(start) in err and "does not match" in err
    assert not (tmp_path / "continued" / "config.yaml").exists()


def test_the_demo_replaces_its_own_previous_run_but_never_a_users_folder(tmp_path, capsys):
    from medclipin.train.run_folder import discard

    folder = users_folder(tmp_path / "demo" / "run")
    before = snapshot(folder)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--patients", "20", "--quiet"]) == 2
    assert "not a medclipin run folder" in one_line_error(capsys)
    assert snapshot(folder) == before and not (tmp_path / "demo" / "data").exists()  # refused before any work
    # a previous run (a folder a run has locked) is emptied, under its lock
    with RunLock(tmp_path / "previous"):
        (tmp_path / "previous" / "checkpoints").mkdir()
        (tmp_path / "previous" / "metrics.csv").write_text("step\n")
        with pytest.raises(RunFolderInUseError):
            discard(tmp_path / "previous")
    assert discard(tmp_path / "previous") and [p.name for p in (tmp_path / "previous").iterdir()] == [LOCK_NAME]
    assert not discard(tmp_path / "nothing-here")


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, capsys):
    from test_output_paths import _read_only_dir

    config = config_file(tmp_path, tiny_config("train.steps=1", clipin=False))
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file", tmp_path / "a-file" / "run", _read_only_dir(tmp_path)):
        assert pretrain_cli(config, out) == 2
        assert str(out) in one_line_error(capsys)


def test_resume_refuses_a_manifest_edited_in_place(tmp_path, capsys):
    """B4 (issue 25): the manifest's path was all a resume compared; a manifest edited in place (rows deleted,
    reports changed) was read silently and the losses diverged. Its SHA-256 travels in every checkpoint."""
    from medclipin.data.manifest import read_manifest, write_manifest

    manifest = tmp_path / "manifest.csv"
    write_manifest(manifest, read_manifest(synthetic_manifest()).records)
    cfg = tiny_config(f"data.manifest={manifest}", "train.steps=4", "train.checkpoint_every=2", clipin=False)
    run = tmp_path / "run"
    pretrain(cfg, run, progress=False)
    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if killed after step 2's checkpoint
    kept = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(b"".join(kept[:-3]))  # three rows deleted, same path
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ResumeConfigError, match=r"manifest.csv: changed since this run's checkpoint step_00000002"):
        pretrain(cfg, run, resume="auto", progress=False)
    assert sorted(p.name for p in run.iterdir()) == before
    config = config_file(tmp_path, cfg)
    assert pretrain_cli(config, run, "--resume", "auto") == 2
    assert "Restore the manifest" in one_line_error(capsys)
    manifest.write_bytes(b"".join(kept))  # restored: the run continues
    assert pretrain(cfg, run, resume="auto", progress=False).steps == 4
    # a checkpoint continued in a new folder may read another manifest
    manifest.write_bytes(b"".join(kept[:-3]))
    assert pretrain(cfg, tmp_path / "new", resume=str(run / "checkpoints" / "step_00000002"), progress=False).steps == 4


def test_resume_after_config_yaml_was_deleted_still_refuses_changed_math(tmp_path):
    """W1 (issue 25): with RUN/config.yaml deleted, a resume took a changed train.lr, wrote it into a new
    config.yaml and trained with the checkpoint's. The checkpoint keeps the configuration too."""
    cfg = tiny_config("train.steps=4", "train.checkpoint_every=2", clipin=False)
    run = tmp_path / "run"
    pretrain(cfg, run, progress=False)
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (run / "config.yaml").unlink()
    changed = tiny_config("train.steps=4", "train.checkpoint_every=2", "train.lr=2e-3", clipin=False)
    with pytest.raises(ResumeConfigError, match=r"step_00000002: resuming would change the run's math \(train.lr: "
                                                r"0.001 -> 0.002\)"):
        pretrain(changed, run, resume="auto", progress=False)
    assert not (run / "config.yaml").exists()
    assert pretrain(tiny_config("train.steps=4", "train.checkpoint_every=2", "train.log_every=3", clipin=False), run,
                    resume="auto", progress=False).steps == 4


def test_the_demo_never_replaces_a_users_data_folder(tmp_path, capsys):
    """B6 (issue 25): `demo --out D` deleted the user's D/data/manifest.csv (only D/run was protected)."""
    data = tmp_path / "demo" / "data"
    data.mkdir(parents=True)
    (data / "manifest.csv").write_text("record_id,image_path\nmine,x.png\n")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--patients", "20", "--quiet"]) == 2
    assert "not empty and not a synthetic dataset (manifest.csv)" in one_line_error(capsys)
    assert [p.name for p in data.iterdir()] == ["manifest.csv"]
    assert (data / "manifest.csv").read_text() == "record_id,image_path\nmine,x.png\n"
    assert not (tmp_path / "demo" / "run").exists()
