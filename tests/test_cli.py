"""The `medclipin` command: every documented subcommand is present and has help."""

import subprocess
import sys

import pytest

from medclipin.cli import COMMANDS, build_parser, main

DOCUMENTED = ["demo", "synth", "pretrain", "prepare", "validate", "preprocess", "tokenizer",
              "zeroshot", "retrieve", "probe", "gradcam", "bench"]


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
