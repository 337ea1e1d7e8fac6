"""Manifest validation: counts, missing/undecodable files, duplicates, leakage, exit codes."""

import json
import shutil

from test_prepare_common import write_dicom, write_image

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


def _five_bad(tmp_path, good: int = 40):
    """A manifest of `good` readable PNGs and five bad files of different kinds (train split)."""
    images = tmp_path / "images"
    records = [Record(f"g{i}", f"pg{i}", f"sg{i}", str(write_image(images / f"good{i}.png", value=i)), "train",
                      findings="Secret report text.")
               for i in range(good)]
    (images / "zero.png").write_bytes(b"")
    full = (images / "good0.png").read_bytes()
    (images / "cut.png").write_bytes(full[: len(full) // 2])
    (images / "notes.dcm").write_text("not an image\n" * 20)
    (images / "folder.png").mkdir()
    bad = {"zero.png": "empty file", "cut.png": "truncated or corrupt", "notes.dcm": "not a DICOM, PNG or JPEG",
           "folder.png": "not a regular file", "gone.png": "missing"}
    for i, name in enumerate(bad):
        records.append(Record(f"b{i}", f"PATIENT-{i}", f"sb{i}", str(images / name), "train", findings="Secret."))
    return write_manifest(tmp_path / "m.csv", records), bad


def test_all_names_every_bad_file_with_its_reason(tmp_path, capsys):
    path, bad = _five_bad(tmp_path)
    assert validate_main([str(path), "--all", "--json", str(tmp_path / "v.json")]) == 1
    printed = capsys.readouterr().out
    for name, reason in bad.items():
        line = next((l for l in printed.splitlines() if l.strip().startswith(str(tmp_path / "images" / name))), "")
        assert reason in line, (name, printed)
    assert "Secret" not in printed and "PATIENT-" not in printed  # paths yes; report text and patient ids never
    report = json.loads((tmp_path / "v.json").read_text())
    assert {(e["path"].rsplit("/", 1)[-1]) for e in report["bad_files"]} == set(bad)
    assert all(reason in next(e["reason"] for e in report["bad_files"] if e["path"].endswith(name))
               for name, reason in bad.items())
    assert report["decode_sampled"] is False and not report["ok"]


def test_default_sample_says_so_and_still_finds_cheap_failures(tmp_path, capsys):
    path, bad = _five_bad(tmp_path)
    report = validate_manifest(path, sample=4)
    found = {e["path"].rsplit("/", 1)[-1] for e in report.bad_files}
    assert {"zero.png", "folder.png", "gone.png"} <= found  # checked for every file, without decoding
    assert report.decode_sampled and report.decode_checked == 4
    assert validate_main([str(path), "--sample", "4"]) == 1
    printed = capsys.readouterr().out
    assert "sample of 4" in printed and "--all" in printed


def test_sample_covers_every_split_and_file_type(tmp_path):
    images = tmp_path / "images"
    records = [Record(f"r{i}", f"p{i}", f"s{i}", str(write_image(images / f"{i}.png", value=i)), "train")
               for i in range(60)]
    records += [Record(f"t{i}", f"q{i}", f"u{i}", str(write_image(images / f"t{i}.jpg", value=i)), "test")
                for i in range(2)]
    records.append(Record("v0", "w0", "x0", str(write_dicom(images / "v0.dcm")), "validate"))
    report = validate_manifest(write_manifest(tmp_path / "m.csv", records), sample=4)
    assert report.decode_checked == 4
    assert all(report.decode_checked_per_split[s] >= 1 for s in ("train", "validate", "test"))


def test_header_only_manifest_is_not_ok(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("record_id,patient_id,study_id,image_path,split\n")
    report = validate_manifest(tmp_path / "empty.csv")
    assert not report.ok and report.records == 0 and "no records" in " ".join(report.failures)
    assert validate_main([str(tmp_path / "empty.csv")]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_a_manifest_without_patient_ids_says_leakage_cannot_be_checked(tmp_path, capsys):
    """W7 (issue 25): without a patient_id column every record is its own patient and `validate` said OK
    with leakage silently unchecked."""
    path = write_manifest(tmp_path / "m.csv", _records(tmp_path))
    rows = path.read_text().splitlines()
    column = rows[0].split(",").index("patient_id")
    stripped = tmp_path / "no_patients.csv"
    kept = [",".join(c for i, c in enumerate(row.split(",")) if i != column) for row in rows]
    stripped.write_text("\n".join(kept) + "\n")
    assert not validate_manifest(path).warnings
    report = validate_manifest(stripped)
    assert report.ok and len(report.warnings) == 1 and "leakage" in report.warnings[0]
    assert validate_main([str(stripped)]) == 0
    assert "warning: no patient_id: every record counts as its own patient" in capsys.readouterr().out
