"""Manifest validation: counts, missing/undecodable files, duplicates, leakage, exit codes."""

import json
import shutil

from test_prepare_common import write_image

from medclipin.commands.validate import main as validate_main
from medclipin.data.manifest import Box, Record, write_manifest
from medclipin.data.validate import validate_manifest


def _records(tmp_path):
    images = tmp_path / "images"
    paths = [write_image(images / f"{i}.png", value=i * 40) for i in range(4)]
    return [
        Record("r0", "p0", "s0", str(paths[0]), "train", findings="Clear.", labels={"Edema": 1.0}),
        Record("r1", "p1", "s1", str(paths[1]), "train", impression="Normal.", labels={"Edema": 0.0},
               boxes=[Box("Edema", (1, 1, 4, 4))]),
        Record("r2", "p2", "s2", str(paths[2]), "validate", text="note", labels={"Edema": -1.0}),
        Record("r3", "p3", "s3", str(paths[3]), "test", labels={"Edema": None}),
    ]


def test_clean_manifest(tmp_path, capsys):
    path = write_manifest(tmp_path / "m.csv", _records(tmp_path))
    report = validate_manifest(path)
    assert report.ok and report.records == 4 and report.missing_files == 0 and report.decode_checked == 4
    assert report.records_per_split == {"train": 2, "validate": 1, "test": 1}
    assert report.empty_text_per_split == {"train": 0, "validate": 0, "test": 1}
    assert report.label_prevalence["Edema"]["train"] == {"positive": 1, "negative": 1, "uncertain": 0, "missing": 0}
    assert report.label_prevalence["Edema"]["validate"]["uncertain"] == 1 and report.boxes == 1
    assert validate_main([str(path), "--json", str(tmp_path / "v.json")]) == 0
    printed = capsys.readouterr().out
    assert "OK" in printed and "Clear." not in printed and "p0" not in printed
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is True


def test_failures(tmp_path, capsys):
    records = _records(tmp_path)
    records[3].patient_id = "p0"  # p0 in train and test: leakage
    records[2].image_path = str(tmp_path / "images" / "gone.png")  # missing
    shutil.copy(records[0].image_path, tmp_path / "images" / "copy.png")  # same content, other path, other split
    records.append(Record("r4", "p4", "s4", str(tmp_path / "images" / "copy.png"), "validate"))
    records.append(Record("r5", "p1", "s1", records[1].image_path, "train"))  # same path, same split
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    records.append(Record("r6", "p6", "s6", str(tmp_path / "images" / "broken.png"), "train"))
    path = write_manifest(tmp_path / "m.csv", records)
    report = validate_manifest(path, check_all=True)
    assert not report.ok
    assert report.leaked_patients == 1 and report.missing_files == 1
    assert report.duplicate_paths == 1 and report.duplicate_content == 1 and report.cross_split_images == 1
    assert report.decode_errors == 1 and report.decode_checked == 5  # distinct existing files
    assert validate_main([str(path), "--all"]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_sample_and_malformed(tmp_path, capsys):
    path = write_manifest(tmp_path / "m.csv", _records(tmp_path))
    assert validate_manifest(path, sample=2).decode_checked == 2
    bad = tmp_path / "bad.csv"
    bad.write_text("record_id,image_path,split\nr0,x.png,training\n")
    assert validate_main([str(bad)]) == 2
    assert "split" in capsys.readouterr().err
