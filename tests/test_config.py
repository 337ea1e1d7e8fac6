"""Typed configs: YAML loading, dotted overrides, unknown keys with suggestions, type errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medclipin.config import (
    Config,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


def write_yaml(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_defaults_without_a_file():
    cfg = load_config()
    assert isinstance(cfg, Config) and isinstance(cfg.train, TrainConfig)
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert cfg.data.text.sections == ("findings", "impression")


def test_yaml_values_are_typed(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {
        "data": {"image": {"size": 64, "augment": {"gamma": [80, 120]}}, "text": {"sections": ["impression"]}},
        "model": {"clipin": {"enabled": True, "momentum": 0.99}, "image_encoder": {"kwargs": {"depth": 2}}},
        "train": {"lr": "3e-4", "steps": 10.0},
    })
    cfg = load_config(path)
    assert cfg.data.image.size == 64
    assert cfg.data.image.augment.gamma == (80.0, 120.0)  # list -> tuple of floats
    assert cfg.data.text.sections == ("impression",)
    assert cfg.model.clipin.enabled is True and cfg.model.clipin.momentum == 0.99
    assert cfg.model.image_encoder.kwargs == {"depth": 2}
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 10 and isinstance(cfg.train.steps, int)
    # untouched siblings keep their defaults
    assert cfg.model.clipin.nc_dim == 8192


def test_empty_yaml_is_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert config_to_dict(load_config(tmp_path / "empty.yaml")) == config_to_dict(Config())


def test_overrides_scalars_nested_dicts_tuples_and_bools(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {"train": {"batch_size": 32}, "model": {"clipin": {"enabled": False}}})
    cfg = load_config(path, [
        "train.batch_size=128",
        "model.clipin.momentum=0.99",
        "model.clipin.enabled=true",
        "model.clipin.use_intra=False",
        "train.betas=[0.9, 0.95]",
        "data.text.sections=[impression]",
        "model.image_encoder.kwargs={depth: 2, embed_dim: 64}",
        "train.deterministic=yes",
        "data.manifest=/data/m.csv",
        "data.cache=",
    ])
    assert cfg.train.batch_size == 128
    assert cfg.model.clipin.momentum == 0.99
    assert cfg.model.clipin.enabled is True and cfg.model.clipin.use_intra is False
    assert cfg.train.betas == (0.9, 0.95)
    assert cfg.data.text.sections == ("impression",)
    assert cfg.model.image_encoder.kwargs == {"depth": 2, "embed_dim": 64}
    assert cfg.train.deterministic is True
    assert cfg.data.manifest == "/data/m.csv" and cfg.data.cache == ""


def test_override_creates_missing_sections_and_later_wins():
    cfg = load_config(None, ["train.steps=5", "train.steps=7", "eval.prompts=p.yaml"])
    assert cfg.train.steps == 7 and cfg.eval.prompts == "p.yaml"


def test_unknown_key_in_yaml_names_it_and_suggests(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {"train": {"batch_sise": 8}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "train.batch_sise" in message and "did you mean 'train.batch_size'" in message
    assert "x.yaml" in message


def test_unknown_nested_key_in_yaml(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {"model": {"clipin": {"momentun": 0.9}}})
    with pytest.raises(ConfigError, match=r"model\.clipin\.momentun.*did you mean 'model\.clipin\.momentum'"):
        load_config(path)


def test_unknown_section_in_override_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.steps=5"])


def test_unknown_leaf_in_override_suggests():
    with pytest.raises(ConfigError, match=r"'model\.clipin\.momentom'.*did you mean 'model\.clipin\.momentum'"):
        load_config(None, ["model.clipin.momentom=0.9"])


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError, match="valid keys: .*batch_size"):
        load_config(None, ["train.zzzzzz=1"])


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.steps"])


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=abc", "train.batch_size"),
    ("train.steps=2.5", "train.steps"),
    ("train.lr=fast", "train.lr"),
    ("model.clipin.enabled=maybe", "model.clipin.enabled"),
    ("train.betas=0.9", "train.betas"),
    ("model.image_encoder.kwargs=3", "model.image_encoder.kwargs"),
    ("model.clipin=5", "model.clipin"),
])
def test_type_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"'{key}'" in str(info.value)


def test_type_error_in_yaml_names_the_key(tmp_path):
    path = write_yaml(tmp_path / "x.yaml", {"data": {"image": {"size": "large"}}})
    with pytest.raises(ConfigError, match=r"'data\.image\.size' expects int"):
        load_config(path)


def test_missing_file_and_non_mapping_top_level(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.betas=[0.8, 0.9]", "model.clipin.enabled=true", "data.text.sections=[impression]",
                             "model.text_encoder.config={hidden_size: 32}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_repository_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        load_config(path)


def test_yaml_is_only_ever_read_with_safe_load():
    """Grep-able guarantee beside test_checkpoint's for weights: no YAML loader that can build Python objects."""
    import re

    package = Path(__file__).resolve().parents[1] / "medclipin"
    offenders = [f"{path.relative_to(package.parent)}: {match.group(0)}"
                 for path in sorted(package.rglob("*.py"))
                 for match in re.finditer(r"yaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all)\(|"
                                          r"yaml\.(Unsafe|Full)?Loader\b", path.read_text())]
    assert not offenders, offenders
