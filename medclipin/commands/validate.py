"""Check a manifest: files exist and decode, counts per split, empty texts, label prevalence,
duplicate images (same path or same content) and patient leakage across splits.

    medclipin validate MANIFEST [--all] [--sample N] [--json OUT]

Every file is checked for existence (and for being a non-empty regular file); a sample of files,
stratified by split and file type, is decoded (--all: every file). Exits 1 on an empty manifest, on
missing, empty or undecodable files, on a patient in more than one split, or on an image in more
than one split; 2 when the manifest itself is malformed. Output is counts plus the path and reason of
every bad file; never report text or patient identifiers.
"""

from __future__ import annotations

import argparse
import json
import sys

from medclipin.atomic import atomic_open, check_output_file
from medclipin.data.reader_base import DEFAULT_MAX_PIXELS
from medclipin.data.validate import ValidationReport, validate_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", help="manifest CSV or JSONL")
    parser.add_argument("--all", action="store_true", help="decode every image (default: a sample)")
    parser.add_argument("--sample", type=int, default=32, help="images decoded when --all is not given (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the decode sample")
    parser.add_argument("--json", "--out", dest="json", default=None, metavar="OUT",
                        help="write the full report (with every bad file) as JSON")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help=f"larger images count as bad files (default {DEFAULT_MAX_PIXELS:,}; 0 = no limit)")


def _errors(count: int) -> str:
    return f"{count} error{'' if count == 1 else 's'}"


def print_report(report: ValidationReport, stream=None) -> None:
    stream = stream or sys.stdout  # looked up at call time so redirection/capture works
    print(f"manifest: {report.records} records", file=stream)
    for split in report.records_per_split:
        print(f"  {split:9s} records {report.records_per_split[split]:7d}  patients "
              f"{report.patients_per_split[split]:7d}  empty text {report.empty_text_per_split[split]:7d}", file=stream)
    print(f"  files: {report.existing_files} exist, missing {report.missing_files}, "
          f"empty or not a regular file {report.unreadable_files}", file=stream)
    if report.decode_sampled:
        print(f"  decoded a sample of {report.decode_checked} of {report.existing_files} files (every split and file "
              f"type; --sample N for more, --all to decode every file): {_errors(report.decode_errors)}", file=stream)
    else:
        print(f"  decoded all {report.decode_checked} files: {_errors(report.decode_errors)}", file=stream)
    print(f"  duplicate images: same path {report.duplicate_paths}, same content {report.duplicate_content}; "
          f"in more than one split {report.cross_split_images}", file=stream)
    print(f"  patients in more than one split: {report.leaked_patients}", file=stream)
    if report.boxes:
        print(f"  boxes: {report.boxes}", file=stream)
    for name, table in report.label_prevalence.items():
        cells = ", ".join(f"{s} {t['positive']}/{t['positive'] + t['negative'] + t['uncertain']}"
                          + (f" (-1: {t['uncertain']})" if t["uncertain"] else "") for s, t in table.items())
        print(f"  label {name}: positive/stated {cells}", file=stream)
    if report.bad_files:
        print(f"  bad files ({len(report.bad_files)}):", file=stream)
        for entry in report.bad_files:  # paths, never report text or patient identifiers from the manifest
            print(f"    {entry['path']}: {entry['reason']}", file=stream)
    for warning in report.warnings:
        print(f"  warning: {warning}", file=stream)
    print("OK" if report.ok else "FAILED: " + "; ".join(report.failures), file=stream)


def run(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json)  # before the checks, which can take minutes with --all
    report = validate_manifest(args.manifest, check_all=args.all, sample=args.sample, seed=args.seed,
                               max_pixels=args.max_pixels)
    print_report(report)
    if args.json:
        with atomic_open(args.json, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run ``medclipin validate`` on its own (tests, scripts): the same parsing and error handling as the CLI."""
    from medclipin.cli import main as cli_main

    return cli_main(["validate", *(sys.argv[1:] if argv is None else argv)])
