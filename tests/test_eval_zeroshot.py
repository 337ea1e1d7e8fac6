"""Prompt files load generically; scores follow the documented multi-label / multi-class rules."""

import hashlib
from pathlib import Path

import pytest
import torch

from medclipin.eval.zeroshot import PromptFileError, load_prompts, zero_shot_scores

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


@pytest.mark.parametrize("path", sorted(DATASETS.glob("**/prompts*.yaml")), ids=lambda p: str(p.relative_to(DATASETS)))
def test_every_pinned_prompt_file_loads(path):
    prompts = load_prompts(path)
    assert prompts.class_names and prompts.mode in ("multilabel", "multiclass")
    assert prompts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    summary = prompts.summary()
    for name in prompts.class_names:
        assert summary["prompts_per_class"][name]["positive"] == len(prompts.templates) * len(prompts.positive[name])
        if prompts.mode == "multilabel":
            assert summary["prompts_per_class"][name]["negative"] > 0
    assert "{}" not in prompts.first_prompt(prompts.class_names[0])


def test_malformed_prompt_files_name_the_problem(tmp_path):
    cases = {
        "mode: sometimes\nclasses: {A: {positive: [a], negative: [b]}}\n": "'mode'",
        "classes: {A: {positive: [a]}}\n": "needs 'negative'",
        "templates: ['no placeholder']\nclasses: {A: {positive: [a], negative: [b]}}\n": "'{}'",
        "name: x\n": "'classes'",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"p{i}.yaml"
        path.write_text(text)
        with pytest.raises(PromptFileError, match=message):
            load_prompts(path)
    with pytest.raises(PromptFileError, match="not found"):
        load_prompts(tmp_path / "missing.yaml")


def test_score_rules():
    images = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    positive = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    negative = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    pair = zero_shot_scores(images, positive, negative, logit_scale=10.0)
    expected = torch.softmax(torch.stack([10 * images @ positive.T, 10 * images @ negative.T]), dim=0)[0]
    assert torch.allclose(pair, expected, atol=1e-6)
    multiclass = zero_shot_scores(images, positive, None, logit_scale=10.0)
    assert torch.allclose(multiclass.sum(1), torch.ones(5), atol=1e-6)


def test_multiclass_file_runs_end_to_end(eval_model, eval_data, tmp_path):
    from medclipin.data.manifest import read_manifest
    from medclipin.api import load
    from medclipin.eval.embeddings import EmbeddingStore
    from medclipin.eval.evaluate import zero_shot

    path = tmp_path / "mc.yaml"
    path.write_text("name: mc\nmode: multiclass\ntemplates: ['{}.']\nclasses:\n"
                    "  Cardiomegaly: {positive: [cardiomegaly]}\n  Pneumothorax: {positive: [pneumothorax]}\n")
    model, processor = load(eval_model)
    result = zero_shot(EmbeddingStore(model, processor), read_manifest(eval_data).split("test"), load_prompts(path),
                       bootstrap=20)
    assert result["mode"] == "multiclass" and "accuracy" in result and "argmax" in result["threshold_rule"]
    assert result["scores"].shape[1] == 2
