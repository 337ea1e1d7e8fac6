"""Records → model-ready tensors: decoded, augmented images and tokenised report text.

``ImageTextDataset`` yields one record at a time (image tensor(s) + text string(s)); ``TextImageCollator``
tokenises a whole batch at once with the fast tokenizer, which is much cheaper than per-item calls.
Records whose image file is missing or whose text is empty are skipped at construction and counted
in ``skipped`` (reason → count), never dropped silently; an image that fails to decode raises an
error naming the file.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medclipin.config import ImageConfig, TextConfig
from medclipin.data.manifest import Record
from medclipin.data.reports import record_text, text_view
from medclipin.data.cache import open_image_source
from medclipin.data.transforms import build_image_transform

log = logging.getLogger(__name__)


class ImageTextDataset(Dataset):
    """Image–text pairs from manifest records.

    Args:
        records: manifest records (usually one split).
        image_cfg, text_cfg: how images become tensors and which report sections are used.
        train: random augmentation (and CLIPin's second views) when True; deterministic otherwise.
        two_views: also return ``image_2``/``text_2`` — independent views for CLIPin's target branch.
        cache_dir: decode-once cache from ``medclipin preprocess`` (empty: decode the original files).
        seed: makes augmentation a function of (seed, epoch, index), so runs and resumed runs repeat exactly.
        require_text: skip (and count) records with empty report text; image-only uses set it False.
    """

    def __init__(
        self,
        records: Sequence[Record],
        image_cfg: ImageConfig,
        text_cfg: TextConfig,
        train: bool = False,
        two_views: bool = False,
        cache_dir: str = "",
        seed: int = 0,
        require_text: bool = True,
    ):
        self.image_cfg, self.text_cfg = image_cfg, text_cfg
        self.train, self.two_views, self.seed = train, two_views, seed
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        kept: list[Record] = []
        texts: list[str] = []
        for record in records:
            text = record_text(record, text_cfg.sections)
            if require_text and not text.strip():
                self.skipped["empty report text"] += 1
            elif not cache_dir and not os.path.exists(record.image_path):
                self.skipped["image file missing"] += 1
            else:
                kept.append(record)
                texts.append(text)
        self.records, self.texts = kept, texts
        if self.skipped:
            log.warning("skipped %d of %d records: %s", sum(self.skipped.values()), len(records),
                        ", ".join(f"{n} {why}" for why, n in self.skipped.items()))
        self.source = open_image_source(image_cfg, cache_dir)
        self.transform = build_image_transform(image_cfg, train=train)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        pixels = self.source.load(record.image_path)
        item = {"index": index, "text": self.texts[index]}
        if self.train:
            rng = self._rng(index)
            # seed the augmentation per item: identical on every run, in any worker, and after a resume
            self.transform.reseed(int(rng.integers(0, 2**31 - 1)))
            item["image"] = self.transform(pixels)
            if self.two_views:
                item["image_2"] = self.transform(pixels)
                item["text_2"] = text_view(self.texts[index], rng, shuffle=self.text_cfg.view_shuffle,
                                           drop_prob=self.text_cfg.view_drop_prob)
        else:
            item["image"] = self.transform(pixels)
        return item


class TextImageCollator:
    """Stacks images and tokenises the batch's texts in one fast-tokenizer call."""

    def __init__(self, tokenizer, max_length: int, truncation_side: str = "right"):
        self.tokenizer, self.max_length = tokenizer, max_length
        # "left" keeps the end of long reports (the impression) when they are cut
        self.tokenizer.truncation_side = truncation_side

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = {
            "index": torch.tensor([item["index"] for item in items]),
            "image": torch.stack([item["image"] for item in items]),
        }
        batch.update(self.tokenize([item["text"] for item in items]))
        if "image_2" in items[0]:
            batch["image_2"] = torch.stack([item["image_2"] for item in items])
            second = self.tokenize([item["text_2"] for item in items])
            batch["input_ids_2"], batch["attention_mask_2"] = second["input_ids"], second["attention_mask"]
        return batch
