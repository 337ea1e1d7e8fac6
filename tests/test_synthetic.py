"""The embedded synthetic dataset: determinism, DICOM encoding, labels/boxes, reports, splits,
idempotence, and that no single global pixel statistic predicts a finding."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pydicom
import pytest
from PIL import Image

from medclipin.data.manifest import read_manifest
from medclipin.data.synthetic import (
    CLASS_NAMES,
    SyntheticDatasetError,
    generate_synthetic_dataset,
    synthesize_study,
)

SIZE = 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    manifest_path = generate_synthetic_dataset(out, n_patients=60, image_size=SIZE, seed=3)
    return out, read_manifest(manifest_path)


def test_class_names_fixed():
    assert CLASS_NAMES == ("Pleural Effusion", "Cardiomegaly", "Nodule", "Pneumothorax", "Consolidation")


def test_layout_and_manifests(dataset):
    out, manifest = dataset
    assert (out / "synthetic.json").is_file() and (out / "labels.csv").is_file()
    png = read_manifest(out / "manifest_png.csv")
    assert manifest.label_names == list(CLASS_NAMES) == png.label_names
    assert [r.record_id for r in manifest.records] == [r.record_id for r in png.records]
    for rec, rec_png in zip(manifest.records, png.records):
        assert rec.image_path.endswith(".dcm") and rec_png.image_path.endswith(".png")
        assert (rec.labels, rec.boxes, rec.split, rec.findings) == (rec_png.labels, rec_png.boxes, rec_png.split, rec_png.findings)
    with open(out / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["study_id"] for r in rows] == [r.study_id for r in manifest.records]
    for row, rec in zip(rows, manifest.records):
        assert all(int(row[c]) == int(rec.labels[c]) for c in CLASS_NAMES)
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["parameters"] == {"n_patients": 60, "image_size": SIZE, "seed": 3}
    assert meta["counts"]["studies"] == len(manifest)


def test_the_number_of_worker_processes_changes_no_byte(tmp_path):
    """Studies drawn in two processes are the files and manifests of studies drawn in one, in the same order."""
    one = generate_synthetic_dataset(tmp_path / "one", n_patients=12, image_size=SIZE, seed=5, workers=1)
    two = generate_synthetic_dataset(tmp_path / "two", n_patients=12, image_size=SIZE, seed=5, workers=2)
    for name in ("manifest.csv", "manifest_png.csv", "labels.csv", "synthetic.json"):
        assert (one.parent / name).read_bytes() == (two.parent / name).read_bytes(), name
    files = sorted(p.relative_to(one.parent) for p in one.parent.rglob("SYN*"))
    assert len(files) == 2 * len(read_manifest(one).records)
    assert all((one.parent / f).read_bytes() == (two.parent / f).read_bytes() for f in files)


def test_deterministic(tmp_path):
    a = generate_synthetic_dataset(tmp_path / "a", n_patients=10, image_size=SIZE, seed=7)
    b = generate_synthetic_dataset(tmp_path / "b", n_patients=10, image_size=SIZE, seed=7)
    assert a.read_text() == b.read_text()
    assert (a.parent / "labels.csv").read_text() == (b.parent / "labels.csv").read_text()
    for rec in read_manifest(a).records:
        name = rec.study_id
        da = pydicom.dcmread(a.parent / "dicom" / f"{name}.dcm")
        db = pydicom.dcmread(b.parent / "dicom" / f"{name}.dcm")
        np.testing.assert_array_equal(da.pixel_array, db.pixel_array)
        assert da.SOPInstanceUID == db.SOPInstanceUID
        np.testing.assert_array_equal(np.asarray(Image.open(a.parent / "png" / f"{name}.png")),
                                      np.asarray(Image.open(b.parent / "png" / f"{name}.png")))
    # a study does not depend on which other studies are generated
    c = read_manifest(generate_synthetic_dataset(tmp_path / "c", n_patients=4, image_size=SIZE, seed=7))
    first = {r.study_id: r for r in read_manifest(a).records}
    for rec in c.records:
        assert (rec.findings, rec.impression, rec.boxes) == (first[rec.study_id].findings,
                                                             first[rec.study_id].impression, first[rec.study_id].boxes)
    other = generate_synthetic_dataset(tmp_path / "d", n_patients=10, image_size=SIZE, seed=8)
    assert other.read_text() != a.read_text()


def test_dicom_attributes(dataset):
    out, manifest = dataset
    seen = set()
    for rec in manifest.records:
        ds = pydicom.dcmread(rec.image_path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.Modality == "CR" and ds.ViewPosition in ("PA", "AP") and ds.ViewPosition == rec.view
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
        assert ds.PatientID == rec.patient_id and ds.PatientID.startswith("SYN")
        pixels = ds.pixel_array
        assert pixels.dtype == np.uint16 and int(pixels.max()) < 4096
        seen.add(ds.PhotometricInterpretation)
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def _windowed(ds) -> np.ndarray:
    """DICOM linear VOI with the first window, inverted for MONOCHROME1: the displayed image in [0, 1]."""
    x = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    y = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    return 1.0 - y if ds.PhotometricInterpretation == "MONOCHROME1" else y


def test_monochrome1_renders_like_png(dataset):
    out, manifest = dataset
    checked = {"MONOCHROME1": 0, "MONOCHROME2": 0}
    for rec in manifest.records:
        ds = pydicom.dcmread(rec.image_path)
        png = np.asarray(Image.open(out / "png" / f"{rec.study_id}.png"), dtype=np.float64) / 255.0
        shown = _windowed(ds)
        assert np.abs(shown - png).max() <= 1.0 / 255.0 + 1e-6
        if ds.PhotometricInterpretation == "MONOCHROME1":
            # stored values are inverted: the raw (un-inverted) image is the negative of the PNG
            raw = ds.pixel_array.astype(np.float64)
            assert np.corrcoef(raw.ravel(), png.ravel())[0, 1] < -0.99
        checked[ds.PhotometricInterpretation] += 1
    assert min(checked.values()) > 0


def test_boxes_match_labels(dataset):
    _, manifest = dataset
    for rec in manifest.records:
        boxed = {b.label for b in rec.boxes}
        assert boxed == set(rec.positive_labels()), rec.record_id
        for b in rec.boxes:
            x0, y0, x1, y1 = b.box
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
        assert all(rec.labels[c] in (0.0, 1.0) for c in CLASS_NAMES)


def test_every_class_and_normals_present(dataset):
    _, manifest = dataset
    n = len(manifest)
    normal = sum(1 for r in manifest.records if not r.positive_labels())
    assert 0.15 * n <= normal <= 0.45 * n
    for name in CLASS_NAMES:
        assert sum(1 for r in manifest.records if r.labels[name] == 1.0) >= 5, name
    assert any(len(r.positive_labels()) >= 2 for r in manifest.records)


def test_reports(dataset):
    _, manifest = dataset
    negations = 0
    for rec in manifest.records:
        assert rec.findings.strip() and rec.impression.strip()
        lower = rec.findings.lower()
        negations += ("no pleural effusion" in lower or "without pneumothorax" in lower or "no pneumothorax" in lower)
        if not rec.positive_labels():
            assert any(p in rec.impression for p in ("No acute", "Normal chest", "No radiographic evidence"))
        else:
            assert "No acute" not in rec.impression
        for name in rec.positive_labels():
            word = {"Pleural Effusion": "effusion", "Cardiomegaly": ("cardiomegaly", "enlarged", "increased"),
                    "Nodule": "nodule", "Pneumothorax": "pneumothorax", "Consolidation": "consolidation"}[name]
            words = (word,) if isinstance(word, str) else word
            assert any(w in (rec.findings + " " + rec.impression).lower() for w in words), (rec.record_id, name)
    assert negations >= len(manifest) // 4


def test_report_sides_follow_the_image():
    """Patient's right is on the image left: a nodule reported on the right lies left of centre."""
    checked = 0
    for patient in range(80):
        study = synthesize_study(11, patient, 0, SIZE)
        if [b.label for b in study.boxes] != ["Nodule"]:
            continue
        box = study.boxes[0].box
        x_centre = (box[0] + box[2]) / 2
        words = set(study.findings.lower().replace(".", " ").split())
        if "right" in words and "left" not in words:
            assert x_centre < SIZE * 0.55
            checked += 1
        elif "left" in words and "right" not in words:
            assert x_centre > SIZE * 0.45
            checked += 1
    assert checked >= 3


def test_splits_by_patient(dataset):
    _, manifest = dataset
    split_of: dict[str, set] = {}
    for rec in manifest.records:
        split_of.setdefault(rec.patient_id, set()).add(rec.split)
    assert all(len(s) == 1 for s in split_of.values())
    per_split = {s: sum(1 for v in split_of.values() if s in v) for s in ("train", "validate", "test")}
    assert per_split == {"train": 42, "validate": 6, "test": 12}
    studies_per_patient = {p: sum(1 for r in manifest.records if r.patient_id == p) for p in split_of}
    assert set(studies_per_patient.values()) <= {1, 2} and 2 in studies_per_patient.values()


def test_study_count_scale():
    from medclipin.data.synthetic.cohort import n_studies as _n_studies

    total = sum(_n_studies(0, p) for p in range(1600))
    assert 2200 <= total <= 2600


def test_idempotent_and_parameter_mismatch(tmp_path):
    out = tmp_path / "ds"
    manifest = generate_synthetic_dataset(out, n_patients=5, image_size=SIZE, seed=1)
    stamp = (out / "synthetic.json").stat().st_mtime_ns
    dcm = sorted((out / "dicom").glob("*.dcm"))[0]
    dcm_stamp = dcm.stat().st_mtime_ns
    assert generate_synthetic_dataset(out, n_patients=5, image_size=SIZE, seed=1) == manifest
    assert (out / "synthetic.json").stat().st_mtime_ns == stamp and dcm.stat().st_mtime_ns == dcm_stamp
    with pytest.raises(SyntheticDatasetError, match="overwrite"):
        generate_synthetic_dataset(out, n_patients=6, image_size=SIZE, seed=1)
    generate_synthetic_dataset(out, n_patients=3, image_size=SIZE, seed=1, overwrite=True)
    assert json.loads((out / "synthetic.json").read_text())["parameters"]["n_patients"] == 3
    assert len(list((out / "dicom").glob("*.dcm"))) == len(read_manifest(manifest))


def test_interrupted_generation_is_not_complete(tmp_path):
    out = tmp_path / "ds"
    generate_synthetic_dataset(out, n_patients=3, image_size=SIZE, seed=2)
    expected = (out / "manifest.csv").read_text()
    (out / "synthetic.json").unlink()  # as if killed before the last write
    (out / "png" / sorted(p.name for p in (out / "png").glob("*.png"))[0]).unlink()
    generate_synthetic_dataset(out, n_patients=3, image_size=SIZE, seed=2)
    assert (out / "synthetic.json").is_file() and (out / "manifest.csv").read_text() == expected
    assert len(list((out / "png").glob("*.png"))) == len(list((out / "dicom").glob("*.dcm")))


def test_no_single_global_statistic_separates_a_class():
    """Random exposure/gamma/window, habitus and noise: a model must look at the lesion.

    For each class, the ROC AUC of each global statistic (either direction) stays below 0.75."""
    from sklearn.metrics import roc_auc_score

    stats: dict[str, list[float]] = {k: [] for k in ("mean", "std", "p10", "p50", "p90")}
    labels: dict[str, list[int]] = {c: [] for c in CLASS_NAMES}
    for patient in range(300):
        study = synthesize_study(5, patient, 0, SIZE)
        image = study.rendered.astype(np.float64)
        p10, p50, p90 = np.percentile(image, (10, 50, 90))
        for key, value in zip(stats, (image.mean(), image.std(), p10, p50, p90)):
            stats[key].append(value)
        for c in CLASS_NAMES:
            labels[c].append(study.labels[c])
    for c in CLASS_NAMES:
        assert 20 <= sum(labels[c]) <= 280
        for key, values in stats.items():
            auc = roc_auc_score(labels[c], values)
            assert max(auc, 1.0 - auc) < 0.75, (c, key, auc)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_synthetic_dataset(tmp_path / "x", n_patients=0)
    with pytest.raises(ValueError):
        generate_synthetic_dataset(tmp_path / "x", n_patients=2, image_size=16)


def test_cli_summary_has_counts_not_text(tmp_path, capsys):
    from medclipin.cli import main

    assert main(["synth", "--out", str(tmp_path / "cli"), "--patients", "4", "--size", str(SIZE)]) == 0
    printed = capsys.readouterr().out
    manifest = read_manifest(tmp_path / "cli" / "manifest.csv")
    assert "train" in printed and "Nodule" in printed
    for rec in manifest.records:
        assert rec.findings not in printed and rec.impression not in printed
        assert rec.patient_id not in printed
    assert main(["synth", "--out", str(tmp_path / "cli"), "--patients", "5", "--size", str(SIZE)]) == 1


def test_prompt_file_matches_classes():
    import yaml
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "datasets" / "synthetic" / "prompts.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["name"] == "synthetic-cxr" and data["mode"] == "multilabel"
    assert tuple(data["classes"]) == CLASS_NAMES
    for entry in data["classes"].values():
        assert entry["positive"] and entry["negative"]
    assert all("{}" in t for t in data["templates"])


# --------------------------------------------------------------------- loose and repetitive pairs
@pytest.fixture(scope="module")
def clean_and_noisy(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair_noise")
    clean = generate_synthetic_dataset(out / "clean", n_patients=120, image_size=64, seed=9)
    loose = generate_synthetic_dataset(out / "loose", n_patients=120, image_size=64, seed=9, loose_fraction=0.3)
    repetitive = generate_synthetic_dataset(out / "rep", n_patients=120, image_size=64, seed=9, repetitive_fraction=0.5)
    return clean, loose, repetitive


def _by_id(manifest_path):
    return {r.record_id: r for r in read_manifest(manifest_path).records}


def test_loose_fraction_is_met_in_train_only(clean_and_noisy):
    clean_path, loose_path, _ = clean_and_noisy
    clean, loose = _by_id(clean_path), _by_id(loose_path)
    train = [r for r in loose.values() if r.split == "train"]
    kinds = [r.extra["pair_noise"] for r in train]
    assert kinds.count("swapped") + kinds.count("omitted") == round(0.3 * len(train))
    assert kinds.count("omitted") == round(0.3 * len(train)) // 2
    for record_id, record in loose.items():
        before = clean[record_id]
        assert (record.labels, record.boxes, record.split, record.image_path.rsplit("/", 1)[-1]) == \
            (before.labels, before.boxes, before.split, before.image_path.rsplit("/", 1)[-1])  # the truth stays
        kind = record.extra["pair_noise"]
        text, text_before = (record.findings, record.impression), (before.findings, before.impression)
        if record.split != "train" or kind == "":
            assert text == text_before and kind == ""
        elif kind == "swapped":
            others = {(r.findings, r.impression) for r in clean.values()
                      if r.split == "train" and r.patient_id != record.patient_id}
            assert text in others
        else:  # omitted: a shorter version of its own report, some finding no longer mentioned
            assert record.positive_labels() and text != text_before
            sentences = lambda text: set(re.split(r"(?<=\.) ", text)) - {""}  # noqa: E731
            assert sentences(record.findings) <= sentences(before.findings)


def test_omitted_reports_drop_whole_findings():
    from medclipin.data.synthetic.pair_noise import TrainReport, plan_pair_noise

    studies = [synthesize_study(2, p, 0, 64) for p in range(40)]
    train = [TrainReport(s.study_id, s.patient_id, p, 0, s.findings, s.impression, s.report,
                         [c for c in CLASS_NAMES if s.labels[c]]) for p, s in enumerate(studies)]
    plan = plan_pair_noise(2, train, loose_fraction=1.0)
    word = {"Pleural Effusion": "effusion", "Cardiomegaly": "cardiomegaly", "Nodule": "nodule",
            "Pneumothorax": "pneumothorax", "Consolidation": "consolidation"}
    checked = 0
    for report, study in zip(train, studies):
        noisy = plan[report.study_id]
        if noisy.pair_noise != "omitted":
            continue
        mentioned = {c for c in report.classes if word[c] in (noisy.findings + noisy.impression).lower()
                     .replace(f"no {word[c]}", "").replace(f"without {word[c]}", "")}
        assert mentioned < set(report.classes) or not report.classes, (report.classes, noisy)
        checked += 1
    assert checked == 20 and sum(n.pair_noise == "swapped" for n in plan.values()) == 20
    # the plan depends on the study ids, not on the order the studies come in
    assert plan_pair_noise(2, list(reversed(train)), loose_fraction=1.0) == plan


def test_repetitive_fraction_is_met_for_train_normals_only(clean_and_noisy):
    clean_path, _, repetitive_path = clean_and_noisy
    clean, rep = _by_id(clean_path), _by_id(repetitive_path)
    from medclipin.data.synthetic.pair_noise import NORMAL_TEMPLATES

    normal_train = [r for r in rep.values() if r.split == "train" and not r.positive_labels()]
    templated = [r for r in rep.values() if r.extra["report_template"]]
    assert len(templated) == round(0.5 * len(normal_train))
    assert all(r in normal_train for r in templated)
    assert {(r.findings, r.impression) for r in templated} <= set(NORMAL_TEMPLATES)
    assert len({r.extra["report_template"] for r in templated}) == 3
    for record_id, record in rep.items():
        if not record.extra["report_template"]:
            assert (record.findings, record.impression) == (clean[record_id].findings, clean[record_id].impression)


def test_default_output_unchanged_and_images_never_change(clean_and_noisy, tmp_path):
    import hashlib

    clean_path, loose_path, rep_path = clean_and_noisy
    explicit = generate_synthetic_dataset(tmp_path / "zeros", n_patients=120, image_size=64, seed=9,
                                          loose_fraction=0.0, repetitive_fraction=0)
    for name in ("manifest.csv", "manifest_png.csv", "labels.csv", "synthetic.json"):
        assert (explicit.parent / name).read_bytes() == (clean_path.parent / name).read_bytes(), name
    header = clean_path.read_text().splitlines()[0]
    assert "pair_noise" not in header and "report_template" not in header
    assert json.loads((clean_path.parent / "synthetic.json").read_text())["parameters"] == \
        {"n_patients": 120, "image_size": 64, "seed": 9}

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*/SYN*"))}

    assert digest(clean_path.parent) == digest(loose_path.parent) == digest(rep_path.parent)
    assert (loose_path.parent / "labels.csv").read_bytes() == (clean_path.parent / "labels.csv").read_bytes()
    meta = json.loads((loose_path.parent / "synthetic.json").read_text())
    assert meta["parameters"]["loose_fraction"] == 0.3 and sum(meta["counts"]["pair_noise"].values()) > 0
    # a folder made with other knobs is "other parameters"
    with pytest.raises(SyntheticDatasetError):
        generate_synthetic_dataset(loose_path.parent, n_patients=120, image_size=64, seed=9)
    with pytest.raises(ValueError, match="loose_fraction"):
        generate_synthetic_dataset(tmp_path / "bad", n_patients=2, loose_fraction=1.5)


def test_cli_pair_noise_options(tmp_path, capsys):
    from medclipin.cli import main

    assert main(["synth", "--out", str(tmp_path / "n"), "--patients", "12", "--size", "64",
                 "--loose-fraction", "0.5", "--repetitive-fraction", "1"]) == 0
    printed = capsys.readouterr().out
    assert "loose train pairs:" in printed and "fixed normal template" in printed
    records = read_manifest(tmp_path / "n" / "manifest.csv").records
    assert any(r.extra["pair_noise"] for r in records) and any(r.extra["report_template"] for r in records)
    for rec in records:
        assert rec.findings not in printed and rec.patient_id not in printed


def test_synth_never_replaces_a_users_files(tmp_path, capsys):
    """B5 (issue 25): `synth --out d` over a folder with the user's manifest.csv, labels.csv and a PNG replaced
    them all and exited 0. A folder that holds neither a synthetic dataset nor an interrupted generation is
    refused in one line naming what is there; an interrupted generation (its start marker) is redone."""
    from medclipin.cli import main

    folder = tmp_path / "d"
    (folder / "png").mkdir(parents=True)
    mine = {"manifest.csv": b"record_id,image_path\nmine,x.png\n", "labels.csv": b"study_id,x\n1,1\n",
            "png/SYN00001_01.png": b"the user's image"}
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    assert main(["synth", "--out", str(folder), "--patients", "2", "--size", "64"]) == 1
    err = capsys.readouterr().err
    assert "not empty and not a synthetic dataset (labels.csv, manifest.csv, png/)" in err
    assert {name: (folder / name).read_bytes() for name in mine} == mine
    assert sorted(p.name for p in folder.iterdir()) == ["labels.csv", "manifest.csv", "png"]
    # an interrupted generation is this generator's own: redone
    done = generate_synthetic_dataset(tmp_path / "e", n_patients=2, image_size=64)
    (tmp_path / "e" / "synthetic.json").unlink()
    assert (tmp_path / "e" / ".medclipin-synthetic").is_file()
    assert generate_synthetic_dataset(tmp_path / "e", n_patients=2, image_size=64) == done
    assert (tmp_path / "e" / "synthetic.json").is_file()
