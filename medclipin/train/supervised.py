"""The supervised ceiling: the same image tower, images, augmentation and step budget, trained on the labels.

Zero-shot classification never sees a label; a classifier trained directly on them, with everything
else equal, is what zero-shot can at best hope to match. ``medclipin supervised`` (and
``medclipin demo --ceiling``) trains it and writes ``OUT/metrics.json`` with the same test-split
metrics as zero-shot, so the two can be read side by side.

What is equal to the image–text run of the same config: image tower and its pretrained weights,
frozen layers, image size, augmentation, batch size, steps, the tower's learning rate, warm-up and
cosine schedule, precision, seed. What differs: a linear head on the pooled feature instead of the
projection to the joint space, and binary cross-entropy on the labels (unstated and uncertain labels
are left out of the loss) instead of the image–text objective.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DistributedSampler

from medclipin.config import Config, save_config
from medclipin.data.dataset import ImageTextDataset
from medclipin.data.manifest import ManifestError, read_manifest
from medclipin.data.processor import Processor
from medclipin.models.encoders import ImageEncoder
from medclipin.models.weights import resolve_normalization
from medclipin.train.distributed import DistInfo
from medclipin.train.cpu_runtime import configure_cpu
from medclipin.train.objective import ObjectiveOutput
from medclipin.train.optim import build_optimizer, build_scheduler, tower_learning_rates
from medclipin.train.step import TrainStep, autocast_context, resolve_device, resolve_precision

log = logging.getLogger(__name__)


class SupervisedClassifier(nn.Module):
    """An image tower with a linear multi-label head, trained with masked binary cross-entropy."""

    def __init__(self, image_encoder: ImageEncoder, n_classes: int):
        super().__init__()
        self.image_encoder = image_encoder
        self.head = nn.Linear(image_encoder.out_dim, n_classes)

    def logits(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_encoder(image))

    def forward(self, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        logits = self.logits(batch["image"]).float()
        labels = batch["labels"]
        known = ~torch.isnan(labels)
        loss = nn.functional.binary_cross_entropy_with_logits(logits[known], labels[known])
        return ObjectiveOutput(loss=loss, terms={"bce": loss.detach()})

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Nothing to do after a step (TrainStep calls it for every objective)."""


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([i["image"] for i in items]), "labels": torch.stack([i["labels"] for i in items]),
            "rejected": [pair for i in items for pair in i.get("rejected", ())]}


def class_names_for(cfg: Config, records) -> list[str]:
    """The classes of ``eval.prompts`` when set (so the ceiling and zero-shot score the same classes), else
    every ``label:<Class>`` column of the manifest."""
    from medclipin.train.preflight import eval_prompts, label_names_of

    prompts = eval_prompts(cfg.eval.prompts, label_names_of(records), cfg.data.manifest)
    return prompts.class_names if prompts is not None else label_names_of(records)


def train_supervised(cfg: Config, out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Train the ceiling classifier on the train split and score the test split; writes ``OUT/metrics.json``.

    Returns:
        ``{"mean_auc", "per_class_auc", "classes", "train": {...}, "metrics": <full classification metrics>}``.
    """
    from medclipin.eval.metrics import classification_metrics, labels_matrix
    from medclipin.train.trainer import BatchStream

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    device = resolve_device(tcfg.device)
    precision = resolve_precision(tcfg.precision, device)
    configure_cpu(tcfg.threads, tcfg.retain_freed_memory, device)
    resolve_normalization(cfg)
    save_config(cfg, out_dir / "config.yaml")
    manifest = read_manifest(cfg.data.manifest)
    train_records, test_records = manifest.split("train"), manifest.split("test")
    if not train_records or not test_records:
        raise ManifestError(f"{cfg.data.manifest}: the supervised ceiling needs train and test records")
    classes = class_names_for(cfg, manifest.records)
    processor = Processor(cfg.data.image, cfg.data.text, tokenizer=None)

    torch.manual_seed(tcfg.seed)
    encoder = ImageEncoder(cfg.model.image_encoder, in_chans=cfg.data.image.channels, image_size=cfg.data.image.size)
    model = SupervisedClassifier(encoder, len(classes)).to(device)
    dataset = ImageTextDataset(train_records, processor, train=True, cache_dir=cfg.data.cache, seed=tcfg.seed,
                               require_text=False, label_names=classes)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=tcfg.seed, drop_last=True)
    batches = BatchStream(dataset, sampler, tcfg.batch_size, _collate, cfg.data.num_workers,
                          pin_memory=device.type == "cuda", seed=tcfg.seed)
    optimizer = build_optimizer(model, tcfg, device, lrs=tower_learning_rates(model, tcfg))
    scheduler = build_scheduler(optimizer, tcfg)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step_fn = TrainStep(model, model, optimizer, scheduler, scaler, tcfg, precision, device, DistInfo())
    model.train()
    start = time.perf_counter()
    losses = []
    for step in range(tcfg.steps):
        outcome = step_fn(batches, step)
        if (step + 1) % tcfg.log_every == 0 or step + 1 == tcfg.steps:
            losses.append({"step": step + 1, "bce": float(outcome.loss)})
            if progress:
                log.info("supervised ceiling: step %d/%d, BCE %.4f", step + 1, tcfg.steps, float(outcome.loss))
    train_s = time.perf_counter() - start

    model.eval()
    test_set = ImageTextDataset(test_records, processor, train=False, cache_dir=cfg.data.cache, require_text=False,
                                substitute_unreadable=False)
    scores, kept = [], []
    with torch.no_grad(), autocast_context(precision, device):
        for i in range(0, len(test_set), 64):
            items = [test_set[j] for j in range(i, min(i + 64, len(test_set)))]
            good = [item for item in items if item["image"] is not None]
            if good:
                images = torch.stack([item["image"] for item in good]).to(device)
                scores.append(torch.sigmoid(model.logits(images).float()).cpu())
                kept.extend(item["index"] for item in good)
    kept_records = [test_set.records[i] for i in kept]
    metrics = classification_metrics(torch.cat(scores).numpy(), labels_matrix(kept_records, classes), classes,
                                     "multilabel", bootstrap=cfg.eval.bootstrap)
    result = {
        "what": "supervised ceiling: the same image tower, images, augmentation and steps, trained on the labels",
        "mean_auc": metrics.get("mean_auc"), "per_class_auc": metrics.get("per_class_auc"), "classes": classes,
        "n_test": len(kept_records), "train": {"steps": tcfg.steps, "batch_size": tcfg.batch_size, "wall_s": train_s,
                                               "losses": losses},
        "metrics": metrics,
    }
    with (out_dir / "metrics.json").open("w") as handle:
        json.dump(result, handle, indent=2)
    return result


def read_ceiling(folder: str | os.PathLike) -> dict | None:
    """A ceiling's ``metrics.json`` when it has been computed, else None."""
    path = Path(folder) / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


