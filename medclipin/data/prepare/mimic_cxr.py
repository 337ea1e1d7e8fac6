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

import functools
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    AdapterOptions, PrepareError, PrepareResult, find_first, make_options, option, parse_label_value, read_table,
    uncertain_value,
)
from medclipin.data.reports import extract_sections, normalize_whitespace

CHEXPERT_LABELS = [
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
    "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
    "Pneumothorax", "Support Devices",
]
FRONTAL_VIEWS = ("PA", "AP")


@dataclass
class Options(AdapterOptions):
    """Options of the MIMIC-CXR adapter (``jpg``: the MIMIC-CXR-JPG layout; ``medclipin prepare
    mimic-cxr-jpg`` sets it)."""

    jpg: bool = option(False, "MIMIC-CXR-JPG: images are .jpg instead of .dcm")
    frontal_only: bool = option(False, "keep PA and AP views only")
    no_sections: str = option("last-paragraph", "rule for reports with neither FINDINGS nor IMPRESSION "
                                                "(default: last-paragraph)", choices=("last-paragraph", "whole", "drop"))
    uncertain: str = option("keep", "CheXpert-labeler uncertain (-1) labels: keep -1 (default), ones, zeros, ignore",
                            choices=("keep", "ones", "zeros", "ignore"))
    reports_root: str | None = option(None, "folder holding files/pXX/pXXXXXXXX/sXXXXXXXX.txt (default: --root); "
                                            "MIMIC-CXR-JPG users point this at their MIMIC-CXR reports")
    split_csv: str | None = option(None, "default: mimic-cxr-2.0.0-split.csv.gz under --root")
    metadata_csv: str | None = option(None, "default: mimic-cxr-2.0.0-metadata.csv.gz under --root")
    labels_csv: str | None = option(None, "default: mimic-cxr-2.0.0-chexpert.csv.gz under --root")
    no_labels: bool = option(False, "do not read CheXpert labels")


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


def prepare(root: str | os.PathLike, options: Options | None = None, **overrides) -> PrepareResult:
    """MIMIC-CXR(-JPG) files under ``root`` -> records; options as :class:`Options` or keyword arguments."""
    opts = make_options(Options, options, overrides)
    root = Path(root)
    jpg = opts.jpg
    extension = ".jpg" if jpg else ".dcm"
    reports_root = Path(opts.reports_root) if opts.reports_root else root
    split_rows = _table(root, opts.split_csv, "split", required=True)
    metadata = _table(root, opts.metadata_csv, "metadata", required=opts.frontal_only)
    label_rows = None if opts.no_labels else _table(root, opts.labels_csv, "chexpert", required=False)

    views = {row["dicom_id"]: row.get("ViewPosition", "").strip().upper() for row in metadata or []}
    labels_by_study: dict[str, dict] = {}
    label_names: list[str] = []
    if label_rows:
        label_names = [c for c in CHEXPERT_LABELS if c in label_rows[0]] or \
            [c for c in label_rows[0] if c not in ("subject_id", "study_id")]
        for row in label_rows:
            labels_by_study[row["study_id"].strip()] = {
                name: uncertain_value(parse_label_value(row.get(name, "")), opts.uncertain) for name in label_names
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
        if opts.frontal_only and view not in FRONTAL_VIEWS:
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
            if opts.no_sections == "drop":
                skipped["no FINDINGS/IMPRESSION (--no-sections drop)"] += 1
                continue
            text = _fallback_text(report, opts.no_sections)
            notes[f"text: {opts.no_sections} (no FINDINGS/IMPRESSION)"] += 1
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
