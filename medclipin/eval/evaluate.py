"""Evaluate one model on one manifest split: zero-shot, retrieval, linear probe and Grad-CAM localisation.

Every metric reads embeddings through one :class:`EmbeddingStore`, so the images are encoded once.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch

from medclipin.data.manifest import Record
from medclipin.errors import MedclipinError
from medclipin.eval.embeddings import EmbeddingStore, keep_readable
from medclipin.eval.gradcam import (
    DEFAULT_CAM_METHOD,
    POINTING_TOLERANCE_PX,
    TextRelevance,
    box_to_input,
    cam_box_iou,
    cam_to_original,
    display_image,
    image_cam,
    pointing_game_hit,
    save_gradcam_figure,
    text_relevance,
)
from medclipin.eval.metrics import classification_metrics, labels_matrix
from medclipin.eval.probe import linear_probe
from medclipin.eval.retrieval import retrieval_metrics
from medclipin.eval.zeroshot import PromptSet, class_embeddings, zero_shot_scores

log = logging.getLogger(__name__)


def _file_safe(name: str) -> str:
    """A class name as a file-name part: letters, digits, ``-`` and ``_`` only. Class names come from the manifest
    and the prompt file, which may come from anywhere: "../" in one must never become a path."""
    return re.sub(r"[^a-z0-9_-]+", "_", name.lower()).strip("_")[:60] or "finding"


class PromptClassError(MedclipinError, KeyError):
    """A prompt class has no ``label:<class>`` column in the manifest (a KeyError too, for older callers)."""

    def __str__(self) -> str:  # KeyError quotes its message; this is a sentence
        return str(self.args[0]) if self.args else ""


def check_prompt_classes(records: list[Record], prompts: PromptSet) -> None:
    """Every prompt class must be a ``label:<class>`` column of the manifest (a typo would silently score nothing)."""
    known = set().union(*(r.labels.keys() for r in records)) if records else set()
    missing = [c for c in prompts.class_names if c not in known]
    if missing:
        raise PromptClassError(f"prompt classes {missing} have no label:<class> column in the manifest "
                       f"(manifest classes: {sorted(known)})")


def score_records(store: EmbeddingStore, records: list[Record], prompts: PromptSet) -> tuple[list[Record], np.ndarray, np.ndarray]:
    """(readable records, (N, C) zero-shot scores, (N, C) labels 1/0/NaN) of ``records`` against ``prompts``."""
    if not records:
        return [], np.zeros((0, len(prompts.class_names))), np.zeros((0, len(prompts.class_names)))
    check_prompt_classes(records, prompts)
    positive, negative = class_embeddings(store, prompts)
    logit_scale = float(store.model.logit_scale.detach().exp())
    records, images = keep_readable(list(records), store.images(list(records)))
    scores = zero_shot_scores(images, positive, negative, logit_scale).numpy()
    return records, scores, labels_matrix(records, prompts.class_names)


def zero_shot(store: EmbeddingStore, records: list[Record], prompts: PromptSet, bootstrap: int = 1000,
              seed: int = 0, keep_records: bool = False) -> dict:
    """Zero-shot metrics of ``records`` against ``prompts`` (classes missing from the manifest are an error).

    Returns the metrics of :func:`~medclipin.eval.metrics.classification_metrics` plus ``scores`` and
    ``labels`` arrays (N, C) for plots (not JSON: pop them before writing), and with ``keep_records`` the
    readable ``records`` they belong to (pop those too).
    """
    if not records:
        raise ValueError("no records to evaluate")
    records_all = list(records)
    records, scores, labels = score_records(store, records_all, prompts)
    result = classification_metrics(scores, labels, prompts.class_names, prompts.mode, bootstrap=bootstrap, seed=seed)
    result["logit_scale"] = float(store.model.logit_scale.detach().exp())
    result["unreadable_images"] = store.rejected_records(records_all)
    result["scores"] = scores
    result["labels"] = labels
    if keep_records:
        result["records"] = records
    return result


def retrieval(store: EmbeddingStore, records: list[Record], chunk_size: int = 512) -> dict:
    """Image↔text R@1/5/10, mean and median rank; each record's report text is its image's match.
    Records whose image cannot be read are left out (and named under ``unreadable_images``)."""
    all_records = list(records)
    records, images = keep_readable(all_records, store.images(all_records))
    texts = [store.processor.report_text(r) for r in records]
    result = retrieval_metrics(images, store.texts(texts), texts, chunk_size=chunk_size)
    result["unreadable_images"] = store.rejected_records(all_records)
    return result


def probe(store: EmbeddingStore, train_records: list[Record], test_records: list[Record], class_names: list[str],
          fractions=(0.01, 0.1, 1.0), seeds=(0, 1, 2), features: str = "encoder") -> dict:
    """Linear probe on frozen image features of the store (see :mod:`medclipin.eval.probe`); unreadable images
    are left out."""
    train_records, train_x = keep_readable(train_records, store.images(train_records, features=features))
    test_records, test_x = keep_readable(test_records, store.images(test_records, features=features))
    return linear_probe(
        train_x.numpy(), labels_matrix(train_records, class_names),
        test_x.numpy(), labels_matrix(test_records, class_names),
        class_names, fractions=fractions, seeds=seeds,
    )


def probe_clinical(store: EmbeddingStore, train_records: list[Record], fit_records: list[Record],
                   test_records: list[Record], class_names: list[str], rule, calibration: str = "platt",
                   bootstrap: int = 1000, seed: int = 0, features: str = "encoder") -> dict:
    """Operating points, calibration and subgroups of the probe trained on all of ``train_records``, with
    thresholds and calibration fitted on ``fit_records`` (validate) and applied to ``test_records``
    (see :func:`~medclipin.eval.clinical.clinical_metrics`; ``calibrated`` is dropped)."""
    from medclipin.eval.clinical import clinical_metrics
    from medclipin.eval.probe import probe_probabilities

    train_records, train_x = keep_readable(train_records, store.images(train_records, features=features))
    fit_records, fit_x = keep_readable(fit_records, store.images(fit_records, features=features)) \
        if fit_records else ([], torch.zeros((0, train_x.shape[1])))
    test_records, test_x = keep_readable(test_records, store.images(test_records, features=features))
    (fit_scores, test_scores), trained = probe_probabilities(
        train_x.numpy(), labels_matrix(train_records, class_names), [fit_x.numpy(), test_x.numpy()], class_names,
        seed=seed)
    result = clinical_metrics(fit_scores, labels_matrix(fit_records, trained), test_scores,
                              labels_matrix(test_records, trained), trained, test_records, rule,
                              calibration=calibration, bootstrap=bootstrap, seed=seed)
    result.pop("calibrated")
    result["classes_not_trained"] = [c for c in class_names if c not in trained]
    result["fit_records"] = len(fit_records)
    return result


def gradcam_localisation(store: EmbeddingStore, records: list[Record], prompts: PromptSet, out_dir: Path | None,
                         figures: int = 8, tolerance: float = POINTING_TOLERANCE_PX, iou_threshold: float = 0.5,
                         limit: int | None = None, target: str = "evidence", method: str = DEFAULT_CAM_METHOD) -> dict:
    """Pointing game and IoU over every (positive image, finding with a box) pair in ``records``.

    What is explained (``target``):

    * ``"evidence"`` (default) — the finding's zero-shot logit: the similarity to the class's positive
      prompt ensemble minus the similarity to its negative one (multi-label prompt files; the quantity
      whose sigmoid is the zero-shot probability), i.e. the regions that make the model say "effusion"
      rather than "no effusion". Multi-class files: the similarity to the class's prompt ensemble.
    * ``"prompt"`` — the similarity to the class's first positive prompt alone (first template). Much of
      it is what every chest X-ray shares with any text, so it localises worse.

    Boxes are mapped to model-input pixels, where the CAM lives. Figures (original image, overlay,
    report words shaded by relevance) and their raw arrays (.npz) for the first ``figures`` pairs go
    to ``out_dir``.

    Pointing game (Zhang et al. 2018): a hit when the map's maximum lies inside the box grown by
    ``tolerance`` pixels of the original image (their standard: 15). ``pointing_game_strict`` is the
    same with no tolerance.

    Args:
        tolerance: pointing-game tolerance in pixels of the original image.
        limit: stop after this many pairs (None = all).
        method: the class-activation method (:data:`~medclipin.eval.gradcam.CAM_METHODS`).
    """
    if target not in ("evidence", "prompt"):
        raise ValueError(f"target must be 'evidence' or 'prompt', got {target!r}")
    model, processor = store.model, store.processor
    image_cfg = processor.image_cfg
    source = processor.image_source(store.image_cache)
    transform = processor.image_transform(train=False)
    device = next(model.parameters()).device
    class_index = {name: i for i, name in enumerate(prompts.class_names)}
    positive, negative = class_embeddings(store, prompts)
    if target == "evidence":
        directions = positive - negative if negative is not None else positive
    pairs = [(r, b) for r in records for b in r.boxes if b.label in class_index and r.labels.get(b.label) == 1.0
             and r.image_path not in store.rejected]
    if limit is not None:
        pairs = pairs[:limit]
    hits, strict_hits, ious, per_class, per_pair = [], [], [], {}, []
    written: list[str] = []
    for start in range(0, len(pairs), 16):
        chunk = pairs[start:start + 16]
        loaded = [source.load_with_geometry(r.image_path) for r, _ in chunk]
        images = torch.stack([transform(pixels) for pixels, _ in loaded]).to(device)
        prompts_used = [_explained_text(prompts, b.label, target) for _, b in chunk]
        if target == "evidence":
            text_emb = torch.stack([directions[class_index[b.label]] for _, b in chunk]).to(device)
        else:
            text_emb = store.texts(prompts_used).to(device)
        cams = image_cam(model, images, text_emb, method=method)
        for (record, box), cam, (pixels, geometry), shown, prompt in zip(chunk, cams, loaded, images, prompts_used):
            mapped = box_to_input(box.box, geometry, pixels.shape[0], image_cfg.size)
            # original-image pixels → model-input pixels: the geometry's scale, then the final resize
            tolerance_input = tolerance * geometry.scale * image_cfg.size / pixels.shape[0]
            hit = pointing_game_hit(cam, mapped, tolerance_input)
            strict_hits.append(pointing_game_hit(cam, mapped, 0.0))
            iou = cam_box_iou(cam, mapped, iou_threshold)
            hits.append(hit)
            ious.append(iou)
            per_class.setdefault(box.label, []).append(hit)
            entry = {"record_id": record.record_id, "finding": box.label, "prompt": prompt, "hit": bool(hit),
                     "iou": iou, "box_input": [round(float(v), 2) for v in mapped]}
            if out_dir is not None and len(written) < figures:
                relevance = text_relevance(model, processor, shown, processor.report_text(record))
                name = f"gradcam_{len(written):02d}_{_file_safe(box.label)}.png"
                entry["figure"] = _pair_figure(Path(out_dir) / name, record, box, cam, mapped, pixels.shape[0],
                                               geometry, shown, image_cfg, relevance, prompt, hit)
                written.append(entry["figure"])
            per_pair.append(entry)
    return {
        "pointing_game": float(np.mean(hits)) if hits else None,
        "pointing_game_strict": float(np.mean(strict_hits)) if strict_hits else None,
        "iou": float(np.mean(ious)) if ious else None,
        "iou_threshold": iou_threshold,
        "tolerance_px": tolerance,
        "method": method,
        "pairs": len(hits),
        "per_class_pointing_game": {k: float(np.mean(v)) for k, v in per_class.items()},
        "target": target,
        "layer": model.image_encoder.gradcam_layer_name(),
        "per_pair": per_pair,
        "figures": written,
    }


def _explained_text(prompts: PromptSet, label: str, target: str) -> str:
    """What a figure says is explained: the first prompt, or 'positive vs. negative' for the evidence target."""
    first = prompts.first_prompt(label)
    if target == "evidence" and prompts.negative.get(label):
        return f"{prompts.positive[label][0]}  vs.  {prompts.negative[label][0]}"
    return first


def _pair_figure(path: Path, record: Record, box, cam: np.ndarray, mapped, source_side: int, geometry,
                 shown: torch.Tensor, image_cfg, relevance: TextRelevance, prompt: str, hit: bool) -> str:
    """Figure on the original image when it can be read (else on the model input), plus the raw arrays."""
    from medclipin.data.readers import ImageReadError, read_image

    title = (f"explained: \"{prompt}\" (green box: annotated {box.label.lower()}; pointing game "
             f"{'hit' if hit else 'miss'})")
    try:
        original = read_image(record.image_path, window=image_cfg.window).pixels
        cam_shown = cam_to_original(cam, geometry, source_side, original.shape[:2])
        image, box_shown, image_title = original, box.box, "original image"
    except (ImageReadError, OSError):  # e.g. only the decode-once cache is available
        image, cam_shown, box_shown, image_title = display_image(shown, image_cfg), cam, mapped, "model input"
    save_gradcam_figure(path, image, cam_shown, relevance, title=title, box=box_shown, image_title=image_title,
                        text_title="report, words shaded by relevance to this image",
                        map_title="what favours the finding" if " vs. " in prompt else "where the match comes from")
    np.savez_compressed(path.with_suffix(".npz"), cam=cam, cam_shown=cam_shown, box_input=np.array(mapped),
                        words=np.array(relevance.words, dtype=str), word_scores=relevance.scores,
                        word_signed=relevance.signed)
    return str(path)


def evaluate(store: EmbeddingStore, records: list[Record], prompts: PromptSet | None, out_dir: Path | None = None,
             gradcam_figures: int = 8, bootstrap: int = 1000) -> dict:
    """All metrics for one split, as the demo and ``metrics.json`` report them.

    Keys: ``n_records``, ``retrieval`` (``image_to_text``/``text_to_image`` R@1/5/10, ranks),
    and with prompts ``zeroshot`` (``mean_auc``, ``per_class_auc``, per-class CIs) and, where records
    have boxes, ``gradcam`` (``pointing_game``, ``iou``).
    """
    result: dict = {"n_records": len(records), "retrieval": retrieval(store, records)}
    if prompts is not None:
        zs = zero_shot(store, records, prompts, bootstrap=bootstrap)
        zs.pop("scores"), zs.pop("labels")
        result["zeroshot"] = zs
        if any(r.boxes for r in records):
            gc = gradcam_localisation(store, records, prompts, out_dir, figures=gradcam_figures)
            gc.pop("per_pair")
            result["gradcam"] = gc
    return result
