"""The clinical-study flags end to end on the tiny trained model: zeroshot/probe/retrieve --test-manifest,
operating points, calibration and subgroups in zeroshot.json, report.md, and `medclipin compare`."""

import json
from pathlib import Path

import pytest

from medclipin.cli import main
from medclipin.data.manifest import read_manifest, write_manifest
from medclipin.eval.metrics import is_finite_json
from medclipin.eval.zeroshot import file_sha256

CLASSES = {"Pleural Effusion", "Cardiomegaly", "Nodule", "Pneumothorax", "Consolidation"}


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def external_manifest(eval_data, tmp_path_factory) -> Path:
    """Another "hospital": the synthetic set's train records, every split column saying train (ignored),
    with sex, age and source filled in."""
    records = read_manifest(eval_data).split("train")
    for i, record in enumerate(records):
        record.sex, record.age, record.source = ("M", "F")[i % 2], str(25 + 3 * i), "hospital B"
    return write_manifest(tmp_path_factory.mktemp("external") / "external.csv", records, relative_paths=False)


def test_zeroshot_on_an_external_test_set(eval_model, eval_data, eval_prompts, external_manifest, tmp_path, capsys):
    out = tmp_path / "zs"
    assert _cli("zeroshot", "--checkpoint", eval_model, "--manifest", eval_data, "--prompts", eval_prompts,
                "--test-manifest", external_manifest, "--out", out, "--bootstrap", 50,
                "--embedding-cache", tmp_path / "emb", "--gradcam-examples", 3) == 0
    payload = json.loads((out / "zeroshot.json").read_text())
    assert is_finite_json(payload)
    run = payload["run"]
    assert run["manifest_sha256"] == file_sha256(eval_data)
    assert run["test_manifest_sha256"] == file_sha256(external_manifest)
    assert run["n_records"] == len(read_manifest(external_manifest).records)  # every record, split ignored
    zs = payload["zeroshot"]
    assert set(zs["per_class"]) == CLASSES
    for name, entry in zs["per_class"].items():
        point = entry["operating_point"]
        assert {"threshold", "tp", "fp", "tn", "fn", "sensitivity", "specificity", "ppv", "npv", "f1", "mcc"} <= set(point)
        assert {f"{m}_ci" for m in ("sensitivity", "specificity", "ppv", "npv", "f1", "mcc")} <= set(point)
        if point["threshold"] is not None:
            assert point["tp"] + point["fp"] + point["tn"] + point["fn"] == entry["n"]
        assert {"ece", "brier", "method"} <= set(entry["calibration"])
        assert entry["calibration"]["method"] == "platt"
    assert zs["clinical"]["fit_split"] == "validate" and zs["clinical"]["fit_records"] > 0
    assert set(zs["subgroups"]) == {"view", "sex", "age", "source"}
    assert set(zs["subgroups"]["sex"]) == {"M", "F"}
    assert set(zs["subgroups"]["source"]["hospital B"]["per_class"]) == CLASSES
    report = (out / "report.md").read_text()
    assert "external test set" in report and "sensitivity" in report and "## Subgroups" in report
    assert file_sha256(external_manifest) in report
    for png in ("report_roc.png", "report_reliability.png", "report_subgroups.png"):
        assert (out / png).stat().st_size > 10_000 and f"]({png})" in report
    examples = sorted(p.name for p in out.glob("example_*.png"))
    assert examples and all(f"]({name})" in report for name in examples)
    printed = capsys.readouterr().out
    assert "SYN" not in printed and "SYN" not in report  # no record or patient ids


def test_zeroshot_threshold_rules_and_the_fixed_threshold_ignores_validate(eval_model, eval_data, eval_prompts,
                                                                           tmp_path):
    out = tmp_path / "fixed"
    assert _cli("zeroshot", "--checkpoint", eval_model, "--manifest", eval_data, "--prompts", eval_prompts,
                "--out", out, "--bootstrap", 0, "--embedding-cache", tmp_path / "emb", "--threshold", "fixed=0.5",
                "--calibration", "temperature", "--gradcam-examples", 0) == 0
    zs = json.loads((out / "zeroshot.json").read_text())["zeroshot"]
    assert all(e["operating_point"]["threshold"] == 0.5 for e in zs["per_class"].values())
    assert all(e["calibration"]["method"] == "temperature" for e in zs["per_class"].values())
    assert not list(out.glob("example_*.png"))


def test_zeroshot_bad_threshold_is_one_line(eval_model, eval_data, eval_prompts, tmp_path, capsys):
    assert _cli("zeroshot", "--checkpoint", eval_model, "--manifest", eval_data, "--prompts", eval_prompts,
                "--out", tmp_path / "o", "--threshold", "best") == 2
    err = capsys.readouterr().err
    assert "--threshold" in err and len(err.strip().splitlines()) == 1


def test_probe_and_retrieve_on_an_external_test_set(eval_model, eval_data, external_manifest, tmp_path):
    out = tmp_path / "probe"
    assert _cli("probe", "--checkpoint", eval_model, "--manifest", eval_data, "--test-manifest", external_manifest,
                "--out", out, "--fractions", 1.0, "--seeds", 0, "--embedding-cache", tmp_path / "emb",
                "--bootstrap", 50) == 0
    payload = json.loads((out / "probe.json").read_text())
    assert payload["run"]["test_manifest_sha256"] == file_sha256(external_manifest)
    assert payload["probe"]["n_test"] == len(read_manifest(external_manifest).records)
    assert "test manifest sha256" in (out / "probe.md").read_text()
    clinical = payload["probe"]["clinical"]
    assert clinical["fit_records"] == len(read_manifest(eval_data).split("validate"))
    trained = set(clinical["per_class"])
    assert trained and trained | set(clinical["classes_not_trained"]) == CLASSES
    for entry in clinical["per_class"].values():
        assert {"threshold", "sensitivity", "sensitivity_ci", "mcc"} <= set(entry["operating_point"])
        assert {"ece", "brier", "method"} <= set(entry["calibration"])
    assert "sex" in clinical["subgroups"] and "Operating points" in (out / "probe.md").read_text()
    out = tmp_path / "retrieval"
    assert _cli("retrieve", "--checkpoint", eval_model, "--manifest", eval_data, "--test-manifest", external_manifest,
                "--out", out, "--embedding-cache", tmp_path / "emb") == 0
    payload = json.loads((out / "retrieval.json").read_text())
    assert payload["retrieval"]["n"] == len(read_manifest(external_manifest).records)
    assert payload["run"]["test_manifest"] == str(external_manifest)


def test_compare_two_models(eval_model, eval_data, eval_prompts, tmp_path, capsys):
    out = tmp_path / "cmp"
    # the same model twice: every ΔAUC is 0 with p = 1, and the operating points agree
    assert _cli("compare", "--checkpoints", eval_model, eval_model, "--manifest", eval_data, "--prompts", eval_prompts,
                "--split", "all", "--out", out, "--bootstrap", 50, "--embedding-cache", tmp_path / "emb") == 0
    payload = json.loads((out / "compare.json").read_text())
    assert is_finite_json(payload) and set(payload["classes"]) == CLASSES
    for entry in payload["classes"].values():
        assert {"auc_a", "auc_b", "delta_auc", "delta_auc_ci", "p_value"} <= set(entry)
        assert entry["auc_a"] == entry["auc_b"] and entry["delta_auc"] == 0 and entry["p_value"] == 1.0
        if entry["threshold_a"] is not None:
            assert entry["threshold_a"] == entry["threshold_b"]
            assert entry["operating_point_delta"]["sensitivity"]["delta"] == 0
    assert any(e["threshold_a"] is not None for e in payload["classes"].values())
    text = (out / "compare.md").read_text()
    assert "DeLong" in text and "Δ AUC" in text and "Caution" in text  # --split all overlaps validate
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["zeroshot", "compare"])
def test_a_missing_test_manifest_fails_before_any_model_is_loaded(command, eval_data, eval_prompts, tmp_path, capsys):
    models = ["--checkpoint", tmp_path / "no_model"] if command == "zeroshot" else \
        ["--checkpoints", tmp_path / "no_a", tmp_path / "no_b"]
    assert _cli(command, *models, "--manifest", eval_data, "--prompts", eval_prompts,
                "--test-manifest", tmp_path / "absent.csv", "--out", tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert "absent.csv" in err and "not found" in err and len(err.splitlines()) == 1
