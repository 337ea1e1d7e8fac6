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
    enc = ImageEncoder(ImageEncoderConfig(name="resnet18"), in_chans=1, image_size=224)
    assert enc.model.conv1.in_channels == 1
    x = torch.randn(2, 1, 224, 224)
    assert enc(x).shape == (2, 512) and enc.out_dim == 512
    layer, reshape = enc.gradcam_layer()
    assert layer is enc.model.layer4 and reshape is None  # 7 x 7 at 224 px
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    enc(x)
    handle.remove()
    assert seen["shape"][:2] == (2, 512) and len(seen["shape"]) == 4  # spatial (B, C, h, w)


def test_grad_cam_runs_on_a_cnn_model():
    pytest.importorskip("pytorch_grad_cam")
    from medclipin.config import ModelConfig
    from medclipin.eval.gradcam import image_cam
    from medclipin.models.model import MedClipModel

    cfg = ModelConfig()
    cfg.image_encoder = ImageEncoderConfig(name="resnet18")
    cfg.text_encoder.config = TINY_BERT
    cfg.contrastive.embed_dim = 8
    torch.manual_seed(0)
    model = MedClipModel.from_config(cfg, image_size=64, in_chans=1, vocab_size=50)
    images = torch.randn(2, 1, 64, 64)
    maps = image_cam(model, images, torch.nn.functional.normalize(torch.randn(2, 8), dim=-1))
    assert maps.shape == (2, 64, 64) and float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0 + 1e-6


def test_input_replicated_when_the_architecture_takes_no_in_chans(monkeypatch):
    """Which arguments a timm architecture takes is read from its class's signature (no retry on a TypeError's
    text); one whose class takes no ``in_chans`` is built with three channels and fed replicated grey."""
    from medclipin.models import encoders

    real = encoders._timm_constructor_arguments
    monkeypatch.setattr(encoders, "_timm_constructor_arguments",
                        lambda timm, name, kwargs: real(timm, name, kwargs) - {"in_chans"})
    assert "img_size" in real(__import__("timm"), "vit_tiny_patch16_224", {})
    assert "img_size" not in real(__import__("timm"), "resnet18", {})
    enc = ImageEncoder(ImageEncoderConfig(name="resnet18"), in_chans=1, image_size=64)
    assert enc.replicate_channels == 3 and enc.model.conv1.in_channels == 3
    assert enc(torch.randn(2, 1, 64, 64)).shape == (2, 512)


def test_image_freeze_and_grad_checkpointing():
    enc = ImageEncoder(ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs=TINY_VIT, freeze=True,
                                          grad_checkpointing=True), in_chans=1, image_size=32)
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.model.grad_checkpointing


def _frozen_names(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not p.requires_grad}


def test_image_freeze_layers_freezes_the_stem_and_the_first_blocks_and_backward_skips_them():
    cfg = ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs={**TINY_VIT, "depth": 3}, freeze_layers=2)
    enc = ImageEncoder(cfg, in_chans=1, image_size=32)
    frozen = _frozen_names(enc.model)
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc2.bias"} <= frozen
    assert all(n.startswith(("cls_token", "pos_embed", "patch_embed.", "blocks.0.", "blocks.1.")) for n in frozen)
    trainable = {n for n, p in enc.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("blocks.2.", "norm.")) for n in trainable)
    enc(torch.randn(2, 1, 32, 32)).sum().backward()
    for name, parameter in enc.model.named_parameters():
        assert (parameter.grad is None) == (name in frozen), name
    # a CNN: the stem and the first stages, in timm's own grouping
    cnn = ImageEncoder(ImageEncoderConfig(name="resnet18", freeze_layers=2), in_chans=1, image_size=64)
    frozen = _frozen_names(cnn.model)
    assert all(n.startswith(("conv1.", "bn1.", "layer1.", "layer2.")) for n in frozen)
    assert {"conv1.weight", "layer1.0.conv1.weight", "layer2.1.bn2.bias"} <= frozen
    assert not any(n.startswith(("layer3.", "layer4.")) for n in frozen)
    cnn(torch.randn(2, 1, 64, 64)).sum().backward()
    assert cnn.model.conv1.weight.grad is None and cnn.model.layer2[0].conv1.weight.grad is None
    assert cnn.model.layer3[0].conv1.weight.grad is not None
    # 0 freezes nothing; freeze wins over freeze_layers; more layers than the tower has is an error
    assert not _frozen_names(ImageEncoder(ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs=TINY_VIT),
                                          in_chans=1, image_size=32).model)
    both = ImageEncoder(ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs=TINY_VIT, freeze=True, freeze_layers=1),
                        in_chans=1, image_size=32)
    assert not any(p.requires_grad for p in both.parameters())
    with pytest.raises(ValueError, match="freeze_layers=9"):
        ImageEncoder(ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs={**TINY_VIT, "depth": 3}, freeze_layers=9),
                     in_chans=1, image_size=32)


def test_text_freeze_layers_freezes_the_embeddings_and_the_first_layers_and_backward_skips_them():
    torch.manual_seed(0)
    cfg = TextEncoderConfig(config={**TINY_BERT, "num_hidden_layers": 3}, freeze_layers=2)
    enc = TextEncoder(cfg, vocab_size=50)
    frozen = _frozen_names(enc.model)
    assert all(n.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1.")) for n in frozen)
    assert {"embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"} <= frozen
    assert all(p.requires_grad for n, p in enc.model.named_parameters() if n.startswith("encoder.layer.2."))
    ids, mask = torch.randint(5, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    enc(ids, mask).sum().backward()
    for name, parameter in enc.model.named_parameters():
        assert (parameter.grad is None) == (name in frozen), name
    # all layers may be frozen (only the pooling on top is left); more than that is an error
    every = TextEncoder(TextEncoderConfig(config=TINY_BERT, freeze_layers=1), vocab_size=50)
    assert not any(p.requires_grad for p in every.parameters())
    with pytest.raises(ValueError, match="freeze_layers=2"):
        TextEncoder(TextEncoderConfig(config=TINY_BERT, freeze_layers=2), vocab_size=50)


def test_frozen_layers_stay_frozen_in_the_model_and_its_objective():
    """Through MedClipModel.from_config and the training objective: frozen tower layers get no gradient,
    are not optimised, and the CLIPin target still mirrors them."""
    from medclipin.config import ModelConfig
    from medclipin.models.model import MedClipModel
    from medclipin.train.objective import TrainingObjective
    from medclipin.train.optim import parameter_groups

    cfg = ModelConfig()
    cfg.image_encoder = ImageEncoderConfig(name="vit_tiny_patch16_224", kwargs={**TINY_VIT, "depth": 2}, freeze_layers=1)
    cfg.text_encoder.config = {**TINY_BERT, "num_hidden_layers": 2}
    cfg.text_encoder.freeze_layers = 1
    cfg.contrastive.embed_dim = 8
    cfg.clipin.enabled = True
    cfg.clipin.pre_dim, cfg.clipin.nc_dim, cfg.clipin.predictor_hidden = 16, 16, 16
    torch.manual_seed(0)
    objective = TrainingObjective(MedClipModel.from_config(cfg, 32, 1, vocab_size=50), cfg)
    model = objective.model
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 1, 32, 32, generator=g), "input_ids": torch.randint(5, 50, (4, 9), generator=g),
             "attention_mask": torch.ones(4, 9, dtype=torch.long)}
    objective(batch).loss.backward()
    assert model.text_encoder.model.embeddings.word_embeddings.weight.grad is None
    assert model.text_encoder.model.encoder.layer[0].attention.self.query.weight.grad is None
    assert model.text_encoder.model.encoder.layer[1].attention.self.query.weight.grad is not None
    assert model.image_encoder.model.blocks[0].attn.qkv.weight.grad is None
    assert model.image_encoder.model.patch_embed.proj.weight.grad is None
    assert model.image_encoder.model.blocks[1].attn.qkv.weight.grad is not None
    optimised = {id(p) for group in parameter_groups(objective, 0.05) for p in group["params"]}
    assert id(model.image_encoder.model.blocks[0].attn.qkv.weight) not in optimised
    assert id(model.image_encoder.model.blocks[1].attn.qkv.weight) in optimised
    target = objective.clipin.target["text_encoder"]
    assert torch.equal(target.model.encoder.layer[0].attention.self.query.weight,
                       model.text_encoder.model.encoder.layer[0].attention.self.query.weight)


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
