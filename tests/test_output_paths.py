"""An output path that cannot be written fails at once, in one line naming it, before any work."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from medclipin.cli import main

READ_ONLY_FS = Path("/sys/medclipin-test-output")  # sysfs: nobody, not even root, can create files there


def _read_only_dir(tmp_path) -> Path:
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder / "out"
    if sys.platform.startswith("linux") and Path("/sys").is_dir() and not READ_ONLY_FS.exists():
        return READ_ONLY_FS
    pytest.skip("no read-only location for this user")


def _commands(out: Path, manifest: Path) -> dict[str, list[str]]:
    missing_model = manifest.parent / "does-not-exist-model"
    return {
        "preprocess": ["preprocess", "--manifest", str(manifest), "--size", "16", "--out", str(out), "--quiet"],
        "validate --json": ["validate", str(manifest), "--json", str(out)],
        "validate --out": ["validate", str(manifest), "--out", str(out)],
        "prepare": ["prepare", "image-folder", "--root", str(manifest.parent), "--out", str(out)],
        "synth": ["synth", "--out", str(out), "--patients", "1"],
        # evaluation commands: the model, the manifest, the prompts and the image do not exist either
        "zeroshot": ["zeroshot", "--checkpoint", str(missing_model), "--manifest", str(manifest), "--prompts",
                     str(manifest.with_suffix(".yaml")), "--out", str(out)],
        "retrieve": ["retrieve", "--checkpoint", str(missing_model), "--manifest", str(manifest), "--out", str(out)],
        "probe": ["probe", "--checkpoint", str(missing_model), "--manifest", str(manifest), "--out", str(out)],
        "gradcam": ["gradcam", "--checkpoint", str(missing_model), "--image", str(manifest.with_suffix(".png")),
                    "--text", "effusion", "--out", str(out)],
        "zeroshot --embedding-cache": ["zeroshot", "--checkpoint", str(missing_model), "--manifest", str(manifest),
                                       "--prompts", str(manifest.with_suffix(".yaml")), "--out",
                                       str(manifest.parent / "fine"), "--embedding-cache", str(out)],
    }


FOLDER_OUTPUTS = ("preprocess", "synth", "zeroshot", "retrieve", "probe", "gradcam", "zeroshot --embedding-cache")


@pytest.mark.parametrize("command", ["preprocess", "validate --json", "validate --out", "prepare", "synth",
                                     "zeroshot", "retrieve", "probe", "gradcam", "zeroshot --embedding-cache"])
@pytest.mark.parametrize("problem", ["a file where a folder is needed", "read-only"])
def test_unwritable_output_fails_first_in_one_line(tmp_path, capsys, command, problem):
    manifest = tmp_path / "does-not-exist.csv"  # any work would fail on this first, with another message
    if problem == "read-only":
        out = _read_only_dir(tmp_path)
    else:
        (tmp_path / "taken").write_text("a file")
        out = tmp_path / "taken" if command in FOLDER_OUTPUTS else tmp_path / "taken" / "report.json"
    assert main(_commands(out, manifest)[command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(out) in err, err
    assert "does-not-exist" not in err  # the output was checked before the input was touched


def test_json_output_that_is_a_folder(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "m.csv"), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["zeroshot", "retrieve", "probe", "gradcam"])
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_evaluation_batch_size_must_be_a_positive_whole_number(tmp_path, capsys, command, value):
    argv = [command, "--checkpoint", str(tmp_path), "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"),
            "--batch-size", value, *(["--prompts", "p.yaml"] if command == "zeroshot" else [])]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --batch-size:" in err and ("must be >= 1" in err or "whole number" in err) and "Traceback" not in err


@pytest.mark.parametrize("argv", [["retrieve", "--query-text", ""], ["retrieve", "--query-text", "   "],
                                  ["gradcam", "--image", "x.png", "--text", " "]])
def test_an_empty_query_is_refused(argv, tmp_path, capsys):
    """W13 (issue 25): `retrieve --query-text ""` and `gradcam --text ""` exited 0 with "hits"."""
    with pytest.raises(SystemExit) as refused:
        main([argv[0], "--checkpoint", str(tmp_path / "m"), "--manifest", str(tmp_path / "m.csv"), *argv[1:],
              "--out", str(tmp_path / "out")])
    assert refused.value.code == 2
    assert "is empty: give a sentence to search for" in capsys.readouterr().err
