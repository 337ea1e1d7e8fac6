"""The public API: load a model in one line, then embed, classify, retrieve and explain plain images and texts.

Example:
    >>> import medclipin
    >>> model, processor = medclipin.load("demo_out/run")            # a model, run or checkpoint folder
    >>> scores = medclipin.zero_shot(model, processor, ["chest.dcm"],
    ...                              {"Pleural Effusion": ("pleural effusion", "no pleural effusion")})
    >>> scores["Pleural Effusion"]                                   # probability per image
    >>> hits = medclipin.retrieve(model, processor, "large left pleural effusion", ["a.png", "b.dcm"], k=1)
    >>> explanation = medclipin.explain(model, processor, "chest.dcm", "left pleural effusion")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from medclipin.data.processor import Processor, ProcessorError
from medclipin.errors import MedclipinError
from medclipin.models.model import CONFIG_NAME, WEIGHTS_NAME, MedClipModel, ModelFolderError, read_model_config


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The model folder behind ``path``: a model folder, a run folder (``RUN/model``) or a checkpoint folder
    (``CKPT/model``). A :class:`ModelFolderError` names the path and what it holds instead."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"{path}: no such file or folder")
    if not path.is_dir():
        raise ModelFolderError(f"{path}: is a file; expected a model, run or checkpoint folder")
    for candidate in (path, path / "model"):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / CONFIG_NAME).is_file():
            return candidate
    hint = ""
    if (path / "open_clip_config.json").is_file():
        hint = f" (an open_clip folder: load it as open_clip:local-dir:{path})"
    elif (path / "checkpoints").is_dir() and not (path / "model").is_dir():
        hint = " (a run folder without a final model: the run did not finish; use one of its checkpoints/step_*)"
    raise ModelFolderError(f"{path}: no medclipin model here (expected {WEIGHTS_NAME} + {CONFIG_NAME} in it "
                           f"or in its model/ folder){hint}")


def load_processor(model_dir: str | os.PathLike) -> Processor:
    """The processor saved with a model (``processor.json`` + tokenizer); format-1 folders kept it in config.json."""
    from medclipin.data.processor import PROCESSOR_NAME
    from medclipin.data.tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    if (model_dir / PROCESSOR_NAME).is_file():
        return Processor.from_pretrained(model_dir)
    saved = read_model_config(model_dir)
    if "image" in saved and "text" in saved:  # format 1
        return Processor.from_dict({"image": saved["image"], "text": saved["text"]}, load_tokenizer(str(model_dir)),
                                   where=str(model_dir / CONFIG_NAME))
    raise ProcessorError(f"{model_dir}: no {PROCESSOR_NAME}: the model was saved without its processor")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", weights: str = "") -> tuple[MedClipModel, Processor]:
    """``(model, processor)`` from a medclipin folder or a third-party CLIP, ready for inference (eval mode, fp32).

    Args:
        path: ``RUN`` (uses ``RUN/model``), ``RUN/checkpoints/step_N`` or a model folder; or a base CLIP spec
            (:mod:`medclipin.models.bases`): ``open_clip:local-dir:DIR``, ``hf:DIR``, ``open_clip:ARCH`` with
            ``weights``.
        device: ``"cpu"``, ``"cuda"``, ...
        weights: the weights file of an ``open_clip:ARCH`` spec (OpenAI archive, ``epoch_N.pt``, ...).

    Raises:
        ModelFolderError: the path is not a model folder (the message names it and what is missing).
        BaseError: a base spec cannot be loaded (the message says why).
    """
    from medclipin.models.bases import is_base_spec, load_base

    if is_base_spec(str(path)):
        model, processor = load_base(str(path), weights)
        return model.to(device).float().eval(), processor
    if weights:
        raise ModelFolderError(f"{path}: weights are given with an open_clip:<arch> spec only; a medclipin folder "
                               "holds its own")
    model_dir = resolve_model_dir(path)
    model = MedClipModel.from_pretrained(model_dir).to(device).float().eval()
    return model, load_processor(model_dir)


# ------------------------------------------------------------------------------------- embeddings
@torch.no_grad()
def embed_images(model: MedClipModel, processor: Processor, images, batch_size: int = 32) -> torch.Tensor:
    """(N, D) L2-normalised embeddings of image files or arrays."""
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        images = [images]
    device = next(model.parameters()).device
    chunks = [model.encode_image(processor.images(images[i:i + batch_size]).to(device)).float().cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, model.embed_dim)


@torch.no_grad()
def embed_texts(model: MedClipModel, processor: Processor, texts: Sequence[str] | str, batch_size: int = 64) -> torch.Tensor:
    """(N, D) L2-normalised embeddings of texts."""
    if isinstance(texts, str):
        texts = [texts]
    device = next(model.parameters()).device
    chunks = []
    for i in range(0, len(texts), batch_size):
        tokens = {k: v.to(device) for k, v in processor.texts(texts[i:i + batch_size]).items()}
        chunks.append(model.encode_text(**tokens).float().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, model.embed_dim)


# ------------------------------------------------------------------------------------- zero-shot
ClassPrompts = Mapping[str, "str | Sequence[str] | tuple[str | Sequence[str], str | Sequence[str]]"]


def _prompt_set(classes, templates: Sequence[str] | None):
    from medclipin.eval.zeroshot import PromptSet, load_prompts

    if isinstance(classes, (str, os.PathLike)):
        return load_prompts(classes)
    if isinstance(classes, PromptSet):
        return classes
    positive, negative = {}, {}
    for name, value in classes.items():
        if isinstance(value, tuple) and len(value) == 2:
            pos, neg = value
            negative[name] = [neg] if isinstance(neg, str) else list(neg)
        else:
            pos = value
        positive[name] = [pos] if isinstance(pos, str) else list(pos)
    mode = "multilabel" if negative and len(negative) == len(positive) else "multiclass"
    if negative and len(negative) != len(positive):
        raise ValueError("give every class a (positive, negative) pair, or none of them (multi-class)")
    return PromptSet(name="api", mode=mode, templates=list(templates or ["{}"]), positive=positive, negative=negative)


@dataclass
class ZeroShotResult:
    """Per-image class probabilities.

    Attributes:
        class_names: the classes, in column order.
        scores: (N, C) probabilities: per class positive-vs-negative (multi-label) or softmax over classes.
        mode: ``"multilabel"`` or ``"multiclass"``.
    """

    class_names: list[str]
    scores: np.ndarray
    mode: str

    def __getitem__(self, class_name: str) -> np.ndarray:
        return self.scores[:, self.class_names.index(class_name)]


def zero_shot(model: MedClipModel, processor: Processor, images, classes, templates: Sequence[str] | None = None,
              ) -> ZeroShotResult:
    """Zero-shot classification of image files or arrays.

    Args:
        images: file paths (DICOM, PNG, JPEG) or arrays.
        classes: a prompt file path (``datasets/**/prompts*.yaml``), a ``PromptSet``, or a mapping
            ``class → (positive, negative)`` (multi-label: one probability per class, CheXzero style)
            or ``class → positive`` (multi-class: softmax over classes). Each side may be a list of
            descriptions (a prompt ensemble).
        templates: e.g. ``["{}.", "findings: {}."]`` for mappings (default ``["{}"]``).
    """
    from medclipin.eval.zeroshot import zero_shot_scores

    prompt_set = _prompt_set(classes, templates)
    positive, negative = _class_embeddings(model, processor, prompt_set)
    image_embeddings = embed_images(model, processor, images)
    scale = float(model.logit_scale.detach().exp())
    scores = zero_shot_scores(image_embeddings, positive, negative, scale).numpy()
    return ZeroShotResult(prompt_set.class_names, scores, prompt_set.mode)


def _class_embeddings(model, processor, prompt_set):
    def ensemble(descriptions):
        return torch.nn.functional.normalize(embed_texts(model, processor, prompt_set.prompts(descriptions)).mean(0), dim=-1)

    positive = torch.stack([ensemble(prompt_set.positive[c]) for c in prompt_set.class_names])
    if prompt_set.mode != "multilabel":
        return positive, None
    return positive, torch.stack([ensemble(prompt_set.negative[c]) for c in prompt_set.class_names])


# ------------------------------------------------------------------------------------- retrieval
@dataclass
class Hit:
    """One retrieved item: its position in the gallery, the item itself and the cosine similarity."""

    index: int
    item: object
    score: float


def retrieve(model: MedClipModel, processor: Processor, query, gallery: Sequence, k: int = 5) -> list[Hit]:
    """The ``k`` gallery items closest to ``query``.

    A text query searches a gallery of images (files or arrays); an image query (a path or an array)
    searches a gallery of texts. Scores are cosine similarities of the joint embeddings.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    text_query = isinstance(query, str) and not _is_image_path(query)
    if text_query:
        q, g = embed_texts(model, processor, [query]), embed_images(model, processor, list(gallery))
    else:
        q, g = embed_images(model, processor, [query]), embed_texts(model, processor, list(gallery))
    sims = (q @ g.T)[0]
    top = torch.topk(sims, min(k, len(gallery)))
    return [Hit(int(i), gallery[int(i)], float(s)) for s, i in zip(top.values, top.indices)]


def _is_image_path(value: str) -> bool:
    return os.path.isfile(value)


# ------------------------------------------------------------------------------------- Grad-CAM
def explain(model: MedClipModel, processor: Processor, image, text: str, contrast: str | None = None,
            method: str = "hirescam"):
    """Multimodal Grad-CAM: where in ``image`` (a file path or an array) and which words of ``text`` drive
    their similarity — or, with ``contrast`` (e.g. ``"no pleural effusion"``), what makes the model prefer
    ``text`` over ``contrast``. Returns an :class:`~medclipin.eval.gradcam.Explanation`; save it with
    :func:`medclipin.eval.gradcam.save_explanation`."""
    from medclipin.eval.gradcam import explain as _explain

    return _explain(model, processor, image, text, contrast=contrast, method=method)


__all__ = ["load", "load_processor", "resolve_model_dir", "embed_images", "embed_texts", "zero_shot",
           "ZeroShotResult", "retrieve", "Hit", "explain", "ModelFolderError", "MedclipinError"]
