"""Any CSV / JSONL table with named columns (datasets ``csv`` and ``jsonl``).

The image comes from ``--image-column`` (a path) or ``--image-template`` (``"images/{patientid}"``;
``{column}`` is replaced by that row's value), relative to ``--root``; when the path does not exist
as written, each of ``--image-extensions`` is tried appended to it (``COVID-00001`` ->
``COVID-00001.jpg``). Text: ``--text-column`` (free text -> ``text``), ``--findings-column`` /
``--impression-column``, or ``--report-column`` (a whole report, split by
:func:`medclipin.data.reports.extract_sections`). Labels: ``--label-column`` (one categorical
column -> one-hot; empty cell = not stated) or ``--label-columns`` (1/0/-1/empty each).
Patients: ``--patient-column`` (optionally narrowed by ``--patient-pattern``, a regex whose group 1
is the patient id); splits: ``--split-column`` or a deterministic hash of the patient id.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    IMAGE_EXTENSIONS, PrepareError, PrepareResult, add_split_arguments, hash_split, parse_label_value, read_table,
)
from medclipin.data.prepare.image_folder import patient_of
from medclipin.data.reports import extract_sections, normalize_whitespace

SPLIT_VALUES = {"train": "train", "training": "train", "val": "validate", "valid": "validate",
                "validation": "validate", "validate": "validate", "dev": "validate", "test": "test",
                "testing": "test"}
_TRUE = {"true", "yes", "y", "positive", "pos"}
_FALSE = {"false", "no", "n", "negative", "neg"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--table", default=None,
                        help="the CSV/JSONL file (relative to --root or absolute); default: the only "
                             ".csv/.csv.gz/.jsonl file directly under --root")
    parser.add_argument("--encoding", default=None, help="text encoding (default: UTF-8, else Windows-1252)")
    image = parser.add_mutually_exclusive_group(required=True)
    image.add_argument("--image-column", help="column holding the image path")
    image.add_argument("--image-template", help='image path template, e.g. "images/{patientid}"')
    parser.add_argument("--image-root", default=None, help="folder image paths are relative to (default: --root)")
    parser.add_argument("--image-extensions", nargs="+", default=list(IMAGE_EXTENSIONS),
                        help="extensions tried when the path has none on disk")
    parser.add_argument("--id-column", default=None, help="record id column (default: the image path)")
    parser.add_argument("--text-column", default=None, help="free text (caption, note) -> text")
    parser.add_argument("--findings-column", default=None)
    parser.add_argument("--impression-column", default=None)
    parser.add_argument("--report-column", default=None, help="whole report text, split into sections")
    parser.add_argument("--require-text", action="store_true", help="skip rows without any text (counted)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--label-column", default=None, help="one categorical label column -> one-hot")
    labels.add_argument("--label-columns", nargs="+", default=None, help="label columns with 1/0/-1/empty")
    parser.add_argument("--patient-column", default=None, help="patient id column (default: the record id)")
    parser.add_argument("--patient-pattern", default=None, help="regex on the patient value; group 1 = patient id")
    parser.add_argument("--study-column", default=None)
    parser.add_argument("--view-column", default=None)
    parser.add_argument("--split-column", default=None,
                        help="column with train/val(idate)/test; default: deterministic patient-hash split")
    add_split_arguments(parser)


def _template(template: str, row: dict) -> str:
    def value(match):
        key = match.group(1)
        if key not in row:
            raise PrepareError(f"--image-template names column {key!r}, which the table lacks")
        return str(row[key]).strip()
    return re.sub(r"\{([^{}]+)\}", value, template)


def _find_image(base: Path, rel: str, extensions) -> Path | None:
    path = Path(rel) if Path(rel).is_absolute() else base / rel
    if path.is_file():
        return path
    for ext in extensions:
        ext = ext if ext.startswith(".") else "." + ext
        for candidate in (path.with_name(path.name + ext), path.with_name(path.name + ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def _label(text: str) -> float | None:
    lowered = (text or "").strip().lower()
    if lowered in _TRUE:
        return 1.0
    if lowered in _FALSE:
        return 0.0
    return parse_label_value(text)


def _default_table(root: Path) -> Path:
    tables = sorted(p for p in root.iterdir() if p.is_file()
                    and p.name.lower().endswith((".csv", ".csv.gz", ".jsonl", ".tsv")))
    if len(tables) != 1:
        raise PrepareError(f"{root}: found {len(tables)} tables; pass --table")
    return tables[0]


def prepare(args: argparse.Namespace) -> PrepareResult:
    root = Path(args.root)
    table = Path(args.table) if args.table else _default_table(root)
    if not table.is_absolute() and not table.is_file():
        table = root / table
    rows = read_table(table, encoding=args.encoding)
    if not rows:
        raise PrepareError(f"{table}: no rows")
    columns = set(rows[0])
    named = [args.image_column, args.id_column, args.text_column, args.findings_column, args.impression_column,
             args.report_column, args.label_column, args.patient_column, args.study_column, args.view_column,
             args.split_column, *(args.label_columns or [])]
    missing = [c for c in named if c and c not in columns]
    if missing:
        raise PrepareError(f"{table}: no column(s) {', '.join(map(repr, missing))}; columns are {sorted(columns)}")
    base = Path(args.image_root) if args.image_root else root
    if args.label_column:
        label_names = sorted({r[args.label_column].strip() for r in rows if r[args.label_column].strip()})
    else:
        label_names = list(args.label_columns or [])
    skipped: Counter = Counter()
    notes: Counter = Counter()
    records = []
    seen: set[str] = set()
    for row in rows:
        rel = row[args.image_column].strip() if args.image_column else _template(args.image_template, row)
        if not rel:
            skipped["empty image field"] += 1
            continue
        image = _find_image(base, rel, args.image_extensions)
        if image is None:
            skipped["missing image"] += 1
            continue
        record_id = row[args.id_column].strip() if args.id_column else image.relative_to(base).as_posix() \
            if image.is_relative_to(base) else str(image)
        if record_id in seen:
            skipped["duplicate row (same record id)"] += 1
            continue
        findings = normalize_whitespace(row.get(args.findings_column, "")) if args.findings_column else ""
        impression = normalize_whitespace(row.get(args.impression_column, "")) if args.impression_column else ""
        text = normalize_whitespace(row.get(args.text_column, "")) if args.text_column else ""
        if args.report_column:
            sections = extract_sections(row.get(args.report_column, ""))
            findings, impression = findings or sections.findings, impression or sections.impression
            if not (findings or impression) and not text:
                text = normalize_whitespace(row.get(args.report_column, ""))
        if not (findings or impression or text):
            if args.require_text:
                skipped["no text"] += 1
                continue
            notes["no text (kept)"] += 1
        try:
            if args.label_column:
                value = row[args.label_column].strip()
                labels = {n: (1.0 if n == value else 0.0) if value else None for n in label_names}
                if not value:
                    notes["label not stated"] += 1
            else:
                labels = {n: _label(row.get(n, "")) for n in label_names}
        except ValueError:
            skipped["invalid label value"] += 1
            continue
        patient_value = row[args.patient_column].strip() if args.patient_column else record_id
        patient = patient_of(patient_value, args.patient_pattern)
        if args.split_column:
            split = SPLIT_VALUES.get(row[args.split_column].strip().lower())
            if split is None:
                skipped["unknown split value"] += 1
                continue
        else:
            split = hash_split(patient, tuple(args.split_fractions), args.split_salt)
        seen.add(record_id)
        records.append(Record(
            record_id=record_id, patient_id=patient,
            study_id=row[args.study_column].strip() if args.study_column else record_id,
            image_path=str(image), split=split, view=row[args.view_column].strip() if args.view_column else "",
            findings=findings, impression=impression, text=text, labels=labels,
        ))
    return PrepareResult(records, label_names, skipped, notes)
