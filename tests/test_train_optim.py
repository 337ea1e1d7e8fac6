"""AdamW parameter groups (names-wise, on a real CLIPin + SigLIP model) and the warmup + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch

from medclipin.config import TrainConfig
from medclipin.models.model import MedClipModel
from medclipin.train.optim import build_optimizer, build_scheduler, parameter_groups, warmup_cosine
from test_train_support import tiny_config


@pytest.fixture(scope="module")
def clipin_siglip_model():
    cfg = tiny_config("model.contrastive.kind=siglip", "model.clipin.learnable_lambda=true")
    torch.manual_seed(0)
    return MedClipModel(cfg.model, cfg.data.image, cfg.data.text, vocab_size=200)


def group_names(model, groups):
    by_id = {id(p): n for n, p in model.named_parameters()}
    decay = {by_id[id(p)] for p in groups[0]["params"]}
    no_decay = {by_id[id(p)] for p in groups[1]["params"]}
    return decay, no_decay


def test_no_weight_decay_on_norms_biases_temperatures_lambda(clipin_siglip_model):
    model = clipin_siglip_model
    groups = parameter_groups(model, weight_decay=0.05)
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    decay, no_decay = group_names(model, groups)
    assert not decay & no_decay
    # objective scalars: SigLIP temperature and bias, CLIPin λ
    for name in ("contrastive.logit_scale", "contrastive.logit_bias", "loss_weights.lambda_intra",
                 "loss_weights.lambda_clip"):
        assert name in no_decay, name
    # every norm and every bias
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)):
            for pname, p in module.named_parameters(recurse=False):
                if p.requires_grad:
                    assert f"{name}.{pname}" in no_decay, f"{name}.{pname}"
    assert all(n in no_decay for n in decay | no_decay if n.endswith(".bias"))
    # timm's own no_weight_decay list (position embedding, class token)
    assert {"image_encoder.model.pos_embed", "image_encoder.model.cls_token"} <= no_decay
    # the matrices decay: tower weights, projections, CLIPin heads, word embeddings
    for name in ("image_proj.weight", "text_proj.weight", "image_pre.weight", "image_nc.2.weight",
                 "predictors.image_inter.0.weight", "image_encoder.model.patch_embed.proj.weight",
                 "image_encoder.model.blocks.0.attn.qkv.weight"):
        assert name in decay, name
    assert any("word_embeddings" in n for n in decay)


def test_ema_target_and_frozen_parameters_are_not_optimised(clipin_siglip_model):
    model = clipin_siglip_model
    decay, no_decay = group_names(model, parameter_groups(model, 0.1))
    assert not any(n.startswith("target.") for n in decay | no_decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decay | no_decay == trainable


def test_build_optimizer_is_adamw_with_config_values(clipin_siglip_model):
    cfg = TrainConfig(lr=2e-4, betas=(0.8, 0.9), weight_decay=0.1)
    optimizer = build_optimizer(clipin_siglip_model, cfg, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["lr"] == 2e-4 and g["betas"] == (0.8, 0.9) for g in optimizer.param_groups)


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
