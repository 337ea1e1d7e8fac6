"""medclipin bench: the train benchmark runs all contenders at tiny size and writes its keys; FLOP counting
is plausible; the eval benchmark runs. No timing thresholds here (those belong in the benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medclipin.bench import train as bench_train
from medclipin.bench.eval import run_eval_benchmark
from medclipin.bench.flops import count_flops, count_flops_by_dtype, matmul_peak, mfu, vit_flops_estimate
from medclipin.config import load_config

TINY = [
    "data.image.size=32", "data.image.channels=1", "data.text.max_length=8", "data.text.vocab_size=100",
    "model.image_encoder.name=vit_tiny_patch16_224",
    "model.image_encoder.kwargs={patch_size: 16, depth: 1, embed_dim: 32, num_heads: 2}",
    "model.text_encoder.config={hidden_size: 32, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 64}",
    "model.contrastive.embed_dim=16",
    "model.clipin.pre_dim=32", "model.clipin.nc_dim=32", "model.clipin.predictor_hidden=16",
    "train.batch_size=4", "train.device=cpu", "train.warmup_steps=1", "train.steps=10",
    "eval.batch_size=4",
]


@pytest.fixture()
def tiny_cfg():
    return load_config(None, TINY)


def test_train_benchmark_all_contenders(tiny_cfg, tmp_path):
    out = tmp_path / "train.json"
    result = bench_train.run_train_benchmark(tiny_cfg, out, steps=2, warmup=0, peak_max_n=128)
    saved = json.loads(out.read_text())
    for key in ("clip_samples_per_s", "clipin_samples_per_s", "open_clip_samples_per_s", "mfu",
                "clipin_step_vs_clip_step", "precision", "machine", "torch", "date", "config", "matmul_peak"):
        assert key in saved, key
    assert set(saved["matmul_peak"]) == {"float32", "bfloat16"}
    assert saved["precision"] in ("fp32", "bf16")
    expected = ["clip", "clipin"] + (["open_clip"] if result["open_clip_available"] else [])
    assert list(saved["contenders"]) == expected
    for name in expected:
        c = saved["contenders"][name]
        assert len(c["step_times_s"]) == 2
        assert c["samples_per_s"] > 0 and c["flops_per_sample"] > 0
        assert (c["mfu"] is None and c["mfu_note"]) or 0 < c["mfu"] <= 1
        assert c["peak_memory_bytes"] > 0
        assert c["attention"]["text_attn_implementation"] == "sdpa"
        assert c["attention"]["image_fused_attn"] is True
    # CLIPin = online forward/backward on view 1 + no-grad target forward on view 2 (+ heads): ≈ 4/3 of CLIP
    assert 1.2 < saved["clipin_flops_vs_clip_flops"] < 1.8
    if result["open_clip_available"]:
        assert saved["clip_vs_open_clip"] > 0
        # the same towers: the same FLOPs per step within the heads' difference
        clip, oc = saved["contenders"]["clip"], saved["contenders"]["open_clip"]
        assert abs(clip["flops_per_step"] - oc["flops_per_step"]) / clip["flops_per_step"] < 0.05


def test_train_benchmark_without_open_clip(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(bench_train, "open_clip_available", lambda: False)
    result = bench_train.run_train_benchmark(tiny_cfg, tmp_path / "t.json", steps=1, warmup=0, measure_peak=False)
    assert result["open_clip_available"] is False
    assert result["open_clip_samples_per_s"] is None
    assert "not installed" in result["open_clip_note"]
    assert "open_clip" not in result["contenders"]
    assert result["clip_samples_per_s"] > 0


def test_medclipin_step_updates_weights_and_ema(tiny_cfg):
    c = bench_train.build_medclipin_contender("clipin", tiny_cfg, torch.device("cpu"), "fp32", seed=0)
    objective = c.model  # the training objective the trainer optimises
    model, target = objective.model, objective.clipin.target
    online = model.image_encoder.model.patch_embed.proj.weight.detach().clone()
    target_before = target["image_encoder"].model.patch_embed.proj.weight.detach().clone()
    assert torch.equal(online, target_before)
    assert bool(c.step().applied)
    new_online = model.image_encoder.model.patch_embed.proj.weight.detach()
    new_target = target["image_encoder"].model.patch_embed.proj.weight.detach()
    assert not torch.equal(new_online, online)
    m = objective.clipin.momentum(1, tiny_cfg.train.steps)
    torch.testing.assert_close(new_target, m * target_before + (1 - m) * new_online)
    assert c.optimizer.state  # AdamW stepped
    assert "TrainStep" in c.info["implementation"]  # the trainer's own step, not a copy
    assert c.info["optimizer"] == "AdamW(fused)"  # one kernel per step, on CPU too


def test_flop_count_plausible_for_tiny_vit():
    import timm

    depth, dim, size, patch = 2, 64, 32, 8
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=size, patch_size=patch, depth=depth,
                              embed_dim=dim, num_heads=2, in_chans=3)
    x = torch.randn(2, 3, size, size)
    counted = count_flops(lambda: model(x).sum().backward())
    patches = (size // patch) ** 2
    forward = vit_flops_estimate(depth, dim, patches + 1, patch_dim=3 * patch * patch, patches=patches)
    analytic = 3 * forward * 2  # forward + backward (≈ 2× forward), batch 2
    assert counted > 0
    assert analytic / 2 < counted < analytic * 2


def test_flop_count_of_the_cnn_towers_depthwise_convolutions_is_their_real_work():
    """EfficientNet's depthwise convolutions (groups = channels) do 1/C of a full convolution's work: the MFU
    of a CNN tower is low because they are memory-bound, not because they are miscounted."""
    x = torch.randn(2, 16, 12, 12)
    for groups in (1, 16):
        conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=False)
        multiply_adds = 2 * 16 * 12 * 12 * 9 * (16 // groups)  # batch × out channels × pixels × kernel × in/group
        assert count_flops(lambda: conv(x)) == 2 * multiply_adds


@pytest.mark.parametrize("groups", [1, 4, 16])
def test_flop_count_of_a_convolutions_backward_is_twice_its_forward(groups):
    """grad_input and grad_weight each cost one forward, grouped or not. torch's own formula multiplies the
    weight gradient of a grouped convolution by ``groups`` (x16 here): MFU above 1 on the demo's
    EfficientNet came from that."""
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, groups=groups, bias=False)
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    forward = count_flops(lambda: conv(x))
    assert count_flops(lambda: conv(x).sum().backward()) == 3 * forward


def test_flop_count_of_the_demo_cnn_tower_backward_is_at_most_twice_its_forward():
    """The demo's image tower (EfficientNet-Lite0: depthwise convolutions everywhere), random weights."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, in_chans=1)
    x = torch.randn(2, 1, 64, 64)
    forward = count_flops(lambda: model(x))
    both = count_flops(lambda: model(x).sum().backward())
    assert forward < both <= 3 * forward


def test_flops_are_split_by_the_dtype_they_ran_in():
    """Under bf16 autocast, a layer run with autocast off (``train_fp32``) is counted as fp32 work."""
    linear, conv = torch.nn.Linear(64, 64), torch.nn.Conv2d(8, 8, 3, groups=8)
    x, y = torch.randn(4, 64), torch.randn(2, 8, 10, 10)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            linear(x).sum().backward()
            with torch.autocast("cpu", enabled=False):
                conv(y).sum().backward()

    split = count_flops_by_dtype(step)
    assert split == {"bfloat16": 2 * (2 * 4 * 64 * 64), "float32": 2 * (2 * 2 * 8 * 8 * 8 * 9)}
    assert count_flops(step) == sum(split.values())


def test_mfu_weighs_each_dtype_by_its_own_peak_and_never_exceeds_one():
    peaks = {"float32": 100.0, "bfloat16": 400.0}
    value, note = mfu({"bfloat16": 400, "float32": 100}, 4.0, peaks, "bfloat16")  # ideal 1 s + 1 s, took 4 s
    assert value == pytest.approx(0.5) and note is None
    value, note = mfu({"unknown": 200}, 1.0, peaks, "bfloat16")  # charged at the run's precision
    assert value == pytest.approx(0.5)
    value, note = mfu({"float32": 300}, 1.0, peaks, "bfloat16")  # 3x what the fp32 peak allows
    assert value is None and "no MFU" in note
    assert mfu({"float32": 0}, 1.0, peaks, "float32")[0] is None
    assert mfu({"float32": 10}, float("nan"), peaks, "float32")[0] is None


def test_train_benchmark_reports_no_mfu_above_one(tiny_cfg, tmp_path, monkeypatch):
    """With a peak far below what the steps achieve, every contender's MFU is withheld with its reason."""
    monkeypatch.setattr(bench_train, "matmul_peak",
                        lambda dtype, device, max_n=None: {"dtype": str(dtype), "n": 1, "seconds": 1.0,
                                                           "flops_per_s": 1.0})
    result = bench_train.run_train_benchmark(tiny_cfg, None, steps=1, warmup=0, contenders=("clip",))
    assert result["mfu"] == {"clip": None} and "no MFU" in result["mfu_notes"]["clip"]
    assert result["contenders"]["clip"]["flops_by_dtype"]


def test_matmul_peak_small():
    peak = matmul_peak(torch.float32, torch.device("cpu"), max_n=128, target_s=0.01, repeats=1)
    assert peak["n"] <= 128 and peak["flops_per_s"] > 0


def test_eval_benchmark_tiny(tiny_cfg, tmp_path):
    out = tmp_path / "eval.json"
    result = run_eval_benchmark(tiny_cfg, out, sizes=(50, 200), max_queries=64, batches=1, metrics_n=50,
                                full_up_to=100)
    saved = json.loads(out.read_text())
    assert saved["images_per_s"] > 0 and saved["texts_per_s"] > 0
    assert saved["retrieval"]["50"]["subset"] is False and saved["retrieval"]["50"]["queries_timed"] == 50
    assert saved["retrieval"]["200"]["subset"] is True and saved["retrieval"]["200"]["queries_timed"] == 64
    assert result["retrieval_200_queries_per_s"] > 0
    assert saved["retrieval_metrics"]["n"] == 50


def test_cli_bench_eval(tmp_path, monkeypatch):
    from medclipin.cli import main

    out = tmp_path / "e.json"
    code = main(["bench", "eval", "--json", str(out), "--sizes", "40", "--batches", "1", "--batch-size", "2",
                 "--metrics-n", "0", *TINY])
    assert code == 0 and json.loads(out.read_text())["retrieval"]["40"]["candidates"] == 40


def test_gpu_config_is_vitb16_bert_base():
    """The GPU benchmark config builds ViT-B/16 + BERT-base (checked on the config, no model is built)."""
    from medclipin.train.step import resolve_precision

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "bench_gpu_vitb16_bert.yaml")
    assert cfg.model.image_encoder.name == "vit_base_patch16_224" and cfg.data.image.size == 224
    text = cfg.model.text_encoder.config
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
            text["intermediate_size"]) == (768, 12, 12, 3072)
    assert cfg.train.precision == "bf16" and cfg.train.device == "cuda" and cfg.train.batch_size >= 64
    assert resolve_precision(cfg.train.precision, torch.device("cuda")) == "bf16"


def test_cli_bench_has_train_eval_io():
    from medclipin.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["bench", "train", "--config", "c.yaml", "--json", "o.json", "--steps", "3",
                              "--warmup", "1", "train.batch_size=8"])
    assert (args.bench, args.steps, args.warmup, args.overrides) == ("train", 3, 1, ["train.batch_size=8"])
    assert parser.parse_args(["bench", "eval"]).bench == "eval"
    args = parser.parse_args(["bench", "io", "--json", "io.json", "--workers", "2", "--size", "128"])
    assert (args.bench, args.workers, args.size) == ("io", 2, 128)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_open_clip_model_matches_towers(tiny_cfg, pooling):
    """open_clip's model is built with medclipin's pooling and the same trunk size (same FLOPs per step)."""
    pytest.importorskip("open_clip")
    tiny_cfg.model.text_encoder.pooling = pooling
    model = bench_train.build_open_clip_model(tiny_cfg)
    expected = {"cls": "ClsLastHiddenStatePooler", "mean": "MeanPooler"}[pooling]
    assert type(model.text.pooler).__name__ == expected
    assert model.visual.trunk.patch_embed.proj.in_channels == tiny_cfg.data.image.channels


def test_cli_bench_gpu_dry_run_checks_and_times_every_config(tmp_path, capsys):
    """``bench gpu --dry-run`` (CI): the GPU script's checks and throughput run on CPU at a tiny size, for the
    GPU config and for a ``--model`` config (the hook for the imported open_clip ViT-B/16)."""
    from medclipin.cli import main

    out = tmp_path / "gpu.json"
    extra = Path(__file__).resolve().parents[1] / "configs" / "bench_small.yaml"
    code = main(["bench", "gpu", "--dry-run", "--json", str(out), "--steps", "1", "--warmup", "0",
                 "--model", str(extra)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["checks_ok"]
    assert [c["name"].split()[0] for c in result["checks"]] == ["bf16", "fused", "collectives"]
    assert result["checks"][2]["backend"] == "gloo"
    runs = result["throughput"]
    assert [Path(r["config"]).stem for r in runs] == ["bench_gpu_vitb16_bert", "bench_small", "bench_gpu_openai_vitb16"]
    assert set(runs[1]["contenders"]) == {"clip", "clipin"}
    # the imported open_clip CLIP: medclipin's steps and open_clip's own on the same model
    assert set(runs[2]["contenders"]) == {"clip", "clipin", "open_clip"}
    for run in runs:
        for c in run["contenders"].values():
            assert c["samples_per_s"] > 0 and (c["mfu"] is None or 0 < c["mfu"] <= 1)
    printed = capsys.readouterr().out
    assert "checks passed" in printed and "samples/s" in printed


def test_gpu_checks_fail_when_a_limit_is_missed(monkeypatch):
    from medclipin.bench import gpu

    monkeypatch.setitem(gpu.LIMITS, "adamw_max_abs_diff", -1.0)  # no difference can be below zero
    cfg = load_config(gpu.GPU_CONFIG, gpu.DRY_RUN_OVERRIDES)
    check = gpu.check_fused_adamw(cfg, torch.device("cpu"))
    assert check["ok"] is False and check["values"]["adamw_max_abs_diff"] >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_bench_gpu_without_cuda_says_to_use_dry_run(capsys):
    from medclipin.cli import main

    assert main(["bench", "gpu"]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_train_benchmark_variants_are_alternated_and_compared_with_the_first(tiny_cfg):
    """``--variant``: each contender once per config variant, in the same rounds; ratios against the first."""
    result = bench_train.run_train_benchmark(tiny_cfg, None, steps=2, warmup=0, contenders=("clip",),
                                             measure_peak=False,
                                             variants={"base": [], "half": ["train.batch_size=2"]})
    assert list(result["contenders"]) == ["clip@base", "clip@half"]
    assert result["contenders"]["clip@half"]["batch_size"] == 2
    half, base = result["contenders"]["clip@half"], result["contenders"]["clip@base"]
    assert half["flops_per_sample"] == pytest.approx(base["flops_per_sample"], rel=0.05)  # per sample, not step
    ratio = result["variant_ratios"]["clip@half / clip@base"]
    assert ratio["samples_per_s"] == pytest.approx(half["samples_per_s"] / base["samples_per_s"])
    assert ratio["paired_median"] > 0 and ratio["cpu_time"] > 0


def test_cli_variant_parsing():
    from medclipin.commands.bench import _parse_variants

    assert _parse_variants(["base:", "big:data.image.size=160; train.batch_size=16"]) == {
        "base": [], "big": ["data.image.size=160", "train.batch_size=16"]}
    with pytest.raises(ValueError):
        _parse_variants(["only:"])
    with pytest.raises(ValueError):
        _parse_variants(["a:", "a:train.steps=1"])
