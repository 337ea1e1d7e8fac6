"""One optimiser step: accumulation, clipping, the non-finite guard, precision and autocast; feedback files."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from medclipin.config import TrainConfig
from medclipin.train.objective import ObjectiveOutput
from medclipin.train.distributed import DistInfo
from medclipin.train.monitor import MetricsLog, Progress, TensorBoardLog
from medclipin.train.optim import build_scheduler
from medclipin.train.step import (
    NonFiniteLossError,
    TrainStep,
    autocast_context,
    fast_bf16_available,
    resolve_precision,
)

CPU = torch.device("cpu")


class Toy(nn.Module):
    """A regression objective with the TrainingObjective calling convention (batch dict in, ObjectiveOutput out)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 1)
        self.after_calls = []
        self.poison = 0.0  # added to the loss: set to nan to inject a non-finite loss

    def forward(self, batch):
        prediction = self.linear(batch["image"]).squeeze(-1)
        loss = ((prediction - batch["target"]) ** 2).mean() + self.poison
        return ObjectiveOutput(loss=loss, terms={"mse": loss.detach()}, stats={})

    def after_optimizer_step(self, step, total):
        self.after_calls.append(step)


def make_step(model, fused=True, **train):
    """A TrainStep with SGD: fused (the trainer's path: skips on the device) or not (skips via a host read)."""
    cfg = TrainConfig(**{"steps": 10, "warmup_steps": 0, "lr": 0.1, "grad_clip": 0.0, **train})
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, fused=fused)
    scheduler = build_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return TrainStep(model, model, optimizer, scheduler, scaler, cfg, "fp32", CPU, DistInfo()), optimizer


def batches(n, size, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n * size, 4, generator=g), torch.randn(n * size, generator=g)
    return [{"image": x[i * size:(i + 1) * size], "target": y[i * size:(i + 1) * size]} for i in range(n)]


def test_gradient_accumulation_equals_the_big_batch_for_a_per_sample_loss():
    # MSE is a mean over samples, so 2 micro-batches of 4 accumulate to exactly one batch of 8.
    # (A contrastive loss is not per-sample: accumulated micro-batches never see each other's negatives.)
    small = batches(2, 4)
    big = [{k: torch.cat([b[k] for b in small]) for k in small[0]}]
    accumulated, full = Toy(), Toy()
    step_a, _ = make_step(accumulated, grad_accum=2)
    step_f, _ = make_step(full, grad_accum=1)
    out_a = step_a(iter(small).__next__, 0)
    out_f = step_f(iter(big).__next__, 0)
    assert out_a.applied and out_f.applied
    assert out_a.loss.item() == pytest.approx(out_f.loss.item(), rel=1e-6)
    assert out_a.samples == out_f.samples == 8
    for pa, pf in zip(accumulated.parameters(), full.parameters()):
        assert torch.allclose(pa, pf, atol=1e-6)
    assert accumulated.after_calls == [1]


def test_gradient_clipping_bounds_the_update_and_reports_the_raw_norm():
    model = Toy()
    data = batches(1, 8)
    data[0]["target"] = data[0]["target"] + 100.0  # a huge gradient
    step, optimizer = make_step(model, grad_clip=0.5, lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    outcome = step(iter(data).__next__, 0)
    assert outcome.grad_norm.item() > 10  # the norm before clipping
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert moved.item() == pytest.approx(0.5, rel=1e-4)  # SGD lr 1: the update is the clipped gradient


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")
@pytest.mark.parametrize("fused", [True, False], ids=["skip-on-device", "skip-via-host"])
def test_non_finite_loss_skips_the_update_counts_it_and_resets(fused):
    model = Toy()
    step, _ = make_step(model, fused=fused, max_nonfinite_steps=3)
    data = iter(batches(6, 4))
    before = [p.detach().clone() for p in model.parameters()]
    model.poison = float("nan")
    for index, expected in ((0, 1), (1, 2)):
        outcome = step(data.__next__, index)
        assert not outcome.applied and step.consecutive_nonfinite == expected
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no update happened
    assert model.after_calls == [1, 2]  # a skipped step is still a step: schedule and EMA move on
    model.poison = 0.0
    assert step(data.__next__, 2).applied
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert step.consecutive_nonfinite == 0 and step.nonfinite_total == 2


def test_a_skipped_step_leaves_fused_adamw_moments_and_step_count_alone():
    from medclipin.train.optim import build_optimizer

    model = Toy()
    cfg = TrainConfig(steps=10, warmup_steps=0, lr=0.1, grad_clip=0.0)
    optimizer = build_optimizer(model, cfg, CPU)
    assert all(group["fused"] for group in optimizer.param_groups)
    step = TrainStep(model, model, optimizer, build_scheduler(optimizer, cfg),
                     torch.amp.GradScaler("cpu", enabled=False), cfg, "fp32", CPU, DistInfo())
    data = iter(batches(2, 4))
    step(data.__next__, 0)
    state = {k: v.clone() for k, v in optimizer.state[model.linear.weight].items()}
    weight = model.linear.weight.detach().clone()
    model.poison = float("nan")
    assert not step(data.__next__, 1).applied
    assert torch.equal(model.linear.weight, weight)
    for key, value in optimizer.state[model.linear.weight].items():
        assert torch.equal(value, state[key]), key  # step count, exp_avg, exp_avg_sq unchanged


@pytest.mark.parametrize("fused", [True, False], ids=["trainer-optimizer", "unfused-control"])
def test_a_step_never_reads_a_device_tensor_on_the_host(monkeypatch, fused):
    """No host synchronisation per step: a GPU keeps the next step queued. The only host reads are of the
    guard's asynchronously copied counters (host memory), which are allowed."""
    model = Toy()
    step, _ = make_step(model, fused=fused, max_nonfinite_steps=3)
    host_counters = step.guard._host
    reads = []
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            if self.untyped_storage().data_ptr() != host_counters.untyped_storage().data_ptr():
                reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    data = iter(batches(3, 4))
    for index in range(3):
        step(data.__next__, index)
    monkeypatch.undo()
    # the control shows the spy works: an optimiser that cannot skip on the device reads the verdict
    assert reads == ([] if fused else ["__bool__"] * 3)


def test_consecutive_non_finite_losses_stop_with_a_clear_message():
    model = Toy()
    model.poison = float("inf")
    step, _ = make_step(model, max_nonfinite_steps=2)
    data = iter(batches(4, 4))
    step(data.__next__, 5)
    step(data.__next__, 6)  # the check reads the counters one step late: no host sync per step
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive non-finite losses at step 7.*those of step 5"):
        step(data.__next__, 7)


def test_non_finite_gradient_with_finite_loss_is_skipped_too():
    model = Toy()
    step, _ = make_step(model, max_nonfinite_steps=5)
    model.linear.weight.register_hook(lambda g: g * float("nan"))
    before = model.linear.weight.detach().clone()
    assert not step(iter(batches(1, 4)).__next__, 0).applied
    assert torch.equal(model.linear.weight, before) and step.nonfinite_total == 1


def test_precision_resolution():
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("auto", CPU) == ("bf16" if fast_bf16_available(CPU) else "fp32")
    with pytest.raises(ValueError, match="train.precision"):
        resolve_precision("fp8", CPU)
    with pytest.raises(ValueError, match="needs a GPU"):
        autocast_context("fp16", CPU)


def test_bf16_autocast_path_is_correct_on_tiny_tensors():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    with autocast_context("bf16", CPU):
        low = layer(x)
    assert low.dtype == torch.bfloat16
    assert torch.allclose(low.float(), layer(x), atol=5e-2, rtol=2e-2)
    with autocast_context("fp32", CPU):
        assert layer(x).dtype == torch.float32


def test_bf16_train_step_updates_like_fp32():
    results = {}
    for precision in ("fp32", "bf16"):
        model = Toy()
        step, _ = make_step(model)
        step.precision = precision
        outcome = step(iter(batches(1, 8)).__next__, 0)
        assert outcome.applied and outcome.loss.dtype == torch.float32
        results[precision] = (outcome.loss.item(), model.linear.weight.detach().clone())
    assert results["bf16"][0] == pytest.approx(results["fp32"][0], rel=3e-2)
    assert torch.allclose(results["bf16"][1], results["fp32"][1], atol=2e-2)


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")
def test_fp16_style_scaler_skips_an_overflowing_step_without_counting_it(monkeypatch):
    # fp16 compute needs a GPU, but the GradScaler logic is device-independent: an inf gradient makes
    # the scaler skip optimizer.step() and lower its scale; it is not a "non-finite loss".
    import contextlib

    import medclipin.train.step as step_module

    monkeypatch.setattr(step_module, "autocast_context", lambda precision, device: contextlib.nullcontext())
    model = Toy()
    step, optimizer = make_step(model)
    step.precision = "fp16"
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    handle = model.linear.weight.register_hook(lambda g: g * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    outcome = step(iter(batches(1, 4)).__next__, 0)
    assert outcome.applied and step.nonfinite_total == 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert step.scaler.get_scale() < 2.0 ** 4
    handle.remove()
    step(iter(batches(1, 4)).__next__, 1)
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ------------------------------------------------------------------ feedback
def test_metrics_log_appends_and_truncates_torn_rows(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step, "lr": 0.1})
    with (tmp_path / "metrics.csv").open("a") as handle:
        handle.write("1")  # a row torn by a kill: "1" of step "16"
    log.truncate_after(3)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    again = MetricsLog(tmp_path / "metrics.csv")
    again.write({"step": 4, "loss": 0.25, "lr": 0.1})  # a resumed run appends under the file's columns
    assert (tmp_path / "metrics.csv").read_text().splitlines()[-1] == "4,0.25,0.1"
    # a column that appears later (a monitor logged every N steps) widens the file; nothing is dropped
    again.write({"step": 5, "loss": 0.2, "lr": 0.1, "gnorm_image_clip": 2.5})
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,gnorm_image_clip" and lines[1] == "1,1.0,0.1," and lines[-1] == "5,0.2,0.1,2.5"


def test_progress_plain_lines_have_rate_and_eta():
    stream = io.StringIO()
    bar = Progress(total=10, initial=0, enabled=True, stream=stream)
    bar.update(5, {"loss": "1.000", "lr": "1e-3", "samples/s": "8.0"})
    bar.close()
    line = stream.getvalue().strip()
    assert line.startswith("step 5/10 loss=1.000 lr=1e-3 samples/s=8.0 eta=")
    quiet = io.StringIO()
    Progress(total=10, initial=0, enabled=False, stream=quiet).update(5, {"loss": "1"})
    assert quiet.getvalue() == ""


def test_tensorboard_is_optional(tmp_path):
    board = TensorBoardLog(tmp_path / "tb")
    board.write({"step": 1, "loss": 0.5}, 1)  # no-op without tensorboard, scalars with it
    board.close()
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert board.writer is None and not (tmp_path / "tb").exists()
    else:
        assert any((tmp_path / "tb").iterdir())
