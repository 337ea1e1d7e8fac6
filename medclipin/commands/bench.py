"""Benchmarks, measured side by side on this machine.

  medclipin bench train --config configs/bench_small.yaml --json train.json [--steps 10] [--warmup 2]
      median step time, samples/s, FLOPs/sample, MFU and peak memory of medclipin CLIP, CLIP+CLIPin and
      open_clip on the same towers, steps alternated (clip, clipin, open_clip, clip, ...).
  medclipin bench train --config C --profile clipin
      torch.profiler table of a few steps of one contender (clip, clipin or open_clip).
  medclipin bench eval [--config C] [--json eval.json]
      images/s and texts/s of embedding extraction; retrieval queries/s at 10k and 100k items.
  medclipin bench io --json io.json [--workers N] [--size PX]
      image decoding / loading throughput.
  medclipin bench demo --out DIR [--steps 30] [--json profile.json]
      where the demo's time goes: a shortened demo run with every stage timed (exclusive wall time, shares,
      projection to the full demo) and each tower's forward/backward timed alone.
  medclipin bench gpu [--json gpu.json] [--model CONFIG ...] [--dry-run]
      a lent GPU in one short run: bf16 / fused AdamW / collectives checked against CPU, then samples/s and
      MFU of configs/bench_gpu_vitb16_bert.yaml (ViT-B/16 + BERT-base); --dry-run does it all on CPU, tiny.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="WHAT")
    train = sub.add_parser("train", help="training step speed: medclipin CLIP, CLIP+CLIPin, open_clip")
    train.add_argument("--config", metavar="YAML", default=None, help="config (default: the built-in defaults)")
    train.add_argument("--json", metavar="OUT", default=None, help="write the results here")
    train.add_argument("--steps", type=int, default=10, help="timed steps per contender (default 10)")
    train.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    train.add_argument("--contenders", default="clip,clipin,open_clip",
                       help="comma-separated subset of clip,clipin,open_clip")
    train.add_argument("--device", default=None, help="cpu, cuda (default: the config's train.device)")
    train.add_argument("--variant", metavar="NAME:KEY=VALUE;...", action="append", default=[],
                       help="build every contender once per variant (dotted overrides separated by ';', none for the "
                            "base) and alternate them all: e.g. --variant base: --variant px160:data.image.size=160; "
                            "ratios against the first variant")
    train.add_argument("--profile", metavar="CONTENDER", default=None,
                       help="print a torch.profiler table of this contender's steps instead of benchmarking")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")

    ev = sub.add_parser("eval", help="embedding extraction images/s and retrieval queries/s")
    ev.add_argument("--config", metavar="YAML", default=None, help="config (default: the built-in defaults)")
    ev.add_argument("--json", metavar="OUT", default=None, help="write the results here")
    ev.add_argument("--sizes", default="10000,100000", help="retrieval candidate counts (default 10000,100000)")
    ev.add_argument("--max-queries", type=int, default=2048,
                    help="queries timed against all N candidates when N > --full-up-to (default 2048)")
    ev.add_argument("--full-up-to", type=int, default=10_000,
                    help="time every query up to this N (default 10000)")
    ev.add_argument("--dim", type=int, default=None, help="embedding width (default: model.contrastive.embed_dim)")
    ev.add_argument("--batch-size", type=int, default=None, help="embedding batch (default: eval.batch_size)")
    ev.add_argument("--batches", type=int, default=5, help="timed embedding batches (default 5)")
    ev.add_argument("--metrics-n", type=int, default=10_000,
                    help="also time the full retrieval_metrics at this N (default 10000; 0 = skip)")
    ev.add_argument("--device", default=None, help="cpu, cuda (default: the config's train.device)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")

    io = sub.add_parser("io", help="image decoding and loading throughput")
    io.add_argument("--json", metavar="OUT", required=True, help="write the results here")
    io.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    io.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")


    gpu = sub.add_parser("gpu", help="GPU checks (bf16, fused AdamW, collectives vs CPU) and ViT-B/16 throughput")
    gpu.add_argument("--config", metavar="YAML", default=None,
                     help="benchmark config (default: the shipped bench_gpu_vitb16_bert, ViT-B/16 + BERT-base)")
    gpu.add_argument("--model", metavar="YAML", action="append", default=[],
                     help="another config to time (medclipin CLIP and CLIP+CLIPin); repeatable. Hook for the "
                          "imported open_clip ViT-B/16 (issue 22): pass the config that loads it")
    gpu.add_argument("--json", metavar="OUT", default=None, help="write the results here")
    gpu.add_argument("--steps", type=int, default=10, help="timed steps per contender (default 10)")
    gpu.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    gpu.add_argument("--contenders", default="clip,clipin,open_clip",
                     help="comma-separated subset of clip,clipin,open_clip")
    gpu.add_argument("--dry-run", action="store_true",
                     help="everything on the CPU at a tiny size (CI; no GPU needed)")


    demo = sub.add_parser("demo", help="profile the demo end to end (stage table, shares)")
    demo.add_argument("--out", required=True, help="the profiled demo's output folder (its data/ is reused)")
    demo.add_argument("--steps", type=int, default=30, help="training steps of the profiled run (default 30)")
    demo.add_argument("--patients", type=int, default=None, help="synthetic dataset size (default: the demo's)")
    demo.add_argument("--anatomy-rounds", type=int, default=3,
                      help="rounds timing each tower's forward/backward alone (default 3; 0 = skip)")
    demo.add_argument("--json", metavar="OUT", default=None, help="write the results here")
    demo.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted demo config overrides")


def _parse_variants(specs: list[str]) -> dict[str, list[str]] | None:
    """``["base:", "px160:data.image.size=160;train.batch_size=16"]`` → ``{"base": [], "px160": [...]}``."""
    if not specs:
        return None
    variants = {}
    for spec in specs:
        name, _, overrides = spec.partition(":")
        if not name or name in variants:
            raise ValueError(f"--variant {spec!r}: give each variant a distinct NAME before ':'")
        variants[name] = [o.strip() for o in overrides.split(";") if o.strip()]
    if len(variants) < 2:
        raise ValueError("--variant: give at least two (the first is the baseline)")
    return variants


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _summary(result: dict, keys: list[str]) -> None:
    print(json.dumps({k: result.get(k) for k in keys if k in result}, indent=2, default=str))


def run(args: argparse.Namespace) -> int:
    from medclipin.config import load_config

    if args.bench is None:
        print("usage: medclipin bench {train,eval,io,demo,gpu} ... (see medclipin bench --help)", file=sys.stderr)
        return 2
    if args.bench == "io":
        try:
            from medclipin.bench.io import run_io_benchmark
        except ImportError as exc:
            print(f"error: the io benchmark is not available in this build ({exc})", file=sys.stderr)
            return 1
        run_io_benchmark(args.json, args.workers, args.size)  # prints its own table
        print(f"wrote {args.json}", file=sys.stderr)
        return 0
    if args.bench == "demo":
        from medclipin.bench.demo_profile import format_profile, profile_demo, write_profile

        result = profile_demo(args.out, steps=args.steps, overrides=args.overrides, patients=args.patients,
                              anatomy_rounds=args.anatomy_rounds, progress=_progress)
        if args.json:
            write_profile(result, args.json)
        print(format_profile(result))
        return 0
    if args.bench == "gpu":
        from medclipin.bench.gpu import GPU_CONFIG, format_gpu_report, run_gpu_benchmark

        contenders = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
        try:
            result = run_gpu_benchmark(args.config or GPU_CONFIG, args.model, args.json, dry_run=args.dry_run,
                                       steps=args.steps, warmup=args.warmup, contenders=contenders,
                                       progress=_progress)
        except (RuntimeError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(format_gpu_report(result))
        return 0 if result["checks_ok"] else 1
    cfg = load_config(args.config, args.overrides)
    if args.bench == "train":
        from medclipin.bench.train import profile_contender, run_train_benchmark

        if args.profile:
            print(profile_contender(cfg, args.profile, device=args.device))
            return 0
        contenders = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
        try:
            result = run_train_benchmark(cfg, args.json, steps=args.steps, warmup=args.warmup, contenders=contenders,
                                         device=args.device, config_path=args.config or "", progress=_progress,
                                         variants=_parse_variants(args.variant))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        _summary(result, ["date", "precision", "batch_size", "image_size", "clip_samples_per_s",
                          "clipin_samples_per_s", "open_clip_samples_per_s", "mfu", "mfu_notes", "clip_vs_open_clip",
                          "clip_vs_open_clip_paired_median", "clipin_step_vs_clip_step",
                          "clipin_step_vs_clip_step_paired_median", "clip_vs_open_clip_cpu_time",
                          "clipin_step_vs_clip_step_cpu_time", "clipin_flops_vs_clip_flops", "peak_flops_per_s",
                          "open_clip_note", "variant_ratios"])
        if args.variant:
            for name, c in result["contenders"].items():
                print(f"{name:<24} {c['samples_per_s']:8.2f} samples/s  median step {c['median_step_s']:.3f} s")
        return 0
    sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
    from medclipin.bench.eval import run_eval_benchmark

    result = run_eval_benchmark(cfg, args.json, sizes=sizes, dim=args.dim, max_queries=args.max_queries,
                                batch_size=args.batch_size, batches=args.batches, device=args.device,
                                config_path=args.config or "", metrics_n=args.metrics_n,
                                full_up_to=args.full_up_to, progress=_progress)
    _summary(result, ["date", "precision", "images_per_s", "texts_per_s"]
             + [f"retrieval_{n}_queries_per_s" for n in sizes])
    return 0
