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
    return {
        "preprocess": ["preprocess", "--manifest", str(manifest), "--size", "16", "--out", str(out), "--quiet"],
        "validate --json": ["validate", str(manifest), "--json", str(out)],
        "validate --out": ["validate", str(manifest), "--out", str(out)],
        "prepare": ["prepare", "image-folder", "--root", str(manifest.parent), "--out", str(out)],
        "synth": ["synth", "--out", str(out), "--patients", "1"],
    }


@pytest.mark.parametrize("command", ["preprocess", "validate --json", "validate --out", "prepare", "synth"])
@pytest.mark.parametrize("problem", ["a file where a folder is needed", "read-only"])
def test_unwritable_output_fails_first_in_one_line(tmp_path, capsys, command, problem):
    manifest = tmp_path / "does-not-exist.csv"  # any work would fail on this first, with another message
    if problem == "read-only":
        out = _read_only_dir(tmp_path)
    else:
        (tmp_path / "taken").write_text("a file")
        out = tmp_path / "taken" if command in ("preprocess", "synth") else tmp_path / "taken" / "report.json"
    assert main(_commands(out, manifest)[command]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and str(out) in err, err
    assert "does-not-exist" not in err  # the output was checked before the input was touched


def test_json_output_that_is_a_folder(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "m.csv"), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
