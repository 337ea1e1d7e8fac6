"""Records → tensors through the processor: skipped records are counted, views are independent,
augmentation is reproducible, unreadable images are substituted and reported, and the collator
tokenises with the processor's settings without touching anyone else's tokenizer."""

import dataclasses

import pytest
import torch

from medclipin.config import ImageConfig, TextConfig
from medclipin.data.dataset import ImageTextDataset, TextImageCollator
from medclipin.data.manifest import read_manifest
from medclipin.data.processor import Processor
from medclipin.data.synthetic import generate_synthetic_dataset
from medclipin.data.tokenizer import train_wordpiece_tokenizer


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    path = generate_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_patients=12, image_size=64)
    return read_manifest(path).split("train")


IMAGE = ImageConfig(size=48, channels=1)
TEXT = TextConfig(max_length=32)


@pytest.fixture(scope="module")
def tokenizer(records, tmp_path_factory):
    texts = [r.findings + " " + r.impression for r in records]
    return train_wordpiece_tokenizer(texts * 5, vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def processor(tokenizer):
    return Processor(IMAGE, TEXT, tokenizer)


def test_missing_image_and_empty_text_are_skipped_and_counted(records, processor):
    broken = [dataclasses.replace(records[0], image_path="/nonexistent/x.dcm"),
              dataclasses.replace(records[1], findings="", impression="", text="")]
    dataset = ImageTextDataset(broken + records[2:], processor)
    assert len(dataset) == len(records) - 2
    assert dataset.skipped == {"image file missing": 1, "empty report text": 1}
    assert dataset.missing == ["/nonexistent/x.dcm"]
    # image-only uses keep records without text
    assert len(ImageTextDataset(broken[1:] + records[2:], processor, require_text=False)) == len(records) - 1


def _augmented_text_views(processor):
    text = dataclasses.replace(processor.text_cfg, view_shuffle=True, view_drop_prob=0.2)
    return Processor(processor.image_cfg, text, processor.tokenizer)


def test_second_text_view_is_the_same_report_by_default(records, processor):
    """The reference code's t2 = t1: no second text is made, and the batch has none (the target reuses t1)."""
    dataset = ImageTextDataset(records, processor, train=True, two_views=True, seed=3)
    item = dataset[0]
    assert "image_2" in item and "text_2" not in item
    batch = TextImageCollator(processor)([dataset[i] for i in range(3)])
    assert "image_2" in batch and "input_ids_2" not in batch


def test_two_views_are_independent_and_reproducible(records, processor):
    augmented = _augmented_text_views(processor)
    dataset = ImageTextDataset(records, augmented, train=True, two_views=True, seed=3)
    item = dataset[0]
    assert item["image"].shape == (1, 48, 48)
    assert not torch.equal(item["image"], item["image_2"])  # independent augmentations
    again = ImageTextDataset(records, augmented, train=True, two_views=True, seed=3)[0]
    assert torch.equal(item["image"], again["image"]) and item["text_2"] == again["text_2"]
    assert item["rejected"] == []
    dataset.set_epoch(1)
    assert not torch.equal(item["image"], dataset[0]["image"])  # a new epoch draws new views


def test_evaluation_is_deterministic(records, processor):
    dataset = ImageTextDataset(records, processor, train=False)
    assert torch.equal(dataset[1]["image"], dataset[1]["image"])
    assert "image_2" not in dataset[1]
    # the processor's evaluation path gives the same tensor for the same file
    assert torch.equal(dataset[1]["image"], processor.images([records[1].image_path])[0])
    assert dataset.texts[1] == processor.report_text(records[1])


def test_collator_tokenizes_both_text_views(records, processor):
    short = Processor(IMAGE, dataclasses.replace(TEXT, max_length=16, view_shuffle=True, view_drop_prob=0.2),
                      processor.tokenizer)
    dataset = ImageTextDataset(records, short, train=True, two_views=True)
    batch = TextImageCollator(short)([dataset[i] for i in range(3)])
    assert batch["image"].shape == batch["image_2"].shape == (3, 1, 48, 48)
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 16
    assert batch["input_ids_2"].shape[0] == 3
    assert (batch["attention_mask"].sum(1) > 2).all()  # real tokens beyond [CLS]/[SEP]
    assert batch["rejected"] == []
    # the collator's tokens are the processor's
    expected = short.texts([dataset.texts[i] for i in range(3)])
    assert torch.equal(batch["input_ids"], expected["input_ids"])


def _corrupt_copy(record, folder):
    bad = folder / ("broken_" + record.image_path.rsplit("/", 1)[-1])
    bad.write_bytes(b"\x00not an image\x00" * 10)
    return dataclasses.replace(record, image_path=str(bad))


def test_an_unreadable_image_is_replaced_by_the_next_record_and_reported(records, processor, tmp_path):
    broken = _corrupt_copy(records[1], tmp_path)
    listed = [records[0], broken, *records[2:6]]
    dataset = ImageTextDataset(listed, processor, train=True, seed=1)
    assert len(dataset) == 6  # the file exists: found only when it is read
    item = dataset[1]
    assert item["index"] == 2 and item["text"] == dataset.texts[2]  # the next readable record fills the slot
    assert torch.equal(item["image"], dataset[2]["image"])  # deterministic: same augmentation as item 2 itself
    assert len(item["rejected"]) == 1 and item["rejected"][0][0] == broken.image_path
    assert "not" in item["rejected"][0][1].lower()
    assert dataset[1]["rejected"] == item["rejected"]  # remembered, reported again
    batch = TextImageCollator(processor)([dataset[i] for i in range(3)])
    assert batch["image"].shape[0] == 3
    assert batch["index"].tolist() == [0, 2, 2]
    assert [path for path, _ in batch["rejected"]] == [broken.image_path]
    # evaluation (no substitution): the row has no image and the failure
    evaluation = ImageTextDataset(listed, processor, train=False, substitute_unreadable=False)
    item = evaluation[1]
    assert item["image"] is None and item["index"] == 1 and item["rejected"][0][0] == broken.image_path
    # a dataset where nothing can be read is an error, not an endless search
    from medclipin.errors import MedclipinError

    hopeless = ImageTextDataset([broken, _corrupt_copy(records[2], tmp_path)], processor, train=True)
    with pytest.raises(MedclipinError, match="consecutive images could not be read"):
        hopeless[0]


def test_processor_truncation_side_is_its_own(records, tokenizer):
    """The processor keeps a private tokenizer: ``truncation_side: left`` keeps a long report's end (the
    impression) and never changes the tokenizer it was given, however many collators use it."""
    assert tokenizer.truncation_side == "right"
    left = Processor(IMAGE, dataclasses.replace(TEXT, truncation_side="left", max_length=12), tokenizer)
    right = Processor(IMAGE, dataclasses.replace(TEXT, truncation_side="right", max_length=12), tokenizer)
    assert left.tokenizer is not tokenizer and left.tokenizer.truncation_side == "left"
    assert tokenizer.truncation_side == "right" and right.tokenizer.truncation_side == "right"
    text = " ".join(r.findings + " " + r.impression for r in records[:3])
    full = tokenizer([text], truncation=False)["input_ids"][0]
    assert len(full) > 12
    kept_left = left.texts([text])["input_ids"][0].tolist()
    kept_right = right.texts([text])["input_ids"][0].tolist()
    assert kept_left[-11:] == full[-11:] and kept_right[:11] == full[:11] and kept_left != kept_right
    # collating with one does not change the other
    dataset = ImageTextDataset(records[:2], left)
    TextImageCollator(left)([dataset[0], dataset[1]])
    assert right.texts([text])["input_ids"][0].tolist() == kept_right
    assert tokenizer.truncation_side == "right"
    with pytest.raises(ValueError, match="truncation_side"):
        Processor(IMAGE, dataclasses.replace(TEXT, truncation_side="middle"), tokenizer)


def test_a_device_or_fifo_is_not_called_missing_and_skipped_records_are_named(tmp_path, caplog):
    """W2 (issue 25): /dev/zero and a FIFO were "image file missing" in pretrain and retrieve, and the start-of-run
    "skipped 3 of 55 records" named none of them. Named by record id (paths and text can identify patients)."""
    import logging
    import os

    from medclipin.config import load_config
    from medclipin.data.dataset import ImageTextDataset, select_usable
    from medclipin.data.manifest import Record
    from medclipin.data.processor import Processor

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    records = [Record(f"r{i}", f"p{i}", f"s{i}", path, "train", findings="normal heart")
               for i, path in enumerate(["/dev/zero", str(fifo), str(tmp_path / "gone.png")])]
    usable = select_usable(records, ("findings",))
    assert usable.skipped == {"image not a regular file": 2, "image file missing": 1}
    assert usable.image_problems == {"/dev/zero": "image not a regular file", str(fifo): "image not a regular file",
                                     str(tmp_path / "gone.png"): "image file missing"}
    cfg = load_config(None)
    with caplog.at_level(logging.WARNING, logger="medclipin.data.dataset"):
        ImageTextDataset(records, Processor(cfg.data.image, cfg.data.text, None), require_text=True)
    assert "skipped 3 of 3 records" in caplog.text and "record_id r0, r1, r2" in caplog.text
    assert str(tmp_path) not in caplog.text and "normal heart" not in caplog.text
