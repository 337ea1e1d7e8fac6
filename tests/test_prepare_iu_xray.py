"""IU X-ray / Open-i adapter: real report XMLs (when present) and a miniature tree with PNGs."""

import json
import tarfile

import pytest
from test_prepare_common import write_image

from medclipin.commands.prepare import main as prepare_main
from medclipin.data.manifest import read_manifest
from medclipin.data.prepare.iu_xray import mesh_labels
from medclipin.data.validate import validate_manifest

XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation><uId id="CXR{n}"/>
<MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText>
<AbstractText Label="INDICATION">Cough.</AbstractText>
<AbstractText Label="FINDINGS">{findings}</AbstractText>
<AbstractText Label="IMPRESSION">{impression}</AbstractText>
</Abstract></Article></MedlineCitation>
<MeSH>{mesh}</MeSH>
{images}
</eCitation>"""


def write_report(folder, n, findings, impression, mesh, images):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{n}.xml").write_text(XML.format(
        n=n, findings=findings, impression=impression,
        mesh="".join(f"<major>{m}</major>" for m in mesh),
        images="".join(f'<parentImage id="{i}"><figureId>F1</figureId></parentImage>' for i in images)))


def test_iu_xray_miniature(tmp_path):
    root = tmp_path / "openi"
    reports = root / "ecgen-radiology"
    write_report(reports, 1, "Heart is enlarged.", "Cardiomegaly.", ["Cardiomegaly/mild"],
                 ["CXR1_IM-0001-1001", "CXR1_IM-0001-2001"])
    write_report(reports, 2, "", "No acute disease.", ["normal"], ["CXR2_IM-0002-1001"])
    write_report(reports, 3, "", "", ["normal"], ["CXR3_IM-0003-1001"])  # no text
    write_report(reports, 4, "Clear.", "Normal.", ["normal"], ["CXR4_IM-0004-1001"])  # image absent
    write_report(reports, 5, "Clear.", "Normal.", ["normal"], [])  # no images
    for i, image in enumerate(["CXR1_IM-0001-1001", "CXR1_IM-0001-2001", "CXR2_IM-0002-1001", "CXR3_IM-0003-1001"]):
        write_image(root / "NLMCXR_png" / f"{image}.png", value=i * 10)
    out = tmp_path / "iu.csv"
    assert prepare_main(["iu-xray", "--root", str(root), "--out", str(out), "--summary", str(tmp_path / "s.json")]) == 0
    manifest = read_manifest(out)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["skipped"] == {"missing image": 1, "no text (no FINDINGS/IMPRESSION)": 1,
                                  "report without images (reports)": 1}
    by_id = {r.record_id: r for r in manifest.records}
    assert set(by_id) == {"CXR1_IM-0001-1001", "CXR1_IM-0001-2001", "CXR2_IM-0002-1001"}
    first = by_id["CXR1_IM-0001-1001"]
    assert first.findings == "Heart is enlarged." and first.impression == "Cardiomegaly."
    assert first.labels["Cardiomegaly"] == 1.0 and first.labels["No Finding"] == 0.0
    assert by_id["CXR2_IM-0002-1001"].labels["No Finding"] == 1.0
    assert by_id["CXR1_IM-0001-2001"].split == first.split  # one study, one split
    assert validate_manifest(out, check_all=True).ok


def test_mesh_labels():
    labels = mesh_labels(["Pulmonary Atelectasis/base/left", "Opacity/lung/base", "Calcinosis/aorta"])
    assert labels["Atelectasis"] == labels["Lung Opacity"] == 1.0 and labels["Cardiomegaly"] == 0.0


@pytest.mark.slow  # ~3-6 s: extracts and parses all 3,955 XMLs
def test_iu_xray_real_reports(shared_data, tmp_path):
    """All 3,955 real Open-i XMLs, no images: every image is counted as missing, nothing silently lost."""
    with tarfile.open(shared_data / "iu_xray_reports" / "NLMCXR_reports.tgz") as archive:
        archive.extractall(tmp_path / "openi", filter="data")
    out = tmp_path / "iu.csv"
    assert prepare_main(["iu-xray", "--root", str(tmp_path / "openi"), "--out", str(out),
                         "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["records"] == 0
    skipped = summary["skipped"]
    assert skipped["missing image"] > 7000  # ~7,470 images referenced by reports with text
    assert sum(skipped.values()) >= 7400
