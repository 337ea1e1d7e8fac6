"""Checks before the first training step: what a later phase of the run will need, checked while it is cheap.

A run that would fail at its first validation, its first checkpoint or its end must fail before it trains,
in one line (:class:`PreflightError`), not minutes or hours later with a traceback. Checked here:

* validation and evaluation prompts against the manifest's ``label:<class>`` columns (:func:`eval_prompts`);
* the validate split having usable records when validation is on (:func:`check_validation_records`);
* Grad-CAM boxes naming classes of the prompt set (:func:`check_box_classes`; a warning);
* the run folder being writable and having room for a checkpoint (:func:`check_run_folder_space`);
* the tokenizer covering the report text (:func:`check_tokenizer_coverage`; a warning, not a refusal).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from medclipin.errors import MedclipinError

log = logging.getLogger(__name__)

# eval.prompts value: the shipped prompt set that fits the manifest's classes, else validation by retrieval only
AUTO_PROMPTS = "auto"
# share of report words the tokenizer maps to its unknown token above which the run is warned
UNKNOWN_WARN_FRACTION = 0.05


class PreflightError(MedclipinError, ValueError):
    """A setting or input that a later phase of the run would fail on; found before the first step."""


def _shown(names: Sequence[str], limit: int = 12) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


def eval_prompts(value: str, label_names: Sequence[str], manifest: str | os.PathLike = "the manifest"):
    """The prompt set for zero-shot validation/evaluation of a manifest with ``label_names``, or None.

    ``""``: none. ``"auto"`` (the shipped CPU configs): the prompt set shipped with medclipin whose every class
    is a label column of the manifest (most classes first, then by name), e.g. ``synthetic`` on ``medclipin
    synth`` data; when none fits (your own data), None — validation by retrieval only — and one log line saying
    so. Anything else is a prompt file or shipped name that was asked for explicitly: a class the manifest lacks
    is a :class:`PreflightError` naming the classes and how to pass ``eval.prompts=...``.
    """
    from medclipin.eval.zeroshot import PACKAGE_PROMPTS, load_prompts

    known = set(label_names)
    if not value:
        return None
    if value == AUTO_PROMPTS:
        fitting = []
        for path in sorted(PACKAGE_PROMPTS.glob("*.yaml")):
            prompts = load_prompts(path)
            if all(name in known for name in prompts.class_names):
                fitting.append(prompts)
        if not fitting:
            log.info("eval.prompts=auto: no prompt set shipped with medclipin fits the classes of %s (%s): "
                     "validation by retrieval only; pass eval.prompts=FILE (a prompt YAML of your classes) for "
                     "zero-shot validation", manifest, _shown(sorted(known)))
            return None
        chosen = min(fitting, key=lambda p: (-len(p.class_names), Path(p.path).stem))
        log.info("eval.prompts=auto: zero-shot validation with the shipped prompt set %s (classes %s)",
                 Path(chosen.path).stem, _shown(chosen.class_names))
        return chosen
    prompts = load_prompts(value)
    missing = [name for name in prompts.class_names if name not in known]
    if missing:
        raise PreflightError(
            f"eval.prompts={value}: classes {_shown(missing)} have no label:<class> column in {manifest} (its "
            f"classes: {_shown(sorted(known))}); pass eval.prompts=FILE with a prompt YAML of your classes, "
            "or eval.prompts=auto (validation by retrieval only when no shipped prompt set fits)")
    return prompts


def label_names_of(records) -> list[str]:
    """The ``label:<class>`` columns of a manifest, from its records (every record holds every column)."""
    return sorted(set().union(*(r.labels.keys() for r in records))) if records else []


def check_validation_records(records, sections: Sequence[str], cache_dir: str, manifest) -> None:
    """Validation on a validate split none of whose records can be used would fail at the first validation."""
    from medclipin.data.dataset import select_usable

    if not records:
        return
    usable = select_usable(records, sections, cache_dir)
    if not usable.records:
        reasons = ", ".join(f"{n} {why}" for why, n in usable.skipped.items())
        raise PreflightError(f"{manifest}: none of the {len(records)} records of the validate split can be used "
                             f"({reasons}); fix them, or pass --no-validate")


def check_box_classes(records, prompts, manifest) -> list[str]:
    """Box labels the prompt set has no class for: Grad-CAM localisation (``medclipin gradcam``, the demo) skips
    those boxes, so its pointing-game score would cover fewer findings than the manifest holds. Said in one
    warning, before training; returns the labels."""
    if prompts is None:
        return []
    known = set(prompts.class_names)
    missing = sorted({box.label for record in records for box in record.boxes if box.label not in known})
    if missing:
        log.warning("%s: box labels %s are not classes of the prompt set %s (%s): Grad-CAM localisation skips "
                    "those boxes", manifest, _shown(missing), Path(prompts.path).stem, _shown(prompts.class_names))
    return missing


def checkpoint_bytes(objective) -> int:
    """A generous estimate of what one checkpoint and the final model take on disk: the model and the objective's
    own tensors, the optimiser's two moments of every trainable parameter, and a second model copy
    (``RUN/model`` or ``RUN/best``)."""
    import torch

    total = 0
    for param in objective.parameters():
        size = param.numel() * param.element_size()
        total += size * (4 if param.requires_grad else 2)
    for buffer in objective.buffers():
        if isinstance(buffer, torch.Tensor):
            total += 2 * buffer.numel() * buffer.element_size()
    return total


def check_run_folder_space(run_dir: Path, objective) -> None:
    """The run folder takes a file now, and has room for a checkpoint (a full disk would fail at the first one)."""
    try:
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".medclipin-write-check."):
            pass
    except OSError as exc:
        raise PreflightError(f"{run_dir}: cannot write in the run folder ({exc.strerror or exc})") from None
    needed = checkpoint_bytes(objective)
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise PreflightError(f"{run_dir}: {free / 1e9:.2f} GB free, but a checkpoint and the final model take "
                             f"about {needed / 1e9:.2f} GB; free some space or choose another --out")


def check_tokenizer_coverage(processor, texts: Sequence[str], sample: int = 500) -> float:
    """The share of report words (in up to ``sample`` reports) the tokenizer can only map to its unknown token;
    above 5 % a warning says so (a tokenizer of another language or alphabet learns little from these reports)."""
    tokenizer = processor.tokenizer
    unk = getattr(tokenizer, "unk_token_id", None)
    if tokenizer is None or unk is None or not texts:
        return 0.0
    step = max(1, len(texts) // sample)
    chosen = [t for t in list(texts)[::step][:sample] if t.strip()]
    if not chosen:
        return 0.0
    # the part of each report the model sees
    ids = tokenizer(chosen, add_special_tokens=False, truncation=True,
                    max_length=processor.text_cfg.max_length)["input_ids"]
    total = sum(len(row) for row in ids)
    unknown = sum(row.count(unk) for row in ids)
    fraction = unknown / max(total, 1)
    if fraction > UNKNOWN_WARN_FRACTION:
        log.warning("the tokenizer maps %.0f%% of the report tokens to its unknown token: it does not cover this "
                    "text (another language or alphabet?); train one on these reports (data.text.tokenizer empty "
                    "with a text tower from config, or `medclipin tokenizer`)", 100 * fraction)
    return fraction
