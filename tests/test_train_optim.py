"""AdamW parameter groups (names-wise, on a real CLIPin + SigLIP model) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from medclipin.config import TrainConfig
from medclipin.models.model import MedClipModel
from medclipin.train.objective import TrainingObjective
from medclipin.train.optim import (build_optimizer, build_scheduler, parameter_groups, tower_learning_rates,
                                   warmup_cosine)
from test_train_support import tiny_model_config


def build_objective(*overrides: str) -> TrainingObjective:
    cfg = tiny_model_config(*overrides)
    torch.manual_seed(0)
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels, vocab_size=200)
    return TrainingObjective(model, cfg.model)


@pytest.fixture(scope="module")
def clipin_siglip_model():
    """The training objective of a CLIPin + SigLIP model: what the trainer optimises."""
    return build_objective("model.contrastive.kind=siglip", "model.clipin.learnable_lambda=true")


def group_names(model, groups):
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for p in groups[0]["params"]}
    no_decay = {by_id[id(p)] for p in groups[1]["params"]}
    return decay, no_decay


def test_no_weight_decay_on_norms_biases_temperatures_lambda(clipin_siglip_model):
    model = clipin_siglip_model
    groups = parameter_groups(model, weight_decay=0.05)
    assert len(groups) == 2
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert "lr" not in groups[0] and "lr" not in groups[1]  # the optimiser's default lr
    decay, no_decay = group_names(model, groups)
    assert not decay & no_decay
    # objective scalars: SigLIP temperature and bias (the model's), CLIPin λ (the objective's)
    for name in ("model.logit_scale", "model.logit_bias", "clipin.loss_weights.lambda_intra",
                 "clipin.loss_weights.lambda_clip"):
        assert name in no_decay, name
    # every norm and every bias
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    assert f"{name}.{pname}" in no_decay, f"{name}.{pname}"
    assert all(n in no_decay for n in decay | no_decay if n.endswith(".bias"))
    # timm's own no_weight_decay list (position embedding, class token)
    assert {"model.image_encoder.model.pos_embed", "model.image_encoder.model.cls_token"} <= no_decay
    # the matrices decay: tower weights, projections, CLIPin heads, word embeddings
    for name in ("model.image_proj.weight", "model.text_proj.weight", "model.image_pre.weight",
                 "clipin.image_nc.2.weight", "clipin.predictors.image_inter.0.weight",
                 "model.image_encoder.model.patch_embed.proj.weight",
                 "model.image_encoder.model.blocks.0.attn.qkv.weight"):
        assert name in decay, name
    assert any("word_embeddings" in n for n in decay)


def test_ema_target_and_frozen_parameters_are_not_optimised(clipin_siglip_model):
    model = clipin_siglip_model
    decay, no_decay = group_names(model, parameter_groups(model, 0.1))
    assert not any(n.startswith("clipin.target.") for n in decay | no_decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable
    assert any(n.startswith("clipin.target.") for n, _ in model.named_parameters())
    # frozen lower layers are left out too
    frozen = build_objective("model.text_encoder.freeze_layers=1", "model.image_encoder.freeze_layers=1",
                             "model.image_encoder.kwargs={patch_size: 8, depth: 2, embed_dim: 32, num_heads: 2}")
    decay, no_decay = group_names(frozen, parameter_groups(frozen, 0.1))
    assert not any(n.startswith(("model.text_encoder.model.embeddings.", "model.text_encoder.model.encoder.layer.0.",
                                 "model.image_encoder.model.patch_embed.", "model.image_encoder.model.blocks.0."))
                   for n in decay | no_decay)
    assert decay | no_decay == {n for n, p in frozen.named_parameters() if p.requires_grad}


def test_build_optimizer_is_adamw_with_config_values(clipin_siglip_model):
    cfg = TrainConfig(lr=2e-4, betas=(0.8, 0.9), weight_decay=0.1, eps=1e-6)
    optimizer = build_optimizer(clipin_siglip_model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 2e-4 and g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in optimizer.param_groups)
    assert all(g["fused"] for g in optimizer.param_groups)


def test_parameter_groups_with_per_tower_learning_rates(clipin_siglip_model):
    objective = clipin_siglip_model
    model = objective.model
    lrs = [(model.image_encoder, 1e-5), (model.text_encoder, 3e-5)]
    groups = parameter_groups(objective, 0.05, lrs)
    by_id = {id(p): n for n, p in objective.named_parameters()}
    names = [{by_id[id(p)] for p in group["params"]} for group in groups]
    # default groups first (no lr: the optimiser's), then decay / no-decay per tower, in the order given
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] * 3
    assert [g.get("lr") for g in groups] == [None, None, 1e-5, 1e-5, 3e-5, 3e-5]
    image, text = names[2] | names[3], names[4] | names[5]
    assert image == {f"model.image_encoder.{n}" for n, p in model.image_encoder.named_parameters()}
    assert text == {f"model.text_encoder.{n}" for n, p in model.text_encoder.named_parameters()}
    default = names[0] | names[1]
    assert not default & (image | text)
    assert {"model.logit_scale", "model.image_proj.weight", "clipin.predictors.image_inter.0.weight"} <= default
    # within a tower the same decay rules hold
    assert "model.image_encoder.model.pos_embed" in names[3] and "model.image_encoder.model.blocks.0.attn.qkv.weight" in names[2]
    assert any("word_embeddings" in n for n in names[4]) and any(n.endswith(".bias") for n in names[5])
    # every trainable parameter exactly once; the EMA target's copies of the towers never
    flat = [n for group in names for n in group]
    assert len(flat) == len(set(flat))
    assert set(flat) == {n for n, p in objective.named_parameters() if p.requires_grad}
    # a frozen tower with its own rate keeps its (empty) groups: optimiser state dicts line up on resume
    frozen = build_objective("model.image_encoder.freeze=true")
    groups = parameter_groups(frozen, 0.05, [(frozen.model.image_encoder, 1e-5)])
    assert len(groups) == 4 and groups[2]["params"] == [] and groups[3]["params"] == []


def test_tower_learning_rates_and_the_optimizer_and_scheduler_using_them(clipin_siglip_model):
    objective = clipin_siglip_model
    model = objective.model
    assert tower_learning_rates(model, TrainConfig()) == []  # 0: the towers use train.lr
    pairs = tower_learning_rates(model, TrainConfig(image_encoder_lr=1e-5))
    assert len(pairs) == 1 and pairs[0][0] is model.image_encoder and pairs[0][1] == 1e-5
    pairs = tower_learning_rates(model, TrainConfig(image_encoder_lr=1e-5, text_encoder_lr=2e-5))
    assert [(m, lr) for m, lr in pairs] == [(model.image_encoder, 1e-5), (model.text_encoder, 2e-5)]
    with pytest.raises(ValueError, match="text_encoder_lr"):
        tower_learning_rates(model, TrainConfig(text_encoder_lr=-1.0))

    cfg = TrainConfig(lr=1e-3, text_encoder_lr=1e-4, warmup_steps=2, steps=10)
    optimizer = build_optimizer(objective, cfg, torch.device("cpu"), lrs=tower_learning_rates(model, cfg))
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-3, 1e-4, 1e-4]
    text_ids = {id(p) for p in model.text_encoder.parameters()}
    assert {id(p) for g in optimizer.param_groups[2:] for p in g["params"]} == text_ids
    # the default (lrs=None) is tower_learning_rates of the optimised module; an objective has no towers
    # of its own, so the trainer passes the model's
    assert len(build_optimizer(model, cfg, torch.device("cpu")).param_groups) == 4
    # the schedule scales every group by the same factor
    scheduler = build_scheduler(optimizer, cfg)
    for step in range(5):
        factor = warmup_cosine(step, 2, 10)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * factor] * 2 + [1e-4 * factor] * 2)
        optimizer.step()
        scheduler.step()


def test_warmup_cosine_curve():
    warmup, total = 10, 110
    values = [warmup_cosine(s, warmup, total) for s in range(total + 1)]
    # linear warmup from 1/warmup to 1
    assert values[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    assert values[warmup] == pytest.approx(1.0)
    # half-way through the decay: 0.5; the end: 0; monotone in between
    assert values[warmup + 50] == pytest.approx(0.5)
    assert values[total] == pytest.approx(0.0, abs=1e-12)
    decay = values[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # the exact cosine
    for s in (20, 37, 90):
        assert values[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))))
    # past the end it stays at the floor; min_ratio sets the floor
    assert warmup_cosine(500, warmup, total) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(total, warmup, total, min_ratio=0.1) == pytest.approx(0.1)
    assert warmup_cosine(warmup + 50, warmup, total, min_ratio=0.1) == pytest.approx(0.55)
    # no warmup: starts at the full rate
    assert warmup_cosine(0, 0, 100) == pytest.approx(1.0)


def test_scheduler_drives_the_optimizer_lr():
    parameter = torch.nn.Parameter(torch.zeros(2, 2))
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, steps=20, min_lr_ratio=0.0)
    optimizer = torch.optim.AdamW([parameter], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, cfg)
    seen = []
    for _ in range(cfg.steps):
        seen.append(optimizer.param_groups[0]["lr"])  # the rate the next optimizer.step() uses
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(2.5e-4) and seen[3] == pytest.approx(1e-3)
    assert seen[4] == pytest.approx(1e-3) and seen[-1] < 1e-4
    assert seen == pytest.approx([1e-3 * warmup_cosine(s, 4, 20) for s in range(20)])


def test_tower_learning_rates_found_through_the_objective():
    """build_optimizer(objective, cfg) without explicit lrs still gives the towers their own learning rates."""
    from medclipin.train.objective import TrainingObjective

    cfg = tiny_model_config("train.image_encoder_lr=1e-5", "train.text_encoder_lr=2e-5")
    torch.manual_seed(0)
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels, vocab_size=200)
    objective = TrainingObjective(model, cfg.model)
    optimizer = build_optimizer(objective, cfg.train, torch.device("cpu"))
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lrs[id(model.image_encoder.model.patch_embed.proj.weight)] == 1e-5
    assert all(lrs[id(p)] == 2e-5 for p in model.text_encoder.parameters() if p.requires_grad)
    assert lrs[id(model.image_proj.weight)] == cfg.train.lr
