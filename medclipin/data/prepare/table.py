"""Any CSV / JSONL table with named columns (datasets ``csv`` and ``jsonl``).

The image comes from ``--image-column`` (a path) or ``--image-template`` (``"images/{patientid}"``;
``{column}`` is replaced by that row's value), relative to ``--root``; when the path does not exist
as written, each of ``--image-extensions`` is tried appended to it (``COVID-00001`` ->
``COVID-00001.jpg``). Text: ``--text-column`` (free text -> ``text``), ``--findings-column`` /
``--impression-column``, or ``--report-column`` (a whole report, split by
:func:`medclipin.data.reports.extract_sections`). Labels: ``--label-column`` (one categorical
column -> one-hot; empty cell = not stated) or ``--label-columns`` (1/0/-1/empty each). With
``--label-map FILE`` (YAML, class -> list of values of --label-column, case/whitespace-insensitive; see
:mod:`medclipin.data.prepare.label_map`) the classes are the map's: a row is positive for the classes its
value is listed under and negative for the rest; a value listed nowhere is negative for every class, or
not stated with ``--unlisted not-stated`` (counted in the summary either way). ``--label-separator "|"``
splits a cell holding several findings ("Cardiomegaly|Effusion"). ``--sex-column``, ``--age-column`` and
``--source NAME`` fill the manifest's optional subgroup columns.
Patients: ``--patient-column`` (optionally narrowed by ``--patient-pattern``, a regex whose group 1
is the patient id); splits: ``--split-column`` or a deterministic hash of the patient id.
Rows: ``--where COLUMN=VALUE[,VALUE...]`` keeps only matching rows (real tables mix modalities and
views); every row left out is counted in the summary with the condition it failed.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    IMAGE_EXTENSIONS, PrepareError, PrepareResult, SplitOptions, hash_split, make_options, option, parse_label_value,
    read_table,
)
from medclipin.data.prepare.image_folder import patient_of
from medclipin.data.prepare.label_map import load_label_map
from medclipin.data.reports import extract_sections, normalize_whitespace

SPLIT_VALUES = {"train": "train", "training": "train", "val": "validate", "valid": "validate",
                "validation": "validate", "validate": "validate", "dev": "validate", "test": "test",
                "testing": "test"}
_TRUE = {"true", "yes", "y", "positive", "pos"}
_FALSE = {"false", "no", "n", "negative", "neg"}


@dataclass
class Options(SplitOptions):
    """Options of the table adapter (datasets ``csv`` and ``jsonl``): which column holds what.

    Exactly one of ``image_column`` / ``image_template`` is required; at most one of ``label_column`` /
    ``label_columns``.
    """

    table: str | None = option(None, "the CSV/JSONL file (relative to --root or absolute); default: the only "
                                     ".csv/.csv.gz/.jsonl file directly under --root")
    encoding: str | None = option(None, "text encoding (default: UTF-8, else Windows-1252)")
    image_column: str | None = option(None, "column holding the image path", group="image", group_required=True)
    image_template: str | None = option(None, 'image path template, e.g. "images/{patientid}"', group="image")
    image_root: str | None = option(None, "folder image paths are relative to (default: --root)")
    image_extensions: list[str] = option(list(IMAGE_EXTENSIONS), "extensions tried when the path has none on disk",
                                         nargs="+")
    id_column: str | None = option(None, "record id column (default: the image path)")
    text_column: str | None = option(None, "free text (caption, note) -> text")
    findings_column: str | None = option(None, "findings section column")
    impression_column: str | None = option(None, "impression section column")
    report_column: str | None = option(None, "whole report text, split into sections")
    require_text: bool = option(False, "skip rows without any text (counted)")
    label_column: str | None = option(None, "one categorical label column -> one-hot", group="labels")
    label_columns: list[str] | None = option(None, "label columns with 1/0/-1/empty", nargs="+", group="labels")
    label_map: str | None = option(None, "YAML mapping class -> list of --label-column values (case- and "
                                         "whitespace-insensitive); e.g. datasets/figure1/label_map.yaml")
    unlisted: str = option("negative", "--label-map: a value listed for no class is negative for every class "
                                       "(default) or not-stated", choices=("negative", "not-stated"))
    label_separator: str | None = option(None, 'split --label-column cells into several values, e.g. "|"')
    sex_column: str | None = option(None, "patient sex column (subgroup evaluation)")
    age_column: str | None = option(None, "patient age column (subgroup evaluation, in bands)")
    source: str | None = option(None, "where these images come from (hospital or dataset name) -> source column")
    patient_column: str | None = option(None, "patient id column (default: the record id)")
    patient_pattern: str | None = option(None, "regex on the patient value; group 1 = patient id")
    study_column: str | None = option(None, "study id column (default: the record id)")
    view_column: str | None = option(None, "view column")
    split_column: str | None = option(None, "column with train/val(idate)/test; default: deterministic "
                                            "patient-hash split")
    where: list[str] | None = option(
        None, 'keep only rows matching COLUMN=VALUE[,VALUE...] (any of the values; shell-style wildcards, '
              'case-insensitive) or COLUMN!=VALUE[,...]; repeat for several conditions, all must hold, e.g. '
              '--where modality=X-ray --where "view=PA,AP*". Rows left out are counted in the summary',
        nargs="+", action="extend", metavar="CONDITION")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.conditions = [RowCondition.parse(text) for text in (self.where or [])]
        if bool(self.image_column) == bool(self.image_template):
            raise PrepareError("the table adapter needs exactly one of image_column (--image-column) and "
                               "image_template (--image-template)")
        if self.label_column and self.label_columns:
            raise PrepareError("pass label_column (--label-column) or label_columns (--label-columns), not both")
        if (self.label_map or self.label_separator) and not self.label_column:
            raise PrepareError("--label-map and --label-separator apply to --label-column; pass it")
        self.mapping = load_label_map(self.label_map) if self.label_map else None


@dataclass(frozen=True)
class RowCondition:
    """One ``--where`` condition: a column, the accepted values (wildcards allowed), and whether it is negated."""

    column: str
    values: tuple[str, ...]
    negated: bool = False
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> "RowCondition":
        negated = "!=" in text
        column, sep, values = text.partition("!=" if negated else "=")
        column = column.strip()
        choices = tuple(v.strip().lower() for v in values.split(",") if v.strip())
        if not sep or not column or not choices:
            raise PrepareError(f"--where {text!r}: expected COLUMN=VALUE[,VALUE...] or COLUMN!=VALUE[,...]")
        return cls(column, choices, negated, text)

    def holds(self, row: dict) -> bool:
        from fnmatch import fnmatchcase

        value = str(row.get(self.column, "") or "").strip().lower()
        matched = any(fnmatchcase(value, pattern) for pattern in self.values)
        return matched != self.negated


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


def _read_checked_table(root: Path, opts: Options) -> tuple[Path, list[dict]]:
    """The table's rows, after checking that every column the options name exists."""
    table = Path(opts.table) if opts.table else _default_table(root)
    if not table.is_absolute() and not table.is_file():
        table = root / table
    rows = read_table(table, encoding=opts.encoding)
    if not rows:
        raise PrepareError(f"{table}: no rows")
    columns = set(rows[0])
    named = [opts.image_column, opts.id_column, opts.text_column, opts.findings_column, opts.impression_column,
             opts.report_column, opts.label_column, opts.patient_column, opts.study_column, opts.view_column,
             opts.split_column, opts.sex_column, opts.age_column, *(opts.label_columns or []),
             *(c.column for c in opts.conditions)]
    missing = [c for c in named if c and c not in columns]
    if missing:
        raise PrepareError(f"{table}: no column(s) {', '.join(map(repr, missing))}; columns are {sorted(columns)}")
    return table, rows


def _report_fields(row: dict, opts: Options) -> tuple[str, str, str]:
    """(findings, impression, free text) of a row: named columns first, then sections of a whole report."""
    findings = normalize_whitespace(row.get(opts.findings_column, "")) if opts.findings_column else ""
    impression = normalize_whitespace(row.get(opts.impression_column, "")) if opts.impression_column else ""
    text = normalize_whitespace(row.get(opts.text_column, "")) if opts.text_column else ""
    if opts.report_column:
        sections = extract_sections(row.get(opts.report_column, ""))
        findings, impression = findings or sections.findings, impression or sections.impression
        if not (findings or impression) and not text:
            text = normalize_whitespace(row.get(opts.report_column, ""))
    return findings, impression, text


def _cell_values(row: dict, opts: Options) -> list[str]:
    value = row[opts.label_column].strip()
    if not opts.label_separator:
        return [value] if value else []
    return [v.strip() for v in value.split(opts.label_separator) if v.strip()]


def _row_labels(row: dict, opts: Options, label_names: list[str], notes: Counter) -> dict[str, float | None]:
    """Labels of a row: one class column (one-hot, or through --label-map; empty = not stated) or one column
    per label. Raises ValueError for a value that is not a label."""
    if opts.label_column:
        values = _cell_values(row, opts)
        if not values:
            return {n: None for n in label_names}
        if opts.mapping is None:
            return {n: 1.0 if n in values else 0.0 for n in label_names}
        found = [opts.mapping.classes_of(v) for v in values]
        positive = frozenset().union(*(f for f in found if f))
        if None in found:
            notes[f"label map: value listed for no class (-> {'negative for every class' if opts.unlisted == 'negative' else 'not stated'})"] += 1
        if not positive and opts.unlisted == "not-stated":
            return {n: None for n in label_names}
        return {n: 1.0 if n in positive else 0.0 for n in label_names}
    return {n: _label(row.get(n, "")) for n in label_names}


def prepare(root: str | os.PathLike, options: Options | None = None, **overrides) -> PrepareResult:
    """A table under ``root`` -> records; options as :class:`Options` or keyword arguments."""
    opts = make_options(Options, options, overrides)
    root = Path(root)
    _, rows = _read_checked_table(root, opts)
    base = Path(opts.image_root) if opts.image_root else root
    if opts.mapping is not None:
        label_names = list(opts.mapping.classes)
    elif opts.label_column:
        label_names = sorted({v for r in rows for v in _cell_values(r, opts)})
    else:
        label_names = list(opts.label_columns or [])
    skipped: Counter = Counter()
    notes: Counter = Counter()
    records = []
    seen: set[str] = set()
    for row in rows:
        failed = next((c for c in opts.conditions if not c.holds(row)), None)
        if failed is not None:
            skipped[f"left out by --where {failed.text}"] += 1
            continue
        rel = row[opts.image_column].strip() if opts.image_column else _template(opts.image_template, row)
        if not rel:
            skipped["empty image field"] += 1
            continue
        image = _find_image(base, rel, opts.image_extensions)
        if image is None:
            skipped["missing image"] += 1
            continue
        record_id = row[opts.id_column].strip() if opts.id_column else image.relative_to(base).as_posix() \
            if image.is_relative_to(base) else str(image)
        if record_id in seen:
            skipped["duplicate row (same record id)"] += 1
            continue
        findings, impression, text = _report_fields(row, opts)
        if not (findings or impression or text):
            if opts.require_text:
                skipped["no text"] += 1
                continue
            notes["no text (kept)"] += 1
        try:
            labels = _row_labels(row, opts, label_names, notes)
        except ValueError:
            skipped["invalid label value"] += 1
            continue
        if opts.label_column and not row[opts.label_column].strip():
            notes["label not stated"] += 1
        patient_value = row[opts.patient_column].strip() if opts.patient_column else record_id
        patient = patient_of(patient_value, opts.patient_pattern)
        if opts.split_column:
            split = SPLIT_VALUES.get(row[opts.split_column].strip().lower())
            if split is None:
                skipped["unknown split value"] += 1
                continue
        else:
            split = hash_split(patient, opts.split_fractions, opts.split_salt)
        seen.add(record_id)
        records.append(Record(
            record_id=record_id, patient_id=patient,
            study_id=row[opts.study_column].strip() if opts.study_column else record_id,
            image_path=str(image), split=split, view=row[opts.view_column].strip() if opts.view_column else "",
            findings=findings, impression=impression, text=text, labels=labels,
            sex=row[opts.sex_column].strip() if opts.sex_column else "",
            age=row[opts.age_column].strip() if opts.age_column else "", source=opts.source or "",
        ))
    return PrepareResult(records, label_names, skipped, notes)
