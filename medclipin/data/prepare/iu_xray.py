"""IU X-ray / Open-i (Indiana University chest X-ray collection).

Layout under ``--root`` (both archives extracted, any depth)::

    ecgen-radiology/<n>.xml     from NLMCXR_reports.tgz (one report per study)
    <...>/CXR<n>_IM-XXXX-XXXX.png   from NLMCXR_png.tgz (name = the XML's parentImage id + .png)

One record per image (``parentImage``) with its study's FINDINGS and IMPRESSION (taken from the
XML's own fields). Open-i has no patient ids: the report (study) id is the grouping unit, so the
hash split is by report. Labels come from the MeSH ``major`` terms: the term before the first "/"
is mapped by :data:`MESH_TO_LABEL`; ``normal`` -> No Finding. A report without FINDINGS and
IMPRESSION is skipped (counted) unless ``--keep-empty-text``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medclipin.data.manifest import Record
from medclipin.data.prepare.common import (
    PrepareError, PrepareResult, SplitOptions, hash_split, index_files, make_options, option,
)
from medclipin.data.reports import normalize_whitespace

# MeSH major heading (before the first "/", lower case) -> label
MESH_TO_LABEL = {
    "normal": "No Finding",
    "cardiomegaly": "Cardiomegaly",
    "pulmonary atelectasis": "Atelectasis",
    "atelectasis": "Atelectasis",
    "pleural effusion": "Pleural Effusion",
    "opacity": "Lung Opacity",
    "airspace disease": "Lung Opacity",
    "pneumonia": "Pneumonia",
    "pulmonary edema": "Edema",
    "edema": "Edema",
    "consolidation": "Consolidation",
    "pneumothorax": "Pneumothorax",
    "nodule": "Nodule",
    "pulmonary nodule": "Nodule",
    "mass": "Mass",
    "emphysema": "Emphysema",
    "pulmonary emphysema": "Emphysema",
    "granulomatous disease": "Granuloma",
    "calcified granuloma": "Granuloma",
    "granuloma": "Granuloma",
    "fractures, bone": "Fracture",
    "hernia, hiatal": "Hiatal Hernia",
    "scoliosis": "Scoliosis",
    "lung, hyperdistention": "Hyperinflation",
    "pulmonary disease, chronic obstructive": "COPD",
    "cicatrix": "Scarring",
    "infiltrate": "Lung Opacity",
    "pleural thickening": "Pleural Thickening",
    "catheters, indwelling": "Support Devices",
    "implanted medical device": "Support Devices",
}
LABELS = sorted(set(MESH_TO_LABEL.values()))


@dataclass
class Options(SplitOptions):
    """Options of the IU X-ray / Open-i adapter."""

    keep_empty_text: bool = option(False, "keep images whose report has neither FINDINGS nor IMPRESSION")


def parse_report(path: Path) -> dict:
    """One Open-i XML -> {'id', 'sections': {LABEL: text}, 'mesh': [...], 'images': [...]}."""
    root = ET.parse(path).getroot()
    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None and uid.get("id") else path.stem
    sections = {(a.get("Label") or "").upper(): normalize_whitespace(a.text or "") for a in root.iter("AbstractText")}
    mesh = [normalize_whitespace(m.text or "") for m in root.iter("major") if (m.text or "").strip()]
    images = [p.get("id") for p in root.iter("parentImage") if p.get("id")]
    return {"id": report_id, "sections": sections, "mesh": mesh, "images": images}


def mesh_labels(terms: list[str]) -> dict[str, float]:
    """Report-level labels: 1 for every mapped MeSH term, 0 for the other classes."""
    found = {MESH_TO_LABEL.get(term.split("/")[0].strip().lower()) for term in terms}
    return {name: 1.0 if name in found else 0.0 for name in LABELS}


def prepare(root: str | os.PathLike, options: Options | None = None, **overrides) -> PrepareResult:
    """Open-i XMLs and PNGs under ``root`` -> records; options as :class:`Options` or keyword arguments."""
    opts = make_options(Options, options, overrides)
    root = Path(root)
    xmls = sorted(p for p in root.rglob("*.xml") if p.is_file())
    if not xmls:
        raise PrepareError(f"{root}: no report XMLs found (extract NLMCXR_reports.tgz under --root)")
    images = index_files(root, (".png",))
    skipped: Counter = Counter()
    notes: Counter = Counter()
    records: list[Record] = []
    fractions = opts.split_fractions
    for xml_path in xmls:
        try:
            report = parse_report(xml_path)
        except ET.ParseError:
            skipped["unreadable report XML (reports)"] += 1
            continue
        if not report["images"]:
            skipped["report without images (reports)"] += 1
            continue
        findings = report["sections"].get("FINDINGS", "")
        impression = report["sections"].get("IMPRESSION", "")
        if not (findings or impression) and not opts.keep_empty_text:
            skipped["no text (no FINDINGS/IMPRESSION)"] += len(report["images"])
            continue
        labels = mesh_labels(report["mesh"])
        unmapped = not any(MESH_TO_LABEL.get(t.split("/")[0].strip().lower()) for t in report["mesh"])
        split = hash_split(report["id"], fractions, opts.split_salt)
        for image_id in report["images"]:
            paths = images.get(image_id)
            if not paths:
                skipped["missing image"] += 1
                continue
            if unmapped:
                notes["no mapped MeSH term (all labels 0)"] += 1
            records.append(Record(
                record_id=image_id, patient_id=report["id"], study_id=report["id"], image_path=str(paths[0]),
                split=split, findings=findings, impression=impression, labels=dict(labels),
            ))
    return PrepareResult(records, list(LABELS), skipped, notes)
