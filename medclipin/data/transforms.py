"""Image tensors for training and evaluation: albumentations pipelines per domain.

Training augmentations (strengths from :class:`~medclipin.config.AugmentConfig`):

* chest X-ray: random resized crop (area 0.8–1, near-square), small affine (rotation ±7°,
  translation ±4%, scale ±5%), brightness/contrast, gamma. Never a vertical flip; horizontal flip
  only if configured (laterality matters: dextrocardia, left-sided findings).
* fundus: the same crop and affine, horizontal and vertical flips, colour jitter.

Evaluation is deterministic: pad to square (if needed) and resize to ``cfg.size``.

Everything geometric happens first and lands at ``size × size``, so the photometric ops run on the
small image; uint8 input stays uint8 until the final normalisation (albumentations' uint8 paths use
lookup tables and are the fastest).

Example:
    >>> transform = build_image_transform(ImageConfig(size=224), train=True)
    >>> transform(read_image("chest.dcm").pixels).shape
    torch.Size([1, 224, 224])
"""

from __future__ import annotations

import os
import random
from typing import Callable

import cv2
import numpy as np
import torch

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones PyPI at import otherwise
import albumentations as A  # noqa: E402

from medclipin.config import ImageConfig  # noqa: E402
from medclipin.data.geometry import pad_to_square  # noqa: E402
from medclipin.errors import SettingError  # noqa: E402

# ITU-R BT.601 luma, the usual RGB→grey weights
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """RGB → luminance when one channel is wanted (before augmenting: fewer pixels to process)."""
    if channels == 1 and image.ndim == 3:
        if image.dtype == np.uint8:
            return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return np.ascontiguousarray(image @ _LUMA, dtype=np.float32)
    return image


def _train_ops(cfg: ImageConfig) -> list:
    aug, size = cfg.augment, cfg.size
    ops: list = [
        A.RandomResizedCrop(size=(size, size), scale=(aug.scale_min, aug.scale_max), ratio=(0.9, 1.1),
                            interpolation=cv2.INTER_AREA, p=1.0),
    ]
    if aug.horizontal_flip > 0:
        ops.append(A.HorizontalFlip(p=aug.horizontal_flip))
    if aug.vertical_flip > 0 and cfg.domain != "cxr":  # a chest X-ray is never upside down
        ops.append(A.VerticalFlip(p=aug.vertical_flip))
    if aug.rotate_limit > 0 or aug.translate > 0:
        ops.append(A.Affine(rotate=(-aug.rotate_limit, aug.rotate_limit),
                            translate_percent=(-aug.translate, aug.translate), scale=(0.95, 1.05),
                            border_mode=cv2.BORDER_CONSTANT, fill=0, p=0.8))
    if aug.brightness_contrast > 0:
        ops.append(A.RandomBrightnessContrast(brightness_limit=aug.brightness_contrast,
                                              contrast_limit=aug.brightness_contrast, p=0.8))
    if aug.gamma and tuple(aug.gamma) != (100.0, 100.0):
        ops.append(A.RandomGamma(gamma_limit=tuple(aug.gamma), p=0.5))
    if aug.color_jitter > 0 and cfg.channels == 3:
        jitter = aug.color_jitter
        ops.append(A.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=jitter / 4, p=0.8))
    return ops


class ImageTransform:
    """Callable array → normalised tensor (C, S, S). Built by :func:`build_image_transform`.

    Picklable. Re-seeds its random state once in each new process (DataLoader workers are forked
    copies and would otherwise all draw the same augmentations).
    """

    def __init__(self, cfg: ImageConfig, train: bool):
        self.cfg = cfg
        self.train = bool(train and cfg.augment.enabled)
        self.size = int(cfg.size)
        self.channels = int(cfg.channels)
        if self.channels not in (1, 3):
            raise SettingError(f"image.channels must be 1 or 3, got {self.channels}")
        mean, std = normalization(cfg)
        # (x * scale - mean) / std as x * (scale / std) - mean / std, per channel
        self._mul = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(-1, 1, 1)
        self._sub = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32).view(-1, 1, 1)
        ops = _train_ops(cfg) if self.train else [A.Resize(self.size, self.size, interpolation=cv2.INTER_AREA)]
        self.pipeline = A.Compose(ops)
        self._seed_pipeline(None)  # fresh entropy, one stream shared by all ops
        self._pid = os.getpid()

    def _reseed_if_forked(self) -> None:
        if os.getpid() == self._pid:
            return
        self._pid = os.getpid()
        info = torch.utils.data.get_worker_info()
        # worker seeds derive from the DataLoader's base seed: reproducible when torch is seeded
        self._seed_pipeline(int(info.seed % 2**32) if info is not None else None)

    def _seed_pipeline(self, seed: int | None) -> None:
        # One generator shared by all ops. Not Compose.set_random_seed: that seeds every op with the
        # *same* seed, so all ops draw the same numbers (e.g. horizontal and vertical flip always
        # fire together, and rotation and brightness are perfectly correlated).
        self.pipeline.set_random_state(np.random.default_rng(seed), random.Random(seed))

    def reseed(self, seed: int) -> None:
        """Seed the augmentations explicitly (the dataset seeds per item, so runs and resumes repeat exactly)."""
        self._pid = os.getpid()
        self._seed_pipeline(seed)

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim not in (2, 3):
            raise ValueError(f"expected an (H, W) or (H, W, 3) array, got shape {image.shape}")
        if image.dtype != np.uint8:
            image = image.astype(np.float32, copy=False)
        image = _to_channels(image, self.channels)
        if image.shape[0] != image.shape[1]:  # not geometry-normalised: pad (never stretch)
            image, _ = pad_to_square(image)
        if self.train:
            self._reseed_if_forked()
        out = self.pipeline(image=image)["image"]
        tensor = torch.from_numpy(np.ascontiguousarray(out))
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        else:
            tensor = tensor.permute(2, 0, 1)
        scale = 1.0 / 255.0 if tensor.dtype == torch.uint8 else 1.0
        tensor = tensor.float()
        if self.channels == 3 and tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1).contiguous()
        return tensor.mul_(self._mul * scale).sub_(self._sub)


def normalization(cfg: ImageConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` with one value per channel. An empty config value means "not resolved yet" (the
    processor fills it from the image tower's weights); the from-scratch default 0.5 / 0.25 applies."""
    def values(v) -> tuple[float, ...]:
        return (float(v),) if isinstance(v, (int, float)) else tuple(float(x) for x in v)

    mean, std = values(cfg.mean) or (0.5,), values(cfg.std) or (0.25,)
    channels = int(cfg.channels)
    for name, values in (("mean", mean), ("std", std)):
        if len(values) not in (1, channels):
            raise SettingError(f"data.image.{name} has {len(values)} values; expected 1 or {channels} "
                               "(one per channel)")
    if any(s <= 0 for s in std):
        raise SettingError(f"data.image.std must be > 0, got {std}")
    return (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)


def build_image_transform(cfg: ImageConfig, train: bool) -> Callable[[np.ndarray], torch.Tensor]:
    """Build the array → tensor transform for one domain.

    Args:
        cfg: ``ImageConfig``: ``domain`` picks the augmentations, ``size``/``channels``/``mean``/``std``
            the output; ``augment`` holds the strengths.
        train: random augmentations when True (and ``cfg.augment.enabled``); deterministic resize otherwise.

    Returns:
        A picklable callable: float32 [0, 1] or uint8 array (H, W) or (H, W, 3), any size (non-square
        input is zero-padded to square, never stretched) → float tensor (cfg.channels, size, size),
        normalised with ``(x - mean) / std``. Grey input is replicated to 3 channels when
        ``channels == 3``; RGB becomes luminance when ``channels == 1``.

    Example:
        >>> t = build_image_transform(ImageConfig(size=224, channels=3, domain="fundus"), train=False)
        >>> t(np.zeros((512, 512, 3), np.uint8)).shape
        torch.Size([3, 224, 224])
    """
    return ImageTransform(cfg, train)


class TwoViewTransform:
    """Two independent augmentations of the same image (the two image views of CLIPin).

    Example:
        >>> view_1, view_2 = TwoViewTransform(build_image_transform(cfg, train=True))(image)
    """

    def __init__(self, transform: Callable[[np.ndarray], torch.Tensor]):
        self.transform = transform

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(image), self.transform(image)
