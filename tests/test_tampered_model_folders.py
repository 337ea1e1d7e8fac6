"""A tampered or broken model folder is one line naming the file and the problem, from ``medclipin.load`` and from
every evaluation command: never a traceback, and never an allocation that the file does not back."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

import medclipin
from medclipin.cli import main
from medclipin.models.model import ModelFolderError


def _header(folder: Path) -> tuple[dict, bytes]:
    data = (folder / "model.safetensors").read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


def _write_header(folder: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def header_too_large(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + data[8:])


def header_not_json(folder):
    _, body = _header(folder)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"\xff" * 16 + body)


def tensor_larger_than_its_bytes(folder):
    header, body = _header(folder)
    header["image_proj.weight"]["shape"] = [100_000, 100_000]  # 40 GB claimed, a few KB stored
    _write_header(folder, header, body)


def config_not_json(folder):
    (folder / "config.json").write_text('{"format_version": 2, "model": ')


def unknown_architecture(folder):
    _edit_config(folder, lambda c: c["model"]["image_encoder"].update(name="vit_tinyy_patch16_224"))


def embed_dim_of_360_gb(folder):
    # the projections would be 100,000,000,000 x 32 floats each (12.8 TB): refused from the header, not allocated
    _edit_config(folder, lambda c: c["model"].update(embed_dim=100_000_000_000))


def wrong_type_in_config(folder):
    _edit_config(folder, lambda c: c["model"].update(embed_dim="large"))


def text_tower_config_that_cannot_be_built(folder):
    _edit_config(folder, lambda c: c["text_hf_config"].update(hidden_size=33))  # not a multiple of the heads


CASES = {
    "header_too_large": (header_too_large, "model.safetensors", "corrupt weights file (header of 1099511627776 bytes"),
    "header_not_json": (header_not_json, "model.safetensors", "header is not JSON"),
    "tensor_larger_than_its_bytes": (tensor_larger_than_its_bytes, "model.safetensors",
                                     "tensor 'image_proj.weight' does not fit"),
    "config_not_json": (config_not_json, "config.json", "not readable JSON"),
    "unknown_architecture": (unknown_architecture, "config.json",
                             "'vit_tinyy_patch16_224' is not a timm architecture; did you mean vit_tiny_patch16_224"),
    "embed_dim_of_360_gb": (embed_dim_of_360_gb, "model.safetensors",
                            "wrong shape: image_proj.bias (config.json [100000000000], file [32])"),
    "wrong_type_in_config": (wrong_type_in_config, "config.json", "cannot be built (TypeError"),
    "text_tower_config_that_cannot_be_built": (text_tower_config_that_cannot_be_built, "config.json",
                                               "cannot be built"),
}


@pytest.fixture()
def tampered(request, eval_model, tmp_path):
    tamper, file_name, expected = CASES[request.param]
    folder = tmp_path / "model"
    shutil.copytree(eval_model, folder)
    tamper(folder)
    return folder, folder / file_name, expected


@pytest.mark.parametrize("tampered", list(CASES), indirect=True)
def test_load_names_the_file_and_the_problem(tampered):
    folder, path, expected = tampered
    with pytest.raises(ModelFolderError) as refused:
        medclipin.load(folder)
    message = str(refused.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message, message


@pytest.mark.parametrize("tampered", ["header_too_large", "unknown_architecture", "embed_dim_of_360_gb"], indirect=True)
@pytest.mark.parametrize("command", ["zeroshot", "retrieve", "probe", "gradcam"])
def test_evaluation_commands_say_it_in_one_line(tampered, command, eval_data, eval_prompts, tmp_path, capsys):
    folder, path, expected = tampered
    argv = {
        "zeroshot": ["--manifest", str(eval_data), "--prompts", str(eval_prompts)],
        "retrieve": ["--manifest", str(eval_data)],
        "probe": ["--manifest", str(eval_data)],
        "gradcam": ["--manifest", str(eval_data), "--prompts", str(eval_prompts)],
    }[command]
    assert main([command, "--checkpoint", str(folder), *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {path}") and expected in err, err


def test_buffers_the_weights_file_does_not_hold_are_bounded(eval_model, monkeypatch):
    from medclipin.models import model as model_module

    monkeypatch.setattr(model_module, "MAX_UNSAVED_BUFFER_BYTES", 16)  # BERT's position ids are 4 KB
    with pytest.raises(ModelFolderError, match="GiB of buffers that are not in model.safetensors"):
        medclipin.load(eval_model)


def test_a_tampered_checkpoint_is_one_line_on_resume(tmp_path, capsys):
    import yaml

    from medclipin.config import config_to_dict
    from medclipin.train import checkpoint as ckpt
    from medclipin.train.trainer import pretrain
    from test_train_support import tiny_config

    cfg = tiny_config("train.steps=2", "train.checkpoint_every=1", clipin=True)
    pretrain(cfg, tmp_path / "run", progress=False)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    first, last = ckpt.list_checkpoints(tmp_path / "run")[-2:]
    (last / ckpt.STATE_NAME).write_bytes(b"not a torch file")
    header_too_large(first / "model")  # and the objective file of another one
    for start, name in ((last, ckpt.STATE_NAME), (first, "model.safetensors")):
        argv = ["pretrain", "--config", str(config), "--out", str(tmp_path / f"from_{start.name}"), "--quiet",
                "--no-validate", "--resume", str(start)]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ") and name in err, err


def _edit_processor(folder: Path, section: str, **changes) -> None:
    values = json.loads((folder / "processor.json").read_text())
    values[section].update(changes)
    (folder / "processor.json").write_text(json.dumps(values))


def _swap_dtype_f32_to_i32(folder: Path) -> None:
    header, body = _header(folder)
    header["image_proj.weight"]["dtype"] = "I32"  # same bytes, another kind of number
    _write_header(folder, header, body)


def _tokenizer_of_wrong_structure(folder: Path) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"] = {"type": "WordPiece"}  # no vocabulary
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


def _tokenizer_larger_than_the_model(folder: Path) -> None:
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"extra{i}": len(vocab) + i for i in range(50)})
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))


PROCESSOR_CASES = {  # issue 25: B7, W10, W11, W9 (dtype)
    "image_size_200000": (lambda f: _edit_processor(f, "image", size=200_000), "processor.json",
                          "image.size 200000 is outside 16..4096"),
    "max_pixels_0": (lambda f: _edit_processor(f, "image", max_pixels=0), "processor.json",
                     "image.max_pixels 0 would switch off the limit"),
    "channels_3": (lambda f: _edit_processor(f, "image", channels=3), "processor.json",
                   "image.channels is 3, but the model in config.json was built for 1"),
    "size_96": (lambda f: _edit_processor(f, "image", size=96), "processor.json",
                "image.size is 96, but the model in config.json was built for"),
    "format_version_string": (lambda f: _edit_config(f, lambda c: c.update(format_version="2")), "config.json",
                              "format_version must be a whole number, got '2'"),
    "dtype_f32_to_i32": (_swap_dtype_f32_to_i32, "model.safetensors",
                         "wrong dtype: image_proj.weight (file torch.int32"),
    "tokenizer_wrong_structure": (_tokenizer_of_wrong_structure, "", "the tokenizer files cannot be loaded"),
    "tokenizer_larger_than_model": (_tokenizer_larger_than_the_model, "", "more than the"),
    "tokenizer_nested_200000_deep": (lambda f: (f / "tokenizer.json").write_text("[" * 200_000 + "]" * 200_000), "",
                                     "the tokenizer files cannot be loaded"),
}


@pytest.mark.parametrize("case", list(PROCESSOR_CASES))
def test_a_tampered_processor_tokenizer_or_dtype_is_one_line_before_any_allocation(case, eval_model, eval_data,
                                                                                   eval_prompts, tmp_path, capsys):
    """B7: processor.json size 200000 made zeroshot/gradcam try to allocate 160 GB; W10: max_pixels 0 switched
    off the bomb guard; W11: channel/size mismatches, a broken or too large tokenizer, format_version "2" were
    tracebacks or wrong; W8: a tokenizer.json nested 200,000 deep was a RecursionError; W9: an F32 tensor
    relabelled I32 loaded. Each is one line naming the file."""
    tamper, file_name, expected = PROCESSOR_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(eval_model, folder)
    tamper(folder)
    with pytest.raises(medclipin.errors.MedclipinError) as refused:
        medclipin.load(folder)
    message = str(refused.value)
    assert message.startswith(str(folder / file_name)) and expected in message and "\n" not in message, message
    argv = ["zeroshot", "--checkpoint", str(folder), "--manifest", str(eval_data), "--prompts", str(eval_prompts),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


@pytest.mark.parametrize("command", ["zeroshot", "gradcam"])
def test_non_finite_embeddings_are_refused_not_scored(command, eval_model, eval_data, eval_prompts, tmp_path, capsys):
    """W9 (issue 25): NaN weights gave NaN embeddings; zeroshot exited 0 ("no labelled rows") and gradcam printed
    "similarity +nan". Non-finite embeddings are refused where they are computed, in one line."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "model"
    shutil.copytree(eval_model, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["image_proj.weight"][0, 0] = float("nan")
    weights["text_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(folder / "model.safetensors"))
    argv = {"zeroshot": ["--manifest", str(eval_data), "--prompts", str(eval_prompts)],
            "gradcam": ["--manifest", str(eval_data), "--prompts", str(eval_prompts)]}[command]
    assert main([command, "--checkpoint", str(folder), *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "non-finite" in err and "embeddings" in err, err
