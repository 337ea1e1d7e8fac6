"""MIMIC-CXR / MIMIC-CXR-JPG adapter on a miniature tree in the published layout (invented ids)."""

import json

from test_prepare_common import write_csv, write_dicom, write_image

from medclipin.commands.prepare import main as prepare_main
from medclipin.data.manifest import read_manifest
from medclipin.data.validate import validate_manifest

FULL_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 INDICATION:  ___ year old man with cough.
 COMPARISON:  ___
 FINDINGS:
 Lungs are clear.  No pleural effusion.
 IMPRESSION:
 No acute cardiopulmonary process.
"""
NO_SECTIONS = """                                 FINAL REPORT
 PORTABLE CHEST ___

 INDICATION:  Line placement.

 Right internal jugular line ends in the SVC.  No pneumothorax.
"""
LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
          "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
          "Pneumothorax", "Support Devices"]

# (subject, study, dicom_id, split, view, image on disk, report)
ROWS = [
    ("10000032", "50000001", "aaaa0001-0000", "train", "PA", True, FULL_REPORT),
    ("10000032", "50000001", "aaaa0002-0000", "train", "LATERAL", True, FULL_REPORT),
    ("10000032", "50000002", "aaaa0003-0000", "train", "AP", True, NO_SECTIONS),
    ("10000764", "50000003", "bbbb0001-0000", "validate", "PA", False, FULL_REPORT),  # image missing
    ("10000764", "50000004", "bbbb0002-0000", "validate", "AP", True, FULL_REPORT),
    ("10000898", "50000005", "cccc0001-0000", "test", "PA", True, None),  # report missing
    ("10000898", "50000006", "cccc0002-0000", "test", "PA", True, FULL_REPORT),
]


def build_tree(root, extension=".dcm", reports_root=None):
    reports_root = reports_root or root
    for subject, study, dicom_id, split, view, present, report in ROWS:
        study_dir = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        if present:
            if extension == ".dcm":
                write_dicom(study_dir / f"{dicom_id}.dcm", view=view)
            else:
                write_image(study_dir / f"{dicom_id}.jpg", value=len(dicom_id) + int(study[-1]))
        if report is not None:
            path = reports_root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(report)
    write_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
              [[d, st, su, sp] for su, st, d, sp, *_ in ROWS], gz=True)
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz",
              ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
               "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
               "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"],
              [[d, su, st, "CHEST (PA AND LAT)", v, 8, 8, 21800506, 213014.5, "", "", ""]
               for su, st, d, sp, v, *_ in ROWS], gz=True)
    label_rows = []
    for study in sorted({r[1] for r in ROWS}):
        subject = next(r[0] for r in ROWS if r[1] == study)
        values = [""] * len(LABELS)
        values[LABELS.index("Cardiomegaly")] = "1.0"
        values[LABELS.index("Edema")] = "-1.0"
        values[LABELS.index("Pneumothorax")] = "0.0"
        label_rows.append([subject, study, *values])
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *LABELS], label_rows, gz=True)


def test_mimic_cxr_default(tmp_path, capsys):
    root = tmp_path / "mimic-cxr"
    build_tree(root)
    out = tmp_path / "out" / "mimic.csv"
    assert prepare_main(["mimic-cxr", "--root", str(root), "--out", str(out),
                         "--summary", str(tmp_path / "summary.json")]) == 0
    printed = capsys.readouterr().out
    assert "Lungs are clear" not in printed and "10000032" not in printed  # counts only
    manifest = read_manifest(out)
    assert {r.record_id for r in manifest.records} == {"aaaa0001-0000", "aaaa0002-0000", "aaaa0003-0000",
                                                       "bbbb0002-0000", "cccc0002-0000"}
    by_id = {r.record_id: r for r in manifest.records}
    assert by_id["aaaa0001-0000"].findings == "Lungs are clear. No pleural effusion."
    assert by_id["aaaa0001-0000"].impression == "No acute cardiopulmonary process."
    assert by_id["aaaa0002-0000"].view == "LATERAL"
    fallback = by_id["aaaa0003-0000"]
    assert fallback.findings == fallback.impression == ""
    assert fallback.text == "Right internal jugular line ends in the SVC. No pneumothorax."
    # official splits, validate and test kept apart
    assert {r.split for r in manifest.records} == {"train", "validate", "test"}
    assert by_id["bbbb0002-0000"].split == "validate" and by_id["cccc0002-0000"].split == "test"
    assert by_id["aaaa0001-0000"].labels["Cardiomegaly"] == 1.0
    assert by_id["aaaa0001-0000"].labels["Edema"] == -1.0
    assert by_id["aaaa0001-0000"].labels["Atelectasis"] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped"] == {"missing image": 1, "missing report": 1}
    assert summary["notes"] == {"text: last-paragraph (no FINDINGS/IMPRESSION)": 1}
    report = validate_manifest(out, check_all=True)
    assert report.ok and report.leaked_patients == 0 and report.decode_checked == 5


def test_mimic_cxr_options(tmp_path):
    root = tmp_path / "mimic-cxr"
    build_tree(root)
    out = tmp_path / "frontal.csv"
    assert prepare_main(["mimic-cxr", "--root", str(root), "--out", str(out), "--frontal-only",
                         "--no-sections", "drop", "--uncertain", "zeros", "--summary", str(tmp_path / "s.json")]) == 0
    manifest = read_manifest(out)
    assert {r.view for r in manifest.records} <= {"PA", "AP"}
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["skipped"]["excluded view (not PA/AP)"] == 1
    assert summary["skipped"]["no FINDINGS/IMPRESSION (--no-sections drop)"] == 1
    assert all(r.labels["Edema"] == 0.0 for r in manifest.records)
    out_whole = tmp_path / "whole.csv"
    assert prepare_main(["mimic-cxr", "--root", str(root), "--out", str(out_whole), "--no-sections", "whole"]) == 0
    whole = {r.record_id: r for r in read_manifest(out_whole).records}["aaaa0003-0000"]
    assert whole.text.startswith("FINAL REPORT") and whole.text.endswith("No pneumothorax.")


def test_mimic_cxr_jpg_with_separate_reports(tmp_path):
    root, reports = tmp_path / "mimic-cxr-jpg", tmp_path / "mimic-cxr"
    build_tree(root, extension=".jpg", reports_root=reports)
    out = tmp_path / "jpg.csv"
    assert prepare_main(["mimic-cxr-jpg", "--root", str(root), "--reports-root", str(reports), "--out", str(out)]) == 0
    manifest = read_manifest(out)
    assert len(manifest) == 5 and all(r.image_path.endswith(".jpg") for r in manifest.records)
    assert validate_manifest(out, check_all=True).ok


def test_mimic_cxr_needs_split_csv(tmp_path, capsys):
    (tmp_path / "files").mkdir()
    assert prepare_main(["mimic-cxr", "--root", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    assert "split.csv.gz" in capsys.readouterr().err
