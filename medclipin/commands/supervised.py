"""Train the supervised ceiling: the config's image tower, images, augmentation and step budget, trained on
the manifest's labels (binary cross-entropy), scored on the test split like zero-shot. Writes OUT/metrics.json.

  medclipin supervised --config demo --manifest demo_out/data/manifest.csv --out demo_out/ceiling
"""

from __future__ import annotations

import logging


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (a file, or a shipped config name)")
    parser.add_argument("--manifest", default=None, help="manifest (default: the config's data.manifest)")
    parser.add_argument("--out", required=True, help="output folder (metrics.json, config.yaml)")
    parser.add_argument("--quiet", action="store_true", help="no step log lines")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides key.path=value")


def run(args) -> int:
    from medclipin.atomic import check_output_dir
    from medclipin.config import load_config
    from medclipin.train.supervised import train_supervised

    check_output_dir(args.out)  # before any training

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    overrides = list(args.overrides) + ([f"data.manifest={args.manifest}"] if args.manifest else [])
    cfg = load_config(args.config, overrides)
    result = train_supervised(cfg, args.out, progress=not args.quiet)
    per_class = ", ".join(f"{k} {v:.3f}" for k, v in (result["per_class_auc"] or {}).items() if v is not None)
    print(f"supervised ceiling: test mean AUC {result['mean_auc']:.3f} ({per_class}); wrote {args.out}/metrics.json")
    return 0
