"""csv / jsonl adapter, including the real Figure1 COVID-19 metadata.csv."""

import json

from test_prepare_common import write_csv, write_image

from medclipin.commands.prepare import main as prepare_main
from medclipin.data.manifest import read_manifest
from medclipin.data.validate import validate_manifest

FIGURE1 = ["--image-template", "images/{patientid}", "--text-column", "notes", "--label-column", "finding",
           "--patient-column", "patientid", "--patient-pattern", r"^(COVID-\d+)", "--view-column", "view"]


def test_figure1_metadata(shared_data, tmp_path, capsys):
    out = tmp_path / "figure1.csv"
    assert prepare_main(["csv", "--root", str(shared_data / "cxr_figure1"), "--out", str(out),
                         "--summary", str(tmp_path / "s.json"), *FIGURE1]) == 0
    assert "COVID-00001" not in capsys.readouterr().out  # no identifiers printed
    manifest = read_manifest(out)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert len(manifest) == 55 and summary["skipped_total"] == 0
    assert manifest.label_names == ["COVID-19", "No finding", "Pneumonia"]
    assert summary["label_positives"] == {"COVID-19": 35, "No finding": 3, "Pneumonia": 2}
    assert summary["with_any_text"] == 49 and summary["notes"]["label not stated"] == 15
    assert {r.image_path.rsplit(".", 1)[1] for r in manifest.records} == {"jpg", "png"}
    a, b = (next(r for r in manifest.records if r.record_id == f"images/COVID-00003{s}.jpg") for s in "ab")
    assert a.patient_id == b.patient_id == "COVID-00003" and a.split == b.split
    report = validate_manifest(out, check_all=True)
    assert report.ok and report.leaked_patients == 0 and report.decode_checked == 55


def test_csv_and_jsonl_options(tmp_path):
    root = tmp_path / "data"
    for i in range(6):
        write_image(root / "img" / f"{i}.png", value=i * 3)
    rows = [[f"img/{i}.png", f"P{i // 2}", ["train", "val", "test"][i // 2], "1" if i % 2 else "0", "",
             "FINDINGS: Clear lungs. IMPRESSION: Normal." if i else ""] for i in range(6)]
    rows.append(["img/missing.png", "P9", "train", "1", "", "x"])
    write_csv(root / "table.csv", ["path", "pid", "fold", "Effusion", "Edema", "report"], rows)
    out = tmp_path / "m.csv"
    args = ["csv", "--root", str(root), "--out", str(out), "--image-column", "path", "--patient-column", "pid",
            "--split-column", "fold", "--label-columns", "Effusion", "Edema", "--report-column", "report",
            "--require-text", "--summary", str(tmp_path / "s.json")]
    assert prepare_main(args) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["skipped"] == {"missing image": 1, "no text": 1}
    manifest = read_manifest(out)
    r = {x.record_id: x for x in manifest.records}["img/1.png"]
    assert (r.findings, r.impression, r.split, r.labels) == ("Clear lungs.", "Normal.", "train",
                                                              {"Effusion": 1.0, "Edema": None})
    assert validate_manifest(out).ok
    with (root / "table.jsonl").open("w") as handle:
        for i in range(6):
            handle.write(json.dumps({"file": f"img/{i}", "caption": f"case {i}", "patient": f"P{i}"}) + "\n")
    out2 = tmp_path / "j.jsonl"
    assert prepare_main(["jsonl", "--root", str(root), "--table", "table.jsonl", "--out", str(out2),
                         "--image-column", "file", "--image-extensions", ".png", "--text-column", "caption",
                         "--patient-column", "patient"]) == 0
    manifest2 = read_manifest(out2)
    assert len(manifest2) == 6 and manifest2.records[0].text == "case 0"


def test_csv_unknown_column(tmp_path, capsys):
    write_csv(tmp_path / "t.csv", ["a"], [["x"]])
    assert prepare_main(["csv", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv"),
                         "--image-column", "image"]) == 2
    assert "no column" in capsys.readouterr().err
