"""`prepare csv --label-map`: several spellings onto one class, unlisted values, counts; the shipped maps on
the real Figure1 table; an external table with other spellings lands on the same classes."""

import json
from pathlib import Path

import pytest
from test_prepare_common import write_csv, write_image

from medclipin.commands.prepare import main as prepare_main
from medclipin.data.manifest import read_manifest
from medclipin.data.prepare.common import PrepareError
from medclipin.data.prepare.label_map import load_label_map

REPO = Path(__file__).resolve().parents[1]
FIGURE1_MAP = REPO / "datasets" / "figure1" / "label_map.yaml"
VALUES = ["COVID-19", "  covid-19 ", "COVID-19, ARDS", "No Finding", "no   finding", "Pneumonia", "Tuberculosis", ""]


def _table(tmp_path, values, name="t") -> Path:
    root = tmp_path / name
    for i in range(len(values)):
        write_image(root / "img" / f"{i}.png", value=i * 5)
    write_csv(root / "table.csv", ["path", "finding", "sex", "age"],
              [[f"img/{i}.png", v, "MF"[i % 2], str(30 + 5 * i)] for i, v in enumerate(values)])
    return root


def _prepare(root, out, *extra) -> dict:
    summary = out.with_suffix(".json")
    assert prepare_main(["csv", "--root", str(root), "--out", str(out), "--image-column", "path",
                         "--label-column", "finding", "--summary", str(summary), *map(str, extra)]) == 0
    return json.loads(summary.read_text())


def _labels(out):
    return {r.record_id: r.labels for r in read_manifest(out).records}


def test_label_map_spellings_unlisted_negative_and_counts(tmp_path):
    out = tmp_path / "m.csv"
    summary = _prepare(_table(tmp_path, VALUES), out, "--label-map", FIGURE1_MAP, "--sex-column", "sex",
                       "--age-column", "age", "--source", "hospital A")
    manifest = read_manifest(out)
    assert manifest.label_names == ["COVID-19", "Pneumonia", "No finding"]  # the map's classes, in its order
    labels = _labels(out)
    assert labels["img/0.png"] == labels["img/1.png"] == labels["img/2.png"] == \
        {"COVID-19": 1.0, "Pneumonia": 0.0, "No finding": 0.0}
    assert labels["img/3.png"] == labels["img/4.png"] == {"COVID-19": 0.0, "Pneumonia": 0.0, "No finding": 1.0}
    assert labels["img/6.png"] == {"COVID-19": 0.0, "Pneumonia": 0.0, "No finding": 0.0}  # unlisted -> negative
    assert labels["img/7.png"] == {"COVID-19": None, "Pneumonia": None, "No finding": None}  # empty -> not stated
    assert summary["label_positives"] == {"COVID-19": 3, "Pneumonia": 1, "No finding": 2}
    assert summary["notes"] == {"label map: value listed for no class (-> negative for every class)": 1,
                                "label not stated": 1, "no text (kept)": 8}
    record = manifest.records[2]
    assert (record.sex, record.age, record.source) == ("M", "40", "hospital A")


def test_unlisted_values_not_stated_and_a_separator(tmp_path):
    out = tmp_path / "m.csv"
    summary = _prepare(_table(tmp_path, ["Tuberculosis", "pneumonia|TB", "covid-19 | No finding", ""]), out,
                       "--label-map", FIGURE1_MAP, "--unlisted", "not-stated", "--label-separator", "|")
    labels = _labels(out)
    assert labels["img/0.png"] == {"COVID-19": None, "Pneumonia": None, "No finding": None}
    assert labels["img/1.png"] == {"COVID-19": 0.0, "Pneumonia": 1.0, "No finding": 0.0}  # a listed value wins
    assert labels["img/2.png"] == {"COVID-19": 1.0, "Pneumonia": 0.0, "No finding": 1.0}
    assert summary["notes"]["label map: value listed for no class (-> not stated)"] == 2


def test_an_external_table_with_other_spellings_gets_the_same_classes(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    _prepare(_table(tmp_path, ["COVID-19", "No finding", "Pneumonia"], "a"), first, "--label-map", FIGURE1_MAP)
    _prepare(_table(tmp_path, ["covid-19", "NO FINDING", "normal", "pneumonia "], "b"), second,
             "--label-map", FIGURE1_MAP)
    assert read_manifest(first).label_names == read_manifest(second).label_names
    assert [r.positive_labels() for r in read_manifest(second).records] == \
        [["COVID-19"], ["No finding"], ["No finding"], ["Pneumonia"]]


def test_label_map_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("COVID-19: []\n")
    with pytest.raises(PrepareError, match="bad.yaml.*COVID-19"):
        load_label_map(bad)
    bad.write_text("[just, a, list]\n")
    with pytest.raises(PrepareError, match="bad.yaml"):
        load_label_map(bad)
    with pytest.raises(PrepareError, match="not found"):
        load_label_map(tmp_path / "missing.yaml")
    root = _table(tmp_path, ["COVID-19"])
    assert prepare_main(["csv", "--root", str(root), "--out", str(tmp_path / "m.csv"), "--image-column", "path",
                         "--label-columns", "finding", "--label-map", str(FIGURE1_MAP)]) == 2
    assert "--label-column" in capsys.readouterr().err


def test_shipped_maps_on_the_real_figure1_table(shared_data, tmp_path):
    out = tmp_path / "figure1.csv"
    assert prepare_main(["csv", "--root", str(shared_data / "cxr_figure1"), "--out", str(out),
                         "--image-template", "images/{patientid}", "--label-column", "finding",
                         "--label-map", str(FIGURE1_MAP), "--patient-column", "patientid",
                         "--patient-pattern", r"^(COVID-\d+)", "--view-column", "view", "--sex-column", "sex",
                         "--age-column", "age", "--source", "figure1", "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["records"] == 55
    assert summary["label_positives"] == {"COVID-19": 35, "Pneumonia": 2, "No finding": 3}
    assert summary["notes"]["label not stated"] == 15
    records = read_manifest(out).records
    assert sum(r.sex in ("M", "F") for r in records) == 22 and {r.source for r in records} == {"figure1"}
    for name in ("chexpert", "figure1"):
        assert load_label_map(REPO / "datasets" / name / "label_map.yaml").classes
