"""RSNA Pneumonia Detection Challenge (Kaggle, stage 2).

Layout under ``--root``::

    stage_2_train_labels.csv        patientId, x, y, width, height, Target (one row per box; x.. empty if none)
    stage_2_train_images/<patientId>.dcm
    stage_2_detailed_class_info.csv (not needed: Target already says pneumonia or not)

One record per image (one image per patient) with label ``Pneumonia`` = Target and the boxes kept
(label ``Pneumonia``, ``[x, y, x + width, y + height]`` in pixels) for localisation evaluation. The
challenge's stage-2 test labels were never released, so the split is a deterministic hash of
``patientId``. ``view`` comes from the DICOM header (``ViewPosition``; header only, no pixels).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from medclipin.data.manifest import Box, Record
from medclipin.data.prepare.common import PrepareError, PrepareResult, add_split_arguments, find_first, hash_split, read_table

LABEL = "Pneumonia"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_split_arguments(parser)
    parser.add_argument("--images-dir", default=None, help="default: stage_2_train_images under --root")
    parser.add_argument("--no-header-view", action="store_true",
                        help="do not open DICOM headers for ViewPosition (faster; view left empty)")


def _view(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"], force=True)
        return str(getattr(ds, "ViewPosition", "") or "").strip().upper()
    except Exception:  # a broken header is the validator's business; the view just stays unknown
        return ""


def prepare(args: argparse.Namespace) -> PrepareResult:
    root = Path(args.root)
    labels_csv = find_first(root, ["stage_2_train_labels.csv", "stage_1_train_labels.csv"])
    if labels_csv is None:
        raise PrepareError(f"{root}: stage_2_train_labels.csv not found")
    images_dir = Path(args.images_dir) if args.images_dir else labels_csv.parent / labels_csv.name.replace(
        "_labels.csv", "_images")
    rows = read_table(labels_csv)
    by_patient: dict[str, dict] = {}
    for row in rows:
        pid = row["patientId"].strip()
        entry = by_patient.setdefault(pid, {"target": 0.0, "boxes": []})
        if row.get("Target", "").strip() in ("1", "1.0"):
            entry["target"] = 1.0
            if row.get("x", "").strip():
                x, y, w, h = (float(row[k]) for k in ("x", "y", "width", "height"))
                entry["boxes"].append(Box(LABEL, (x, y, x + w, y + h)))
    skipped: Counter = Counter()
    notes: Counter = Counter()
    records = []
    fractions = tuple(args.split_fractions)
    for pid, entry in by_patient.items():
        image = images_dir / f"{pid}.dcm"
        if not image.is_file():
            skipped["missing image"] += 1
            continue
        if entry["target"] == 1.0 and not entry["boxes"]:
            notes["positive without box"] += 1
        records.append(Record(
            record_id=pid, patient_id=pid, study_id=pid, image_path=str(image),
            split=hash_split(pid, fractions, args.split_salt),
            view="" if args.no_header_view else _view(image),
            labels={LABEL: entry["target"]}, boxes=entry["boxes"],
        ))
    notes["boxes"] = sum(len(r.boxes) for r in records)
    return PrepareResult(records, [LABEL], skipped, notes)
