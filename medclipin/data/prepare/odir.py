"""ODIR-5K (Ocular Disease Intelligent Recognition, Peking University).

Layout under ``--root``::

    ODIR-5K_Training_Annotations(Updated)_V2.xlsx   (or its CSV export, same columns)
    ODIR-5K_Training_Dataset/<ID>_left.jpg, <ID>_right.jpg

Columns: ``ID, Patient Age, Patient Sex, Left-Fundus, Right-Fundus, Left-Diagnostic Keywords,
Right-Diagnostic Keywords, N, D, G, C, A, H, M, O``. The N..O columns describe the *patient*, so
per-eye labels are derived from each eye's diagnostic keywords (:func:`keyword_labels`), and the
eye's keywords (English, comma-separated) become the record's ``text``. Quality notes ("lens dust",
"low image quality", "image offset", "optic disk photographically invisible") carry no label;
images whose keywords say "no fundus image" or "anterior segment image" are skipped (counted).
``.xlsx`` needs openpyxl; without it pass the CSV export (``--annotations``). Split: hash of the
patient ``ID`` (both eyes of a patient stay together).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    PrepareError, PrepareResult, SplitOptions, hash_split, index_files, make_options, option, read_table,
)

LABELS = ["Normal", "Diabetic Retinopathy", "Glaucoma", "Cataract", "Age-related Macular Degeneration",
          "Hypertensive Retinopathy", "Pathological Myopia", "Other"]
QUALITY_NOTES = ("lens dust", "low image quality", "image offset", "optic disk photographically invisible",
                 "optic disc photographically invisible")
NOT_FUNDUS = ("no fundus image", "anterior segment image")
# keyword substring -> label; first match wins, so specific phrases come before general ones
_RULES = (
    ("normal fundus", "Normal"),
    ("hypertensive retinopathy", "Hypertensive Retinopathy"),
    ("diabetic retinopathy", "Diabetic Retinopathy"),
    ("proliferative retinopathy", "Diabetic Retinopathy"),  # "mild/moderate/severe nonproliferative retinopathy"
    ("glaucoma", "Glaucoma"),
    ("cataract", "Cataract"),
    ("age-related macular degeneration", "Age-related Macular Degeneration"),
    ("myopi", "Pathological Myopia"),  # "pathological myopia", "myopia retinopathy", "myopic maculopathy"
)


@dataclass
class Options(SplitOptions):
    """Options of the ODIR-5K adapter."""

    annotations: str | None = option(None, "annotation table (.xlsx or CSV export); default: the "
                                           "ODIR-5K_Training_Annotations* file under --root")
    images_dir: str | None = option(None, "default: search under --root")


def split_keywords(text: str) -> list[str]:
    """ODIR keyword cells use the full-width comma (U+FF0C) or ',' / ';' as separators."""
    return [k.strip().lower() for k in re.split(r"[\uff0c,;]", text or "") if k.strip()]


def keyword_labels(keywords: list[str]) -> dict[str, float]:
    """Per-eye labels: 1 for every class one of the keywords names (quality notes ignored), else 0."""
    found = set()
    for keyword in keywords:
        if any(note in keyword for note in QUALITY_NOTES):
            continue
        label = next((name for phrase, name in _RULES if phrase in keyword), "Other")
        found.add(label)
    return {name: 1.0 if name in found else 0.0 for name in LABELS}


def _find_annotations(root: Path) -> Path:
    candidates = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in (".xlsx", ".csv")
                        and "annotation" in p.name.lower())
    try:
        import openpyxl  # noqa: F401
        have_xlsx = True
    except ImportError:
        have_xlsx = False
    usable = [p for p in candidates if have_xlsx or p.suffix.lower() == ".csv"]
    if not usable:
        hint = " (found .xlsx only: install openpyxl or export it as CSV)" if candidates else ""
        raise PrepareError(f"{root}: no ODIR annotation table found{hint}; pass --annotations")
    return sorted(usable, key=lambda p: (p.suffix.lower() != ".csv", p.name))[0]


def prepare(root: str | os.PathLike, options: Options | None = None, **overrides) -> PrepareResult:
    """ODIR annotations and photos under ``root`` -> per-eye records; options as :class:`Options` or keyword
    arguments."""
    opts = make_options(Options, options, overrides)
    root = Path(root)
    table = Path(opts.annotations) if opts.annotations else _find_annotations(root)
    rows = read_table(table)
    images = index_files(Path(opts.images_dir) if opts.images_dir else root, (".jpg", ".jpeg", ".png"))
    skipped: Counter = Counter()
    notes: Counter = Counter()
    records = []
    fractions = opts.split_fractions
    for row in rows:
        patient = row["ID"].strip()
        split = hash_split(patient, fractions, opts.split_salt)
        for side in ("Left", "Right"):
            filename = row.get(f"{side}-Fundus", "").strip() or f"{patient}_{side.lower()}.jpg"
            keywords = split_keywords(row.get(f"{side}-Diagnostic Keywords", ""))
            if any(n in k for k in keywords for n in NOT_FUNDUS):
                skipped["not a fundus image (keyword)"] += 1
                continue
            paths = images.get(Path(filename).stem)
            if not paths:
                skipped["missing image"] += 1
                continue
            if not keywords:
                skipped["no diagnostic keywords"] += 1
                continue
            labels = keyword_labels(keywords)
            if not any(labels.values()):
                notes["only quality notes (all labels 0)"] += 1
            records.append(Record(
                record_id=Path(filename).stem, patient_id=patient, study_id=patient, image_path=str(paths[0]),
                split=split, view="FUNDUS", text=", ".join(keywords), labels=labels,
                sex=str(row.get("Patient Sex") or "").strip(), age=str(row.get("Patient Age") or "").strip(),
                source="ODIR-5K",
            ))
    return PrepareResult(records, list(LABELS), skipped, notes)
