"""Encoders: any timm image model (ViT, CNN; one channel natively or replicated; Grad-CAM layer) and a
BERT-family text tower (CLS/mean pooling, freezing, checkpointing, clear errors offline)."""

from __future__ import annotations

import pytest
import torch

from medclipin.config import ImageEncoderConfig, TextEncoderConfig
from medclipin.models.encoders import EncoderLoadError, ImageEncoder, TextEncoder

TINY_VIT = {"patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def test_vit_one_channel_native_and_cls_feature():
    enc = ImageEncoder(ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs=TINY_VIT), in_chans=1, image_size=32)
    assert enc.model.patch_embed.proj.in_channels == 1 and enc.replicate_channels == 1
    x = torch.randn(2, 1, 32, 32)
    assert enc(x).shape == (2, 32) and enc.out_dim == 32
    layer, reshape = enc.gradcam_layer()
    assert layer is enc.model.blocks[-1].norm1
    tokens = torch.randn(2, 1 + 4, 32)  # CLS + 2x2 patches
    assert reshape(tokens).shape == (2, 32, 2, 2)


def test_cnn_resnet18_one_channel_and_gradcam_layer():
    enc = ImageEncoder(ImageEncoderConfig(name="resnet18"), in_chans=1, image_size=64)
    assert enc.model.conv1.in_channels == 1
    x = torch.randn(2, 1, 64, 64)
    assert enc(x).shape == (2, 512) and enc.out_dim == 512
    layer, reshape = enc.gradcam_layer()
    assert layer is enc.model.layer4 and reshape is None
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    enc(x)
    handle.remove()
    assert seen["shape"][:2] == (2, 512) and len(seen["shape"]) == 4  # spatial (B, C, h, w)


def test_grad_cam_runs_on_a_cnn_model():
    pytest.importorskip("pytorch_grad_cam")
    from medclipin.config import ImageConfig, ModelConfig, TextConfig
    from medclipin.eval.gradcam import image_cam
    from medclipin.models.model import MedClipModel

    cfg = ModelConfig()
    cfg.image_encoder = ImageEncoderConfig(name="resnet18")
    cfg.text_encoder.config = TINY_BERT
    cfg.contrastive.embed_dim = 8
    torch.manual_seed(0)
    model = MedClipModel(cfg, ImageConfig(size=64, channels=1), TextConfig(), vocab_size=50)
    images = torch.randn(2, 1, 64, 64)
    maps = image_cam(model, images, torch.nn.functional.normalize(torch.randn(2, 8), dim=-1))
    assert maps.shape == (2, 64, 64) and float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 + 1e-6


def test_input_replicated_when_the_architecture_takes_no_in_chans(monkeypatch):
    import timm

    real = timm.create_model

    def no_in_chans(name, pretrained=False, **kwargs):
        if "in_chans" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'in_chans'")
        return real(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_in_chans)
    enc = ImageEncoder(ImageEncoderConfig(name="resnet18"), in_chans=1, image_size=64)
    assert enc.replicate_channels == 3 and enc.model.conv1.in_channels == 3
    assert enc(torch.randn(2, 1, 64, 64)).shape == (2, 512)


def test_image_freeze_and_grad_checkpointing():
    enc = ImageEncoder(ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs=TINY_VIT, freeze=True,
                                          grad_checkpointing=True), in_chans=1, image_size=32)
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.model.grad_checkpointing


def test_image_pretrained_missing_file_is_clear(tmp_path):
    with pytest.raises(EncoderLoadError, match="not found"):
        ImageEncoder(ImageEncoderConfig(name="resnet18", pretrained=str(tmp_path / "nope.safetensors")))
    with pytest.raises(EncoderLoadError, match="no weights file"):
        ImageEncoder(ImageEncoderConfig(name="resnet18", pretrained=str(tmp_path)))


def test_image_pretrained_from_local_file(tmp_path):
    from safetensors.torch import save_file

    source = ImageEncoder(ImageEncoderConfig(name="resnet18"), in_chans=3)
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = ImageEncoder(ImageEncoderConfig(name="resnet18", pretrained=str(tmp_path)), in_chans=3)
    for key, value in loaded.model.state_dict().items():
        if "num_batches_tracked" not in key:
            assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_text_pooling(pooling):
    torch.manual_seed(0)
    enc = TextEncoder(TextEncoderConfig(config=TINY_BERT, pooling=pooling), vocab_size=50).eval()
    ids = torch.randint(5, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    pooled = enc(ids, mask)
    hidden = enc.model(input_ids=ids, attention_mask=mask).last_hidden_state
    if pooling == "cls":
        expected = hidden[:, 0]
    else:
        expected = torch.stack([hidden[0].mean(0), hidden[1, :4].mean(0)])
    torch.testing.assert_close(pooled, expected)
    # mean pooling ignores padding: changing a padded token leaves the feature unchanged
    if pooling == "mean":
        ids2 = ids.clone()
        ids2[1, 5] = 7
        torch.testing.assert_close(enc(ids2, mask)[1], pooled[1])


def test_text_options_and_errors(tmp_path):
    with pytest.raises(ValueError, match="pooling"):
        TextEncoder(TextEncoderConfig(config=TINY_BERT, pooling="max"), vocab_size=50)
    with pytest.raises(ValueError, match="vocab_size"):
        TextEncoder(TextEncoderConfig(config=TINY_BERT))
    frozen = TextEncoder(TextEncoderConfig(config=TINY_BERT, freeze=True, grad_checkpointing=True), vocab_size=50)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in frozen.model.modules())
    assert frozen.model.pooler is None  # we pool ourselves
    with pytest.raises(EncoderLoadError, match="local folder holds no loadable"):
        TextEncoder(TextEncoderConfig(pretrained=str(tmp_path)))


def test_text_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderLoadError, match="offline"):
        TextEncoder(TextEncoderConfig(pretrained="medclipin-test/no-such-model-anywhere"))
