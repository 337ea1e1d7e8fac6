"""RSNA Pneumonia adapter on a miniature stage-2 tree with tiny DICOMs."""

import json

from test_prepare_common import write_csv, write_dicom

from medclipin.commands.prepare import main as prepare_main
from medclipin.data.manifest import read_manifest
from medclipin.data.prepare.common import hash_split
from medclipin.data.validate import validate_manifest


def test_rsna_pneumonia(tmp_path):
    root = tmp_path / "rsna"
    rows = [
        ["0004cfab-14fd-4e49-80ba-63a80b6bddd6", "", "", "", "", 0],
        ["00436515-870c-4b36-a041-de91049b9ab4", 264.0, 152.0, 213.0, 379.0, 1],
        ["00436515-870c-4b36-a041-de91049b9ab4", 562.0, 152.0, 256.0, 453.0, 1],
        ["00704310-78a8-4b38-8475-49f4573b2dbb", 323.0, 577.0, 160.0, 104.0, 1],
        ["ffffffff-0000-0000-0000-000000000000", "", "", "", "", 0],  # no DICOM on disk
    ]
    for i, pid in enumerate(sorted({r[0] for r in rows[:-1]})):
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", view="AP" if i else "PA", value=i * 50)
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    out = tmp_path / "rsna.csv"
    assert prepare_main(["rsna-pneumonia", "--root", str(root), "--out", str(out),
                         "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["skipped"] == {"missing image": 1} and summary["notes"]["boxes"] == 3
    records = {r.record_id: r for r in read_manifest(out).records}
    assert len(records) == 3
    positive = records["00436515-870c-4b36-a041-de91049b9ab4"]
    assert positive.labels == {"Pneumonia": 1.0}
    assert [b.box for b in positive.boxes] == [(264.0, 152.0, 477.0, 531.0), (562.0, 152.0, 818.0, 605.0)]
    assert records["0004cfab-14fd-4e49-80ba-63a80b6bddd6"].labels == {"Pneumonia": 0.0}
    assert records["0004cfab-14fd-4e49-80ba-63a80b6bddd6"].view == "PA"
    assert all(r.split == hash_split(r.patient_id) for r in records.values())
    report = validate_manifest(out, check_all=True)
    assert report.ok and report.boxes == 3
