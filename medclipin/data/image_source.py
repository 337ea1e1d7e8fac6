"""Where the dataset gets its images: a file decoded into geometry-normalised 8-bit pixels, on the fly
or from the decode-once cache.

A full-resolution chest X-ray DICOM takes 5–800 ms to decode; a training step needs 50–300 images/s.
``medclipin preprocess`` (:mod:`medclipin.data.preprocess`) therefore runs :func:`prepare_image` once
per file and stores the result (:mod:`medclipin.data.image_cache`); :func:`open_image_source` gives the
dataset one object that either reads that cache or runs :func:`prepare_image` itself, so a cached and
an uncached run see the same pixels.

Example:
    >>> source = open_image_source(cfg.data.image, cfg.data.cache)
    >>> image, geometry = source.load_with_geometry("a.dcm")
    >>> image.shape, image.dtype
    ((512, 512), dtype('uint8'))
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import cv2
import numpy as np

from medclipin.data.geometry import GeometryInfo, normalize_geometry
from medclipin.data.image_cache import CacheError, CacheReader
from medclipin.data.reader_base import DEFAULT_MAX_PIXELS, check_max_pixels
from medclipin.data.readers import read_image

if TYPE_CHECKING:  # the config composes the data layer's settings; the data layer does not need it at run time
    from medclipin.config import ImageConfig

log = logging.getLogger(__name__)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def default_channels(domain: str) -> int:
    """Chest X-rays are grey (1 channel); fundus photographs are colour (3)."""
    return 3 if domain == "fundus" else 1


def match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Grey ↔ RGB as the configuration asks (BT.601 luminance for RGB → grey)."""
    if channels == 1 and image.ndim == 3:
        if image.dtype == np.uint8:
            return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return np.ascontiguousarray(image @ _LUMA, dtype=np.float32)
    if channels == 3 and image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def prepare_image(path: str, domain: str, size: int, channels: int, window: str = "first", *,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, GeometryInfo]:
    """Decode, geometry-normalise and quantise one image: exactly what the cache stores.

    Args:
        max_pixels: refuse larger images before decoding (see :func:`~medclipin.data.readers.read_image`).

    Returns:
        (uint8 array (size, size) or (size, size, 3), GeometryInfo original → output)

    Raises:
        ImageReadError: the file cannot be decoded.
    """
    pixels = read_image(path, window=window, max_pixels=max_pixels).pixels
    pixels = match_channels(pixels, channels)
    # resize in float, quantise last: one rounding step only
    square, info = normalize_geometry(pixels, domain, size)
    return np.rint(square * np.float32(255.0)).astype(np.uint8), info


class ImageSource:
    """Where the dataset gets geometry-normalised images: the cache, or decoding on the fly.

    ``load(path)`` always returns **uint8**, (S, S) for ``channels == 1`` or (S, S, 3), where S is the
    cache's size (cache) or ``cfg.size`` (decoding). Both paths run :func:`prepare_image`, so a cached
    and an uncached run see the same pixels. Picklable: memory maps and the index open lazily in
    each process (DataLoader workers).
    """

    def __init__(self, cfg: "ImageConfig", cache_dir: str = "", *, max_pixels: int | None = None):
        self.cfg = cfg
        self.cache_dir = os.fspath(cache_dir) if cache_dir else ""
        self.channels = int(cfg.channels)
        self.max_pixels = _resolve_max_pixels(cfg, max_pixels)
        self._cache: CacheReader | None = None
        if self.cache_dir:
            # validate in the main process, so a wrong folder fails before workers start
            self._cache = CacheReader(self.cache_dir)
            built_for = self._cache.meta["domain"]
            if built_for != cfg.domain:
                raise CacheError(f"{self.cache_dir} was built for domain {built_for!r} but the config "
                                 f"says {cfg.domain!r}; run `medclipin preprocess --domain {cfg.domain}` into another folder")
            # the DICOM window decides the stored pixels: another one would train on other pixels than configured
            window = self._cache.meta.get("window", cfg.window)
            if window != cfg.window:
                raise CacheError(f"{self.cache_dir} was built with DICOM window {window!r} but the config says "
                                 f"{cfg.window!r} (data.image.window); run `medclipin preprocess --window "
                                 f"{cfg.window}` into another folder, or set data.image.window={window}")
            size = self._cache.meta.get("size")
            if isinstance(size, int) and size < cfg.size:
                log.warning("%s holds %d px images, smaller than data.image.size=%d: they are enlarged, with no "
                            "more detail than the cache kept", self.cache_dir, size, cfg.size)

    def load_with_geometry(self, path: str) -> tuple[np.ndarray, GeometryInfo]:
        """Like :meth:`load`, plus the mapping from original pixel coordinates to the returned image."""
        if self._cache is None:
            return prepare_image(path, self.cfg.domain, self.cfg.size, self.channels, self.cfg.window,
                                 max_pixels=self.max_pixels)
        image, info = self._cache.read(path)
        return match_channels(image, self.channels), info

    def load(self, path: str) -> np.ndarray:
        """The geometry-normalised uint8 image of ``path``.

        Raises:
            CacheError: (cache) the path is not in the cache; the message says which command builds it.
            ImageReadError: the file cannot be decoded (with a cache: it was rejected when the cache was
                built; the message gives the original reason).
        """
        return self.load_with_geometry(path)[0]


def _resolve_max_pixels(cfg, max_pixels: int | None) -> int:
    """An explicit ``max_pixels``; else the config's ``max_pixels`` field when it has one; else the default."""
    if max_pixels is None:
        max_pixels = getattr(cfg, "max_pixels", DEFAULT_MAX_PIXELS)
    check_max_pixels(max_pixels)
    return max_pixels


def open_image_source(cfg: "ImageConfig", cache_dir: str = "", *, max_pixels: int | None = None) -> ImageSource:
    """The single image entry point of the dataset.

    Args:
        cfg: image configuration (domain, size, channels, window; ``max_pixels`` when it has that field).
        cache_dir: a ``medclipin preprocess`` output folder, or ``""`` to decode originals on the fly.
        max_pixels: pixel limit for decoding on the fly (refused before decoding); ``None``: the config's
            ``max_pixels`` if it has one, else 100 megapixels; ``0``: no limit. A cache was decoded with
            the limit given to ``medclipin preprocess``.

    Returns:
        A picklable :class:`ImageSource`; ``source.load(path)`` returns a uint8 (S, S[, 3]) array.

    Example:
        >>> source = open_image_source(cfg.data.image, cfg.data.cache)
        >>> tensor = build_image_transform(cfg.data.image, train=True)(source.load(record.image_path))
    """
    return ImageSource(cfg, cache_dir, max_pixels=max_pixels)
