"""Write a medclipin model folder from a third-party CLIP (open_clip, OpenAI, CheXzero, BiomedCLIP, a
transformers CLIPModel): the towers, projections, temperature and processor, embedding exactly as the
original library does. The folder then works everywhere a medclipin model does (evaluation commands,
`train.init_from`, `medclipin.load`).

Examples:
  medclipin import --base open_clip:ViT-B-32-quickgelu --weights chexzero.pt --out models/chexzero
  medclipin import --base open_clip:local-dir:biomedclip/ --out models/biomedclip
  medclipin import --base hf:clip-vit-base-patch16/ --out models/openai-b16"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("--base", required=True,
                        help="open_clip:ARCH (with --weights), open_clip:local-dir:DIR or hf:DIR")
    parser.add_argument("--weights", default="", help="weights file of an open_clip:ARCH base ('random': none)")
    parser.add_argument("--out", required=True, help="new model folder (must not exist or be empty)")


def refuse_existing(out: str) -> None:
    """An output folder that holds anything is the user's: never replaced."""
    from pathlib import Path

    from medclipin.atomic import OutputPathError, check_output_dir

    check_output_dir(out)
    path = Path(out)
    if path.is_dir() and any(path.iterdir()):
        raise OutputPathError(f"{out}: exists and is not empty; choose a new folder")


def run(args) -> int:
    from medclipin.models.bases import load_base

    refuse_existing(args.out)
    model, processor = load_base(args.base, args.weights)
    model.save_pretrained(args.out, processor)
    print(f"{args.out}: {args.base} as a medclipin model ({model.image_encoder.out_dim}/{model.text_encoder.out_dim}"
          f"-d towers, {model.embed_dim}-d embeddings)")
    return 0
