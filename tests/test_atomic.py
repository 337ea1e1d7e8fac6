"""Atomic writes: a failure inside the block leaves the old file and no temporary behind."""

import stat

import pytest

from medclipin.atomic import atomic_open


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_open_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "manifest.csv"
    with atomic_open(path, "w", fsync=True) as handle:
        handle.write("first\n")
    assert path.read_text() == "first\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600: outputs are shared

    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write("half of the second")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "first\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.csv"]  # no temporary left


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    import os

    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_follow_the_umask(tmp_path, umask):
    """Shared lab servers need group-readable outputs: files 0666 & ~umask, folders 0777 & ~umask, also
    where the staging folder came from mkdtemp (0700) or a library wrote a file 0600 (safetensors)."""
    import tempfile
    from pathlib import Path

    import torch
    from safetensors.torch import save_model

    from medclipin.atomic import replace_directory

    with atomic_open(tmp_path / "manifest.csv") as handle:
        handle.write("x\n")
    assert _mode(tmp_path / "manifest.csv") == 0o666 & ~umask
    for round_ in range(2):  # a new folder, then replacing an existing one
        staging = Path(tempfile.mkdtemp(dir=tmp_path, prefix=".model.tmp"))
        save_model(torch.nn.Linear(2, 2), str(staging / "model.safetensors"))
        (staging / "tokenizer").mkdir()
        (staging / "tokenizer" / "tokenizer.json").write_text("{}")
        replace_directory(staging, tmp_path / "model")
        model = tmp_path / "model"
        assert _mode(model) == _mode(model / "tokenizer") == 0o777 & ~umask, round_
        assert _mode(model / "model.safetensors") == _mode(model / "tokenizer" / "tokenizer.json") == 0o666 & ~umask


def test_saved_model_folder_follows_the_umask(tmp_path, umask):
    """The real save path of models and checkpoints (mkdtemp staging + safetensors) ends up shareable."""
    from medclipin.models.model import MedClipModel
    from test_train_support import tiny_config

    cfg = tiny_config()
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels, vocab_size=200)
    folder = model.save_pretrained(tmp_path / "run" / "model")
    assert _mode(folder) == 0o777 & ~umask
    assert (folder / "model.safetensors").is_file()
    assert all(_mode(f) == 0o666 & ~umask for f in folder.iterdir() if f.is_file())
