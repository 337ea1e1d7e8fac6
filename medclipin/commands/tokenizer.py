"""Train a WordPiece tokenizer on a manifest's report text.

    medclipin tokenizer train --manifest M --vocab-size V --out DIR [--sections findings impression]

Only the train split's text is used (validate/test text never shapes the vocabulary). The folder
written loads with ``AutoTokenizer.from_pretrained(DIR)``; set ``data.text.tokenizer: DIR`` in a
config to use it. Prints counts only.
"""

from __future__ import annotations

import argparse
import sys
import time

from medclipin.data.manifest import read_manifest
from medclipin.data.reports import record_text
from medclipin.data.tokenizer import train_wordpiece_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    train = sub.add_parser("train", help="train WordPiece on the train split's report text",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--manifest", required=True)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="output folder (save_pretrained format)")
    train.add_argument("--sections", nargs="+", default=["findings", "impression"],
                       choices=("findings", "impression", "text"),
                       help="record sections joined into the training text (falls back to `text`)")
    train.add_argument("--min-frequency", type=int, default=5,
                       help="learn a token only from a piece seen this many times (default 5): rare words such as "
                            "names and record numbers stay out of the vocabulary")
    train.add_argument("--cased", action="store_true", help="keep case (default: lower-case)")
    train.add_argument("--model-max-length", type=int, default=512)


def run(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.manifest)
    texts = [t for t in (record_text(r, tuple(args.sections)) for r in manifest.split("train")) if t]
    # several images of one study share the report: deduplicate so repeated reports don't skew counts
    unique = list(dict.fromkeys(texts))
    if not unique:
        print("error: the manifest's train split has no text in the chosen sections", file=sys.stderr)
        return 2
    start = time.perf_counter()
    tokenizer = train_wordpiece_tokenizer(unique, args.vocab_size, args.out, lowercase=not args.cased,
                                          min_frequency=args.min_frequency, model_max_length=args.model_max_length)
    print(f"trained WordPiece on {len(unique)} unique train texts ({len(texts)} records): "
          f"vocab {tokenizer.vocab_size} in {time.perf_counter() - start:.2f} s -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``medclipin tokenizer`` on its own (tests, scripts): the same parsing and error handling as the CLI."""
    from medclipin.cli import main as cli_main

    return cli_main(["tokenizer", *(sys.argv[1:] if argv is None else argv)])
