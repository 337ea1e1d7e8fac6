"""MedClipModel (the inference model) and TrainingObjective (what trains it): the CLIPin head as specified
(docs/method.md), the EMA target, λ, switches, monitors, two views, the pluggable base objective, xCLIP,
save/load round trips (format 2, and format-1 folders written before the model/objective split) and
every config in configs/."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medclipin.config import ModelConfig, load_config
from medclipin.losses import ClipLoss, SigLipLoss
from medclipin.train.heads import NonContrastiveProjector, Predictor
from medclipin.models.model import MedClipModel, ModelFolderError
from medclipin.train.objective import TARGET_MODULES, TrainingObjective

TARGET_NAMES = tuple(name for name, _, _ in TARGET_MODULES)
# tensors that only training needs: never in an exported model folder
TRAINING_PREFIXES = ("target.", "predictors.", "image_nc.", "text_nc.", "loss_weights.", "nclip.", "clipin.")

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


def build(cfg: ModelConfig, seed: int = 0) -> TrainingObjective:
    """The training objective around a freshly built model (``.model`` is the inference model)."""
    torch.manual_seed(seed)
    model = MedClipModel.from_config(cfg, image_size=32, in_chans=1, vocab_size=VOCAB)
    return TrainingObjective(model, cfg)


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


def online(objective: TrainingObjective, name: str) -> torch.nn.Module:
    """The online module the target's ``name`` mirrors (a tower or pre-projector of the model, or a CLIPin head)."""
    return objective.clipin.online(objective.model, name)


def target_state(objective: TrainingObjective) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in objective.clipin.target.state_dict().items()}


def online_state(objective: TrainingObjective) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name in TARGET_NAMES for k, v in online(objective, name).state_dict().items()}


# ---------------------------------------------------------------------------------- architecture
def test_clipin_head_structure_and_dimensions_from_config():
    objective = build(tiny_cfg())
    model, clipin = objective.model, objective.clipin
    assert isinstance(model.image_pre, torch.nn.Linear) and model.image_pre.out_features == 24
    assert isinstance(model.text_pre, torch.nn.Linear) and model.text_pre.in_features == 32
    assert model.image_proj.in_features == 24 and model.image_proj.out_features == 16
    for nc in (clipin.image_nc, clipin.text_nc):
        assert isinstance(nc, NonContrastiveProjector)
        bn, act, lin = nc
        assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.num_features == 24
        assert isinstance(act, torch.nn.GELU)
        assert (lin.in_features, lin.out_features) == (24, 40)
    for name in ("image_inter", "image_intra", "text_inter", "text_intra"):
        pred = getattr(clipin.predictors, name)
        assert isinstance(pred, Predictor)
        types = [type(m) for m in pred]
        assert types == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
        assert (pred[0].in_features, pred[0].out_features, pred[3].out_features) == (40, 20, 40)
    # the target mirrors encoders, pre-projectors and nc projectors only (no predictors, no contrastive heads)
    assert set(clipin.target.keys()) == set(TARGET_NAMES)
    # the towers and pre-projectors are the model's, the nc projectors the objective's
    assert {owner for _, owner, _ in TARGET_MODULES} == {"model", "clipin"}
    for name, owner, attribute in TARGET_MODULES:
        assert online(objective, name) is getattr(model if owner == "model" else clipin, attribute)


def test_the_inference_model_holds_no_training_parts():
    """The model is what inference needs: towers, (pre-)projections, logit scale; the objective holds the rest."""
    objective = build(tiny_cfg("siglip", xclip=True))
    model = objective.model
    for name in ("target", "predictors", "image_nc", "text_nc", "loss_weights", "nclip", "contrastive"):
        assert not hasattr(model, name), name
    assert set(dict(model.named_children())) == {"image_encoder", "text_encoder", "image_pre", "text_pre",
                                                 "image_proj", "text_proj"}
    assert {n for n, _ in model.named_parameters() if "." not in n} == {"logit_scale", "logit_bias"}
    # the objective's parameters are the model's plus its own
    model_ids = {id(p) for p in model.parameters()}
    assert model_ids <= {id(p) for p in objective.parameters()}
    own = objective.training_state_dict()
    assert own and not any(k.startswith("model.") for k in own)
    assert any(k.startswith("clipin.target.") for k in own) and any(k.startswith("nclip.") for k in own)
    # CLIP: no bias; no CLIPin: identity pre-projectors
    clip = build(tiny_cfg("clip", clipin=False)).model
    assert clip.logit_bias is None and isinstance(clip.image_pre, torch.nn.Identity)
    assert isinstance(clip.text_pre, torch.nn.Identity) and clip.image_proj.in_features == 32


def test_baselines_have_no_clipin_parts():
    for kind in ("clip", "siglip"):
        objective = build(tiny_cfg(kind, clipin=False))
        assert objective.clipin is None and objective.nclip is None
        assert not hasattr(objective.model, "target") and not hasattr(objective.model, "predictors")
        assert not objective.needs_two_views and not objective.has_unused_parameters
        assert objective.training_state_dict() == {}
        out = objective(batch(two_views=False))
        assert set(out.terms) >= {kind, "logit_scale"} and torch.isfinite(out.loss)
        assert torch.allclose(out.loss, out.terms[kind])
        assert isinstance(objective.base, ClipLoss if kind == "clip" else SigLipLoss)


# ------------------------------------------------------------------------------------ EMA target
def test_target_starts_equal_to_online():
    objective = build(tiny_cfg())
    online_values, target = online_state(objective), target_state(objective)
    assert online_values.keys() == target.keys()
    live = {k: v for k, v in objective.clipin.target.state_dict().items()}
    for key in online_values:
        assert torch.equal(online_values[key], target[key]), key
        source = dict(online(objective, key.split(".")[0]).state_dict())[key.split(".", 1)[1]]
        assert source.data_ptr() != live[key].data_ptr() or source.numel() == 0, key


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_no_gradient_reaches_the_target(kind):
    objective = build(tiny_cfg(kind))
    objective.train()
    objective(batch()).loss.backward()
    for name, parameter in objective.clipin.target.named_parameters():
        assert not parameter.requires_grad, name
        assert parameter.grad is None, name
    # the online encoders did receive gradients
    assert objective.model.image_encoder.model.patch_embed.proj.weight.grad is not None
    assert objective.clipin.predictors.text_intra[0].weight.grad is not None
    assert objective.model.logit_scale.grad is not None
    if kind == "siglip":
        assert objective.model.logit_bias.grad is not None
    # and the optimiser never sees target parameters
    from medclipin.train.optim import parameter_groups

    ids = {id(p) for group in parameter_groups(objective, 0.05) for p in group["params"]}
    assert not ids & {id(p) for p in objective.clipin.target.parameters()}
    assert {id(p) for p in objective.parameters() if p.requires_grad} == ids


def test_ema_update_is_exact_and_buffers_are_copied():
    objective = build(tiny_cfg(momentum=0.9))
    objective.train()
    objective(batch())  # BatchNorm running statistics of the online nc projectors move
    with torch.no_grad():  # make online ≠ target everywhere
        for name in TARGET_NAMES:
            for p in online(objective, name).parameters():
                p.add_(torch.randn_like(p) * 0.1)
    before_target, online_values = target_state(objective), online_state(objective)
    objective.clipin.update_target(objective.model, 0.9)
    after = target_state(objective)
    buffer_names = {f"{name}.{k}" for name in TARGET_NAMES for k, _ in online(objective, name).named_buffers()}
    assert any("running_mean" in k for k in buffer_names)
    for key, value in after.items():
        if key in buffer_names:
            assert torch.equal(value, online_values[key]), key  # copied, not averaged
        else:
            expected = 0.9 * before_target[key] + 0.1 * online_values[key]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)


def test_after_optimizer_step_uses_momentum_schedule():
    fixed = build(tiny_cfg(momentum=0.95)).clipin
    assert fixed.momentum(0, 100) == 0.95 and fixed.momentum(99, 100) == 0.95
    cosine = build(tiny_cfg(momentum=0.95, momentum_schedule="cosine"))
    assert cosine.clipin.momentum(0, 100) == pytest.approx(0.95)
    assert cosine.clipin.momentum(50, 100) == pytest.approx(0.975)
    assert cosine.clipin.momentum(100, 100) == pytest.approx(1.0)
    bad = build(tiny_cfg(momentum_schedule="linear"))
    with pytest.raises(ValueError, match="momentum_schedule"):
        bad.clipin.momentum(1, 10)
    # after_optimizer_step applies m(step): with m = 1 at the end the target does not move
    with torch.no_grad():
        cosine.model.image_pre.weight.add_(1.0)
    before = cosine.clipin.target["image_pre"].weight.clone()
    cosine.after_optimizer_step(100, 100)
    assert torch.equal(cosine.clipin.target["image_pre"].weight, before)
    cosine.after_optimizer_step(0, 100)
    torch.testing.assert_close(cosine.clipin.target["image_pre"].weight,
                               0.95 * before + 0.05 * cosine.model.image_pre.weight)


def test_reset_target_copies_current_online_weights():
    objective = build(tiny_cfg())
    with torch.no_grad():
        objective.model.text_encoder.model.embeddings.word_embeddings.weight.mul_(3.0)  # e.g. loaded pretrained weights
    objective.reset_target()
    for key, value in online_state(objective).items():
        assert torch.equal(value, target_state(objective)[key]), key


# ---------------------------------------------------------------------------------------------- λ
def test_lambda_learnable_clamped_by_after_optimizer_step():
    objective = build(tiny_cfg(lambda_max=5.0))
    weights = objective.clipin.loss_weights
    assert isinstance(weights.lambda_intra, torch.nn.Parameter)
    with torch.no_grad():
        weights.lambda_intra.fill_(-2.0)
        weights.lambda_clip.fill_(9.0)
        objective.model.logit_scale.fill_(10.0)
    objective.after_optimizer_step(1, 10)
    assert weights.lambda_intra.item() == 0.0 and weights.lambda_clip.item() == 5.0
    assert objective.model.logit_scale.item() == pytest.approx(objective.cfg.contrastive.max_logit_scale)
    # the model clamps its own temperature to [0, max] (also without an objective)
    model = objective.model
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0


def test_siglip_bias_is_never_clamped():
    objective = build(tiny_cfg("siglip", clipin=False))
    model = objective.model
    # SigLIP's defaults (paper: scale ln 10, bias -10); CLIP starts at ln(1/0.07)
    assert model.logit_scale.item() == pytest.approx(math.log(10), rel=1e-6)
    assert model.logit_bias.item() == -10.0
    assert build(tiny_cfg("clip", clipin=False)).model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(9.0)
        model.logit_bias.fill_(-30.0)
    objective.after_optimizer_step(1, 10)
    assert model.logit_scale.item() == pytest.approx(model.spec.max_logit_scale)
    assert model.logit_bias.item() == -30.0


def test_the_configured_temperature_and_bias_initialise_the_model():
    cfg = tiny_cfg("siglip", clipin=False)
    cfg.contrastive.siglip_init_logit_bias, cfg.contrastive.siglip_init_logit_scale = -5.0, 1.5
    siglip = build(cfg).model
    assert siglip.logit_bias.item() == -5.0 and siglip.logit_scale.item() == 1.5
    cfg = tiny_cfg("clip", clipin=False)
    cfg.contrastive.init_temperature = 0.2
    assert build(cfg).model.logit_scale.item() == pytest.approx(math.log(1 / 0.2), rel=1e-6)
    cfg.contrastive.init_temperature = 0.0
    with pytest.raises(ValueError, match="init_temperature must be > 0"):
        build(cfg)
    cfg.contrastive.init_temperature, cfg.contrastive.kind = 0.07, "infonce"
    with pytest.raises(ValueError, match="'clip' or 'siglip'"):
        build(cfg)


def test_lambda_fixed_is_a_buffer_and_used_in_the_total():
    objective = build(tiny_cfg(learnable_lambda=False, lambda_intra=0.5, lambda_clip=2.0))
    assert "clipin.loss_weights.lambda_intra" not in dict(objective.named_parameters())
    assert "clipin.loss_weights.lambda_intra" in objective.training_state_dict()
    assert not isinstance(objective.clipin.loss_weights.lambda_intra, torch.nn.Parameter)
    objective.eval()  # BatchNorm with running statistics: deterministic
    out = objective(batch())
    expected = out.terms["loss_inter"] + 0.5 * out.terms["loss_intra"] + 2.0 * out.terms["loss_contrastive"]
    torch.testing.assert_close(out.loss.detach(), expected)
    assert torch.equal(out.terms["loss_contrastive"], out.terms["clip"])


# -------------------------------------------------------------------------------- ablation switches
@pytest.mark.parametrize("inter,intra,contrastive", [(True, False, True), (False, True, True), (True, True, False),
                                                     (False, False, True)])
def test_ablation_switches(inter, intra, contrastive):
    objective = build(tiny_cfg(use_inter=inter, use_intra=intra, use_contrastive=contrastive, learnable_lambda=False))
    objective.eval()
    out = objective(batch())
    expected = torch.zeros(())
    if inter:
        expected = expected + out.terms["loss_inter"]
    if intra:
        expected = expected + out.terms["loss_intra"]
    if contrastive:
        expected = expected + out.terms["loss_contrastive"]
    torch.testing.assert_close(out.loss.detach(), expected)
    assert ("loss_inter" in out.terms) == inter and ("loss_intra" in out.terms) == intra
    assert set(out.parts) == {"clip"} | {name for name, on in (("inter", inter), ("intra", intra)) if on}
    objective.train()
    objective(batch()).loss.backward()
    clipin = objective.clipin
    if inter or intra:
        assert (clipin.predictors.image_inter[0].weight.grad is not None) == inter
        assert (clipin.predictors.image_intra[0].weight.grad is not None) == intra
        assert objective.needs_two_views
        # a switched-off term leaves parameters without gradients: DDP must be told
        assert objective.has_unused_parameters == (not (inter and intra and contrastive))
    else:
        # both non-contrastive terms off (the reference's ONLYCLIP): only λ_clip exists, nothing else is computed
        assert clipin.active is False and not objective.needs_two_views
        for name in ("predictors", "image_nc", "text_nc", "target"):
            assert not hasattr(clipin, name), name
        assert set(objective.training_state_dict()) == {"clipin.loss_weights.lambda_intra",
                                                        "clipin.loss_weights.lambda_clip"}
        assert not objective.has_unused_parameters
    assert (objective.model.image_proj.weight.grad is not None) == contrastive


def test_all_terms_off_is_an_error():
    objective = build(tiny_cfg(use_inter=False, use_intra=False, use_contrastive=False))
    with pytest.raises(ValueError, match="switched off"):
        objective(batch())


# ------------------------------------------------------------------------------ monitors, two views
def test_collapse_monitor_stats():
    objective = build(tiny_cfg())
    objective.train()
    out = objective(batch())
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
    objective.eval()
    out = objective(same)
    assert float(out.stats["std_image"]) < 1e-4 and float(out.stats["std_text"]) < 1e-4


def test_target_sees_the_second_views():
    objective = build(tiny_cfg())
    objective.eval()  # BatchNorm running statistics: each row independent of the batch
    base = batch()
    out = objective(base)
    changed_image = dict(base, image_2=base["image_2"] + 1.0)
    out_i = objective(changed_image)
    changed_text = dict(base, input_ids_2=torch.flip(base["input_ids_2"], dims=[0]))
    out_t = objective(changed_text)
    for other in (out_i, out_t):
        assert torch.equal(other.terms["clip"], out.terms["clip"])  # base term from view 1 only
        assert not torch.equal(other.terms["loss_inter"], out.terms["loss_inter"])
        assert not torch.equal(other.terms["loss_intra"], out.terms["loss_intra"])
    # without second views the first view is the target's input
    single = {k: v for k, v in base.items() if not k.endswith("_2")}
    same_views = dict(base, image_2=base["image"], input_ids_2=base["input_ids"], attention_mask_2=base["attention_mask"])
    torch.testing.assert_close(objective(single).loss, objective(same_views).loss)


@pytest.mark.parametrize("target_dropout", [True, False])
def test_target_dropout_switch(target_dropout):
    """``clipin.target_dropout: false`` gives a deterministic target (no dropout masks) while the online
    branch keeps its dropout; the default keeps the reference code's train-mode target."""
    cfg = tiny_cfg(target_dropout=target_dropout)
    cfg.text_encoder.config.update(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)
    cfg.image_encoder.kwargs.update(drop_rate=0.5, proj_drop_rate=0.5)
    objective = build(cfg)  # no .train() call: a new objective is in train mode, the switch already applies
    model, target = objective.model, objective.clipin.target
    assert model.text_encoder.training and model.image_encoder.training
    assert target["text_encoder"].training is target_dropout
    assert target["image_encoder"].training is target_dropout
    assert target["image_nc"].training  # BYOL: the target's batch norm uses batch statistics
    b = batch()
    runs = []
    with torch.no_grad():
        for _ in range(2):
            runs.append((target["text_encoder"](b["input_ids_2"], b["attention_mask_2"]),
                         target["image_encoder"](b["image_2"])))
            online_text = model.text_encoder(b["input_ids"], b["attention_mask"])
            assert not torch.equal(online_text, model.text_encoder(b["input_ids"], b["attention_mask"]))
    for first, second in zip(*runs):
        assert torch.equal(first, second) is not target_dropout
    objective.eval()
    assert not target["text_encoder"].training and not target["image_nc"].training
    objective.train()  # back to training: the switch applies again
    assert target["text_encoder"].training is target_dropout and target["image_nc"].training


# ------------------------------------------------------------------------------ pluggable base, xCLIP
def test_clipin_wraps_siglip_by_configuration():
    objective = build(tiny_cfg("siglip"))
    assert isinstance(objective.base, SigLipLoss) and objective.model.logit_bias is not None
    objective.eval()
    out = objective(batch())
    assert "siglip" in out.terms and torch.equal(out.terms["loss_contrastive"], out.terms["siglip"])
    assert {"loss_inter", "loss_intra", "lambda_intra", "lambda_clip"} <= set(out.terms)


def test_xclip_uses_nclip_on_pooled_features():
    objective = build(tiny_cfg(clipin=False, xclip=True))
    model = objective.model
    assert objective.nclip.image_head.mlp[0].in_features == model.image_encoder.out_dim
    assert objective.nclip.text_head.mlp[0].in_features == model.text_encoder.out_dim
    objective.train()
    out = objective(batch(two_views=False))
    assert {"clip", "nclip", "nclip_ce", "nclip_entropy"} <= set(out.terms)
    torch.testing.assert_close(out.loss.detach(), out.terms["clip"] + objective.cfg.xclip.nclip_weight * out.terms["nclip"])
    out.loss.backward()
    assert objective.nclip.image_head.prototypes.weight.grad is not None
    assert model.image_proj.weight.grad is not None


# -------------------------------------------------------------------------------------- inference
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_inference_scores_match_the_training_objective(kind):
    """``encode_*`` are the objective's embeddings; ``logits`` is exp(logit_scale)·I Tᵀ (+ the SigLIP bias)."""
    objective = build(tiny_cfg(kind))
    model = objective.model.eval()
    b = batch(1)
    with torch.no_grad():
        image = model.encode_image(b["image"])
        text = model.encode_text(b["input_ids"], b["attention_mask"])
        torch.testing.assert_close(image.norm(dim=-1), torch.ones(B))
        raw = model.encode_image(b["image"], normalize=False)
        torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), image)
        expected = model.logit_scale.exp() * image @ text.T
        if kind == "siglip":
            expected = expected + model.logit_bias
        torch.testing.assert_close(model.logits(image, text), expected)
        torch.testing.assert_close(model.similarity(b["image"], b["input_ids"], b["attention_mask"]),
                                   (image * text).sum(-1))
        # the base loss the objective reports is the loss of these very embeddings
        loss = objective.base(image, text, model.logit_scale, *(() if kind == "clip" else (model.logit_bias,)))
        objective.eval()
        torch.testing.assert_close(objective(b).terms[kind], loss)


# ------------------------------------------------------------------------------------- save / load
def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("variant", ["clip", "clipin", "siglip", "xclip", "siglip_clipin"])
def test_save_pretrained_round_trip(tmp_path, variant):
    import json

    cfg = {
        "clip": tiny_cfg("clip", clipin=False), "clipin": tiny_cfg("clip"),
        "siglip": tiny_cfg("siglip", clipin=False), "xclip": tiny_cfg("clip", clipin=False, xclip=True),
        "siglip_clipin": tiny_cfg("siglip"),
    }[variant]
    objective = build(cfg)
    model = objective.model
    objective.train()
    objective(batch())  # move BatchNorm statistics away from their initial values
    objective.after_optimizer_step(1, 10)
    objective.eval()
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {"model.safetensors", "config.json"}
    saved_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved_config["format_version"] == 2 and saved_config["model"]["kind"] == cfg.contrastive.kind
    assert saved_config["model"]["pre_dim"] == (24 if cfg.clipin.enabled else 0)
    # the exported model holds no training tensors (EMA target, predictors, nc heads, λ, xCLIP heads)
    names = set(_saved_tensors(tmp_path / "m"))
    assert names == set(model.state_dict())
    assert not [n for n in names if n.startswith(TRAINING_PREFIXES)]
    loaded = MedClipModel.from_pretrained(tmp_path / "m").eval()
    b = batch(3)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(b["image"]), loaded.encode_image(b["image"]), rtol=0, atol=0)
        torch.testing.assert_close(model.encode_text(b["input_ids"], b["attention_mask"]),
                                   loaded.encode_text(b["input_ids"], b["attention_mask"]), rtol=0, atol=0)
        torch.testing.assert_close(model.similarity(b["image"], b["input_ids"], b["attention_mask"]),
                                   loaded.similarity(b["image"], b["input_ids"], b["attention_mask"]), rtol=0, atol=0)
        # the loaded model with the objective's own state (what a checkpoint adds) trains on identically
        reloaded = TrainingObjective(loaded, cfg)
        reloaded.load_training_state_dict(objective.training_state_dict())
        reloaded.eval()
        a, c = objective(b), reloaded(b)
        torch.testing.assert_close(a.loss, c.loss, rtol=0, atol=0)
        for key in a.terms:
            torch.testing.assert_close(a.terms[key], c.terms[key], rtol=0, atol=0)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    assert loaded.spec.to_dict() == model.spec.to_dict()


def test_from_pretrained_rejects_a_non_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MedClipModel.from_pretrained(tmp_path)
    with pytest.raises(ModelFolderError, match="no such model folder"):
        MedClipModel.from_pretrained(tmp_path / "missing")


def test_from_pretrained_rejects_broken_folders(tmp_path):
    import json

    build(tiny_cfg()).model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "format_version": 3}))
    with pytest.raises(ModelFolderError, match="newer"):
        MedClipModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ModelFolderError, match="truncated"):
        MedClipModel.from_pretrained(tmp_path / "m")
    # weights of another architecture: refused with the tensor names, before anything is copied
    build(tiny_cfg(clipin=False)).model.save_pretrained(tmp_path / "other")
    (tmp_path / "m" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ModelFolderError, match="missing: image_pre"):
        MedClipModel.from_pretrained(tmp_path / "m")


def write_format1_folder(objective: TrainingObjective, cfg: ModelConfig, folder: Path, tokenizer=None) -> None:
    """A model folder as medclipin wrote it before the model/objective split (format 1): config.json with
    ``model``/``image``/``text`` sections and one state dict of the model *and* its objective, with the old
    names (``contrastive.logit_scale``, ``target.*``, ``predictors.*``, ``image_nc.*``, ``loss_weights.*``...)."""
    import json

    from safetensors.torch import save_file

    from medclipin.config import config_to_dict

    state = {}
    for key, value in objective.state_dict().items():
        if key.startswith("model."):
            key = key[len("model."):]
            if key in ("logit_scale", "logit_bias"):
                key = f"contrastive.{key}"
        elif key.startswith("clipin."):
            key = key[len("clipin."):]
        state[key] = value.contiguous()
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    model_cfg = config_to_dict(cfg)
    for section, new_keys in (("image_encoder", ("freeze_layers", "autocast")), ("text_encoder", ("freeze_layers",)),
                              ("clipin", ("detach_pre",))):
        for key in new_keys:  # keys added after format 1
            model_cfg[section].pop(key, None)
    config = {
        "format_version": 1, "model": model_cfg,
        "image": {"domain": "cxr", "size": 32, "channels": 1, "window": "first", "mean": 0.5, "std": 0.25},
        "text": {"tokenizer": "", "vocab_size": VOCAB, "sections": ["findings", "impression"], "max_length": 12,
                 "truncation_side": "right"},
        "text_hf_config": objective.model.text_encoder.hf_config(),
    }
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


@pytest.mark.parametrize("variant", ["clipin", "siglip_xclip"])
def test_a_format1_model_folder_still_loads(tmp_path, variant):
    """Folders written before the split load for inference: old names renamed, training tensors dropped."""
    cfg = tiny_cfg("clip") if variant == "clipin" else tiny_cfg("siglip", clipin=False, xclip=True)
    objective = build(cfg, seed=3)
    with torch.no_grad():  # values that differ from a fresh model's
        objective.model.logit_scale.fill_(3.0)
        if objective.model.logit_bias is not None:
            objective.model.logit_bias.fill_(-4.0)
    write_format1_folder(objective, cfg, tmp_path / "old")
    from safetensors.torch import load_file

    old_names = set(load_file(str(tmp_path / "old" / "model.safetensors")))
    assert "contrastive.logit_scale" in old_names
    assert any(n.startswith(("target.", "nclip.")) for n in old_names)
    loaded = MedClipModel.from_pretrained(tmp_path / "old").eval()
    assert loaded.spec.pre_dim == (24 if variant == "clipin" else 0) and loaded.kind == cfg.contrastive.kind
    assert loaded.logit_scale.item() == 3.0
    if variant != "clipin":
        assert loaded.logit_bias.item() == -4.0
    expected = objective.model.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
    b = batch(2)
    objective.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(b["image"]), objective.model.encode_image(b["image"]),
                                   rtol=0, atol=0)
    # saved again, it is a format-2 folder without the training tensors
    loaded.save_pretrained(tmp_path / "new")
    assert not [n for n in _saved_tensors(tmp_path / "new") if n.startswith(TRAINING_PREFIXES)]
    assert MedClipModel.from_pretrained(tmp_path / "new").config_dict()["format_version"] == 2


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
    base = load_config(REPO / "configs" / "tiny_clip.yaml")  # the tiny family shares its from-scratch towers
    assert cfg.model.image_encoder == base.model.image_encoder and not cfg.model.image_encoder.pretrained
    assert cfg.model.text_encoder == base.model.text_encoder and not cfg.model.text_encoder.pretrained
    assert cfg.model.contrastive.embed_dim == base.model.contrastive.embed_dim
    cfg.data.image.size = 32  # construction only; keeps the test fast
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels, vocab_size=VOCAB)
    objective = TrainingObjective(model, cfg.model)
    assert (objective.clipin is not None) == ("clipin" in stem)
    assert isinstance(model.image_pre, torch.nn.Linear) == ("clipin" in stem)
    assert (objective.nclip is not None) == ("xclip" in stem)
    assert model.kind == ("siglip" if "siglip" in stem else "clip")


@pytest.mark.parametrize("variant", ["clip", "clipin"])
def test_a_tiny_batch_can_be_fitted(variant):
    """Sanity: the whole graph learns — the contrastive loss on 6 fixed pairs falls well below ln(B)."""
    objective = build(tiny_cfg("clip", clipin=variant == "clipin"))
    objective.train()
    b = batch(5)
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=2e-3)
    first = None
    for step in range(1, 41):
        out = objective(b)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        objective.after_optimizer_step(step, 40)
        first = float(out.terms["clip"]) if first is None else first
    assert float(out.terms["clip"]) < 0.5 * first, (first, float(out.terms["clip"]))


def test_medclipin_load_opens_a_format1_folder_with_its_processor(tmp_path):
    """Format-1 folders kept the image and text settings in config.json and the tokenizer beside it:
    ``medclipin.load`` rebuilds the processor from them (a scalar mean/std as one value)."""
    import medclipin
    from medclipin.data.tokenizer import train_wordpiece_tokenizer

    cfg = tiny_cfg("clip")
    objective = build(cfg, seed=4)
    corpus = ["no pleural effusion.", "small right pleural effusion.", "the heart is enlarged."] * 20
    tokenizer = train_wordpiece_tokenizer(corpus, vocab_size=VOCAB, out_dir=tmp_path / "tok")
    write_format1_folder(objective, cfg, tmp_path / "old", tokenizer=tokenizer)
    model, processor = medclipin.load(tmp_path / "old")
    assert not model.training and processor.image_cfg.size == 32 and processor.text_cfg.max_length == 12
    assert tuple(processor.image_cfg.mean) == (0.5,) and tuple(processor.image_cfg.std) == (0.25,)
    assert processor.tokenizer.truncation_side == "right"
    tokens = processor.texts(["small right pleural effusion."])
    assert torch.equal(tokens["input_ids"], tokenizer(["small right pleural effusion."], return_tensors="pt")["input_ids"])
    objective.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(**tokens), objective.model.encode_text(**tokens), rtol=0, atol=0)


def test_detach_pre_keeps_the_non_contrastive_gradient_out_of_the_trunk():
    """``clipin.detach_pre``: the non-contrastive terms train their own heads but send nothing into the shared
    pre-projector and the towers, which then get exactly the contrastive term's gradient."""
    grads = {}
    for detach in (False, True):
        objective = build(tiny_cfg(detach_pre=detach, learnable_lambda=False))
        objective.eval()  # BatchNorm with running statistics: the same function in both runs
        out = objective(batch())
        out.loss.backward()
        assert objective.clipin.image_nc[2].weight.grad is not None  # the heads still learn
        assert objective.clipin.predictors.text_inter[0].weight.grad is not None
        grads[detach] = objective.model.image_pre.weight.grad.clone()
        objective.zero_grad()
        out = objective(batch())
        out.parts["clip"].backward()  # λ_clip = 1: the contrastive part of the total
        grads[(detach, "clip")] = objective.model.image_pre.weight.grad.clone()
    torch.testing.assert_close(grads[True], grads[(True, "clip")])
    assert not torch.allclose(grads[False], grads[(False, "clip")])
