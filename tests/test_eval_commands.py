"""The evaluation commands end to end on a tiny trained model: zeroshot, retrieve (metrics + queries),
probe, gradcam (single + batch), the shared embedding cache, the demo's evaluate() keys, and
``medclipin.load`` on a model, run or checkpoint folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medclipin.cli import main
from medclipin.data.manifest import read_manifest
from medclipin.eval.metrics import is_finite_json


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


def test_zeroshot_command_writes_json_markdown_and_roc(eval_model, eval_data, eval_prompts, tmp_path, capsys):
    out = tmp_path / "zs"
    assert _cli("zeroshot", "--checkpoint", eval_model, "--manifest", eval_data, "--prompts", eval_prompts,
                "--out", out, "--bootstrap", 50, "--embedding-cache", tmp_path / "emb") == 0
    payload = json.loads((out / "zeroshot.json").read_text())
    zs = payload["zeroshot"]
    assert set(zs["per_class_auc"]) == {"Pleural Effusion", "Cardiomegaly", "Nodule", "Pneumothorax", "Consolidation"}
    assert is_finite_json(payload)
    assert payload["prompts"]["sha256"] and len(payload["prompts"]["sha256"]) == 64
    assert payload["run"]["split"] == "test" and payload["run"]["n_records"] == len(read_manifest(eval_data).split("test"))
    for entry in zs["per_class"].values():  # the small test split has constant columns: None + note, no crash
        assert (entry["auc"] is None) == ("note" in entry)
    report = (out / "zeroshot.md").read_text()
    assert payload["prompts"]["sha256"] in report and "Threshold rule" in report and "| class |" in report
    assert (out / "zeroshot_roc.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "macro AUC" in printed and "SYN" not in printed  # no identifiers printed


def test_zeroshot_command_rejects_a_prompt_class_missing_from_the_manifest(eval_model, eval_data, tmp_path, capsys):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("mode: multilabel\nclasses:\n  Edema:\n    positive: [edema]\n    negative: [no edema]\n")
    assert _cli("zeroshot", "--checkpoint", eval_model, "--manifest", eval_data, "--prompts", prompts,
                "--out", tmp_path / "o", "--embedding-cache", "none") == 2
    assert "Edema" in capsys.readouterr().err


def test_second_evaluation_of_a_checkpoint_does_not_reencode_images(eval_model, eval_data, eval_prompts, tmp_path,
                                                                   monkeypatch):
    from medclipin.api import load
    from medclipin.eval.embeddings import EmbeddingStore
    from medclipin.eval.evaluate import retrieval, zero_shot
    from medclipin.eval.zeroshot import load_prompts

    records = read_manifest(eval_data).split("test")
    prompts = load_prompts(eval_prompts)
    calls = {"image": 0}

    def counting_store():
        model, processor = load(eval_model)
        original = model.encode_image

        def encode_image(image, *args, **kwargs):
            calls["image"] += len(image)
            return original(image, *args, **kwargs)

        monkeypatch.setattr(model, "encode_image", encode_image)
        return EmbeddingStore(model, processor, cache_dir=tmp_path / "cache")

    first = zero_shot(counting_store(), records, prompts, bootstrap=0)
    assert calls["image"] == len(records)
    written = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert written and all(p.suffix == ".safetensors" for p in written)  # no temporary files left behind
    store = counting_store()  # a fresh process-equivalent: new model object, same weights, same cache folder
    second = zero_shot(store, records, prompts, bootstrap=0)
    retrieval(store, records)
    assert calls["image"] == len(records)  # nothing re-encoded
    assert second["mean_auc"] == first["mean_auc"]


def test_embedding_cache_defaults_next_to_the_checkpoint(eval_model, eval_data, tmp_path):
    from medclipin.eval.embeddings import default_embedding_cache

    assert default_embedding_cache(eval_model, tmp_path) == eval_model.resolve().parent / "embeddings"


def test_retrieve_metrics_and_queries(eval_model, eval_data, tmp_path, capsys):
    out = tmp_path / "rt"
    cache = tmp_path / "emb"
    assert _cli("retrieve", "--checkpoint", eval_model, "--manifest", eval_data, "--out", out,
                "--embedding-cache", cache) == 0
    payload = json.loads((out / "retrieval.json").read_text())
    for direction in ("image_to_text", "text_to_image"):
        assert {"R@1", "R@5", "R@10", "mean_rank", "median_rank"} <= set(payload["retrieval"][direction])
    assert "Ground truth" in (out / "retrieval.md").read_text()
    capsys.readouterr()

    manifest = read_manifest(eval_data)
    assert _cli("retrieve", "--checkpoint", eval_model, "--manifest", eval_data, "--embedding-cache", cache,
                "--query-text", "small right pleural effusion", "--top-k", 3, "--out", tmp_path / "q") == 0
    printed = capsys.readouterr().out
    ids = {r.record_id for r in manifest.records}
    listed = [line.split() for line in printed.splitlines() if line.strip()[:2].rstrip(".").isdigit()]
    # hits are named by their manifest row (1-based); record ids often embed patient identifiers
    assert len(listed) == 3 and all(parts[1] == "row" for parts in listed)
    rows = [int(parts[2]) for parts in listed]
    assert all(1 <= row <= len(manifest.records) for row in rows) and len(set(rows)) == 3
    assert not ids & set(printed.split())
    hits = json.loads((tmp_path / "q" / "query.json").read_text())["hits"]
    assert [h["row"] for h in hits] == rows and hits[0]["score"] >= hits[-1]["score"]
    assert not [h for h in hits if "record_id" in h]
    # --show-ids names the same rows by their record ids (printed and saved)
    assert _cli("retrieve", "--checkpoint", eval_model, "--manifest", eval_data, "--embedding-cache", cache,
                "--query-text", "small right pleural effusion", "--top-k", 3, "--show-ids",
                "--out", tmp_path / "q2") == 0
    listed = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.strip()[:2].rstrip(".").isdigit()]
    assert listed == [manifest.records[row - 1].record_id for row in rows] and set(listed) <= ids
    hits = json.loads((tmp_path / "q2" / "query.json").read_text())["hits"]
    assert [h["record_id"] for h in hits] == listed

    record = manifest.records[0]
    assert _cli("retrieve", "--checkpoint", eval_model, "--manifest", eval_data, "--embedding-cache", cache,
                "--query-image", record.image_path, "--top-k", 2) == 0
    printed = capsys.readouterr().out
    assert record.findings[:20] not in printed  # report text only on request
    assert _cli("retrieve", "--checkpoint", eval_model, "--manifest", eval_data, "--embedding-cache", cache,
                "--query-image", record.image_path, "--top-k", 40, "--show-text") == 0
    printed = capsys.readouterr().out
    assert record.impression.split(".")[0] in printed  # every distinct report listed, with text


def test_probe_command(eval_model, eval_data, tmp_path):
    out = tmp_path / "probe"
    assert _cli("probe", "--checkpoint", eval_model, "--manifest", eval_data, "--out", out, "--fractions", 0.1, 1.0,
                "--seeds", 0, 1, "--embedding-cache", tmp_path / "emb") == 0
    payload = json.loads((out / "probe.json").read_text())
    assert set(payload["probe"]["fractions"]) == {"0.1", "1"} and payload["run"]["features"] == "encoder"
    assert is_finite_json(payload) and "± " in (out / "probe.md").read_text()


def test_gradcam_single_image(eval_model, eval_data, tmp_path):
    record = next(r for r in read_manifest(eval_data).records if r.boxes)
    box = record.boxes[0].box
    out = tmp_path / "cam"
    assert _cli("gradcam", "--checkpoint", eval_model, "--image", record.image_path, "--text",
                "large right pleural effusion.", "--box", *box, "--out", out, "--embedding-cache", "none") == 0
    summary = json.loads((out / "gradcam.json").read_text())
    assert -1 <= summary["similarity"] <= 1 and len(summary["localisation"]) == 1
    assert 0 <= summary["localisation"][0]["iou"] <= 1
    arrays = np.load(out / "gradcam.npz")
    assert arrays["cam"].shape == (64, 64) and arrays["cam"].max() <= 1 + 1e-6
    assert arrays["cam_original"].shape == (64, 64)  # synthetic originals are 64 px here
    assert list(arrays["words"])[:2] == ["large", "right"] and arrays["words"][-1] == "effusion."
    assert (out / "gradcam.png").stat().st_size > 10_000


def test_gradcam_batch_mode(eval_model, eval_data, eval_prompts, tmp_path):
    out = tmp_path / "camb"
    assert _cli("gradcam", "--checkpoint", eval_model, "--manifest", eval_data, "--prompts", eval_prompts,
                "--limit", 4, "--figures", 2, "--out", out, "--embedding-cache", "none") == 0
    summary = json.loads((out / "gradcam.json").read_text())
    loc = summary["localisation"]
    assert loc["pairs"] == 4 and 0 <= loc["pointing_game"] <= 1 and len(loc["per_pair"]) == 4
    assert len(summary["figures"]) == 2 and all((out / f.split("/")[-1]).is_file() for f in summary["figures"])
    assert "What the colours mean" in (out / "gradcam.md").read_text()


def test_gradcam_needs_a_mode(eval_model, tmp_path, capsys):
    assert _cli("gradcam", "--checkpoint", eval_model, "--out", tmp_path, "--text", "x") == 2
    assert "both --image and --text" in capsys.readouterr().err


def test_evaluate_keeps_the_demo_keys(eval_model, eval_data, eval_prompts, tmp_path):
    from medclipin.api import load
    from medclipin.eval.embeddings import EmbeddingStore
    from medclipin.eval.evaluate import evaluate
    from medclipin.eval.zeroshot import load_prompts

    model, processor = load(eval_model)
    records = read_manifest(eval_data).split("test")
    result = evaluate(EmbeddingStore(model, processor), records, load_prompts(eval_prompts), tmp_path / "g",
                      gradcam_figures=1, bootstrap=20)
    assert "mean_auc" in result["zeroshot"] and "per_class_auc" in result["zeroshot"]
    assert {"R@1", "R@5", "R@10"} <= set(result["retrieval"]["image_to_text"])
    assert {"R@1", "R@5", "R@10"} <= set(result["retrieval"]["text_to_image"])
    assert "pointing_game" in result["gradcam"] and len(result["gradcam"]["figures"]) == 1
    json.dumps(result, allow_nan=False)


def test_store_encodes_in_eval_mode_and_restores_the_mode(eval_model, eval_data):
    from medclipin.api import load
    from medclipin.eval.embeddings import EmbeddingStore

    model, processor = load(eval_model)
    assert not model.training  # loaded for inference
    model.train()
    texts = ["small right pleural effusion."] * 3
    first = EmbeddingStore(model, processor).texts(texts)
    second = EmbeddingStore(model, processor).texts(texts)
    assert model.training  # given back as it came
    assert torch.equal(first, second) and torch.allclose(first[0], first[1])  # no dropout noise


# ------------------------------------------------------------------ medclipin.load
def test_load_opens_a_model_a_run_and_a_checkpoint_folder(eval_model, eval_data):
    """``medclipin.load`` takes RUN/model, RUN (its model/) or RUN/checkpoints/step_N (its model/): the same
    weights and processor, ready for inference; anything else is a one-line ModelFolderError."""
    import medclipin
    from medclipin.api import resolve_model_dir
    from medclipin.models.model import ModelFolderError
    from medclipin.train import checkpoint as ckpt

    run = eval_model.parent
    checkpoint = ckpt.latest_checkpoint(run)
    assert checkpoint is not None and checkpoint.name == "step_00000030"
    assert resolve_model_dir(eval_model) == eval_model and resolve_model_dir(run) == run / "model"
    assert resolve_model_dir(checkpoint) == checkpoint / "model"
    model, processor = medclipin.load(eval_model)
    assert type(model).__name__ == "MedClipModel" and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = model.state_dict()
    record = read_manifest(eval_data).split("test")[0]
    with torch.no_grad():
        embedding = model.encode_image(processor.images([record.image_path]))
    # the final checkpoint and RUN/model are written from the same weights (before the final validation)
    for path in (run, checkpoint):
        other, other_processor = medclipin.load(path)
        assert other.state_dict().keys() == reference.keys()
        for name, tensor in other.state_dict().items():
            assert torch.equal(tensor, reference[name]), (path, name)
        assert other_processor.to_dict() == processor.to_dict()
        with torch.no_grad():
            assert torch.equal(other.encode_image(other_processor.images([record.image_path])), embedding)
    # errors name the path
    with pytest.raises(ModelFolderError, match="no such file or folder"):
        medclipin.load(run / "nothing")
    with pytest.raises(ModelFolderError, match="is a file"):
        medclipin.load(eval_model / "config.json")
    with pytest.raises(ModelFolderError, match="no medclipin model here"):
        medclipin.load(run / "checkpoints")


def test_load_of_an_unfinished_run_says_so(tmp_path, eval_model):
    import shutil

    import medclipin
    from medclipin.models.model import ModelFolderError

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(eval_model, run / "checkpoints" / "step_00000002" / "model")
    with pytest.raises(ModelFolderError, match="did not finish"):
        medclipin.load(run)
    assert medclipin.load(run / "checkpoints" / "step_00000002")[0] is not None


def test_public_api_on_plain_files_and_texts(eval_model, eval_data, eval_prompts):
    """zero_shot / retrieve / embed on file paths and strings, consistent with the evaluation store."""
    import medclipin
    from medclipin.eval.embeddings import EmbeddingStore

    model, processor = medclipin.load(eval_model)
    records = read_manifest(eval_data).split("test")[:4]
    paths = [r.image_path for r in records]
    store = EmbeddingStore(model, processor)
    torch.testing.assert_close(medclipin.embed_images(model, processor, paths), store.images(records))
    torch.testing.assert_close(store.images(paths), store.images(records))  # bare paths work as records
    texts = ["small right pleural effusion.", "normal heart size."]
    torch.testing.assert_close(medclipin.embed_texts(model, processor, texts), store.texts(texts))
    result = medclipin.zero_shot(model, processor, paths, eval_prompts)
    assert result.scores.shape == (4, len(result.class_names)) and np.isfinite(result.scores).all()
    hits = medclipin.retrieve(model, processor, "small right pleural effusion", paths, k=2)
    assert len(hits) == 2 and hits[0].score >= hits[1].score and hits[0].item in paths
    hits = medclipin.retrieve(model, processor, paths[0], texts, k=1)
    assert hits[0].item in texts


def test_unreadable_images_are_nan_rows_named_and_left_out_of_the_metrics(eval_model, eval_data, eval_prompts,
                                                                         tmp_path):
    import dataclasses

    import medclipin
    from medclipin.eval.embeddings import EmbeddingStore, keep_readable, readable_rows
    from medclipin.eval.evaluate import retrieval, zero_shot
    from medclipin.eval.zeroshot import load_prompts

    model, processor = medclipin.load(eval_model)
    records = read_manifest(eval_data).split("test")
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"\x00 not an image \x00" * 20)
    broken = dataclasses.replace(records[1], image_path=str(bad))
    listed = [records[0], broken, *records[2:]]
    store = EmbeddingStore(model, processor, cache_dir=tmp_path / "cache")
    images = store.images(listed)
    assert torch.isnan(images[1]).all() and not torch.isnan(images[[0, 2]]).any()
    assert readable_rows(images).tolist() == [True, False] + [True] * (len(listed) - 2)
    assert list(store.rejected) == [str(bad)] and store.rejected[str(bad)]
    kept, kept_images = keep_readable(listed, images)
    assert [r.record_id for r in kept] == [r.record_id for r in listed if r is not broken]
    assert torch.equal(kept_images, images[readable_rows(images)])
    # a result with unreadable rows is not cached on disk (the file may be fixed)
    assert not list((tmp_path / "cache").rglob("image-*.safetensors"))
    result = retrieval(store, listed)
    assert result["unreadable_images"] == [{"image_path": str(bad), "reason": store.rejected[str(bad)]}]
    clean = retrieval(EmbeddingStore(model, processor), [r for r in listed if r is not broken])
    assert result["image_to_text"] == clean["image_to_text"] and clean["unreadable_images"] == []
    scores = zero_shot(store, listed, load_prompts(eval_prompts), bootstrap=0)
    assert len(scores["scores"]) == len(listed) - 1 and scores["unreadable_images"][0]["image_path"] == str(bad)


def test_gradcam_figure_names_from_manifest_labels_stay_in_the_output_folder(eval_model, eval_data, tmp_path):
    """A class name from a (shared, untrusted) manifest and prompt file never becomes a path: no traversal."""
    import dataclasses

    import yaml

    from medclipin.data.manifest import Box, write_manifest

    evil = "x/../../../../escaped Pleural Effusion"
    manifest = read_manifest(eval_data)
    records = [dataclasses.replace(
        r, labels={(evil if k == "Pleural Effusion" else k): v for k, v in r.labels.items()},
        boxes=[Box(evil if b.label == "Pleural Effusion" else b.label, b.box) for b in r.boxes]) for r in manifest.records]
    assert any(b.label == evil for r in records for b in r.boxes if r.split == "test")
    path = write_manifest(tmp_path / "m.csv", records, [evil if n == "Pleural Effusion" else n for n in manifest.label_names],
                          relative_paths=False)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"name": "evil", "mode": "multilabel", "templates": ["{}."],
                                       "classes": {evil: {"positive": ["pleural effusion"], "negative": ["no pleural effusion"]}}}))
    out = tmp_path / "a" / "b" / "out"
    assert _cli("gradcam", "--checkpoint", eval_model, "--manifest", path, "--prompts", prompts, "--figures", 2,
                "--out", out, "--embedding-cache", "none") == 0
    figures = json.loads((out / "gradcam.json").read_text())["figures"]
    assert figures and all(Path(f).resolve().parent == out.resolve() for f in figures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m.csv", "prompts.yaml"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["out"]


def test_the_zeroshot_report_says_how_many_records_were_left_out(tmp_path):
    """W3 (issue 25): zeroshot.md said "records evaluated: 20" while 14 were scored, and never mentioned the 6
    unreadable ones (only the JSON did)."""
    from medclipin.eval.report import zeroshot_markdown

    result = {"mean_auc": 0.5, "per_class": {}, "unreadable_images": [{"image_path": f"/x/{i}.png", "reason": "empty"}
                                                            for i in range(6)]}
    text = zeroshot_markdown(result, {"n_records": 20}, {"name": "p", "mode": "multilabel", "templates": ["{}"]})
    assert "records evaluated: 20" in text and "6 of the 20 records were left out" in text
    assert "/x/0.png" not in text
