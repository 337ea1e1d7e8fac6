"""Zero-shot classification from pinned prompt files.

A prompt file (YAML) lists templates and, per class, positive and negative descriptions. Each class
embedding is the normalised mean of the normalised embeddings of every template × description
(a prompt ensemble).

- ``multilabel`` (CheXzero style): for each class, softmax over (positive, negative) similarity;
  the score is the positive probability. Threshold rule: positive when the positive prompt wins
  (probability ≥ 0.5).
- ``multiclass``: softmax over the classes' positive embeddings; the prediction is the argmax.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from medclipin.atomic import file_sha256  # noqa: F401 - reports name manifests by it
from medclipin.errors import MedclipinError
from medclipin.eval.embeddings import EmbeddingStore
from medclipin.safe_parse import load_yaml

MODES = ("multilabel", "multiclass")


class PromptFileError(MedclipinError, ValueError):
    """A prompt file is malformed; the message names the file and the field."""


@dataclass
class PromptSet:
    name: str
    mode: str
    templates: list[str]
    positive: dict[str, list[str]]
    negative: dict[str, list[str]] = field(default_factory=dict)
    path: str = ""

    @property
    def class_names(self) -> list[str]:
        return list(self.positive)

    def prompts(self, descriptions: list[str]) -> list[str]:
        return [template.format(d) for template in self.templates for d in descriptions]

    @property
    def sha256(self) -> str:
        """sha256 of the prompt file's bytes ("" for a prompt set built in code): pins exactly what ran."""
        return file_sha256(self.path) if self.path and Path(self.path).is_file() else ""

    def first_prompt(self, class_name: str) -> str:
        """The class's first positive description in the first template (used as Grad-CAM text)."""
        return self.templates[0].format(self.positive[class_name][0])

    def summary(self) -> dict:
        return {
            "name": self.name, "path": self.path, "sha256": self.sha256, "mode": self.mode,
            "templates": list(self.templates), "classes": self.class_names,
            "prompts_per_class": {c: {"positive": len(self.prompts(self.positive[c])),
                                      "negative": len(self.prompts(self.negative.get(c, [])))}
                                  for c in self.class_names},
        }


PACKAGE_PROMPTS = Path(__file__).resolve().parents[1] / "prompts"


def resolve_prompts_path(path: str | os.PathLike) -> Path:
    """A prompt file: the path as given when it exists, else a pinned prompt file shipped with medclipin by
    name (``synthetic``, ``chexpert_5x200``, ``figure1``...; see ``medclipin/prompts/``)."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.stem if given.suffix in (".yaml", ".yml") else given.name
    packaged = PACKAGE_PROMPTS / f"{name}.yaml"
    if packaged.is_file() and len(given.parts) == 1:
        return packaged
    shipped = ", ".join(sorted(p.stem for p in PACKAGE_PROMPTS.glob("*.yaml")))
    raise PromptFileError(f"{path}: prompt file not found (prompt files shipped with medclipin: {shipped})")


def load_prompts(path: str | os.PathLike) -> PromptSet:
    """Read and check a prompt YAML (see docs/architecture.md for the format): a file, or the name of one
    shipped with medclipin (``"synthetic"``)."""
    path = resolve_prompts_path(path)
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PromptFileError(f"{path}: not valid YAML for a prompt file{where} "
                              f"({str(getattr(exc, 'problem', None) or exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("classes"), dict) or not data["classes"]:
        raise PromptFileError(f"{path}: needs a non-empty 'classes' mapping")
    mode = data.get("mode", "multilabel")
    if mode not in MODES:
        raise PromptFileError(f"{path}: 'mode' must be one of {MODES}, got {mode!r}")
    templates = data.get("templates") or ["{}"]
    if not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise PromptFileError(f"{path}: every template must be a string containing '{{}}'")
    for template in templates:
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError):
            raise PromptFileError(f"{path}: template {template!r} must hold '{{}}' and no other '{{...}}' "
                                  "(write '{{{{' and '}}}}' for braces)") from None
    positive, negative = {}, {}
    for name, entry in data["classes"].items():
        entry = {"positive": entry} if isinstance(entry, list) else (entry or {})
        pos = entry.get("positive") or []
        if not pos:
            raise PromptFileError(f"{path}: class {name!r} has no 'positive' descriptions")
        positive[str(name)] = [str(p) for p in pos]
        neg = entry.get("negative") or []
        if mode == "multilabel" and not neg:
            raise PromptFileError(f"{path}: class {name!r} needs 'negative' descriptions in multilabel mode")
        if neg:  # kept in multiclass files too (unused there: softmax over the classes' positives)
            negative[str(name)] = [str(n) for n in neg]
    return PromptSet(name=str(data.get("name", path.stem)), mode=mode, templates=list(templates),
                     positive=positive, negative=negative, path=str(path))


def _ensemble(store: EmbeddingStore, prompts: list[str]) -> torch.Tensor:
    return torch.nn.functional.normalize(store.texts(prompts).mean(0), dim=-1)


def class_embeddings(store: EmbeddingStore, prompt_set: PromptSet) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(C, D) positive class embeddings and, for multilabel, (C, D) negative ones."""
    pos = torch.stack([_ensemble(store, prompt_set.prompts(prompt_set.positive[c])) for c in prompt_set.class_names])
    if prompt_set.mode != "multilabel":
        return pos, None
    neg = torch.stack([_ensemble(store, prompt_set.prompts(prompt_set.negative[c])) for c in prompt_set.class_names])
    return pos, neg


def zero_shot_scores(image_embeddings: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
                     logit_scale: float) -> torch.Tensor:
    """(N, C) class probabilities: pairwise softmax (multilabel) or softmax over classes (multiclass)."""
    pos_logits = logit_scale * image_embeddings @ positive.T
    if negative is None:
        return pos_logits.softmax(dim=-1)
    neg_logits = logit_scale * image_embeddings @ negative.T
    return torch.sigmoid(pos_logits - neg_logits)  # = softmax over the (positive, negative) pair
