"""Pinned zero-shot prompt files: well-formed, and class names equal to the adapters' label names."""

import csv
from pathlib import Path

import pytest
import yaml

from medclipin.data.prepare import chexpert, odir

DATASETS = Path(__file__).resolve().parents[1] / "datasets"
PROMPTS = {
    "chexpert/prompts_5x200.yaml": ("multiclass", chexpert.COMPETITION_FIVE),
    "chexpert/prompts_competition.yaml": ("multilabel", chexpert.COMPETITION_FIVE),
    "rsna-pneumonia/prompts.yaml": ("multilabel", ["Pneumonia"]),
    "odir/prompts.yaml": ("multilabel", odir.LABELS),
    "figure1/prompts.yaml": ("multiclass", ["COVID-19", "Pneumonia", "No finding"]),
    "rfmid/prompts.yaml": ("multilabel", None),  # checked against the real CSV header below
}


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_prompt_file(name):
    data = yaml.safe_load((DATASETS / name).read_text())
    mode, classes = PROMPTS[name]
    assert data["mode"] == mode and data["name"]
    assert data["templates"] and all("{}" in t for t in data["templates"])
    if classes is not None:
        assert list(data["classes"]) == list(classes)
    for cls, phrases in data["classes"].items():
        assert phrases["positive"] and all(isinstance(p, str) and p for p in phrases["positive"]), cls
        assert phrases["negative"] and all(isinstance(p, str) and p for p in phrases["negative"]), cls


def test_rfmid_prompts_cover_the_published_columns(shared_data):
    with (shared_data / "fundus_rfmid" / "labels.csv").open() as handle:
        header = next(csv.reader(handle))[1:]
    data = yaml.safe_load((DATASETS / "rfmid/prompts.yaml").read_text())
    assert list(data["classes"]) == header and len(header) == 46


def test_every_card_exists_with_a_prepare_command():
    for card in ("mimic-cxr", "mimic-cxr-jpg", "chexpert", "iu-xray", "rsna-pneumonia", "rfmid", "odir", "figure1"):
        text = (DATASETS / card / "README.md").read_text()
        assert "medclipin prepare" in text and "Get it" in text, card
