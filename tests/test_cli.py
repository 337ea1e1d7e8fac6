"""The `medclipin` command: every documented subcommand is present and has help."""

import subprocess
import sys
from pathlib import Path

import pytest

from medclipin.cli import COMMANDS, build_parser, main

DOCUMENTED = ["demo", "synth", "pretrain", "prepare", "validate", "preprocess", "tokenizer",
              "zeroshot", "retrieve", "probe", "compare", "supervised", "gradcam", "import", "export", "bench"]


def test_every_documented_command_is_installed():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(DOCUMENTED) == sorted(COMMANDS)


@pytest.mark.parametrize("name", DOCUMENTED)
def test_help_works(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: medclipin" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "medclipin", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "pretrain" in out.stdout


def test_every_user_error_exits_2_with_its_message(capsys, tmp_path):
    """One handler in the CLI: each module's input error is a MedclipinError, printed without a traceback."""
    from medclipin.config import ConfigError
    from medclipin.data.image_cache import CacheError
    from medclipin.data.manifest import ManifestError
    from medclipin.data.prepare.common import PrepareError
    from medclipin.data.readers import ImageReadError
    from medclipin.data.synthetic import SyntheticDatasetError
    from medclipin.data.tokenizer import TokenizerError
    from medclipin.errors import MedclipinError
    from medclipin.eval.zeroshot import PromptFileError
    from medclipin.models.encoders import EncoderLoadError
    from medclipin.train.step import NonFiniteLossError

    for error in (ConfigError, CacheError, ManifestError, PrepareError, ImageReadError, SyntheticDatasetError,
                  TokenizerError, PromptFileError, EncoderLoadError, NonFiniteLossError):
        assert issubclass(error, MedclipinError), error
    missing = tmp_path / "missing.csv"
    for argv in (["validate", str(missing)], ["preprocess", "--manifest", str(missing), "--size", "64", "--out", str(tmp_path / "c")],
                 ["tokenizer", "train", "--manifest", str(missing), "--vocab-size", "100", "--out", str(tmp_path / "t")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
    demo_config = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert main(["pretrain", "--config", demo_config, "--out", str(tmp_path / "run"), "train.batchsize=3"]) == 2
    assert "did you mean 'train.batch_size'" in capsys.readouterr().err


def test_yaml_tags_in_configs_overrides_and_prompts_are_one_line_errors_and_never_run(capsys, tmp_path):
    """YAML is read with yaml.safe_load everywhere: a python/object tag is refused, never constructed."""
    marker = tmp_path / "executed"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    config = tmp_path / "config.yaml"
    config.write_text(f"train:\n  steps: {tag}\n")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(f"name: x\nmode: multilabel\ntemplates: {tag}\nclasses: {{}}\n")
    demo_config = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    for argv, named in (
        (["pretrain", "--config", str(config), "--out", str(tmp_path / "a")], str(config)),
        (["pretrain", "--config", demo_config, "--out", str(tmp_path / "b"), f"train.steps={tag}"], "train.steps="),
        (["zeroshot", "--checkpoint", str(tmp_path), "--manifest", str(tmp_path / "m.csv"), "--prompts", str(prompts),
          "--out", str(tmp_path / "c")], str(prompts)),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and named in err and "tag" in err, err
    assert not marker.exists() and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("override, expected", [
    ("train.precision=fp8", "train.precision must be auto, fp32, bf16 or fp16"),
    ("train.image_encoder_lr=-1", "train.image_encoder_lr must be >= 0"),
    ("model.clipin.momentum_schedule=sometimes", "model.clipin.momentum_schedule must be 'fixed' or 'cosine'"),
    ("model.text_encoder.pooling=max", "model.text_encoder.pooling must be 'cls' or 'mean'"),
    ("data.text.sections=[findings, history]", "unknown report section 'history'"),
    ("data.image.std=[0.5, 0.5]", "data.image.std has 2 values; expected 1 or 1"),
])
def test_settings_a_user_gets_wrong_are_one_line_from_pretrain(override, expected, tmp_path, capsys):
    """Part 2 of issue 25: ValueErrors raised deep in the set-up for a setting the user chose were tracebacks;
    each is a MedclipinError now (SettingError, or RunSetupError around the model build), before training."""
    import yaml

    from medclipin.config import config_to_dict
    from test_train_support import tiny_config

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(tiny_config("train.steps=1", clipin=True))))
    assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run"), "--quiet",
                 "--no-validate", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1, err
