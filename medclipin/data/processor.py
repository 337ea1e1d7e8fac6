"""The processor: how an image and a report become model inputs, saved beside the model and loaded with it.

One object holds both halves, as a Hugging Face processor does:

* images — the domain's geometry (chest X-ray: pad to square; fundus: field-of-view crop), the
  resolution, the channel count, the DICOM window and the input normalisation of the image tower;
* text — the tokenizer with its settings (which report sections, maximum length, which end is cut).

Training (the dataset and its collator), validation, evaluation, Grad-CAM, the benchmarks and the
public API all go through it, so a model is always fed exactly as it was trained. The tokenizer is
private to the processor: its truncation side is set once, here, and nobody else changes it.

Example:
    >>> model, processor = medclipin.load("runs/demo")
    >>> pixels = processor.images(["chest.dcm"])              # (1, C, S, S)
    >>> tokens = processor.texts(["no pleural effusion."])    # input_ids, attention_mask
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from medclipin.config import ImageConfig, TextConfig, _build, config_to_dict
from medclipin.errors import MedclipinError
from medclipin.safe_parse import load_json

PROCESSOR_NAME = "processor.json"
PROCESSOR_FORMAT = 1

ImageInput = Union[str, os.PathLike, np.ndarray]


class ProcessorError(MedclipinError, ValueError):
    """A processor folder or input is invalid; the message names the file or field."""


class Processor:
    """Image preprocessing for the model's domain plus its tokenizer and text settings.

    Args:
        image_cfg: geometry, size, channels, DICOM window, normalisation (``mean``/``std`` must be
            resolved: :func:`medclipin.models.weights.resolve_normalization` does it for a config).
        text_cfg: sections, ``max_length``, ``truncation_side``.
        tokenizer: a Hugging Face fast tokenizer. The processor keeps its own copy, so setting the
            truncation side here never changes a tokenizer someone else holds. None for image-only
            use (the supervised ceiling); :meth:`texts` then raises.
    """

    def __init__(self, image_cfg: ImageConfig, text_cfg: TextConfig, tokenizer):
        if text_cfg.truncation_side not in ("left", "right"):
            raise ProcessorError(f"data.text.truncation_side must be 'left' or 'right', got {text_cfg.truncation_side!r}")
        if text_cfg.max_length < 2:
            raise ProcessorError(f"data.text.max_length must be >= 2, got {text_cfg.max_length}")
        self.image_cfg = copy.deepcopy(image_cfg)
        self.text_cfg = copy.deepcopy(text_cfg)
        self.tokenizer = copy.deepcopy(tokenizer)
        if self.tokenizer is not None:
            self.tokenizer.truncation_side = text_cfg.truncation_side
        self._eval_transform = None
        self._sources: dict[str, object] = {}

    # ------------------------------------------------------------------------------------ text
    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def report_text(self, record) -> str:
        """The text of a manifest record that the model reads (the configured sections, cleaned)."""
        from medclipin.data.reports import record_text

        return record_text(record, self.text_cfg.sections)

    def texts(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise a batch: ``input_ids`` and ``attention_mask`` (B, L), padded to the longest, cut at
        ``max_length`` on the configured side."""
        if isinstance(texts, str):
            texts = [texts]
        if self.tokenizer is None:
            raise ProcessorError("this processor has no tokenizer (image-only)")
        encoded = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.text_cfg.max_length,
                                 return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def encode_words(self, text: str):
        """One text's encoding with word/character alignment (text-side Grad-CAM needs it)."""
        return self.tokenizer([text], truncation=True, max_length=self.text_cfg.max_length, return_tensors="pt")

    # ---------------------------------------------------------------------------------- images
    def image_transform(self, train: bool = False):
        """Array → normalised tensor (C, S, S): augmenting (``train``) or the deterministic evaluation one."""
        from medclipin.data.transforms import build_image_transform

        if train:
            return build_image_transform(self.image_cfg, train=True)
        if self._eval_transform is None:
            self._eval_transform = build_image_transform(self.image_cfg, train=False)
        return self._eval_transform

    def image_source(self, cache_dir: str = ""):
        """Decoded, geometry-normalised uint8 images of files, from a decode-once cache or the originals."""
        from medclipin.data.image_source import open_image_source

        key = os.fspath(cache_dir) if cache_dir else ""
        if key not in self._sources:
            self._sources[key] = open_image_source(self.image_cfg, key)
        return self._sources[key]

    def load_image(self, image: ImageInput, cache_dir: str = ""):
        """``(uint8 pixels (S', S'[, 3]), GeometryInfo)`` of a file path or an array, as the model sees it before
        its transform (a file is decoded with the configured DICOM window; an array is taken as decoded:
        float in [0, 1] or uint8, (H, W) or (H, W, 3))."""
        if isinstance(image, (str, os.PathLike)):
            return self.image_source(cache_dir).load_with_geometry(os.fspath(image))
        if isinstance(image, np.ndarray):
            return self._prepare_array(image)
        try:  # a PIL image
            return self._prepare_array(np.asarray(image))
        except Exception as exc:  # noqa: BLE001
            raise ProcessorError(f"unsupported image input of type {type(image).__name__}: pass a file path or "
                                 "a numpy array") from exc

    def _prepare_array(self, array: np.ndarray):
        from medclipin.data.geometry import normalize_geometry

        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise ProcessorError(f"image array must be (H, W) or (H, W, 3), got shape {array.shape}")
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[..., :3]
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        pixels = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
        if self.image_cfg.channels == 1 and pixels.ndim == 3:
            pixels = np.ascontiguousarray(pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))
        elif self.image_cfg.channels == 3 and pixels.ndim == 2:
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        square, info = normalize_geometry(np.clip(pixels, 0.0, 1.0), self.image_cfg.domain, self.image_cfg.size)
        return np.rint(square * np.float32(255.0)).astype(np.uint8), info

    def images(self, images: Sequence[ImageInput], cache_dir: str = "") -> torch.Tensor:
        """(B, C, S, S) evaluation tensors of file paths or arrays."""
        if isinstance(images, (str, os.PathLike, np.ndarray)):
            images = [images]
        transform = self.image_transform(train=False)
        return torch.stack([transform(self.load_image(image, cache_dir)[0]) for image in images])

    def __call__(self, images: Sequence[ImageInput] | None = None, text: Sequence[str] | None = None) -> dict:
        """Model inputs for images and/or texts: ``{"image", "input_ids", "attention_mask"}``."""
        out: dict = {}
        if images is not None:
            out["image"] = self.images(images)
        if text is not None:
            out.update(self.texts(text))
        return out

    # ----------------------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        image = config_to_dict(self.image_cfg)
        image.pop("augment", None)  # training augmentation is the run's business, not the model's
        return {"format_version": PROCESSOR_FORMAT, "image": image, "text": config_to_dict(self.text_cfg)}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``processor.json`` and the tokenizer files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2))
        self.tokenizer.save_pretrained(str(directory))

    @classmethod
    def from_dict(cls, values: dict, tokenizer, where: str = "processor") -> "Processor":
        """A processor from saved settings, checked against :func:`check_saved_settings`'s bounds (a model folder
        may come from anywhere: its ``processor.json`` must not allocate 160 GB or switch the bomb guard off)."""
        try:
            image = _build(ImageConfig, dict(values.get("image") or {}), "image.")
            text = _build(TextConfig, dict(values.get("text") or {}), "text.")
        except MedclipinError as exc:
            raise ProcessorError(f"{where}: {exc}") from None
        check_saved_settings(image, text, where)
        return cls(image, text, tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Processor":
        """Load a processor saved by :meth:`save_pretrained` (a model folder holds one)."""
        from medclipin.data.tokenizer import load_tokenizer

        directory = Path(directory)
        path = directory / PROCESSOR_NAME
        if not path.is_file():
            raise ProcessorError(f"{directory}: no {PROCESSOR_NAME} (not a medclipin model folder)")
        try:
            values = load_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ProcessorError(f"{path}: not readable JSON ({exc})") from None
        if not isinstance(values, dict):
            raise ProcessorError(f"{path}: top level must be an object")
        try:
            tokenizer = load_tokenizer(str(directory))
        except MedclipinError:
            raise
        except Exception as exc:  # noqa: BLE001 - a tampered tokenizer.json fails inside transformers/tokenizers
            problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ProcessorError(f"{directory}: the tokenizer files cannot be loaded ({type(exc).__name__}: "
                                 f"{problem})") from None
        processor = cls.from_dict(values, tokenizer, where=str(path))
        check_against_model_config(processor, directory)
        return processor

    def with_text(self, **changes) -> "Processor":
        """A copy with other text settings (e.g. ``max_length``) and the same tokenizer."""
        return Processor(self.image_cfg, replace(self.text_cfg, **changes), self.tokenizer)


# bounds of what a saved processor may ask for: no model here is trained above 4096 px, 3 channels or 8192 tokens
MAX_SAVED_IMAGE_SIZE = 4096
MAX_SAVED_TEXT_LENGTH = 8192


def check_saved_settings(image: ImageConfig, text: TextConfig, where: str) -> None:
    """Refuse saved settings that are out of range (B7, W10 of issue 25): an image size that would allocate
    gigabytes per image, a channel count the towers do not take, ``max_pixels <= 0`` (which switches the
    decompression-bomb guard off for whatever images the model is given), an unknown domain or window."""
    from medclipin.data.geometry import DOMAINS
    from medclipin.data.reader_base import WINDOWS

    problems = []
    if not 16 <= image.size <= MAX_SAVED_IMAGE_SIZE:
        problems.append(f"image.size {image.size} is outside 16..{MAX_SAVED_IMAGE_SIZE}")
    if image.channels not in (1, 3):
        problems.append(f"image.channels {image.channels} is not 1 or 3")
    if image.max_pixels <= 0:
        problems.append(f"image.max_pixels {image.max_pixels} would switch off the limit on decoded image size")
    if image.domain not in DOMAINS:
        problems.append(f"image.domain {image.domain!r} is not one of {DOMAINS}")
    if image.window not in WINDOWS:
        problems.append(f"image.window {image.window!r} is not one of {WINDOWS}")
    if not 1 <= text.max_length <= MAX_SAVED_TEXT_LENGTH:
        problems.append(f"text.max_length {text.max_length} is outside 1..{MAX_SAVED_TEXT_LENGTH}")
    if problems:
        raise ProcessorError(f"{where}: {'; '.join(problems)}")


def check_against_model_config(processor: "Processor", directory: Path) -> None:
    """The processor must feed the model saved beside it (W11 of issue 25): the image size and channels its
    image tower was built for, and token ids below its text tower's vocabulary size (larger ids index past the
    embedding table). Folders without a readable format-2 ``config.json`` are left to the model's loader."""
    try:
        saved = load_json((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    spec = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(spec, dict):
        return
    where = directory / PROCESSOR_NAME
    for key, name in (("image_size", "size"), ("in_chans", "channels")):
        built = spec.get(key)
        if isinstance(built, int) and built != getattr(processor.image_cfg, name):
            raise ProcessorError(f"{where}: image.{name} is {getattr(processor.image_cfg, name)}, but the model in "
                                 f"config.json was built for {built}; the two files do not belong together")
    hf = saved.get("text_hf_config")
    vocab = hf.get("vocab_size") if isinstance(hf, dict) else None
    if processor.tokenizer is not None and isinstance(vocab, int) and len(processor.tokenizer) > vocab:
        raise ProcessorError(f"{directory}: the tokenizer has {len(processor.tokenizer)} tokens, more than the "
                             f"{vocab} of the model's text tower in config.json; the two do not belong together")
