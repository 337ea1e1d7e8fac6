"""Fundus adapters (RFMiD, ODIR-5K) and the generic image-folder adapter."""

import json

from test_prepare_common import write_csv, write_image

from medclipin.commands.prepare import main as prepare_main
from medclipin.data.manifest import read_manifest
from medclipin.data.prepare.odir import keyword_labels, split_keywords
from medclipin.data.validate import validate_manifest

RFMID_COLUMNS = ["ID", "Disease_Risk", "DR", "ARMD", "MH"]


def test_rfmid_published_layout(tmp_path):
    root = tmp_path / "RFMiD"
    sets = [("a. Training Set", "a. RFMiD_Training_Labels.csv", [1, 2, 3]),
            ("b. Validation Set", "b. RFMiD_Validation_Labels.csv", [1, 2]),
            ("c. Testing Set", "c. RFMiD_Testing_Labels.csv", [1, 2, 4])]  # 4.png absent
    value = 0
    for folder, csv_name, ids in sets:
        for i in ids:
            if i != 4:
                value += 20
                write_image(root / "1. Original Images" / folder / f"{i}.png", value=value, mode="RGB")
        write_csv(root / "2. Groundtruths" / csv_name, RFMID_COLUMNS, [[i, 1, i % 2, 0, 1 - i % 2] for i in ids])
    out = tmp_path / "rfmid.csv"
    assert prepare_main(["rfmid", "--root", str(root), "--out", str(out), "--summary", str(tmp_path / "s.json")]) == 0
    manifest = read_manifest(out)
    assert manifest.label_names == RFMID_COLUMNS[1:]
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == {"missing image": 1}
    counts = {s: len(manifest.split(s)) for s in ("train", "validate", "test")}
    assert counts == {"train": 3, "validate": 2, "test": 2}
    for record in manifest.records:  # image from its own set's folder, not another set's 1.png
        assert {"train": "Training", "validate": "Validation", "test": "Testing"}[record.split] in record.image_path
    assert all(r.view == "FUNDUS" for r in manifest.records)
    assert validate_manifest(out, check_all=True).ok


def test_rfmid_real_flat_sample(shared_data, tmp_path):
    out = tmp_path / "rfmid.csv"
    assert prepare_main(["rfmid", "--root", str(shared_data / "fundus_rfmid"), "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert len(manifest) == 10 and len(manifest.label_names) == 46
    assert sum(r.labels["DR"] == 1.0 for r in manifest.records) == 4
    report = validate_manifest(out, sample=2)
    assert report.ok and report.decode_checked == 2


def test_odir_keywords():
    assert split_keywords("moderate non proliferative retinopathy\uff0chypertensive retinopathy") == [
        "moderate non proliferative retinopathy", "hypertensive retinopathy"]
    labels = keyword_labels(["moderate non proliferative retinopathy", "hypertensive retinopathy", "lens dust"])
    assert labels["Diabetic Retinopathy"] == labels["Hypertensive Retinopathy"] == 1.0
    assert labels["Other"] == 0.0 and labels["Normal"] == 0.0
    assert keyword_labels(["normal fundus"])["Normal"] == 1.0
    assert keyword_labels(["drusen"])["Other"] == 1.0
    assert keyword_labels(["pathological myopia"])["Pathological Myopia"] == 1.0
    assert keyword_labels(["wet age-related macular degeneration"])["Age-related Macular Degeneration"] == 1.0


def test_odir_csv_export(tmp_path):
    root = tmp_path / "ODIR-5K"
    header = ["ID", "Patient Age", "Patient Sex", "Left-Fundus", "Right-Fundus", "Left-Diagnostic Keywords",
              "Right-Diagnostic Keywords", "N", "D", "G", "C", "A", "H", "M", "O"]
    rows = [
        [0, 69, "Female", "0_left.jpg", "0_right.jpg", "cataract", "normal fundus", 0, 0, 0, 1, 0, 0, 0, 0],
        [1, 57, "Male", "1_left.jpg", "1_right.jpg", "normal fundus", "normal fundus", 1, 0, 0, 0, 0, 0, 0, 0],
        [2, 42, "Male", "2_left.jpg", "2_right.jpg",
         "laser spot\uff0cmoderate non proliferative retinopathy", "no fundus image", 0, 1, 0, 0, 0, 0, 0, 1],
        [3, 50, "Female", "3_left.jpg", "3_right.jpg", "glaucoma", "lens dust", 0, 0, 1, 0, 0, 0, 0, 0],
    ]
    for i, row in enumerate(rows):
        for side in (3, 4):
            if row[0] != 3 or side == 3:  # 3_right.jpg missing
                write_image(root / "ODIR-5K_Training_Dataset" / row[side], value=i * 30 + side, mode="RGB")
    write_csv(root / "ODIR-5K_Training_Annotations(Updated)_V2.csv", header, rows)
    (root / "ODIR-5K_Training_Annotations(Updated)_V2.xlsx").write_bytes(b"not read without openpyxl")
    out = tmp_path / "odir.csv"
    assert prepare_main(["odir", "--root", str(root), "--out", str(out), "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["skipped"] == {"missing image": 1, "not a fundus image (keyword)": 1}
    records = {r.record_id: r for r in read_manifest(out).records}
    assert records["0_left"].labels["Cataract"] == 1.0 and records["0_right"].labels["Normal"] == 1.0
    assert records["2_left"].labels["Diabetic Retinopathy"] == 1.0 and records["2_left"].labels["Other"] == 1.0
    assert records["2_left"].text == "laser spot, moderate non proliferative retinopathy"
    assert records["0_left"].split == records["0_right"].split  # both eyes of a patient together
    assert validate_manifest(out, check_all=True).ok


def test_image_folder(tmp_path):
    root = tmp_path / "folder"
    for split in ("train", "val", "test"):
        for c, cls in enumerate(("normal", "glaucoma")):
            write_image(root / split / cls / f"{split}_{cls}.png", value=len(split) * 10 + c)
    (root / "train" / "normal" / "notes.txt").write_text("x")
    out = tmp_path / "m.csv"
    assert prepare_main(["image-folder", "--root", str(root), "--out", str(out), "--text-from-class",
                         "--summary", str(tmp_path / "s.json")]) == 0
    manifest = read_manifest(out)
    assert manifest.label_names == ["glaucoma", "normal"] and len(manifest) == 6
    assert {r.split for r in manifest.records} == {"train", "validate", "test"}
    assert json.loads((tmp_path / "s.json").read_text())["skipped"] == {"not an image extension": 1}
    r = next(r for r in manifest.records if r.record_id == "val/glaucoma/val_glaucoma.png")
    assert r.split == "validate" and r.text == "glaucoma" and r.labels == {"glaucoma": 1.0, "normal": 0.0}
    flat = tmp_path / "flat"
    for i in range(6):
        write_image(flat / ("a" if i % 2 else "b") / f"p{i // 2}_{i}.png", value=i)
    assert prepare_main(["image-folder", "--root", str(flat), "--out", str(out), "--patient-pattern", r"^(p\d+)_"]) == 0
    flat_manifest = read_manifest(out)
    assert {r.patient_id for r in flat_manifest.records} == {"p0", "p1", "p2"}
    assert validate_manifest(out).leaked_patients == 0
