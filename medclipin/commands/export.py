"""Export a medclipin model as an open_clip `local-dir` folder or a transformers `CLIPModel` folder that
embeds as medclipin does (a CLIPin pre-projector folds into the projection). What the format cannot hold
exactly is refused in one line.

Examples:
  medclipin export --checkpoint runs/x --format open_clip --out exported/x-open_clip
      then: open_clip.create_model_and_transforms('local-dir:exported/x-open_clip')
  medclipin export --checkpoint runs/x --format hf --out exported/x-hf
      then: transformers.CLIPModel.from_pretrained('exported/x-hf')"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model, run or checkpoint folder (or a base spec)")
    parser.add_argument("--weights", default="", help="weights file when --checkpoint is open_clip:ARCH")
    parser.add_argument("--format", required=True, choices=("open_clip", "hf"), help="target library")
    parser.add_argument("--out", required=True, help="new folder (must not exist or be empty)")


def run(args) -> int:
    from medclipin.api import load
    from medclipin.commands.import_base import refuse_existing
    from medclipin.models.export import export_model

    refuse_existing(args.out)
    model, processor = load(args.checkpoint, weights=args.weights)
    export_model(model, processor, args.out, args.format)
    loader = (f"open_clip.create_model_and_transforms('local-dir:{args.out}')" if args.format == "open_clip"
              else f"transformers.CLIPModel.from_pretrained('{args.out}')")
    print(f"{args.out}: exported; load with {loader}")
    return 0
