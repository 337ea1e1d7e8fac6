"""The ``medclipin`` command. Argument parsing only: each subcommand lives in
``medclipin/commands/<name>.py`` with ``add_arguments(parser)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from medclipin.errors import MedclipinError

# name -> (module, one-line help). Order is the order shown in --help.
COMMANDS = {
    "demo": ("demo", "generate the synthetic set, pretrain CLIPin, evaluate, write metrics.json"),
    "synth": ("synth", "write the embedded synthetic chest X-ray dataset"),
    "pretrain": ("pretrain", "pretrain a model from a YAML config (dotted overrides allowed)"),
    "prepare": ("prepare", "turn a public dataset's raw files into a manifest"),
    "validate": ("validate", "check a manifest: files, splits, leakage, labels"),
    "preprocess": ("preprocess", "decode every image once into a compact cache"),
    "tokenizer": ("tokenizer", "train a WordPiece tokenizer on a report corpus"),
    "zeroshot": ("zeroshot", "zero-shot classification from prompt files"),
    "retrieve": ("retrieve", "image<->text retrieval metrics and queries"),
    "probe": ("probe", "linear probe on frozen image features"),
    "compare": ("compare", "two models on the same images: ΔAUC with CI and DeLong p, operating-point differences"),
    "supervised": ("supervised", "the supervised ceiling: the same image tower trained on the labels"),
    "gradcam": ("gradcam", "multimodal Grad-CAM: where the image and which words drive a match"),
    "import": ("import_base", "a medclipin model folder from an open_clip / OpenAI / HF CLIP"),
    "export": ("export", "a medclipin model as an open_clip local-dir or HF CLIPModel folder"),
    "bench": ("bench", "benchmarks: train, eval, io, demo, gpu"),
}


def _environment_defaults() -> None:
    # albumentations phones PyPI at import; nothing at run time may depend on the network.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medclipin", description="Medical vision-language pretraining with CLIPin.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(f"medclipin.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"medclipin.commands.{module_name}":
                raise
            continue  # command not installed in this build
        command_parser = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip())
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    _environment_defaults()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after flags (`pretrain ... --quiet train.steps=3`): argparse has already
    # closed the positional list by then, so they arrive here
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*(args.overrides or []), *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MedclipinError as exc:  # bad input or settings: the message names the file/field and the problem
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `medclipin synth ... | head`: the reader left, not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
