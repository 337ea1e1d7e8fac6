"""Records → model-ready tensors: decoded, augmented images and tokenised report text.

``ImageTextDataset`` yields one record at a time (image tensor(s) + text string(s)) through the model's
:class:`~medclipin.data.processor.Processor`; ``TextImageCollator`` tokenises a whole batch at once
with the processor (much cheaper than per-item calls).

Nothing is dropped silently. Records whose image file is missing or whose text is empty are skipped
at construction and counted in ``skipped`` (reason → count). An image that exists but cannot be
decoded is found only when it is read: its slot in the batch is filled by the next readable record
(deterministically, so runs and resumes repeat exactly) and the failure travels with the batch
(``batch["rejected"]``: (path, reason) pairs) to the trainer, which lists it in ``RUN/rejects.csv``.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medclipin.data.manifest import Record
from medclipin.data.processor import Processor
from medclipin.data.reports import text_view
from medclipin.errors import MedclipinError

log = logging.getLogger(__name__)

# How many neighbours are tried before a batch slot is given up (then the error propagates): a dataset
# where this many consecutive images are unreadable is broken, not noisy.
MAX_SUBSTITUTIONS = 64


def unreadable_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this image cannot be used" (named, counted, skipped) rather than a bug."""
    from medclipin.data.readers import ImageReadError

    errors: list[type[BaseException]] = [ImageReadError]
    try:
        from medclipin.data.image_cache import CacheError

        errors.append(CacheError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


@dataclass
class UsableRecords:
    """The records a dataset can use, their texts, and what was skipped: reason → count, the image paths that
    cannot be used (``missing``, with each one's reason in ``image_problems``) and the record ids skipped."""

    records: list[Record]
    texts: list[str]
    skipped: Counter
    missing: list[str]
    image_problems: dict[str, str] = field(default_factory=dict)
    skipped_ids: list[str] = field(default_factory=list)


def select_usable(records: Sequence[Record], sections: Sequence[str], cache_dir: str = "",
                  require_text: bool = True) -> UsableRecords:
    """Records with report text in ``sections`` (unless ``require_text`` is off) whose image file exists (not
    checked with a decode-once cache, which knows its files). The trainer counts them before it writes anything."""
    from medclipin.data.reports import record_text

    kept, texts, skipped, missing, problems, skipped_ids = [], [], Counter(), [], {}, []
    for record in records:
        text = record_text(record, tuple(sections))
        if require_text and not text.strip():
            skipped["empty report text"] += 1
            skipped_ids.append(record.record_id)
        elif not cache_dir and not os.path.isfile(record.image_path):
            # a device (/dev/zero), a FIFO or a folder exists but is no image file: not "missing"
            reason = "image not a regular file" if os.path.lexists(record.image_path) else "image file missing"
            skipped[reason] += 1
            skipped_ids.append(record.record_id)
            missing.append(record.image_path)
            problems[record.image_path] = reason
        else:
            kept.append(record)
            texts.append(text)
    return UsableRecords(kept, texts, skipped, missing, problems, skipped_ids)


class ImageTextDataset(Dataset):
    """Image–text pairs from manifest records.

    Args:
        records: manifest records (usually one split).
        processor: image preprocessing and text settings of the model being trained or evaluated.
        train: random augmentation (and CLIPin's second views) when True; deterministic otherwise.
        two_views: also return ``image_2``/``text_2`` — independent views for CLIPin's target branch.
        cache_dir: decode-once cache from ``medclipin preprocess`` (empty: decode the original files).
        seed: makes augmentation a function of (seed, epoch, index), so runs and resumed runs repeat exactly.
        require_text: skip (and count) records with empty report text; image-only uses set it False.
        label_names: also return ``labels`` (C,) — 1/0, NaN when not stated or uncertain — for these classes.
        substitute_unreadable: fill an unreadable image's slot with the next readable record (training);
            False: return the item with ``image = None`` and the failure (evaluation drops such rows).
    """

    def __init__(
        self,
        records: Sequence[Record],
        processor: Processor,
        train: bool = False,
        two_views: bool = False,
        cache_dir: str = "",
        seed: int = 0,
        require_text: bool = True,
        substitute_unreadable: bool = True,
        label_names: Sequence[str] = (),
    ):
        self.processor = processor
        self.label_names = list(label_names)
        self.train, self.two_views, self.seed = train, two_views, seed
        self.substitute_unreadable = substitute_unreadable
        self.epoch = 0
        usable = select_usable(records, processor.text_cfg.sections, cache_dir, require_text)
        self.records, self.texts = usable.records, usable.texts
        self.skipped: Counter[str] = usable.skipped
        self.missing: list[str] = usable.missing
        self.image_problems: dict[str, str] = usable.image_problems
        if self.skipped:
            # named by record id, not by path or text (paths and reports can hold patient identifiers)
            ids = usable.skipped_ids
            shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
            log.warning("skipped %d of %d records: %s (record_id %s; medclipin validate --all names every bad "
                        "file)", sum(self.skipped.values()), len(records),
                        ", ".join(f"{n} {why}" for why, n in self.skipped.items()), shown)
        self.source = processor.image_source(cache_dir)
        self.transform = processor.image_transform(train=train)
        self._unreadable: dict[int, str] = {}  # per process: indices known to fail, and why

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _pixels(self, index: int) -> np.ndarray:
        if index in self._unreadable:
            raise _Unreadable(self._unreadable[index])
        try:
            return self.source.load(self.records[index].image_path)
        except unreadable_errors() as exc:
            self._unreadable[index] = str(exc)
            raise _Unreadable(str(exc)) from None

    def __getitem__(self, index: int) -> dict:
        rejected: list[tuple[str, str]] = []
        position = index
        for _ in range(MAX_SUBSTITUTIONS if self.substitute_unreadable else 1):
            try:
                pixels = self._pixels(position)
                break
            except _Unreadable as exc:
                rejected.append((self.records[position].image_path, exc.reason))
                position = (position + 1) % len(self.records)
        else:
            if not self.substitute_unreadable:
                return {"index": index, "image": None, "text": self.texts[index], "rejected": rejected}
            raise MedclipinError(f"{MAX_SUBSTITUTIONS} consecutive images could not be read, the last "
                                 f"{rejected[-1][0]}: {rejected[-1][1]}")
        item = {"index": position, "text": self.texts[position], "rejected": rejected}
        if self.label_names:  # 1/0, NaN where not stated or uncertain
            labels = self.records[position].labels
            item["labels"] = torch.tensor([labels.get(n) if labels.get(n) in (0.0, 1.0) else float("nan")
                                           for n in self.label_names], dtype=torch.float32)
        if self.train:
            rng = self._rng(position)
            # seed the augmentation per item: identical on every run, in any worker, and after a resume
            self.transform.reseed(int(rng.integers(0, 2**31 - 1)))
            item["image"] = self.transform(pixels)
            if self.two_views:
                item["image_2"] = self.transform(pixels)
                cfg = self.processor.text_cfg
                if cfg.view_shuffle or cfg.view_drop_prob > 0:  # else t2 = t1: the batch has no second text
                    item["text_2"] = text_view(self.texts[position], rng, shuffle=cfg.view_shuffle,
                                               drop_prob=cfg.view_drop_prob)
        else:
            item["image"] = self.transform(pixels)
        return item


class _Unreadable(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class TextImageCollator:
    """Stacks images and tokenises the batch's texts in one processor call.

    The batch carries ``rejected``: the (path, reason) pairs of unreadable images whose slots were
    filled by other records (a list, not a tensor; the trainer takes it out before the step).
    """

    def __init__(self, processor: Processor):
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict:
        batch: dict = {
            "index": torch.tensor([item["index"] for item in items]),
            "image": torch.stack([item["image"] for item in items]),
            "rejected": [pair for item in items for pair in item.get("rejected", ())],
        }
        if "labels" in items[0]:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        batch.update(self.processor.texts([item["text"] for item in items]))
        if "image_2" in items[0]:
            batch["image_2"] = torch.stack([item["image_2"] for item in items])
        if "text_2" in items[0]:
            second = self.processor.texts([item["text_2"] for item in items])
            batch["input_ids_2"], batch["attention_mask_2"] = second["input_ids"], second["attention_mask"]
        return batch
