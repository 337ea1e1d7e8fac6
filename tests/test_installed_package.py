"""The package works when installed: build the wheel, install it into a fresh environment, and run a shortened
demo from a folder outside the repository (configs and prompt files must come from inside the package)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (found,) = out.glob("medclipin-*.whl")
    return found


def test_wheel_ships_configs_and_prompt_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("medclipin/configs/demo.yaml", "medclipin/configs/cpu_clip.yaml", "medclipin/configs/tiny_clip.yaml",
                   "medclipin/prompts/synthetic.yaml", "medclipin/prompts/chexpert_5x200.yaml"):
        assert needed in names, needed


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_from_another_folder(wheel, tmp_path):
    # A fresh virtual environment holding only the wheel; the heavy dependencies (torch, timm, ...) are the
    # ones already installed here, reached through a .pth path entry (which does not run this checkout's
    # editable-install hook, so `import medclipin` can only find the installed wheel).
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    with zipfile.ZipFile(wheel) as archive:  # installing a wheel is unpacking it into site-packages
        archive.extractall(site)
    elsewhere = tmp_path / "somewhere_else"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": ""}
    where = subprocess.run([str(python), "-c", "import medclipin, sys; print(medclipin.__file__)"], cwd=elsewhere,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(site)), where
    demo = subprocess.run(
        [str(python), "-m", "medclipin", "demo", "--out", "demo_out", "--patients", "24", "--quiet", "--config",
         "tiny_clip_clipin", "train.steps=3", "train.batch_size=8", "data.image.size=32", "train.validate_every=0",
         "eval.gradcam_examples=1", "eval.bootstrap=0"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (elsewhere / "demo_out" / "metrics.json").is_file()
    assert (elsewhere / "demo_out" / "learning_curves.png").is_file()
