"""Every objective against an independent, plainly written computation (loops, float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from torch import nn

from medclipin.config import XclipConfig
from medclipin.losses import (
    ClipLoss,
    LossWeights,
    NclipLoss,
    PrototypeHead,
    SigLipLoss,
    build_nclip_loss,
    clipin_inter_loss,
    clipin_intra_loss,
    combine_clipin,
    contrastive_loss,
    embedding_std,
    gather_features,
    negative_cosine_pair,
    world_info,
)


def unit_rows(b: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True)


def dot(a, b) -> float:
    return sum(float(a[k]) * float(b[k]) for k in range(len(a)))


def cos(a, b) -> float:
    return dot(a, b) / math.sqrt(dot(a, a) * dot(b, b))


# ------------------------------------------------------------------------------------------- CLIP
def reference_clip(img, txt, scale: float) -> float:
    """½ (mean_i −log softmax_j(s x_i·y_j)[i] + mean_i −log softmax_j(s y_i·x_j)[i]), by loops."""
    b = len(img)
    image_side = text_side = 0.0
    for i in range(b):
        row = [scale * dot(img[i], txt[j]) for j in range(b)]
        image_side += -(row[i] - math.log(sum(math.exp(v) for v in row)))
        col = [scale * dot(txt[i], img[j]) for j in range(b)]
        text_side += -(col[i] - math.log(sum(math.exp(v) for v in col)))
    return 0.5 * (image_side / b + text_side / b)


def scalar(value: float) -> nn.Parameter:
    """A learnable 0-d float32 scalar, as the model holds ``logit_scale`` / ``logit_bias``."""
    return nn.Parameter(torch.tensor(float(value)))


class ScaledLoss(nn.Module):
    """A base loss with its temperature (and SigLIP bias) as parameters, the way MedClipModel holds them."""

    def __init__(self, loss: nn.Module, logit_scale: float, logit_bias: float | None = None):
        super().__init__()
        self.loss = loss
        self.logit_scale = scalar(logit_scale)
        self.logit_bias = scalar(logit_bias) if logit_bias is not None else None

    def forward(self, image_features, text_features):
        extra = () if self.logit_bias is None else (self.logit_bias,)
        return self.loss(image_features, text_features, self.logit_scale, *extra)


def test_clip_loss_matches_loop():
    img, txt = unit_rows(5, 4, 0), unit_rows(5, 4, 1)
    loss_fn = ClipLoss()
    logit_scale = torch.tensor(math.log(1 / 0.07))
    scale = logit_scale.exp().item()
    assert loss_fn(img, txt, logit_scale).item() == pytest.approx(reference_clip(img, txt, scale), rel=1e-6)


def test_clip_temperature_effect():
    # well-aligned pairs: a sharper (lower) temperature gives a lower loss; T → ∞ gives ln B
    txt = unit_rows(6, 8, 2)
    img = txt + 0.05 * unit_rows(6, 8, 3)
    img = img / img.norm(dim=1, keepdim=True)
    loss_fn = ClipLoss()

    def at(temperature: float):
        return loss_fn(img, txt, torch.tensor(math.log(1 / temperature)))

    sharp, soft = at(0.05), at(1.0)
    assert sharp < soft
    flat = at(1e6)
    assert flat.item() == pytest.approx(math.log(6), rel=1e-4)


def test_the_losses_own_no_parameters_and_a_fixed_temperature_gets_no_gradient():
    """The temperature (and bias) belong to the model; the losses are parameter-free functions of them."""
    for loss_fn in (ClipLoss(), SigLipLoss()):
        assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
        assert not hasattr(loss_fn, "clamp_")
    img, txt = unit_rows(4, 3, 4).requires_grad_(True), unit_rows(4, 3, 5)
    fixed = torch.tensor(2.0)  # a plain tensor: a fixed temperature
    ClipLoss()(img, txt, fixed).backward()
    assert fixed.grad is None and img.grad is not None


def test_clip_gradient_reaches_logit_scale():
    img, txt = unit_rows(4, 3, 4), unit_rows(4, 3, 5)
    loss_fn = ScaledLoss(ClipLoss(), math.log(1 / 0.07))
    loss_fn(img, txt).backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_scale.grad.abs() > 0


# ----------------------------------------------------------------------------------------- SigLIP
def reference_siglip(img, txt, scale: float, bias: float) -> float:
    b = len(img)
    total = 0.0
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * (scale * dot(img[i], txt[j]) + bias))))
    return total / b


def test_siglip_matches_double_loop_and_bias_gets_gradient():
    img, txt = unit_rows(5, 4, 6), unit_rows(5, 4, 7)
    loss_fn = ScaledLoss(SigLipLoss(), math.log(10), -2.0)
    loss = loss_fn(img, txt)
    assert loss.item() == pytest.approx(reference_siglip(img, txt, 10.0, -2.0), rel=1e-6)
    loss.backward()
    assert loss_fn.logit_bias.grad is not None and loss_fn.logit_bias.grad.abs() > 0
    assert loss_fn.logit_scale.grad is not None


def test_siglip_needs_the_bias():
    with pytest.raises(TypeError):
        SigLipLoss()(unit_rows(3, 2, 0), unit_rows(3, 2, 1), torch.tensor(2.3))


def test_contrastive_loss_by_kind():
    assert isinstance(contrastive_loss("clip"), ClipLoss)
    assert isinstance(contrastive_loss(" SigLIP "), SigLipLoss)
    with pytest.raises(ValueError, match="clip.*siglip"):
        contrastive_loss("infonce")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(unit_rows(4, 3, 0), unit_rows(5, 3, 1), torch.tensor(2.0))


# ----------------------------------------------------------------------------------- CLIPin terms
def reference_negative_cosine(pred_a, target_b, pred_b, target_a) -> float:
    b = len(pred_a)
    return 2.0 - sum(cos(pred_a[i], target_b[i]) + cos(pred_b[i], target_a[i]) for i in range(b)) / b


def _leaves(*seeds):
    # deliberately not normalised: the terms must normalise themselves
    return [(3.0 * unit_rows(4, 6, s) * (1 + s)).requires_grad_(True) for s in seeds]


@pytest.mark.parametrize("which", ["inter", "intra"])
def test_cosine_terms_match_explicit_and_stop_gradient(which):
    q_img, q_txt, t_img, t_txt = _leaves(10, 11, 12, 13)
    if which == "inter":
        loss = clipin_inter_loss(q_img, q_txt, t_img, t_txt)
        expected = reference_negative_cosine(q_img.detach(), t_txt.detach(), q_txt.detach(), t_img.detach())
    else:
        loss = clipin_intra_loss(q_img, q_txt, t_img, t_txt)
        expected = reference_negative_cosine(q_img.detach(), t_img.detach(), q_txt.detach(), t_txt.detach())
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    loss.backward()
    assert q_img.grad is not None and q_img.grad.abs().sum() > 0
    assert q_txt.grad is not None and q_txt.grad.abs().sum() > 0
    assert t_img.grad is None and t_txt.grad is None  # stop-gradient on the EMA targets


def test_negative_cosine_extremes():
    x = unit_rows(3, 5, 20)
    assert negative_cosine_pair(x, x, x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert negative_cosine_pair(x, -x, x, -x).item() == pytest.approx(4.0, abs=1e-12)


def test_loss_weights_clamp_and_fixed_mode():
    weights = LossWeights(lambda_intra=1.0, lambda_clip=1.0, learnable=True, lambda_max=20.0)
    assert {n for n, p in weights.named_parameters() if p.requires_grad} == {"lambda_intra", "lambda_clip"}
    with torch.no_grad():
        weights.lambda_intra.fill_(-0.5)
        weights.lambda_clip.fill_(25.0)
    weights.clamp_()
    assert weights.lambda_intra.item() == 0.0 and weights.lambda_clip.item() == 20.0
    fixed = LossWeights(lambda_intra=0.5, lambda_clip=2.0, learnable=False)
    assert list(fixed.parameters()) == []
    assert fixed.state_dict()["lambda_clip"].item() == 2.0
    with pytest.raises(ValueError, match="lambda_max"):
        LossWeights(lambda_intra=30.0)


def test_combine_clipin_total_and_ablation_switches():
    l_inter, l_intra, l_clip = (torch.tensor(v, requires_grad=True) for v in (0.7, 0.4, 2.5))
    weights = LossWeights(lambda_intra=0.5, lambda_clip=2.0)
    total, terms = combine_clipin(l_inter, l_intra, l_clip, weights)
    assert total.item() == pytest.approx(0.7 + 0.5 * 0.4 + 2.0 * 2.5)
    assert set(terms) == {"loss_inter", "loss_intra", "loss_contrastive", "lambda_intra", "lambda_clip"}
    assert all(not t.requires_grad for t in terms.values())
    total.backward()
    assert weights.lambda_clip.grad.item() == pytest.approx(2.5)  # dL/dλ_clip = L_clip

    weights.zero_grad()
    total, terms = combine_clipin(l_inter, l_intra, l_clip, weights, use_intra=False)
    assert total.item() == pytest.approx(0.7 + 2.0 * 2.5)
    assert "lambda_intra" not in terms and "loss_intra" in terms  # still logged, not trained
    total, _ = combine_clipin(l_inter, None, l_clip, weights, use_intra=False, use_contrastive=False)
    assert total.item() == pytest.approx(0.7)
    total, _ = combine_clipin(None, l_intra, l_clip, weights, use_inter=False)
    assert total.item() == pytest.approx(0.5 * 0.4 + 2.0 * 2.5)
    with pytest.raises(ValueError, match="not given"):
        combine_clipin(None, l_intra, l_clip, weights)
    with pytest.raises(ValueError, match="switched off"):
        combine_clipin(l_inter, l_intra, l_clip, weights, use_inter=False, use_intra=False, use_contrastive=False)


def test_embedding_std_detects_collapse():
    same = unit_rows(1, 16, 30).repeat(8, 1)
    assert embedding_std(same).item() == pytest.approx(0.0, abs=1e-12)
    healthy = embedding_std(unit_rows(512, 16, 31)).item()
    assert healthy == pytest.approx(1 / math.sqrt(16), rel=0.1)


# ----------------------------------------------------------------------------------------- nCLIP
def explicit_head(head: PrototypeHead, x: torch.Tensor) -> torch.Tensor:
    """The head written out: W2·gelu(W1 x + b1) + b2, normalised, cosine against normalised prototypes."""
    lin1, lin2 = head.mlp[0], head.mlp[2]
    hidden = x @ lin1.weight.T + lin1.bias
    hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    h = hidden @ lin2.weight.T + lin2.bias
    h = h / h.norm(dim=1, keepdim=True)
    w = head.prototypes.weight
    return h @ (w / w.norm(dim=1, keepdim=True)).T


def softmax_rows(logits: torch.Tensor, temperature: float) -> list[list[float]]:
    out = []
    for row in logits.tolist():
        exps = [math.exp(v / temperature) for v in row]
        out.append([e / sum(exps) for e in exps])
    return out


def make_nclip(entropy_weight: float = 0.7) -> NclipLoss:
    torch.manual_seed(0)
    return NclipLoss(in_dim_image=5, in_dim_text=3, hidden_dim=7, head_dim=4, num_prototypes=6,
                     student_temperature=0.1, teacher_temperature=0.04, entropy_weight=entropy_weight).double()


def test_nclip_matches_explicit_computation():
    loss_fn = make_nclip()
    g = torch.Generator().manual_seed(40)
    img, txt = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    loss, terms = loss_fn(img, txt)
    with torch.no_grad():
        li, lt = explicit_head(loss_fn.image_head, img), explicit_head(loss_fn.text_head, txt)
    p_i, p_t = softmax_rows(li, 0.1), softmax_rows(lt, 0.1)
    q_i, q_t = softmax_rows(li, 0.04), softmax_rows(lt, 0.04)
    b, k = 4, 6
    ce_t_to_i = -sum(q_t[n][c] * math.log(p_i[n][c]) for n in range(b) for c in range(k)) / b
    ce_i_to_t = -sum(q_i[n][c] * math.log(p_t[n][c]) for n in range(b) for c in range(k)) / b
    ce = 0.5 * (ce_t_to_i + ce_i_to_t)

    def entropy_of_mean(p):
        mean = [sum(p[n][c] for n in range(b)) / b for c in range(k)]
        return -sum(m * math.log(m) for m in mean)

    entropy = 0.5 * (entropy_of_mean(p_i) + entropy_of_mean(p_t))
    assert terms["nclip_ce"].item() == pytest.approx(ce, rel=1e-9)
    assert terms["nclip_entropy"].item() == pytest.approx(entropy, rel=1e-9)
    assert loss.item() == pytest.approx(ce - 0.7 * entropy, rel=1e-9)


def test_nclip_no_gradient_through_teacher_targets():
    # with the targets constant, dL/dlogits_I = ½ (p_I − q_T) / (τ_s B); a gradient through the
    # teacher q_I (which also depends on logits_I) would add a term
    loss_fn = make_nclip(entropy_weight=0.0)
    captured = {}

    def keep(name):
        def hook(_module, _inputs, output):
            output.retain_grad()
            captured[name] = output
        return hook

    loss_fn.image_head.register_forward_hook(keep("img"))
    loss_fn.text_head.register_forward_hook(keep("txt"))
    g = torch.Generator().manual_seed(41)
    img, txt = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    loss, _ = loss_fn(img, txt)
    loss.backward()
    li, lt = captured["img"].detach(), captured["txt"].detach()
    expected = 0.5 * (torch.softmax(li / 0.1, -1) - torch.softmax(lt / 0.04, -1)) / (0.1 * 4)
    assert torch.allclose(captured["img"].grad, expected, atol=1e-12)


def test_nclip_entropy_term_penalises_collapse():
    loss_fn = make_nclip()
    g = torch.Generator().manual_seed(42)
    diverse_img = 3 * torch.randn(16, 5, generator=g, dtype=torch.float64)
    diverse_txt = 3 * torch.randn(16, 3, generator=g, dtype=torch.float64)
    _, diverse = loss_fn(diverse_img, diverse_txt)
    _, collapsed = loss_fn(diverse_img[:1].repeat(16, 1), diverse_txt[:1].repeat(16, 1))
    assert collapsed["nclip_entropy"] < diverse["nclip_entropy"]
    assert diverse["nclip_entropy"] <= math.log(6) + 1e-9


def test_build_nclip_loss_from_config():
    cfg = XclipConfig(num_prototypes=32, head_hidden=16, head_dim=8, teacher_temperature=0.05)
    loss_fn = build_nclip_loss(cfg, in_dim_image=12, in_dim_text=10)
    assert loss_fn.image_head.prototypes.weight.shape == (32, 8)
    assert loss_fn.text_head.mlp[0].in_features == 10 and loss_fn.teacher_temperature == 0.05
    loss, _ = loss_fn(torch.randn(4, 12), torch.randn(4, 10))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ data parallel (2 gloo processes)
# Relation checked: with local-loss forms, rank r's loss L_r is the loss of its own rows, and
#   mean_r L_r = L (the single-process loss on the concatenated global batch).
# The gathers' backward sums every rank's gradient into the owner's rows, so the gradient of rank r's
# local features is ∂(Σ_r' L_r')/∂x_r = W · ∂L/∂x_r; DDP's all-reduce divides by W, hence
#   cat_r(grad_r) / W = ∂L/∂x   and   mean_r(∂L_r/∂θ) = ∂L/∂θ for the loss's own parameters.
WORLD, LOCAL_B = 2, 3


def _global_batch():
    return unit_rows(WORLD * LOCAL_B, 4, 50), unit_rows(WORLD * LOCAL_B, 4, 51)


def _nclip_inputs():
    g = torch.Generator().manual_seed(52)
    return (torch.randn(WORLD * LOCAL_B, 5, generator=g, dtype=torch.float64),
            torch.randn(WORLD * LOCAL_B, 3, generator=g, dtype=torch.float64))


def _loss_makers():
    return {
        "clip": lambda: ScaledLoss(ClipLoss(), math.log(1 / 0.2)),
        "siglip": lambda: ScaledLoss(SigLipLoss(), math.log(10), -2.0),
        "nclip": make_nclip,
    }


def _run_losses(img, txt, name):
    """(loss, grad wrt img, grad wrt txt, {param: grad}) of one loss on the given rows."""
    loss_fn = _loss_makers()[name]()
    img, txt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    loss = loss_fn(img, txt)
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    return loss.detach(), img.grad, txt.grad, {n: p.grad.clone() for n, p in loss_fn.named_parameters()}


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        results = {}
        for name in _loss_makers():
            img, txt = _nclip_inputs() if name == "nclip" else _global_batch()
            results[name] = _run_losses(img[rows], txt[rows], name)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
        # Both ranks finish their collectives before either tears gloo down: a rank that exits while
        # its peer still has work in flight can abort (SIGABRT, seen once in CI).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_local_loss_form_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for name in _loss_makers():
        img, txt = _nclip_inputs() if name == "nclip" else _global_batch()
        loss, grad_img, grad_txt, param_grads = _run_losses(img, txt, name)
        ranks = [result[name] for result in per_rank]
        mean_loss = sum(r[0] for r in ranks) / WORLD
        assert mean_loss.item() == pytest.approx(loss.item(), abs=1e-5), name
        assert torch.allclose(torch.cat([r[1] for r in ranks]) / WORLD, grad_img, atol=1e-5), name
        assert torch.allclose(torch.cat([r[2] for r in ranks]) / WORLD, grad_txt, atol=1e-5), name
        for param, grad in param_grads.items():
            assert torch.allclose(sum(r[3][param] for r in ranks) / WORLD, grad, atol=1e-5), (name, param)


def test_gather_features_is_identity_without_a_process_group():
    x = unit_rows(3, 2, 60)
    assert world_info() == (0, 1)
    assert gather_features(x) is x and gather_features(x, with_grad=False) is x
