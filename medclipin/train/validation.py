"""Periodic validation during pretraining: retrieval R@K and zero-shot AUC on the validate split.

:func:`build_validate_fn` returns the ``validate_fn(model, processor, step) -> dict`` that
:func:`medclipin.train.trainer.pretrain` calls every ``train.validate_every`` steps (and at the end) on
the main process; the trainer keeps the best-scoring model in ``RUN/best``.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from medclipin.config import Config
from medclipin.data.manifest import Record

log = logging.getLogger(__name__)


def validation_score(metrics: dict) -> float:
    """Mean zero-shot AUC when it is defined, else the mean of image→text and text→image R@10."""
    auc = (metrics.get("zeroshot") or {}).get("mean_auc")
    if auc is not None:
        return float(auc)
    retrieval = metrics["retrieval"]
    return 0.5 * (retrieval["image_to_text"]["R@10"] + retrieval["text_to_image"]["R@10"])


def build_validate_fn(cfg: Config, records: Sequence[Record]) -> Callable | None:
    """A validation callback over ``records`` (the validate split), or None when there are none.

    Zero-shot runs with the prompt set ``cfg.eval.prompts`` resolves to for the manifest's classes
    (:func:`medclipin.train.preflight.eval_prompts`); retrieval always. Everything validation will need is
    checked here, before training: prompt classes the manifest lacks, or a validate split none of whose
    records can be used, are a one-line :class:`~medclipin.train.preflight.PreflightError` now rather than a
    failure at the first validation. Returns a flat dict of numbers: ``score``, ``retrieval_i2t_R@K``,
    ``retrieval_t2i_R@K``, ``zeroshot_mean_auc`` (when available).
    """
    from medclipin.train.preflight import check_box_classes, check_validation_records, eval_prompts, label_names_of

    records = list(records)
    if not records:
        if cfg.train.validate_every:
            log.info("no validate split in %s: no validation (train.validate_every=%d has nothing to score)",
                     cfg.data.manifest, cfg.train.validate_every)
        return None
    check_validation_records(records, cfg.data.text.sections, cfg.data.cache, cfg.data.manifest)
    from medclipin.eval.embeddings import EmbeddingStore
    from medclipin.eval.evaluate import retrieval, zero_shot

    prompts = eval_prompts(cfg.eval.prompts, label_names_of(records), cfg.data.manifest)
    check_box_classes(records, prompts, cfg.data.manifest)

    def validate(model, processor, step: int) -> dict:
        # a fresh store per call: embeddings are cached by weight fingerprint, which changes every step
        store = EmbeddingStore(model, processor, image_cache=cfg.data.cache, batch_size=cfg.eval.batch_size)
        metrics: dict = {"retrieval": retrieval(store, records)}
        if prompts is not None:
            metrics["zeroshot"] = zero_shot(store, records, prompts, bootstrap=0)
        result = {"score": validation_score(metrics)}
        for direction, short in (("image_to_text", "i2t"), ("text_to_image", "t2i")):
            for key, value in metrics["retrieval"][direction].items():
                if key.startswith("R@"):
                    result[f"retrieval_{short}_{key}"] = float(value)
        if prompts is not None and metrics["zeroshot"].get("mean_auc") is not None:
            result["zeroshot_mean_auc"] = float(metrics["zeroshot"]["mean_auc"])
        if store.rejected:  # counted, not named (paths can hold identifiers): the run goes on without them
            result["unreadable_images"] = float(len(store.rejected))
            log.warning("validation: skipping %d unreadable image(s) of the validate split (medclipin validate "
                        "--all names them)", len(store.rejected))
        return result

    # the numbers every call returns (metrics.csv reserves a column for each)
    validate.columns = ["score", *[f"retrieval_{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)],
                        *(["zeroshot_mean_auc"] if prompts is not None else [])]
    return validate
