"""Any folder-per-class image set: ``ROOT/<class>/<image>``, or ``ROOT/<split>/<class>/<image>`` when
the top-level folders are split names (train, val/valid/validation/validate, test).

Labels are one-hot over the class folders (sorted). With no split folders the split is a hash of
the patient id, which is the file stem unless ``--patient-pattern`` (a regex whose first group is
the patient id, matched against the stem) says otherwise. ``--text-from-class`` puts the class
name in ``text`` (handy for CLIP training on class-labelled images); otherwise there is no text.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    IMAGE_EXTENSIONS, PrepareError, PrepareResult, SplitOptions, hash_split, make_options, option,
)

SPLIT_NAMES = {"train": "train", "training": "train", "val": "validate", "valid": "validate",
               "validation": "validate", "validate": "validate", "test": "test", "testing": "test"}


@dataclass
class Options(SplitOptions):
    """Options of the folder-per-class adapter."""

    image_extensions: list[str] = option(list(IMAGE_EXTENSIONS), "file extensions that are images", nargs="+")
    patient_pattern: str | None = option(None, "regex on the file stem; group 1 is the patient id (default: the stem)")
    text_from_class: bool = option(False, "use the class name as the record text")
    view: str = option("", "view for every record, e.g. FUNDUS or PA")


def patient_of(stem: str, pattern: str | None) -> str:
    if not pattern:
        return stem
    match = re.search(pattern, stem)
    return match.group(1) if match and match.groups() else (match.group(0) if match else stem)


def prepare(root: str | os.PathLike, options: Options | None = None, **overrides) -> PrepareResult:
    """Class folders under ``root`` -> one-hot records; options as :class:`Options` or keyword arguments."""
    opts = make_options(Options, options, overrides)
    root = Path(root)
    if not root.is_dir():
        raise PrepareError(f"{root}: not a folder")
    extensions = {e.lower() if e.startswith(".") else "." + e.lower() for e in opts.image_extensions}
    top = sorted(p for p in root.iterdir() if p.is_dir())
    split_folders = [p for p in top if p.name.lower() in SPLIT_NAMES]
    layout = [(SPLIT_NAMES[p.name.lower()], p) for p in split_folders] if split_folders else [(None, root)]
    items = []  # (split, class, path)
    skipped: Counter = Counter()
    for split, folder in layout:
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            for path in sorted(class_dir.rglob("*")):
                if path.is_file():
                    if path.suffix.lower() in extensions:
                        items.append((split, class_dir.name, path))
                    else:
                        skipped["not an image extension"] += 1
    if not items:
        raise PrepareError(f"{root}: no images in class folders")
    classes = sorted({c for _, c, _ in items})
    records = []
    for split, name, path in items:
        patient = patient_of(path.stem, opts.patient_pattern)
        rel = path.relative_to(root).as_posix()
        records.append(Record(
            record_id=rel, patient_id=patient, study_id=patient, image_path=str(path),
            split=split or hash_split(patient, opts.split_fractions, opts.split_salt), view=opts.view,
            text=name if opts.text_from_class else "", labels={c: 1.0 if c == name else 0.0 for c in classes},
        ))
    return PrepareResult(records, classes, skipped, Counter())
