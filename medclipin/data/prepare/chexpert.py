"""CheXpert (Stanford ML Group): ``train.csv`` / ``valid.csv`` (+ ``test.csv`` if present), and the
CheXpert 5x200 zero-shot set.

Layout: ``--root`` is the folder holding ``train.csv`` (e.g. ``CheXpert-v1.0-small/``); the ``Path``
column reads ``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` and is resolved
against the parent of ``--root`` (or against ``--root`` with the first component dropped).

Splits: ``train.csv`` -> train, ``valid.csv`` -> validate, ``test.csv`` -> test (official; patients
are disjoint). CheXpert has no report text: records carry labels only.

``--five-by-two-hundred``: the manifest holds instead the CheXpert 5x200 set (split ``test``): from
the frontal training images, those positive (1.0, not uncertain) for exactly one of Atelectasis,
Cardiomegaly, Consolidation, Edema, Pleural Effusion and with the other four negative or not stated
(0 or empty; uncertain excluded); per class the ``--per-class`` (200) candidates with the smallest
sha256(seed:Path) -- deterministic whatever the row order. Exclude these patients from any training
manifest built from ``train.csv`` (``--exclude-five-by-two-hundred``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    AdapterOptions, PrepareError, PrepareResult, make_options, option, parse_label_value, rank_key, read_table,
    uncertain_value,
)

LABELS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
]
COMPETITION_FIVE = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
SPLIT_FILES = (("train.csv", "train"), ("valid.csv", "validate"), ("test.csv", "test"))


@dataclass
class Options(AdapterOptions):
    """Options of the CheXpert adapter."""

    uncertain: str = option("keep", "uncertain (-1) labels: keep -1 (default), ones (U-Ones), zeros (U-Zeros), "
                                    "ignore (not stated)", choices=("keep", "ones", "zeros", "ignore"))
    frontal_only: bool = option(False, "keep frontal images only")
    five_by_two_hundred: bool = option(False, "write the CheXpert 5x200 zero-shot set instead of the full manifest")
    per_class: int = option(200, "images per class for --five-by-two-hundred")
    exclude_five_by_two_hundred: bool = option(False, "leave the 5x200 images (same --seed/--per-class) out of the "
                                                      "full manifest")
    seed: int = option(0, "seed of the 5x200 selection (default 0)")


def _resolve(root: Path, rel: str) -> Path:
    rel_path = Path(rel)
    candidates = [root.parent / rel_path, root / rel_path]
    if len(rel_path.parts) > 1:
        candidates.append(root / Path(*rel_path.parts[1:]))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]


def _ids(rel: str) -> tuple[str, str]:
    parts = Path(rel).parts
    patient = next((p for p in parts if p.startswith("patient")), rel)
    study = next((p for p in parts if p.startswith("study")), "study")
    return patient, f"{patient}/{study}"


def _view(row: dict) -> str:
    if row.get("Frontal/Lateral", "").strip().lower() == "lateral":
        return "LATERAL"
    return row.get("AP/PA", "").strip().upper()


def _is_frontal(row: dict) -> bool:
    return row.get("Frontal/Lateral", "Frontal").strip().lower() != "lateral"


def select_five_by_two_hundred(rows: list[dict], per_class: int = 200, seed: int = 0) -> dict[str, list[dict]]:
    """The 5x200 selection from CheXpert training rows (see the module docstring for the rule)."""
    candidates: dict[str, list[dict]] = {name: [] for name in COMPETITION_FIVE}
    for row in rows:
        if not _is_frontal(row):
            continue
        values = {name: parse_label_value(row.get(name, "")) for name in COMPETITION_FIVE}
        positives = [name for name, v in values.items() if v == 1.0]
        if len(positives) == 1 and all(v in (0.0, None) for n, v in values.items() if n != positives[0]):
            candidates[positives[0]].append(row)
    chosen = {}
    for name, items in candidates.items():
        if len(items) < per_class:
            raise PrepareError(f"CheXpert 5x200: only {len(items)} eligible images for {name}, need {per_class}")
        chosen[name] = sorted(items, key=lambda r: rank_key(r["Path"], seed))[:per_class]
    return chosen


def prepare(root: str | os.PathLike, options: Options | None = None, **overrides) -> PrepareResult:
    """CheXpert CSVs under ``root`` -> records (see the module docstring); options as :class:`Options`
    or keyword arguments."""
    opts = make_options(Options, options, overrides)
    root = Path(root)
    if not (root / "train.csv").is_file():
        raise PrepareError(f"{root}: train.csv not found (point --root at the CheXpert-v1.0(-small) folder)")
    skipped: Counter = Counter()
    notes: Counter = Counter()
    records: list[Record] = []
    train_rows = read_table(root / "train.csv")

    if opts.five_by_two_hundred:
        for name, rows in select_five_by_two_hundred(train_rows, opts.per_class, opts.seed).items():
            for row in rows:
                image = _resolve(root, row["Path"])
                if not image.is_file():
                    raise PrepareError(f"CheXpert 5x200: selected image missing: {row['Path']} "
                                       "(the set is fixed; restore the file rather than re-drawing)")
                patient, study = _ids(row["Path"])
                records.append(Record(
                    record_id=row["Path"], patient_id=patient, study_id=study, image_path=str(image),
                    split="test", view=_view(row), text="",
                    labels={n: 1.0 if n == name else 0.0 for n in COMPETITION_FIVE},
                ))
        notes[f"5x200 selection: {opts.per_class} per class, seed {opts.seed}"] = len(records)
        return PrepareResult(records, list(COMPETITION_FIVE), skipped, notes)

    excluded: set[str] = set()
    if opts.exclude_five_by_two_hundred:
        chosen = select_five_by_two_hundred(train_rows, opts.per_class, opts.seed)
        excluded = {_ids(r["Path"])[0] for rows in chosen.values() for r in rows}
    for filename, split in SPLIT_FILES:
        path = root / filename
        if not path.is_file():
            if split != "test":
                raise PrepareError(f"{path} not found")
            continue
        rows = train_rows if filename == "train.csv" else read_table(path)
        for row in rows:
            rel = row.get("Path", "").strip()
            if not rel:
                skipped["row without Path"] += 1
                continue
            patient, study = _ids(rel)
            if patient in excluded:
                skipped["patient in the 5x200 set (--exclude-five-by-two-hundred)"] += 1
                continue
            if opts.frontal_only and not _is_frontal(row):
                skipped["excluded view (lateral)"] += 1
                continue
            image = _resolve(root, rel)
            if not image.is_file():
                skipped["missing image"] += 1
                continue
            labels = {name: uncertain_value(parse_label_value(row.get(name, "")), opts.uncertain)
                      for name in LABELS if name in row}
            records.append(Record(record_id=rel, patient_id=patient, study_id=study, image_path=str(image),
                                  split=split, view=_view(row), labels=labels, sex=row.get("Sex", "").strip(),
                                  age=row.get("Age", "").strip(), source="CheXpert"))
    label_names = [n for n in LABELS if n in train_rows[0]] if train_rows else list(LABELS)
    return PrepareResult(records, label_names, skipped, notes)
