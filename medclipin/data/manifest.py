"""Manifest records: one row per image–text pair, the hand-off between dataset preparation and training.

The format is documented in ``datasets/README.md``. A manifest is a CSV (or JSONL with the same keys)
with the columns ``record_id, patient_id, study_id, image_path, view, split, findings, impression,
text``, one ``label:<Class Name>`` column per class (``1``, ``0``, ``-1`` for uncertain, empty for
not stated) and ``boxes`` (JSON list of ``{"label": ..., "box": [x0, y0, x1, y1]}`` in pixels of the
original image). Optional columns ``sex``, ``age`` and ``source`` (the hospital or dataset a
record comes from) feed subgroup evaluation; they are written only when some record has a value. Any other column (e.g. the synthetic set's ``pair_noise``) is kept in
``Record.extra`` and written back after ``boxes``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from medclipin.atomic import atomic_open
from medclipin.errors import MedclipinError
from medclipin.safe_parse import load_json

LABEL_PREFIX = "label:"
SPLITS = ("train", "validate", "test")
BASE_COLUMNS = (
    "record_id",
    "patient_id",
    "study_id",
    "image_path",
    "view",
    "split",
    "findings",
    "impression",
    "text",
)
OPTIONAL_COLUMNS = ("sex", "age", "source")  # written only when a record has one (older manifests unchanged)


class ManifestError(MedclipinError, ValueError):
    """A manifest file is malformed; the message names the file, the row and the field."""


@dataclass(frozen=True)
class Box:
    """A labelled rectangle in pixel coordinates of the original image (x0, y0, x1, y1)."""

    label: str
    box: tuple[float, float, float, float]


@dataclass
class Record:
    """One image–text record of a manifest."""

    record_id: str
    patient_id: str
    study_id: str
    image_path: str
    split: str
    view: str = ""
    findings: str = ""
    impression: str = ""
    text: str = ""
    labels: dict[str, float | None] = field(default_factory=dict)
    boxes: list[Box] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)  # other columns, by name (kept on a round trip)
    sex: str = ""
    age: str = ""  # as stated (a number, "50+", "early 40s"); evaluation groups it in bands
    source: str = ""

    def positive_labels(self) -> list[str]:
        return [name for name, value in self.labels.items() if value == 1.0]


@dataclass
class Manifest:
    """The records of one manifest file and its ordered class names."""

    path: Path
    records: list[Record]
    label_names: list[str]

    def split(self, name: str) -> list[Record]:
        return [r for r in self.records if r.split == name]

    def __len__(self) -> int:
        return len(self.records)


def _parse_label(value: str | float | int | None, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = value.strip()
        if text == "" or text.lower() in ("nan", "none", "null"):
            return None
        try:
            number = float(text)
        except ValueError as exc:
            raise ManifestError(f"{where}: label value {value!r} is not 1, 0, -1 or empty") from exc
    if number not in (1.0, 0.0, -1.0):
        raise ManifestError(f"{where}: label value {value!r} is not 1, 0, -1 or empty")
    return number


def _parse_boxes(value: str | list | None, where: str) -> list[Box]:
    if value in (None, ""):
        return []
    try:
        items = load_json(value) if isinstance(value, str) else value
        return [Box(str(item["label"]), tuple(float(v) for v in item["box"])) for item in items]
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(
            f"{where}: field 'boxes' must be a JSON list of {{\"label\": ..., \"box\": [x0, y0, x1, y1]}}"
        ) from exc


def _is_extra_column(name: str) -> bool:
    return (name not in BASE_COLUMNS and name not in OPTIONAL_COLUMNS and name != "boxes"
            and not name.startswith(LABEL_PREFIX))


def _record_from_row(row: dict, label_names: Sequence[str], base_dir: Path, where: str) -> Record:
    missing = [c for c in ("record_id", "image_path", "split") if not str(row.get(c) or "").strip()]
    if missing:
        raise ManifestError(f"{where}: required field(s) {', '.join(missing)} empty or missing")
    split = str(row["split"]).strip()
    if split not in SPLITS:
        raise ManifestError(f"{where}: field 'split' is {split!r}; expected one of {', '.join(SPLITS)}")
    image_path = str(row["image_path"]).strip()
    if not os.path.isabs(image_path):
        image_path = str(base_dir / image_path)
    labels = {name: _parse_label(row.get(LABEL_PREFIX + name), f"{where}, column '{LABEL_PREFIX}{name}'")
              for name in label_names}
    record_id = str(row["record_id"]).strip()
    return Record(
        record_id=record_id,
        patient_id=str(row.get("patient_id") or record_id).strip(),
        study_id=str(row.get("study_id") or record_id).strip(),
        image_path=image_path,
        split=split,
        view=str(row.get("view") or "").strip(),
        findings=str(row.get("findings") or ""),
        impression=str(row.get("impression") or ""),
        text=str(row.get("text") or ""),
        labels=labels,
        boxes=_parse_boxes(row.get("boxes"), where),
        extra={k: "" if v is None else str(v) for k, v in row.items() if k and _is_extra_column(k)},
        **{k: str(row.get(k) or "").strip() for k in OPTIONAL_COLUMNS},
    )


def _read_utf8(path: Path) -> str:
    """The file's text (UTF-8, a byte-order mark dropped); another encoding is named with its line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(f"{path}, line {line}: not UTF-8 (byte 0x{data[exc.start]:02x}); save the manifest as "
                            "UTF-8, e.g. `iconv -f latin1 -t utf-8 OLD > NEW` for a Latin-1 file") from None


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a CSV or JSONL manifest (UTF-8, with or without a byte-order mark). Relative image paths
    resolve against the manifest's folder.

    Raises:
        ManifestError: a row lacks a required field or has an invalid split/label/boxes value;
            the message names the file, the row number and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    base_dir = path.resolve().parent
    text = _read_utf8(path)
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    row = load_json(line)
                except ValueError as exc:
                    problem = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                    raise ManifestError(f"{path}, line {number}: not valid JSON ({problem})") from None
                if not isinstance(row, dict):
                    raise ManifestError(f"{path}, line {number}: a record must be a JSON object")
                rows.append(row)
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        first_row = 1
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        except csv.Error as exc:  # e.g. a cell over the csv module's 128 KB field limit
            raise ManifestError(f"{path}, line {reader.line_num + 1}: not a readable CSV row ({exc})") from None
        first_row = 2  # row 1 is the header
    if "image_path" not in columns or "split" not in columns:
        raise ManifestError(f"{path}: manifest needs at least the columns record_id, image_path, split")
    label_names = [c[len(LABEL_PREFIX):] for c in columns if c.startswith(LABEL_PREFIX)]
    records = [
        _record_from_row(row, label_names, base_dir, f"{path}, row {i}")
        for i, row in enumerate(rows, start=first_row)
    ]
    seen: set[str] = set()
    for i, record in enumerate(records, start=first_row):
        if record.record_id in seen:
            raise ManifestError(f"{path}, row {i}: duplicate record_id {record.record_id!r}")
        seen.add(record.record_id)
    return Manifest(path=path, records=records, label_names=label_names)


def _row_from_record(record: Record, label_names: Sequence[str], base_dir: Path | None,
                     optional_columns: Sequence[str] = ()) -> dict:
    image_path = record.image_path
    if base_dir is not None:
        try:
            image_path = os.path.relpath(image_path, base_dir)
        except ValueError:  # different drive on Windows
            pass
    row = {
        "record_id": record.record_id,
        "patient_id": record.patient_id,
        "study_id": record.study_id,
        "image_path": image_path,
        "view": record.view,
        "split": record.split,
        "findings": record.findings,
        "impression": record.impression,
        "text": record.text,
    }
    for name in label_names:
        value = record.labels.get(name)
        row[LABEL_PREFIX + name] = "" if value is None else str(int(value))
    row["boxes"] = json.dumps([{"label": b.label, "box": list(b.box)} for b in record.boxes]) if record.boxes else ""
    for name in optional_columns:
        row[name] = getattr(record, name)
    row.update(record.extra)
    return row


def write_manifest(
    path: str | os.PathLike,
    records: Iterable[Record],
    label_names: Sequence[str] | None = None,
    relative_paths: bool = True,
) -> Path:
    """Write records as CSV (or JSONL when ``path`` ends in ``.jsonl``), atomically.

    Args:
        label_names: column order of the labels; defaults to the union of the records' label keys.
        relative_paths: store image paths relative to the manifest's folder (portable manifests).
    """
    path = Path(path)
    records = list(records)
    if label_names is None:
        label_names = []
        for record in records:
            label_names.extend(k for k in record.labels if k not in label_names)
    path.parent.mkdir(parents=True, exist_ok=True)
    base_dir = path.resolve().parent if relative_paths else None
    optional = [c for c in OPTIONAL_COLUMNS if any(getattr(r, c) for r in records)]
    rows = [_row_from_record(r, label_names, base_dir, optional) for r in records]
    extra_columns: list[str] = []
    for record in records:
        extra_columns.extend(k for k in record.extra if k not in extra_columns and _is_extra_column(k))
    for row in rows:  # every record has every column (CSV and JSONL alike)
        for name in extra_columns:
            row.setdefault(name, "")
    columns = list(BASE_COLUMNS) + [LABEL_PREFIX + n for n in label_names] + ["boxes"] + optional + extra_columns
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        if path.suffix == ".jsonl":
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    return path
