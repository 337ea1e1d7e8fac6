"""CheXpert adapter and the deterministic 5x200 selection, on a miniature CheXpert-v1.0-small tree."""

import json
import random

from test_prepare_common import write_csv, write_image

from medclipin.commands.prepare import main as prepare_main
from medclipin.data.manifest import read_manifest
from medclipin.data.prepare.chexpert import COMPETITION_FIVE, LABELS, select_five_by_two_hundred
from medclipin.data.validate import validate_manifest

HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *LABELS]


def _row(path, frontal=True, **labels):
    values = {name: "" for name in LABELS}
    values.update({k.replace("_", " "): v for k, v in labels.items()})
    return [path, "Female", 60, "Frontal" if frontal else "Lateral", "AP" if frontal else "", *values.values()]


def build_tree(tmp_path, per_class=3):
    root = tmp_path / "CheXpert-v1.0-small"
    train, n = [], 0
    for cls in COMPETITION_FIVE:  # per class: per_class + 2 eligible images
        for _ in range(per_class + 2):
            n += 1
            train.append(_row(f"CheXpert-v1.0-small/train/patient{n:05d}/study1/view1_frontal.jpg",
                              **{cls.replace(" ", "_"): "1.0", "No_Finding": ""}))
    ineligible = [
        _row("CheXpert-v1.0-small/train/patient09001/study1/view1_frontal.jpg", Atelectasis="1.0", Edema="1.0"),
        _row("CheXpert-v1.0-small/train/patient09002/study1/view1_frontal.jpg", Atelectasis="1.0", Edema="-1.0"),
        _row("CheXpert-v1.0-small/train/patient09003/study1/view1_frontal.jpg", Atelectasis="-1.0"),
        _row("CheXpert-v1.0-small/train/patient09003/study1/view2_lateral.jpg", frontal=False, Cardiomegaly="1.0"),
    ]
    train += ineligible
    valid = [_row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", Edema="0.0", Cardiomegaly="1.0")]
    for i, row in enumerate(train + valid):
        write_image(tmp_path / row[0], value=i)
    train.append(_row("CheXpert-v1.0-small/train/patient09999/study1/view1_frontal.jpg", Edema="1.0"))  # no file
    write_csv(root / "train.csv", HEADER, train)
    write_csv(root / "valid.csv", HEADER, valid)
    return root, train


def test_chexpert_full_manifest(tmp_path):
    root, _ = build_tree(tmp_path)
    out = tmp_path / "chexpert.csv"
    assert prepare_main(["chexpert", "--root", str(root), "--out", str(out), "--uncertain", "ones",
                         "--summary", str(tmp_path / "s.json")]) == 0
    manifest = read_manifest(out)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["skipped"] == {"missing image": 1}
    assert summary["records_per_split"] == {"train": 29, "validate": 1, "test": 0}
    by_id = {r.record_id: r for r in manifest.records}
    assert by_id["CheXpert-v1.0-small/train/patient09003/study1/view1_frontal.jpg"].labels["Atelectasis"] == 1.0
    assert by_id["CheXpert-v1.0-small/train/patient09003/study1/view2_lateral.jpg"].view == "LATERAL"
    assert by_id["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"].split == "validate"
    assert {(r.sex, r.age, r.source) for r in manifest.records} == {("Female", "60", "CheXpert")}  # subgroups
    assert validate_manifest(out).ok
    assert prepare_main(["chexpert", "--root", str(root), "--out", str(out), "--frontal-only",
                         "--uncertain", "ignore"]) == 0
    frontal = read_manifest(out)
    assert len(frontal) == 29 and all(r.view != "LATERAL" for r in frontal.records)
    assert {r.record_id: r for r in frontal.records}[
        "CheXpert-v1.0-small/train/patient09003/study1/view1_frontal.jpg"].labels["Atelectasis"] is None


def test_five_by_two_hundred_rule_and_determinism(tmp_path):
    root, train_rows = build_tree(tmp_path, per_class=3)
    out = tmp_path / "5x3.csv"
    assert prepare_main(["chexpert", "--root", str(root), "--out", str(out), "--five-by-two-hundred",
                         "--per-class", "3", "--seed", "7"]) == 0
    manifest = read_manifest(out)
    assert manifest.label_names == COMPETITION_FIVE and len(manifest) == 15
    for name in COMPETITION_FIVE:
        chosen = [r for r in manifest.records if r.labels[name] == 1.0]
        assert len(chosen) == 3
        assert all(sum(v == 1.0 for v in r.labels.values()) == 1 for r in chosen)
    assert not any("patient09" in r.record_id for r in manifest.records)  # ineligible rows never chosen
    assert {r.split for r in manifest.records} == {"test"}
    # row order does not change the selection; the seed does
    rows = [dict(zip(HEADER, map(str, r))) for r in train_rows]
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    pick = lambda rs, seed: {k: [r["Path"] for r in v] for k, v in select_five_by_two_hundred(rs, 3, seed).items()}
    assert pick(rows, 7) == pick(shuffled, 7)
    assert {r.record_id for r in manifest.records} == {p for v in pick(rows, 7).values() for p in v}
    assert pick(rows, 7) != pick(rows, 8)
    # excluding the 5x200 patients from the training manifest
    full = tmp_path / "train.csv"
    assert prepare_main(["chexpert", "--root", str(root), "--out", str(full), "--exclude-five-by-two-hundred",
                         "--per-class", "3", "--seed", "7"]) == 0
    assert not {r.patient_id for r in read_manifest(full).records} & {r.patient_id for r in manifest.records}


def test_five_by_two_hundred_too_few(tmp_path, capsys):
    root, _ = build_tree(tmp_path, per_class=1)
    assert prepare_main(["chexpert", "--root", str(root), "--out", str(tmp_path / "x.csv"),
                         "--five-by-two-hundred"]) == 2
    assert "need 200" in capsys.readouterr().err
