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

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medclipin.data.manifest import Box, Record
from medclipin.data.prepare.common import (
    PrepareError, PrepareResult, SplitOptions, find_first, hash_split, make_options, option, read_table,
)

LABEL = "Pneumonia"


@dataclass
class Options(SplitOptions):
    """Options of the RSNA Pneumonia adapter."""

    images_dir: str | None = option(None, "default: stage_2_train_images under --root")
    no_header_view: bool = option(False, "do not open DICOM headers for ViewPosition (faster; view left empty)")


def _view(path: Path) -> str:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["ViewPosition"], force=True)
        return str(getattr(ds, "ViewPosition", "") or "").strip().upper()
    except Exception:  # a broken header is the validator's business; the view just stays unknown
        return ""


def prepare(root: str | os.PathLike, options: Options | None = None, **overrides) -> PrepareResult:
    """RSNA labels and DICOMs under ``root`` -> records with boxes; options as :class:`Options` or keyword
    arguments."""
    opts = make_options(Options, options, overrides)
    root = Path(root)
    labels_csv = find_first(root, ["stage_2_train_labels.csv", "stage_1_train_labels.csv"])
    if labels_csv is None:
        raise PrepareError(f"{root}: stage_2_train_labels.csv not found")
    images_dir = Path(opts.images_dir) if opts.images_dir else labels_csv.parent / labels_csv.name.replace(
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
    fractions = opts.split_fractions
    for pid, entry in by_patient.items():
        image = images_dir / f"{pid}.dcm"
        if not image.is_file():
            skipped["missing image"] += 1
            continue
        if entry["target"] == 1.0 and not entry["boxes"]:
            notes["positive without box"] += 1
        records.append(Record(
            record_id=pid, patient_id=pid, study_id=pid, image_path=str(image),
            split=hash_split(pid, fractions, opts.split_salt),
            view="" if opts.no_header_view else _view(image),
            labels={LABEL: entry["target"]}, boxes=entry["boxes"],
        ))
    notes["boxes"] = sum(len(r.boxes) for r in records)
    return PrepareResult(records, [LABEL], skipped, notes)
