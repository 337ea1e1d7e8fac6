"""Records → tensors: skipped records are counted, views are independent, augmentation is reproducible."""

import dataclasses

import pytest
import torch

from medclipin.config import ImageConfig, TextConfig
from medclipin.data.dataset import ImageTextDataset, TextImageCollator
from medclipin.data.manifest import read_manifest
from medclipin.data.synthetic import generate_synthetic_dataset
from medclipin.data.tokenizer import train_wordpiece_tokenizer


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_patients=12, image_size=64)
    return read_manifest(path).split("train")


IMAGE = ImageConfig(size=48, channels=1)
TEXT = TextConfig(max_length=32)


def test_missing_image_and_empty_text_are_skipped_and_counted(records):
    broken = [dataclasses.replace(records[0], image_path="/nonexistent/x.dcm"),
              dataclasses.replace(records[1], findings="", impression="", text="")]
    dataset = ImageTextDataset(broken + records[2:], IMAGE, TEXT)
    assert len(dataset) == len(records) - 2
    assert dataset.skipped == {"image file missing": 1, "empty report text": 1}


def test_two_views_are_independent_and_reproducible(records):
    dataset = ImageTextDataset(records, IMAGE, TEXT, train=True, two_views=True, seed=3)
    item = dataset[0]
    assert item["image"].shape == (1, 48, 48)
    assert not torch.equal(item["image"], item["image_2"])  # independent augmentations
    again = ImageTextDataset(records, IMAGE, TEXT, train=True, two_views=True, seed=3)[0]
    assert torch.equal(item["image"], again["image"]) and item["text_2"] == again["text_2"]
    dataset.set_epoch(1)
    assert not torch.equal(item["image"], dataset[0]["image"])  # a new epoch draws new views


def test_evaluation_is_deterministic(records):
    dataset = ImageTextDataset(records, IMAGE, TEXT, train=False)
    assert torch.equal(dataset[1]["image"], dataset[1]["image"])
    assert "image_2" not in dataset[1]


def test_collator_tokenizes_both_text_views(records, tmp_path):
    texts = [r.findings + " " + r.impression for r in records]
    tokenizer = train_wordpiece_tokenizer(texts * 5, vocab_size=300, out_dir=tmp_path / "tok")
    dataset = ImageTextDataset(records, IMAGE, TEXT, train=True, two_views=True)
    batch = TextImageCollator(tokenizer, max_length=16)([dataset[i] for i in range(3)])
    assert batch["image"].shape == batch["image_2"].shape == (3, 1, 48, 48)
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 16
    assert batch["input_ids_2"].shape[0] == 3
    assert (batch["attention_mask"].sum(1) > 2).all()  # real tokens beyond [CLS]/[SEP]
