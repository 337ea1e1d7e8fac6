"""YAML and JSON from anywhere: no alias bombs, no RecursionError, one line from every reader (B8, W8)."""

from __future__ import annotations

import time

import pytest
import yaml

from medclipin.cli import main
from medclipin.safe_parse import MAX_DEPTH, load_json, load_yaml

BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
                 + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)])


def _nested_yaml(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_loaders_refuse_aliases_and_deep_nesting_quickly():
    start = time.monotonic()
    with pytest.raises(yaml.YAMLError, match=r"aliases \(\*a0\) are not allowed"):
        load_yaml(BOMB)
    with pytest.raises(yaml.YAMLError, match="nested deeper than"):
        load_yaml(_nested_yaml(200_000))
    with pytest.raises(ValueError, match="nested deeper than"):
        load_json("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match="nested deeper than"):
        load_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert time.monotonic() - start < 5
    assert load_yaml("a: &x 1\nb: [1, {c: 2}]") == {"a": 1, "b": [1, {"c": 2}]}  # anchors alone are harmless
    assert load_json('{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}


def test_a_config_with_an_alias_bomb_or_deep_nesting_under_a_valid_key_is_one_line(tmp_path, capsys):
    """B8 (issue 25): the bomb nested under model.text_encoder.config took 95 s and 4.6 GB, then a MemoryError."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("model:\n  text_encoder:\n    config:\n" + "".join(f"      {line}\n" for line in BOMB.splitlines()))
    deep = tmp_path / "deep.yaml"
    deep.write_text("model:\n  text_encoder:\n    config: " + _nested_yaml(200_000) + "\n")
    for config, problem in ((bomb, "aliases (*a0) are not allowed"), (deep, "nested deeper than")):
        start = time.monotonic()
        assert main(["pretrain", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {config}: not valid YAML") and problem in err and err.count("\n") == 1, err
        assert time.monotonic() - start < 10
    override = "model.text_encoder.config=" + _nested_yaml(200_000)
    assert main(["pretrain", "--config", "tiny_clip", "--out", str(tmp_path / "run"), override]) == 2
    assert "nested deeper than" in capsys.readouterr().err


def test_deeply_nested_prompt_files_model_configs_and_manifests_are_one_line(tmp_path):
    from medclipin.data.manifest import ManifestError, read_manifest
    from medclipin.eval.zeroshot import PromptFileError, load_prompts
    from medclipin.models.model import ModelFolderError, read_model_config

    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("classes: " + _nested_yaml(200_000))
    with pytest.raises(PromptFileError, match="nested deeper than"):
        load_prompts(prompts)
    prompts.write_text(BOMB + "\nclasses: {A: {positive: *a8, negative: [no]}}\n")
    with pytest.raises(PromptFileError, match="aliases"):
        load_prompts(prompts)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="nested deeper than"):
        read_model_config(folder)
    from medclipin.models.model import read_safetensors_header

    header = ("[" * 200_000 + "]" * 200_000).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ModelFolderError, match="model.safetensors"):
        read_safetensors_header(folder / "model.safetensors")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"record_id": "a", "boxes": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    with pytest.raises(ManifestError, match="line 1: not valid JSON .*nested deeper than"):
        read_manifest(manifest)
