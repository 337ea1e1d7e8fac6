"""Pretrain a model from a YAML config. Extra arguments are dotted overrides, e.g.
`medclipin pretrain --config configs/tiny_clip_clipin.yaml --out RUN train.batch_size=128 model.clipin.momentum=0.99`.
Under torchrun or srun every process runs this same command."""

from __future__ import annotations

import json
import logging
import sys


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--out", required=True,
                        help="run folder: new or empty for a new run (never overwritten); locked while the run lasts")
    parser.add_argument("--resume", default="",
                        help="'auto' (newest valid checkpoint in --out, with the run's own config) or a checkpoint "
                             "folder (into a new --out to continue with other settings)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar / step log lines")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip periodic validation (default: on when the manifest has a validate split)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides key.path=value")


def run(args) -> int:
    from medclipin.config import load_config
    from medclipin.train.distributed import detect
    from medclipin.train.trainer import NonFiniteLossError, pretrain

    is_main = detect().is_main
    # one voice per run: the other ranks only report warnings and errors
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    validate_fn = None
    if not args.no_validate:
        from medclipin.data.manifest import read_manifest
        from medclipin.train.validation import build_validate_fn

        # retrieval R@K (+ zero-shot AUC with eval.prompts) every train.validate_every steps; best → OUT/best
        validate_fn = build_validate_fn(cfg, read_manifest(cfg.data.manifest).split("validate"))
    try:
        result = pretrain(cfg, args.out, resume=args.resume, progress=not args.quiet, validate_fn=validate_fn)
    except (NonFiniteLossError, FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if isinstance(exc, NonFiniteLossError) else 2
    if not is_main:
        return 0
    print(json.dumps({"model": str(result.model_dir), "steps": result.steps,
                      "samples_per_s": round(result.samples_per_s, 2), "wall_s": round(result.wall_s, 1),
                      "skipped_nonfinite_steps": result.skipped_nonfinite,
                      "skipped_records": result.skipped_records, "best": result.best}, indent=2))
    return 0
