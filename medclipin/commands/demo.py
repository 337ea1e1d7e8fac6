"""Generate the synthetic chest X-ray set (if absent), pretrain a CLIP+CLIPin model on it, evaluate on the
held-out test split (zero-shot AUC, retrieval R@K, Grad-CAM pointing game) and write OUT/metrics.json."""

from __future__ import annotations

import logging


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output folder (metrics.json, config, model, overlays)")
    parser.add_argument("--config", default=None, help="YAML config (default: the shipped demo config)")
    parser.add_argument("--data", default=None, help="synthetic dataset folder (default: OUT/data)")
    parser.add_argument("--patients", type=int, default=None, help="synthetic dataset size in patients")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--ceiling", action="store_true",
                        help="after the demo, also train the supervised ceiling (same image tower on the labels; "
                             "a few more minutes) into OUT/ceiling; the summary shows it beside zero-shot")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=50")


def run(args) -> int:
    from medclipin.demo import format_summary, run_demo

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    metrics = run_demo(args.out, args.config, args.overrides, data_dir=args.data, patients=args.patients,
                       progress=not args.quiet, ceiling=args.ceiling)
    print(format_summary(metrics))
    print(f"wrote {args.out}/metrics.json")
    return 0
