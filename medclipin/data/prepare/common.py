"""Shared pieces of the dataset adapters: typed options, the result type, deterministic patient
splits, table reading (CSV, CSV.gz, TSV, JSONL, XLSX when openpyxl is installed) and image-file lookup."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from medclipin.errors import MedclipinError
from medclipin.data.manifest import SPLITS, Record

IMAGE_EXTENSIONS = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


class PrepareError(MedclipinError, ValueError):
    """The raw files are not in the expected layout; the message says what is missing."""


@dataclass
class PrepareResult:
    """What an adapter produced: records, label order, and counts of everything not kept as-is.

    ``skipped`` counts records (images) left out, by reason; ``notes`` counts records kept but
    changed by a documented rule (e.g. "text: last paragraph (no FINDINGS/IMPRESSION)").
    """

    records: list[Record]
    label_names: list[str]
    skipped: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    extra_outputs: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        """Counts only (no text, no identifiers): records per split, patients per split, labels."""
        per_split = Counter(r.split for r in self.records)
        patients = {s: len({r.patient_id for r in self.records if r.split == s}) for s in SPLITS}
        positives = {name: sum(1 for r in self.records if r.labels.get(name) == 1.0) for name in self.label_names}
        return {
            "records": len(self.records),
            "records_per_split": {s: per_split.get(s, 0) for s in SPLITS},
            "patients_per_split": patients,
            "with_findings": sum(1 for r in self.records if r.findings.strip()),
            "with_impression": sum(1 for r in self.records if r.impression.strip()),
            "with_any_text": sum(1 for r in self.records if (r.findings + r.impression + r.text).strip()),
            "label_positives": positives,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "notes": dict(sorted(self.notes.items())),
        }


def hash_split(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, salt: str = "medclipin") -> str:
    """Deterministic split of a patient id: the same id always lands in the same split, on any
    machine and in any row order (sha256 of ``salt:key`` mapped to [0, 1))."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise PrepareError(f"split fractions must be three non-negative numbers, got {list(fractions)}")
    total = float(sum(fractions))
    digest = hashlib.sha256(f"{salt}:{key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions):
        edge += fraction / total
        if u < edge:
            return name
    return SPLITS[-1]


def rank_key(key: str, seed: int) -> str:
    """Seeded, order-independent sort key for deterministic sampling."""
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()


def _decode(data: bytes, encoding: str | None) -> str:
    if encoding:
        return data.decode(encoding)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Many public CSVs (e.g. the COVID/Figure1 metadata) are Windows-1252; latin-1 never fails.
        try:
            return data.decode("cp1252")
        except UnicodeDecodeError:
            return data.decode("latin-1")


def read_table(path: str | os.PathLike, encoding: str | None = None, sheet: str | None = None) -> list[dict]:
    """Rows of a CSV/TSV (optionally .gz), JSONL or XLSX file as dicts of strings.

    XLSX needs ``openpyxl`` (not a dependency); without it the error says to export the sheet as CSV.
    """
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"table not found: {path}")
    name = path.name.lower()
    if name.endswith((".xlsx", ".xlsm")):
        try:
            import openpyxl
        except ImportError as exc:
            raise PrepareError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl), "
                               "or export the sheet as CSV and pass that file") from exc
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        ws = book[sheet] if sheet else book.worksheets[0]
        rows = list(ws.iter_rows(values_only=True))
        header = [str(h).strip() if h is not None else "" for h in rows[0]] if rows else []
        return [{h: ("" if v is None else str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
                 for h, v in zip(header, row)} for row in rows[1:] if any(v is not None for v in row)]
    data = path.read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
        name = name[:-3]
    text = _decode(data, encoding)
    if name.endswith((".jsonl", ".ndjson")):
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PrepareError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
                rows.append({k: "" if v is None else str(v) if not isinstance(v, str) else v for k, v in item.items()})
        return rows
    delimiter = "\t" if name.endswith(".tsv") else ","
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    return [{(k or "").strip(): (v or "") for k, v in row.items()} for row in reader]


def find_first(root: Path, names: Iterable[str]) -> Path | None:
    """The first of ``names`` that exists directly under ``root`` or anywhere below it."""
    names = list(names)
    for name in names:
        if (root / name).is_file():
            return root / name
    lowered = {n.lower() for n in names}
    for path in sorted(root.rglob("*")):
        if path.name.lower() in lowered and path.is_file():
            return path
    return None


def index_files(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> dict[str, list[Path]]:
    """Map file stem -> paths of every file under ``root`` with one of ``extensions``."""
    extensions = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    index: dict[str, list[Path]] = {}
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            stem, ext = os.path.splitext(filename)
            if ext.lower() in extensions:
                index.setdefault(stem, []).append(Path(dirpath) / filename)
    for paths in index.values():
        paths.sort()
    return index


def parse_fractions(values: Sequence[float] | None) -> tuple[float, float, float]:
    fractions = tuple(float(v) for v in (values or DEFAULT_FRACTIONS))
    hash_split("x", fractions)  # validates
    return fractions  # type: ignore[return-value]


def option(default, help: str, **cli) -> dataclasses.Field:
    """A field of an adapter's options: its default and help text.

    ``cli`` holds how ``medclipin prepare`` shows it (``choices``, ``nargs``, ``metavar``, ``type``,
    ``group``: name of a mutually exclusive group, ``group_required``); the flag is the field name
    with dashes (``five_by_two_hundred`` -> ``--five-by-two-hundred``). ``choices`` are also checked
    when the options are made.
    """
    metadata = {"help": help, **cli}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class AdapterOptions:
    """Base of every adapter's options: checks ``choices`` when the options are made.

    Raises:
        PrepareError: a value is not one of its field's choices.
    """

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            choices = item.metadata.get("choices")
            value = getattr(self, item.name)
            if choices is not None and value not in choices:
                raise PrepareError(f"option {item.name} is {value!r}; expected one of {', '.join(map(str, choices))}")


@dataclass
class SplitOptions(AdapterOptions):
    """Options of adapters whose split is a deterministic hash of the patient id."""

    split_fractions: tuple[float, float, float] = option(
        DEFAULT_FRACTIONS, "fractions for the deterministic patient-hash split (default 0.8 0.1 0.1)",
        nargs=3, type=float, metavar=("TRAIN", "VALIDATE", "TEST"))
    split_salt: str = option("medclipin", "salt of the patient-id hash; change it for a different (still "
                                          "deterministic) split")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.split_fractions = parse_fractions(self.split_fractions)


def make_options(options_class: type, options, overrides: dict):
    """``options`` (or the defaults) with ``overrides`` applied: what each adapter's ``prepare`` accepts."""
    if options is None:
        return options_class(**overrides)
    if not isinstance(options, options_class):
        raise TypeError(f"options must be {options_class.__name__}, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options


def uncertain_value(value: float | None, policy: str) -> float | None:
    """Apply an uncertainty policy to a -1 label: keep (-1), ones (1), zeros (0), ignore (not stated)."""
    if value != -1.0:
        return value
    return {"keep": -1.0, "ones": 1.0, "zeros": 0.0, "ignore": None}[policy]


def parse_label_value(text: str) -> float | None:
    """'1', '1.0', '0', '-1.0' -> float; '' -> None (not stated)."""
    text = (text or "").strip()
    if text == "" or text.lower() in ("nan", "none", "null"):
        return None
    number = float(text)
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(f"label value {text!r} is not 1, 0, -1 or empty")
    return number
