"""The CLIPin study runner: one command, cached runs, a resumable plan, and the paired comparisons.

docs/comparison.md quotes what this command writes; these tests hold the command to what that page says:
a second call reuses every finished run (nothing retrains), ``--report-only`` rebuilds the tables and plots
from what ran, and the paired differences are the per-seed differences of the right runs.
"""

import json
import math

import pytest

from medclipin.experiments import study


def _fake(setting: str, variant: str, seed: int, auc: float) -> dict:
    return {"grid": "main", "setting": setting, "variant": variant, "seed": seed, "label": variant,
            "zeroshot": {"mean_auc": auc}, "retrieval": {"i2t_R@10": 0.1, "t2i_R@10": 0.1},
            "probe": {"0.01": 0.6, "0.1": 0.7, "1": 0.8}, "training": {}, "train_s": 1.0}


def test_paired_differences_are_per_seed_differences_with_a_t_interval():
    runs = []
    for seed, (a, b) in enumerate([(0.80, 0.70), (0.72, 0.70), (0.76, 0.70)]):
        runs += [_fake("clean", "clip_clipin", seed, a), _fake("clean", "onlyclip", seed, b)]
        # on loose pairs CLIP + CLIPin loses 0.10 and ONLYCLIP 0.20: robustness +0.10 on every seed
        runs += [_fake("loose40", "clip_clipin", seed, a - 0.10), _fake("loose40", "onlyclip", seed, b - 0.20)]
    rows = study.paired_differences(runs)
    clean = next(r for r in rows if r["kind"] == "difference" and r["setting"] == "clean"
                 and r["method"] == "clip_clipin" and r["baseline"] == "onlyclip" and r["metric"] == "auc")
    assert clean["values"] == pytest.approx([0.10, 0.02, 0.06])
    assert clean["mean"] == pytest.approx(0.06)
    # Student t with 2 degrees of freedom: 4.303 × sd / sqrt(3), sd of (0.10, 0.02, 0.06) = 0.04
    assert clean["half"] == pytest.approx(4.3027 * 0.04 / math.sqrt(3), rel=1e-3)
    robust = next(r for r in rows if r["kind"] == "robustness" and r["setting"] == "loose40"
                  and r["baseline"] == "onlyclip" and r["metric"] == "auc")
    assert robust["mean"] == pytest.approx(0.10) and robust["values"] == pytest.approx([0.10] * 3)
    # comparisons whose runs are missing (no CLIP, SigLIP or xCLIP here) are left out, not zero
    assert {r["baseline"] for r in rows} == {"onlyclip"}
    table = study.differences_markdown(rows)
    assert "+0.060 ± 0.099" in table and "| CLIP + CLIPin − ONLYCLIP" in table


def test_the_final_contrastive_loss_is_the_mean_of_the_last_fifth_of_training():
    curve = [{"step": float(s), "clip": 3.0 - s / 100} for s in range(10, 130, 10)]  # 2.9 … 1.8
    # steps 100, 110 and 120 are past 0.8 × 120 = 96
    assert study._final_contrastive_loss({"curve": curve}) == pytest.approx((2.0 + 1.9 + 1.8) / 3)
    siglip = [{"step": 10.0, "siglip": 7.0}, {"step": 20.0, "siglip": 5.0}]
    assert study._final_contrastive_loss({"curve": siglip}) == pytest.approx(5.0)
    # a result written before the curve was recorded: its last logged batch
    assert study._final_contrastive_loss({"last": {"clip": 2.5}}) == 2.5


def test_the_report_covers_every_finished_run_in_the_folder(tmp_path):
    runs = [("clip", 0, 0.70), ("clip", 1, 0.72), ("clip", 4, 0.74), ("onlyclip", 0, 0.71)]  # seed 4: --seeds 4
    for variant, seed, auc in runs:
        run = tmp_path / "runs" / "main" / "clean" / variant / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps(_fake("clean", variant, seed, auc)))
    # a narrower command (here one variant, default seeds 0-2) still reports the whole folder
    assert study.main(["--out", str(tmp_path), "--variants", "clip", "--report-only"]) == 0
    table = json.loads((tmp_path / "results.json").read_text())["table"]
    assert table["main/clean/clip"]["seeds"] == [0, 1, 4] and table["main/clean/clip"]["auc"]["mean"] == pytest.approx(0.72)
    assert table["main/clean/onlyclip"]["seeds"] == [0]


@pytest.mark.slow
def test_the_study_command_caches_its_runs_and_rebuilds_the_report(tmp_path, monkeypatch):
    args = ["--out", str(tmp_path), "--grid", "main", "--settings", "clean", "--variants", "clip", "onlyclip",
            "--seeds", "0", "--patients", "40", "--steps", "2", "--image-size", "64", "--threads", "1"]
    assert study.main(args) == 0
    for variant in ("clip", "onlyclip"):
        result = json.loads((tmp_path / "runs" / "main" / "clean" / variant / "seed0" / "result.json").read_text())
        assert 0.0 <= result["zeroshot"]["mean_auc"] <= 1.0 and set(result["probe"]) == {"0.01", "0.1", "1"}
        assert result["training"]["gradient_norms"], "the per-term gradient monitor reached the result"
        # a finished run keeps its model and logs, not its checkpoints (the study never resumes from them)
        run = tmp_path / "runs" / "main" / "clean" / variant / "seed0" / "run"
        assert (run / "model" / "model.safetensors").is_file() and (run / "metrics.csv").is_file()
        assert not (run / "checkpoints").exists()
    report = (tmp_path / "study.md").read_text()
    assert "| clean | CLIP | 1 |" in report and "ONLYCLIP" in report
    assert (tmp_path / "auc_vs_loose.png").stat().st_size > 0

    # a second call, with another thread count (not part of a run's identity), trains nothing
    def no_training(*_args, **_kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("medclipin.train.trainer.pretrain", no_training)
    assert study.main(args[:-1] + ["2"]) == 0
    (tmp_path / "study.md").unlink()
    assert study.main(["--out", str(tmp_path), "--grid", "all", "--report-only"]) == 0
    assert (tmp_path / "study.md").read_text() == report

    # a run asked for with other settings is not served from the cache
    monkeypatch.setattr("medclipin.train.trainer.pretrain", no_training)
    with pytest.raises(AssertionError, match="trained again"):
        study.main(args[:-6] + ["--steps", "3", "--image-size", "64", "--threads", "1"])


def test_the_continued_grid_pairs_clipin_with_onlyclip_on_the_same_trained_clip(tmp_path, monkeypatch):
    """CLIPin in the paper's setting: both runs of a seed continue the same base (an open_clip folder made from
    the main grid's CLIP), and the report pairs them seed by seed."""
    runs = []
    for seed, (a, b) in enumerate([(0.81, 0.80), (0.79, 0.80), (0.83, 0.80)]):
        for variant, auc in (("cont_clip_clipin", a), ("cont_onlyclip", b)):
            runs.append({**_fake("loose40", variant, seed, auc), "grid": "continued"})
    rows = [r for r in study.paired_differences(runs) if r["kind"] == "continued" and r["metric"] == "auc"]
    assert len(rows) == 1 and rows[0]["values"] == pytest.approx([0.01, -0.01, 0.03])
    assert "continuing a trained CLIP" in study.differences_markdown(study.paired_differences(runs))
    assert "## continued" in study.markdown(study.aggregate(runs), "budget")
    # each continued run trains on model.base = the exported base, which is made once
    made = []
    monkeypatch.setattr(study, "run_one", lambda *a, **k: made.append(a) or {})
    monkeypatch.setattr(study, "dataset", lambda out, setting, patients: tmp_path / "manifest.csv")
    base = tmp_path / "base" / "open_clip"
    base.mkdir(parents=True)
    (base / "open_clip_config.json").write_text("{}")
    assert study.trained_base(tmp_path, study.Budget()) == base and not made
