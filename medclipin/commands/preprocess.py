"""Decode every image of a manifest once, in parallel, into a compact cache of geometry-normalised
8-bit images (sharded memory-mapped arrays; see docs/images.md). Resumable: re-running skips images
already cached and redoes files whose size or modification time changed. Unreadable files are listed
in OUT/rejects.csv. Train with it via `data.cache=OUT`.

Example: medclipin preprocess --manifest data/manifest.csv --size 512 --out cache/cxr512 --workers 8"""

from __future__ import annotations

import os

from medclipin.data.reader_base import DEFAULT_MAX_PIXELS


def add_arguments(parser) -> None:
    parser.add_argument("--manifest", required=True, help="manifest CSV/JSONL (its image_path column is cached)")
    parser.add_argument("--out", required=True, help="cache folder (created; an existing cache is resumed)")
    parser.add_argument("--size", type=int, default=512, help="side of the stored square images (default 512)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="decoding processes (default: all cores; 0 = in this process)")
    parser.add_argument("--domain", choices=("cxr", "fundus"), default="cxr",
                        help="geometry: cxr = resize + pad; fundus = field-of-view crop + pad (default cxr)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None,
                        help="stored channels (default: 1 for cxr, 3 for fundus)")
    parser.add_argument("--window", choices=("first", "percentile", "none"), default="first",
                        help="DICOM VOI: first window/VOI LUT in the file, 0.5-99.5 percentiles, or min-max")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="reject images with more pixels than this before decoding them "
                             f"(decompression bombs; default {DEFAULT_MAX_PIXELS:,}; 0 = no limit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from medclipin.atomic import check_output_dir
    from medclipin.data.manifest import read_manifest
    from medclipin.data.preprocess import build_cache

    check_output_dir(args.out)  # before reading the manifest: fail in a second, not after the work
    manifest = read_manifest(args.manifest)
    paths = [record.image_path for record in manifest.records]
    summary = build_cache(paths, args.out, size=args.size, domain=args.domain, channels=args.channels,
                          window=args.window, workers=args.workers, progress=not args.quiet,
                          max_pixels=args.max_pixels)
    print(f"{args.out}: {summary.line()} in {summary.seconds:.1f} s")
    if summary.rejected:
        # counts only on the console: file paths can contain patient identifiers
        print(f"{summary.rejected} unreadable file(s): see {os.path.join(args.out, 'rejects.csv')}")
    return 1 if summary.total and summary.rejected == summary.total else 0
