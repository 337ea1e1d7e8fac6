"""Turn a public dataset's raw files into a split-aware manifest.

    medclipin prepare DATASET --root RAW --out MANIFEST [options]

DATASET is one of mimic-cxr, mimic-cxr-jpg, chexpert, iu-xray, rsna-pneumonia, rfmid, odir,
image-folder, csv, jsonl (``medclipin prepare DATASET --help`` lists its options). The summary
printed (and written with --summary) holds counts only: records and patients per split, label
positives, and every skipped record by reason. Report text is never printed unless --show-text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from medclipin.atomic import atomic_open, check_output_file
from medclipin.data.manifest import write_manifest
from medclipin.data.prepare import DATASETS, adapter


def add_options(parser: argparse.ArgumentParser, options_class: type, fixed: dict) -> None:
    """One flag per field of an adapter's options dataclass (``five_by_two_hundred`` ->
    ``--five-by-two-hundred``), from its default and ``option(...)`` metadata; ``fixed`` fields are
    set by the dataset name and get no flag."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for item in dataclasses.fields(options_class):
        if item.name in fixed:
            continue
        meta = dict(item.metadata)
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        kwargs: dict = {"dest": item.name, "help": meta.get("help", "")}
        if isinstance(default, bool):
            kwargs.update(action="store_true", default=default)
        else:
            value_type = meta.get("type") or (type(default) if isinstance(default, (int, float, str)) else str)
            kwargs.update(type=value_type, default=list(default) if isinstance(default, (list, tuple)) else default)
            for key in ("nargs", "choices", "metavar", "action"):
                if key in meta:
                    kwargs[key] = meta[key]
        target = parser
        if "group" in meta:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group(required=meta.get("group_required", False))
            target = groups[meta["group"]]
        target.add_argument("--" + item.name.replace("_", "-"), **kwargs)


def options_from_args(options_class: type, fixed: dict, args: argparse.Namespace):
    """The adapter's options from parsed flags (plus the fields the dataset name fixes)."""
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(options_class) if item.name not in fixed}
    return options_class(**values, **fixed)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    for name, (_, help_text, fixed) in DATASETS.items():
        module = adapter(name)
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--root", required=True, help="folder holding the raw files in the published layout")
        p.add_argument("--out", required=True, help="manifest to write (.csv or .jsonl)")
        p.add_argument("--summary", default=None, help="also write the counts summary as JSON here")
        p.add_argument("--absolute-paths", action="store_true",
                       help="store absolute image paths (default: relative to the manifest's folder)")
        p.add_argument("--show-text", action="store_true",
                       help="print the first record's text sections (off by default: report text is private)")
        add_options(p, module.Options, fixed)


def print_summary(dataset: str, out: Path, summary: dict, stream=None) -> None:
    stream = stream or sys.stdout  # looked up at call time so redirection/capture works
    print(f"prepared {dataset}: {summary['records']} records -> {out}", file=stream)
    print("  records per split:  " + ", ".join(f"{k} {v}" for k, v in summary["records_per_split"].items()), file=stream)
    print("  patients per split: " + ", ".join(f"{k} {v}" for k, v in summary["patients_per_split"].items()), file=stream)
    print(f"  with findings {summary['with_findings']}, with impression {summary['with_impression']}, "
          f"with any text {summary['with_any_text']}", file=stream)
    if summary["label_positives"]:
        print("  label positives:    " + ", ".join(f"{k} {v}" for k, v in summary["label_positives"].items()),
              file=stream)
    print(f"  skipped {summary['skipped_total']}" + (":" if summary["skipped"] else ""), file=stream)
    for reason, count in summary["skipped"].items():
        print(f"    {count:8d}  {reason}", file=stream)
    for note, count in summary["notes"].items():
        print(f"  note: {count} {note}", file=stream)


def run(args: argparse.Namespace) -> int:
    for output in (args.out, args.summary):
        if output:
            check_output_file(output)  # before reading the raw dataset
    module = adapter(args.dataset)
    fixed = DATASETS[args.dataset][2]
    result = module.prepare(args.root, options_from_args(module.Options, fixed, args))
    out = Path(args.out)
    write_manifest(out, result.records, result.label_names, relative_paths=not args.absolute_paths)
    summary = {"dataset": args.dataset, **result.summary()}
    print_summary(args.dataset, out, summary)
    if args.summary:
        with atomic_open(args.summary, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(summary, indent=2) + "\n")
    if args.show_text and result.records:
        first = result.records[0]
        print(f"  first record text (--show-text): findings={first.findings!r} impression={first.impression!r} "
              f"text={first.text!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``medclipin prepare`` on its own (tests, scripts): the same parsing and error handling as the CLI."""
    from medclipin.cli import main as cli_main

    return cli_main(["prepare", *(sys.argv[1:] if argv is None else argv)])
