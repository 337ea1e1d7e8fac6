"""MIMIC-CXR (DICOM, PhysioNet) and MIMIC-CXR-JPG in their published layouts.

Layout under ``--root``::

    files/p10/p10000032/s50414267/<dicom_id>.dcm   (MIMIC-CXR; .jpg for MIMIC-CXR-JPG)
    files/p10/p10000032/s50414267.txt              (report; from mimic-cxr-reports.zip)
    mimic-cxr-2.0.0-split.csv.gz                   dicom_id, study_id, subject_id, split
    mimic-cxr-2.0.0-metadata.csv.gz                dicom_id, ..., ViewPosition, ...
    mimic-cxr-2.0.0-chexpert.csv.gz                subject_id, study_id, <14 CheXpert labels>

The official split (train / validate / test, by subject) is kept as published. One record per image
(``dicom_id``) with its study's report. Reports with neither FINDINGS nor IMPRESSION follow
``--no-sections``: ``last-paragraph`` (default: the report's last paragraph, cleaned, goes to
``text`` -- in MIMIC the closing paragraph is usually the conclusion), ``whole`` (the whole
report, whitespace-normalised, goes to ``text``; ``clean_text`` removes placeholders at training
time) or ``drop``.
Every such record is counted in the summary.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections import Counter
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    PrepareError, PrepareResult, find_first, parse_label_value, read_table, uncertain_value,
)
from medclipin.data.reports import extract_sections, normalize_whitespace

CHEXPERT_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]
FRONTAL_VIEWS = ("PA", "AP")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frontal-only", action="store_true", help="keep PA and AP views only")
    parser.add_argument("--no-sections", choices=("last-paragraph", "whole", "drop"), default="last-paragraph",
                        help="rule for reports with neither FINDINGS nor IMPRESSION (default: last-paragraph)")
    parser.add_argument("--uncertain", choices=("keep", "ones", "zeros", "ignore"), default="keep",
                        help="CheXpert-labeler uncertain (-1) labels: keep -1 (default), ones, zeros, ignore")
    parser.add_argument("--reports-root", default=None,
                        help="folder holding files/pXX/pXXXXXXXX/sXXXXXXXX.txt (default: --root); "
                             "MIMIC-CXR-JPG users point this at their MIMIC-CXR reports")
    parser.add_argument("--split-csv", default=None, help="default: mimic-cxr-2.0.0-split.csv.gz under --root")
    parser.add_argument("--metadata-csv", default=None, help="default: mimic-cxr-2.0.0-metadata.csv.gz under --root")
    parser.add_argument("--labels-csv", default=None, help="default: mimic-cxr-2.0.0-chexpert.csv.gz under --root")
    parser.add_argument("--no-labels", action="store_true", help="do not read CheXpert labels")


def _table(root: Path, explicit: str | None, stem: str, required: bool) -> list[dict] | None:
    if explicit:
        return read_table(explicit)
    path = find_first(root, [f"mimic-cxr-2.0.0-{stem}.csv.gz", f"mimic-cxr-2.0.0-{stem}.csv",
                             f"mimic-cxr-2.1.0-{stem}.csv.gz", f"mimic-cxr-2.1.0-{stem}.csv"])
    if path is None:
        if required:
            raise PrepareError(f"{root}: mimic-cxr-2.0.0-{stem}.csv.gz not found (from the MIMIC-CXR-JPG "
                               f"release on PhysioNet); pass --{stem}-csv")
        return None
    return read_table(path)


def _last_paragraph(report: str) -> str:
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", report.replace("\r\n", "\n")) if normalize_whitespace(p)]
    return normalize_whitespace(paragraphs[-1]) if paragraphs else ""


def _fallback_text(report: str, rule: str) -> str:
    return normalize_whitespace(report) if rule == "whole" else _last_paragraph(report)


def prepare(args: argparse.Namespace) -> PrepareResult:
    root = Path(args.root)
    jpg = args.dataset == "mimic-cxr-jpg"
    extension = ".jpg" if jpg else ".dcm"
    reports_root = Path(args.reports_root) if args.reports_root else root
    split_rows = _table(root, args.split_csv, "split", required=True)
    metadata = _table(root, args.metadata_csv, "metadata", required=args.frontal_only)
    label_rows = None if args.no_labels else _table(root, args.labels_csv, "chexpert", required=False)

    views = {row["dicom_id"]: row.get("ViewPosition", "").strip().upper() for row in metadata or []}
    labels_by_study: dict[str, dict] = {}
    label_names: list[str] = []
    if label_rows:
        label_names = [c for c in CHEXPERT_LABELS if c in label_rows[0]] or \
            [c for c in label_rows[0] if c not in ("subject_id", "study_id")]
        for row in label_rows:
            labels_by_study[row["study_id"].strip()] = {
                name: uncertain_value(parse_label_value(row.get(name, "")), args.uncertain) for name in label_names
            }

    skipped: Counter = Counter()
    notes: Counter = Counter()
    records: list[Record] = []

    @functools.lru_cache(maxsize=4096)  # images of a study are (nearly) adjacent; bounded memory
    def study_report(path: Path):
        if not path.is_file():
            return None
        text = path.read_text(encoding="utf-8", errors="replace")
        return text, extract_sections(text)

    for row in split_rows:
        dicom_id, study, subject = row["dicom_id"].strip(), row["study_id"].strip(), row["subject_id"].strip()
        split = row["split"].strip().lower()
        if split not in ("train", "validate", "test"):
            skipped[f"unknown split value {split!r}"] += 1
            continue
        view = views.get(dicom_id, "")
        if args.frontal_only and view not in FRONTAL_VIEWS:
            skipped["excluded view (not PA/AP)" if view else "excluded view (unknown)"] += 1
            continue
        study_dir = Path("files") / f"p{subject[:2]}" / f"p{subject}"
        image = root / study_dir / f"s{study}" / f"{dicom_id}{extension}"
        if not image.is_file():
            skipped["missing image"] += 1
            continue
        loaded = study_report(reports_root / study_dir / f"s{study}.txt")
        if loaded is None:
            skipped["missing report"] += 1
            continue
        report, sections = loaded
        text = ""
        if not sections.has_findings_or_impression:
            if args.no_sections == "drop":
                skipped["no FINDINGS/IMPRESSION (--no-sections drop)"] += 1
                continue
            text = _fallback_text(report, args.no_sections)
            notes[f"text: {args.no_sections} (no FINDINGS/IMPRESSION)"] += 1
            if not text:
                skipped["no text"] += 1
                continue
        labels = labels_by_study.get(study)
        if label_names and labels is None:
            notes["no CheXpert label row (labels empty)"] += 1
            labels = {name: None for name in label_names}
        records.append(Record(
            record_id=dicom_id, patient_id=subject, study_id=study, image_path=str(image), split=split,
            view=view, findings=sections.findings, impression=sections.impression, text=text,
            labels=labels or {},
        ))
    return PrepareResult(records, label_names, skipped, notes)
