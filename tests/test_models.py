"""MedClipModel: the CLIPin head as specified (docs/method.md), the EMA target, λ, switches, monitors,
two views, the pluggable base objective, xCLIP, save/load round trips and every config in configs/."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from medclipin.config import ImageConfig, ModelConfig, TextConfig, load_config
from medclipin.models.heads import NonContrastiveProjector, Predictor
from medclipin.models.model import TARGET_MODULES, MedClipModel

REPO = Path(__file__).resolve().parents[1]
VOCAB = 100
B = 6


def tiny_cfg(kind: str = "clip", clipin: bool = True, xclip: bool = False, **clipin_kw) -> ModelConfig:
    cfg = ModelConfig()
    cfg.image_encoder.name = "vit_tiny_patch16_224"
    cfg.image_encoder.kwargs = {"patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2}
    cfg.text_encoder.config = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                               "intermediate_size": 64, "hidden_dropout_prob": 0.0,
                               "attention_probs_dropout_prob": 0.0}
    cfg.contrastive.kind = kind
    cfg.contrastive.embed_dim = 16
    cfg.clipin.enabled = clipin
    cfg.clipin.pre_dim, cfg.clipin.nc_dim, cfg.clipin.predictor_hidden = 24, 40, 20
    for key, value in clipin_kw.items():
        setattr(cfg.clipin, key, value)
    cfg.xclip.enabled = xclip
    cfg.xclip.num_prototypes, cfg.xclip.head_hidden, cfg.xclip.head_dim = 16, 24, 8
    return cfg


def build(cfg: ModelConfig, seed: int = 0) -> MedClipModel:
    torch.manual_seed(seed)
    return MedClipModel(cfg, ImageConfig(size=32, channels=1), TextConfig(max_length=12), vocab_size=VOCAB)


def batch(seed: int = 0, two_views: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        "image": torch.randn(B, 1, 32, 32, generator=g),
        "input_ids": torch.randint(5, VOCAB, (B, 10), generator=g),
        "attention_mask": torch.ones(B, 10, dtype=torch.long),
    }
    out["attention_mask"][0, 7:] = 0
    if two_views:
        out["image_2"] = torch.randn(B, 1, 32, 32, generator=g)
        out["input_ids_2"] = torch.randint(5, VOCAB, (B, 10), generator=g)
        out["attention_mask_2"] = torch.ones(B, 10, dtype=torch.long)
    return out


def target_state(model: MedClipModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.target.state_dict().items()}


def online_state(model: MedClipModel) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in TARGET_MODULES for k, v in getattr(model, name).state_dict().items()}


# ---------------------------------------------------------------------------------- architecture
def test_clipin_head_structure_and_dimensions_from_config():
    model = build(tiny_cfg())
    assert isinstance(model.image_pre, torch.nn.Linear) and model.image_pre.out_features == 24
    assert isinstance(model.text_pre, torch.nn.Linear) and model.text_pre.in_features == 32
    assert model.image_proj.in_features == 24 and model.image_proj.out_features == 16
    for nc in (model.image_nc, model.text_nc):
        assert isinstance(nc, NonContrastiveProjector)
        bn, act, lin = nc
        assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.num_features == 24
        assert isinstance(act, torch.nn.GELU)
        assert (lin.in_features, lin.out_features) == (24, 40)
    for name in ("image_inter", "image_intra", "text_inter", "text_intra"):
        pred = getattr(model.predictors, name)
        assert isinstance(pred, Predictor)
        types = [type(m) for m in pred]
        assert types == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
        assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (40, 20, 40)
    # the target mirrors encoders, pre-projectors and nc projectors only (no predictors, no contrastive heads)
    assert set(model.target.keys()) == set(TARGET_MODULES)


def test_baselines_have_no_clipin_parts():
    for kind in ("clip", "siglip"):
        model = build(tiny_cfg(kind, clipin=False))
        assert not hasattr(model, "target") and not hasattr(model, "predictors")
        assert not model.needs_two_views
        out = model(batch(two_views=False))
        assert set(out.terms) >= {kind, "logit_scale"} and torch.isfinite(out.loss)
        assert torch.allclose(out.loss, out.terms[kind])


# ------------------------------------------------------------------------------------ EMA target
def test_target_starts_equal_to_online():
    model = build(tiny_cfg())
    online, target = online_state(model), target_state(model)
    assert online.keys() == target.keys()
    for key in online:
        assert torch.equal(online[key], target[key]), key
        assert online[key].data_ptr() != target[key].data_ptr() or online[key].numel() == 0


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_no_gradient_reaches_the_target(kind):
    model = build(tiny_cfg(kind))
    model.train()
    model(batch()).loss.backward()
    for name, parameter in model.target.named_parameters():
        assert not parameter.requires_grad, name
        assert parameter.grad is None, name
    # the online encoders did receive gradients
    assert model.image_encoder.model.patch_embed.proj.weight.grad is not None
    assert model.predictors.text_intra[0].weight.grad is not None
    # and the optimiser never sees target parameters
    from medclipin.train.optim import parameter_groups

    ids = {id(p) for group in parameter_groups(model, 0.05) for p in group["params"]}
    assert not ids & {id(p) for p in model.target.parameters()}


def test_ema_update_is_exact_and_buffers_are_copied():
    model = build(tiny_cfg(momentum=0.9))
    model.train()
    model(batch())  # BatchNorm running statistics of the online nc projectors move
    with torch.no_grad():  # make online ≠ target everywhere
        for name in TARGET_MODULES:
            for p in getattr(model, name).parameters():
                p.add_(torch.randn_like(p) * 0.1)
    before_target, online = target_state(model), online_state(model)
    model.update_target(0.9)
    after = target_state(model)
    buffer_names = {f"{name}.{k}" for name in TARGET_MODULES for k, _ in getattr(model, name).named_buffers()}
    assert any("running_mean" in k for k in buffer_names)
    for key, value in after.items():
        if key in buffer_names:
            assert torch.equal(value, online[key]), key  # copied, not averaged
        else:
            expected = 0.9 * before_target[key] + 0.1 * online[key]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)


def test_after_optimizer_step_uses_momentum_schedule():
    fixed = build(tiny_cfg(momentum=0.95))
    assert fixed.target_momentum(0, 100) == 0.95 and fixed.target_momentum(99, 100) == 0.95
    cosine = build(tiny_cfg(momentum=0.95, momentum_schedule="cosine"))
    assert cosine.target_momentum(0, 100) == pytest.approx(0.95)
    assert cosine.target_momentum(50, 100) == pytest.approx(0.975)
    assert cosine.target_momentum(100, 100) == pytest.approx(1.0)
    bad = build(tiny_cfg(momentum_schedule="linear"))
    with pytest.raises(ValueError, match="momentum_schedule"):
        bad.target_momentum(1, 10)
    # after_optimizer_step applies m(step): with m = 1 at the end the target does not move
    with torch.no_grad():
        cosine.image_pre.weight.add_(1.0)
    before = cosine.target["image_pre"].weight.clone()
    cosine.after_optimizer_step(100, 100)
    assert torch.equal(cosine.target["image_pre"].weight, before)
    cosine.after_optimizer_step(0, 100)
    torch.testing.assert_close(cosine.target["image_pre"].weight, 0.95 * before + 0.05 * cosine.image_pre.weight)


def test_reset_target_copies_current_online_weights():
    model = build(tiny_cfg())
    with torch.no_grad():
        model.text_encoder.model.embeddings.word_embeddings.weight.mul_(3.0)  # e.g. loaded pretrained weights
    model.reset_target()
    for key, value in online_state(model).items():
        assert torch.equal(value, target_state(model)[key]), key


# ---------------------------------------------------------------------------------------------- λ
def test_lambda_learnable_clamped_by_after_optimizer_step():
    model = build(tiny_cfg(lambda_max=5.0))
    weights = model.loss_weights
    assert isinstance(weights.lambda_intra, torch.nn.Parameter)
    with torch.no_grad():
        weights.lambda_intra.fill_(-2.0)
        weights.lambda_clip.fill_(9.0)
        model.contrastive.logit_scale.fill_(10.0)
    model.after_optimizer_step(1, 10)
    assert weights.lambda_intra.item() == 0.0 and weights.lambda_clip.item() == 5.0
    assert model.contrastive.logit_scale.item() == pytest.approx(model.cfg.contrastive.max_logit_scale)


def test_lambda_fixed_is_a_buffer_and_used_in_the_total():
    model = build(tiny_cfg(learnable_lambda=False, lambda_intra=0.5, lambda_clip=2.0))
    assert "loss_weights.lambda_intra" not in dict(model.named_parameters())
    assert not isinstance(model.loss_weights.lambda_intra, torch.nn.Parameter)
    model.eval()  # BatchNorm with running statistics: deterministic
    out = model(batch())
    expected = out.terms["loss_inter"] + 0.5 * out.terms["loss_intra"] + 2.0 * out.terms["loss_contrastive"]
    torch.testing.assert_close(out.loss.detach(), expected)
    assert torch.equal(out.terms["loss_contrastive"], out.terms["clip"])


# -------------------------------------------------------------------------------- ablation switches
@pytest.mark.parametrize("inter,intra,contrastive", [(True, False, True), (False, True, True), (True, True, False),
                                                     (False, False, True)])
def test_ablation_switches(inter, intra, contrastive):
    model = build(tiny_cfg(use_inter=inter, use_intra=intra, use_contrastive=contrastive, learnable_lambda=False))
    model.eval()
    out = model(batch())
    expected = torch.zeros(())
    if inter:
        expected = expected + out.terms["loss_inter"]
    if intra:
        expected = expected + out.terms["loss_intra"]
    if contrastive:
        expected = expected + out.terms["loss_contrastive"]
    torch.testing.assert_close(out.loss.detach(), expected)
    model.train()
    model(batch()).loss.backward()
    assert (model.predictors.image_inter[0].weight.grad is not None) == inter
    assert (model.predictors.image_intra[0].weight.grad is not None) == intra
    assert (model.image_proj.weight.grad is not None) == contrastive


def test_all_terms_off_is_an_error():
    model = build(tiny_cfg(use_inter=False, use_intra=False, use_contrastive=False))
    with pytest.raises(ValueError, match="switched off"):
        model(batch())


# ------------------------------------------------------------------------------ monitors, two views
def test_collapse_monitor_stats():
    model = build(tiny_cfg())
    model.train()
    out = model(batch())
    for key in ("std_image", "std_text", "std_nc_image", "std_nc_text"):
        value = float(out.stats[key])
        dim = 16 if key in ("std_image", "std_text") else 40
        # healthy random embeddings: about 1/sqrt(D); collapse → 0
        assert 0.2 / dim ** 0.5 < value < 2.0 / dim ** 0.5, (key, value)
    # identical inputs for every row → collapsed embeddings → std ≈ 0
    same = batch()
    for key in ("image", "image_2"):
        same[key] = same[key][:1].expand_as(same[key]).clone()
    for key in ("input_ids", "input_ids_2"):
        same[key] = same[key][:1].expand_as(same[key]).clone()
    for key in ("attention_mask", "attention_mask_2"):
        same[key] = torch.ones_like(same[key])
    model.eval()
    out = model(same)
    assert float(out.stats["std_image"]) < 1e-4 and float(out.stats["std_text"]) < 1e-4


def test_target_sees_the_second_views():
    model = build(tiny_cfg())
    model.eval()  # BatchNorm running statistics: each row independent of the batch
    base = batch()
    out = model(base)
    changed_image = dict(base, image_2=base["image_2"] + 1.0)
    out_i = model(changed_image)
    changed_text = dict(base, input_ids_2=torch.flip(base["input_ids_2"], dims=[0]))
    out_t = model(changed_text)
    for other in (out_i, out_t):
        assert torch.equal(other.terms["clip"], out.terms["clip"])  # base term from view 1 only
        assert not torch.equal(other.terms["loss_inter"], out.terms["loss_inter"])
        assert not torch.equal(other.terms["loss_intra"], out.terms["loss_intra"])
    # without second views the first view is the target's input
    single = {k: v for k, v in base.items() if not k.endswith("_2")}
    same_views = dict(base, image_2=base["image"], input_ids_2=base["input_ids"], attention_mask_2=base["attention_mask"])
    torch.testing.assert_close(model(single).loss, model(same_views).loss)


@pytest.mark.parametrize("target_dropout", [True, False])
def test_target_dropout_switch(target_dropout):
    """``clipin.target_dropout: false`` gives a deterministic target (no dropout masks) while the online
    branch keeps its dropout; the default keeps the reference code's train-mode target."""
    cfg = tiny_cfg(target_dropout=target_dropout)
    cfg.text_encoder.config.update(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    cfg.image_encoder.kwargs.update(drop_rate=0.5, proj_drop_rate=0.5)
    model = build(cfg)  # no .train() call: a new model is in train mode, the switch already applies
    assert model.text_encoder.training and model.image_encoder.training
    assert model.target["text_encoder"].training is target_dropout
    assert model.target["image_encoder"].training is target_dropout
    assert model.target["image_nc"].training  # BYOL: the target's batch norm uses batch statistics
    b = batch()
    runs = []
    with torch.no_grad():
        for _ in range(2):
            t = model.target
            runs.append((t["text_encoder"](b["input_ids_2"], b["attention_mask_2"]), t["image_encoder"](b["image_2"])))
            online = model.text_encoder(b["input_ids"], b["attention_mask"])
            assert not torch.equal(online, model.text_encoder(b["input_ids"], b["attention_mask"]))
    for first, second in zip(*runs):
        assert torch.equal(first, second) is not target_dropout
    model.eval()
    assert not model.target["text_encoder"].training and not model.target["image_nc"].training


# ------------------------------------------------------------------------------ pluggable base, xCLIP
def test_clipin_wraps_siglip_by_configuration():
    model = build(tiny_cfg("siglip"))
    assert hasattr(model.contrastive, "logit_bias")
    model.eval()
    out = model(batch())
    assert "siglip" in out.terms and torch.equal(out.terms["loss_contrastive"], out.terms["siglip"])
    assert {"loss_inter", "loss_intra", "lambda_intra", "lambda_clip"} <= set(out.terms)


def test_xclip_uses_nclip_on_pooled_features():
    model = build(tiny_cfg(clipin=False, xclip=True))
    assert model.nclip.image_head.mlp[0].in_features == model.image_encoder.out_dim
    assert model.nclip.text_head.mlp[0].in_features == model.text_encoder.out_dim
    model.train()
    out = model(batch(two_views=False))
    assert {"clip", "nclip", "nclip_ce", "nclip_entropy"} <= set(out.terms)
    torch.testing.assert_close(out.loss.detach(), out.terms["clip"] + model.cfg.xclip.nclip_weight * out.terms["nclip"])
    out.loss.backward()
    assert model.nclip.image_head.prototypes.weight.grad is not None
    assert model.image_proj.weight.grad is not None


# ------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("variant", ["clip", "clipin", "siglip", "xclip", "siglip_clipin"])
def test_save_pretrained_round_trip(tmp_path, variant):
    cfg = {
        "clip": tiny_cfg("clip", clipin=False), "clipin": tiny_cfg("clip"),
        "siglip": tiny_cfg("siglip", clipin=False), "xclip": tiny_cfg("clip", clipin=False, xclip=True),
        "siglip_clipin": tiny_cfg("siglip"),
    }[variant]
    model = build(cfg)
    model.train()
    model(batch())  # move BatchNorm statistics away from their initial values
    model.after_optimizer_step(1, 10)
    model.eval()
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"model.safetensors", "config.json"}
    loaded = MedClipModel.from_pretrained(tmp_path / "m").eval()
    b = batch(3)
    with torch.no_grad():
        a, c = model(b), loaded(b)
        torch.testing.assert_close(a.loss, c.loss, rtol=0, atol=0)
        for key in a.terms:
            torch.testing.assert_close(a.terms[key], c.terms[key], rtol=0, atol=0)
        torch.testing.assert_close(model.encode_image(b["image"]), loaded.encode_image(b["image"]), rtol=0, atol=0)
        torch.testing.assert_close(model.similarity(b["image"], b["input_ids"], b["attention_mask"]),
                                   loaded.similarity(b["image"], b["input_ids"], b["attention_mask"]), rtol=0, atol=0)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key


def test_from_pretrained_rejects_a_non_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MedClipModel.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------ configs
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = ["tiny_clip", "tiny_siglip", "tiny_clip_clipin", "tiny_siglip_clipin", "tiny_xclip"]
FULL = ["clip_vitb16_bioclinicalbert", "siglip_vitb16_bioclinicalbert", "clip_clipin_vitb16_bioclinicalbert",
        "siglip_clipin_vitb16_bioclinicalbert", "xclip_vitb16_bioclinicalbert"]


def test_required_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert set(TINY + FULL) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.contrastive.kind in ("clip", "siglip")


@pytest.mark.parametrize("stem", FULL)
def test_full_configs_match_the_spec(stem):
    cfg = load_config(REPO / "configs" / f"{stem}.yaml")
    assert cfg.model.image_encoder.name == "vit_base_patch16_224" and cfg.data.image.size == 224
    assert cfg.model.text_encoder.pretrained == "emilyalsentzer/Bio_ClinicalBERT"
    assert cfg.data.text.tokenizer == "emilyalsentzer/Bio_ClinicalBERT"
    assert cfg.model.contrastive.embed_dim == 512
    assert cfg.model.clipin.enabled == ("clipin" in stem)
    assert cfg.model.xclip.enabled == stem.startswith("xclip")
    assert cfg.model.contrastive.kind == ("siglip" if stem.startswith("siglip") else "clip")
    if cfg.model.clipin.enabled:
        c = cfg.model.clipin
        assert (c.pre_dim, c.nc_dim, c.predictor_hidden, c.momentum) == (1024, 8192, 2048, 0.95)


def test_fundus_config_augments_a_real_fundus_photo_like_a_fundus(shared_data):
    """The fundus config: 3-channel field-of-view pipeline with flips and colour jitter, on a real RFMiD photo."""
    from medclipin.data.readers import read_image
    from medclipin.data.transforms import TwoViewTransform, build_image_transform

    cfg = load_config(REPO / "configs" / "clip_clipin_vitb16_fundus.yaml")
    assert cfg.data.image.domain == "fundus" and cfg.data.image.channels == 3 and cfg.data.text.sections == ("text",)
    assert (REPO / cfg.eval.prompts).is_file()
    transform = build_image_transform(cfg.data.image, train=True)
    pipeline = repr(transform.pipeline)
    assert "HorizontalFlip" in pipeline and "ColorJitter" in pipeline and "VerticalFlip" not in pipeline
    pixels = read_image(shared_data / "fundus_rfmid" / "1.png", window=cfg.data.image.window).pixels
    first, second = TwoViewTransform(transform)(pixels)
    assert first.shape == second.shape == (3, 224, 224) and not torch.equal(first, second)
    assert torch.isfinite(first).all()
    evaluation = build_image_transform(cfg.data.image, train=False)
    assert torch.equal(evaluation(pixels), evaluation(pixels))


@pytest.mark.parametrize("stem", TINY)
def test_tiny_configs_build(stem):
    cfg = load_config(REPO / "configs" / f"{stem}.yaml")
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.image_encoder == demo.model.image_encoder
    assert cfg.model.text_encoder == demo.model.text_encoder
    assert cfg.model.contrastive.embed_dim == demo.model.contrastive.embed_dim
    cfg.data.image.size = 32  # construction only; keeps the test fast
    model = MedClipModel(cfg.model, cfg.data.image, cfg.data.text, vocab_size=VOCAB)
    assert model.uses_clipin == ("clipin" in stem)
    assert hasattr(model, "nclip") == ("xclip" in stem)


@pytest.mark.parametrize("variant", ["clip", "clipin"])
def test_a_tiny_batch_can_be_fitted(variant):
    """Sanity: the whole graph learns — the contrastive loss on 6 fixed pairs falls well below ln(B)."""
    model = build(tiny_cfg("clip", clipin=variant == "clipin"))
    model.train()
    b = batch(5)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for step in range(1, 41):
        out = model(b)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.after_optimizer_step(step, 40)
        first = float(out.terms["clip"]) if first is None else first
    assert float(out.terms["clip"]) < 0.5 * first, (first, float(out.terms["clip"]))
