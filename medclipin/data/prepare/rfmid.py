"""RFMiD (Retinal Fundus Multi-disease Image Dataset, 46 conditions).

Layout under ``--root`` (as published; folder names may differ, matching is by keyword)::

    1. Original Images/a. Training Set/<ID>.png     b. Validation Set/   c. Testing Set/
    2. Groundtruths/a. RFMiD_Training_Labels.csv   b. RFMiD_Validation_Labels.csv   c. RFMiD_Testing_Labels.csv

Each labels CSV has ``ID`` plus one 0/1 column per condition (``Disease_Risk, DR, ARMD, ...``; label
names are the column names). The CSV whose name contains "train" gives the train split,
"valid"/"eval" validate, "test" test; its images are the files named ``<ID>.<ext>`` in the image
folder whose path contains the same keyword. A single labels CSV without a split keyword (a flat
``labels.csv`` + images folder) gets a deterministic hash split of the ID.

RFMiD publishes no patient ids: the image ID is the grouping unit (both eyes of one person may
fall into different splits -- a limitation of the release, stated in the dataset card).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    IMAGE_EXTENSIONS, PrepareError, PrepareResult, SplitOptions, hash_split, index_files, make_options,
    parse_label_value, read_table,
)

KEYWORDS = {"train": ("train",), "validate": ("valid", "eval"), "test": ("test",)}


@dataclass
class Options(SplitOptions):
    """Options of the RFMiD adapter (the split options are used for a flat labels.csv only)."""


def _split_of(text: str) -> str | None:
    text = text.lower()
    for split, words in KEYWORDS.items():
        if any(w in text for w in words):
            return split
    return None


def prepare(root: str | os.PathLike, options: Options | None = None, **overrides) -> PrepareResult:
    """RFMiD labels CSVs and images under ``root`` -> records; options as :class:`Options` or keyword arguments."""
    opts = make_options(Options, options, overrides)
    root = Path(root)
    tables = sorted(p for p in root.rglob("*.csv") if p.is_file() and "id" in
                    [c.strip().lower() for c in (read_table(p)[:1] or [{}])[0]])
    if not tables:
        raise PrepareError(f"{root}: no labels CSV with an ID column found")
    image_dirs: dict[Path, dict[str, list[Path]]] = {}
    for path in root.rglob("*"):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
            image_dirs.setdefault(path.parent, {})
    for folder in image_dirs:
        image_dirs[folder] = index_files(folder, IMAGE_EXTENSIONS)
    skipped: Counter = Counter()
    notes: Counter = Counter()
    records: list[Record] = []
    label_names: list[str] = []
    for table in tables:
        rows = read_table(table)
        split = _split_of(table.name)
        if split is None and len(tables) > 1:
            raise PrepareError(f"{table}: cannot tell its split (name has none of train/valid/eval/test)")
        folders = [f for f in image_dirs if split is None or _split_of(str(f.relative_to(root))) == split]
        id_column = next(c for c in rows[0] if c.strip().lower() == "id")
        columns = [c for c in rows[0] if c != id_column]
        label_names.extend(c for c in columns if c not in label_names)
        for row in rows:
            image_id = row[id_column].strip()
            paths = [p for f in folders for p in image_dirs[f].get(image_id, [])]
            if not paths:
                skipped["missing image"] += 1
                continue
            if len(paths) > 1:
                notes["several image files for one ID (first taken)"] += 1
            key = f"{split or 'all'}-{image_id}"
            records.append(Record(
                record_id=key, patient_id=key, study_id=key, image_path=str(sorted(paths)[0]),
                split=split or hash_split(image_id, opts.split_fractions, opts.split_salt), view="FUNDUS",
                labels={c: parse_label_value(row.get(c, "")) for c in columns},
            ))
    return PrepareResult(records, label_names, skipped, notes)
