"""Write the embedded synthetic chest X-ray dataset (no real patients).

Generates seeded, deterministic radiograph-like studies with five findings (Pleural Effusion,
Cardiomegaly, Nodule, Pneumothorax, Consolidation) as 12-bit CR DICOM and 8-bit PNG, free-text
reports, labels, bounding boxes and a patient-level train/validate/test split:

    OUT/dicom/*.dcm  OUT/png/*.png  OUT/manifest.csv  OUT/manifest_png.csv  OUT/labels.csv  OUT/synthetic.json

Running it again with the same parameters returns at once; other parameters need --overwrite.
--loose-fraction and --repetitive-fraction make train-split image-text pairs loose or repetitive
(default 0: the standard set; see datasets/synthetic/README.md).
Example: medclipin synth --out data/synthetic --patients 1600 --size 256 --seed 0
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``synth`` options to ``parser``."""
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder")
    parser.add_argument("--patients", metavar="N", type=int, default=1600,
                        help="number of patients, 1-2 studies each (default 1600, about 2,300 studies)")
    parser.add_argument("--size", metavar="PX", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", metavar="S", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset in --out that was generated with other parameters")
    parser.add_argument("--loose-fraction", metavar="F", type=float, default=0.0,
                        help="fraction of train records whose report does not describe the image: half swapped "
                             "with another study's, half with findings left out (default 0)")
    parser.add_argument("--repetitive-fraction", metavar="F", type=float, default=0.0,
                        help="fraction of train-split normal studies given one of 3 fixed normal reports (default 0)")


def run(args: argparse.Namespace) -> int:
    """Generate (or reuse) the dataset and print a count summary. Never prints report text."""
    from medclipin.atomic import check_output_dir
    from medclipin.data.manifest import read_manifest
    from medclipin.data.synthetic import CLASS_NAMES, SyntheticDatasetError, generate_synthetic_dataset

    check_output_dir(args.out)
    try:
        manifest_path = generate_synthetic_dataset(
            args.out, n_patients=args.patients, image_size=args.size, seed=args.seed,
            overwrite=args.overwrite, progress=True, loose_fraction=args.loose_fraction,
            repetitive_fraction=args.repetitive_fraction,
        )
    except (SyntheticDatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    manifest = read_manifest(manifest_path)
    records = manifest.records
    studies = Counter(r.split for r in records)
    patients = {split: len({r.patient_id for r in records if r.split == split}) for split in studies}
    print(f"wrote {len(records)} studies of {len({r.patient_id for r in records})} patients to {manifest_path.parent}")
    for split in ("train", "validate", "test"):
        print(f"  {split:<9} {studies.get(split, 0):>6} studies  {patients.get(split, 0):>6} patients")
    n = max(len(records), 1)
    normal = sum(1 for r in records if not r.positive_labels())
    print(f"  {'normal':<18} {normal:>6}  ({100.0 * normal / n:.1f}%)")
    for name in CLASS_NAMES:
        positives = sum(1 for r in records if r.labels.get(name) == 1.0)
        print(f"  {name:<18} {positives:>6}  ({100.0 * positives / n:.1f}%)")
    train = [r for r in records if r.split == "train"]
    if any("pair_noise" in r.extra for r in train):
        kinds = Counter(r.extra["pair_noise"] for r in train)
        print(f"  loose train pairs: {kinds['swapped']} swapped, {kinds['omitted']} with findings omitted "
              f"(of {len(train)} train records; column pair_noise)")
    if any("report_template" in r.extra for r in train):
        templated = sum(1 for r in train if r.extra["report_template"])
        print(f"  train reports that are a fixed normal template: {templated} (column report_template)")
    print(f"manifest: {manifest_path} (DICOM), {manifest_path.with_name('manifest_png.csv')} (PNG)")
    return 0
