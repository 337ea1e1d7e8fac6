"""Geometry normalisation before augmentation: every image becomes a centred square.

* chest X-ray (``domain="cxr"``): aspect-preserving resize of the longest side to ``size`` and
  zero padding to ``size × size`` (no stretching: heart size and rib angles stay true);
* fundus (``domain="fundus"``): find the circular field of view (the bright retina against the
  black camera border), crop to its bounding box, pad to a square, then resize.

Both return the image (same dtype as the input) and a :class:`GeometryInfo` that maps original pixel
coordinates (e.g. manifest boxes) to output coordinates.

Example:
    >>> square, info = normalize_geometry(read_image("fundus.png").pixels, "fundus", 512)
    >>> info.to_output((100.0, 200.0))
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from medclipin.errors import SettingError

DOMAINS = ("cxr", "fundus")
# Field-of-view detection works on a small copy: the border/retina contrast is a low-frequency feature.
_FOV_WORK_SIZE = 256


@dataclass(frozen=True)
class GeometryInfo:
    """How output pixels relate to the original image: crop, then scale, then pad.

    ``output = (original - crop_origin) * scale + pad_offset`` for (x, y) coordinates.
    """

    crop: tuple[int, int, int, int]  # x0, y0, x1, y1 in the original image
    scale: float
    pad: tuple[int, int]  # x, y offset of the resized content in the output
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the input image

    def to_output(self, xy: tuple[float, float]) -> tuple[float, float]:
        """Map an (x, y) point of the original image to the normalised output."""
        return ((xy[0] - self.crop[0]) * self.scale + self.pad[0], (xy[1] - self.crop[1]) * self.scale + self.pad[1])


def _intensity(image: np.ndarray) -> np.ndarray:
    """The channel to threshold: red for colour fundus (brightest, least vignetted), else the image."""
    return image[:, :, 0] if image.ndim == 3 else image


def fundus_fov_box(image: np.ndarray, threshold: float = 0.1) -> tuple[int, int, int, int]:
    """Bounding box (x0, y0, x1, y1) of the fundus field of view.

    Thresholds a smoothed, downscaled red channel at ``threshold`` × its 99th percentile and keeps the
    largest connected component (drops text labels and light leaks in the border). Falls back to
    the whole image when no convincing component (≥ 10% of the area) is found.

    Args:
        image: (H, W, 3) RGB or (H, W), uint8 or float in [0, 1].
        threshold: fraction of the bright level that separates retina from border.
    """
    height, width = image.shape[:2]
    channel = _intensity(image)
    factor = _FOV_WORK_SIZE / max(height, width)
    small = cv2.resize(channel, (max(1, round(width * factor)), max(1, round(height * factor))),
                       interpolation=cv2.INTER_AREA) if factor < 1 else channel
    small = cv2.GaussianBlur(small.astype(np.float32), (5, 5), 0)
    bright = float(np.percentile(small, 99))
    if bright <= 0:
        return (0, 0, width, height)
    mask = (small > threshold * bright).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return (0, 0, width, height)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h, area = (int(v) for v in stats[best])
    if area < 0.1 * mask.size:
        return (0, 0, width, height)
    scale = 1.0 / factor if factor < 1 else 1.0
    x0, y0 = max(0, int(np.floor(x * scale))), max(0, int(np.floor(y * scale)))
    x1, y1 = min(width, int(np.ceil((x + w) * scale))), min(height, int(np.ceil((y + h) * scale)))
    return (x0, y0, x1, y1)


def pad_to_square(image: np.ndarray, value: float = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """Centre the image on a square canvas filled with ``value``; return it and the (x, y) offset."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height == width:
        return image, (0, 0)
    top, left = (side - height) // 2, (side - width) // 2
    canvas = np.full((side, side) + image.shape[2:], value, dtype=image.dtype)
    canvas[top:top + height, left:left + width] = image
    return canvas, (left, top)


def resize_pad(image: np.ndarray, size: int, value: float = 0) -> tuple[np.ndarray, float, tuple[int, int]]:
    """Aspect-preserving resize (longest side = ``size``) and centred padding to ``size × size``.

    Returns the image, the scale factor and the (x, y) padding offset.
    """
    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    if (new_h, new_w) != (height, width):
        # INTER_AREA is the anti-aliased choice for shrinking; it is also fine for the rare enlargement.
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        image = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    if (new_h, new_w) == (size, size):
        return image, scale, (0, 0)
    canvas = np.full((size, size) + image.shape[2:], value, dtype=image.dtype)
    canvas[top:top + new_h, left:left + new_w] = image
    return canvas, scale, (left, top)


def crop_fundus(image: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Crop a fundus photo to its field of view; return the crop and its box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = fundus_fov_box(image)
    return image[y0:y1, x0:x1], (x0, y0, x1, y1)


def normalize_geometry(image: np.ndarray, domain: str, size: int) -> tuple[np.ndarray, GeometryInfo]:
    """Geometry-normalise one image to a ``size × size`` square for its domain.

    Args:
        image: (H, W) or (H, W, 3), uint8 or float32 in [0, 1].
        domain: ``"cxr"`` (resize + pad) or ``"fundus"`` (field-of-view crop, then resize + pad).
        size: output side in pixels.

    Returns:
        (image of the same dtype, GeometryInfo mapping original → output coordinates)
    """
    if domain not in DOMAINS:
        raise SettingError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    height, width = image.shape[:2]
    crop = (0, 0, width, height)
    if domain == "fundus":
        image, crop = crop_fundus(image)
    out, scale, pad = resize_pad(np.ascontiguousarray(image), size)
    return out, GeometryInfo(crop=crop, scale=scale, pad=pad, original_size=(height, width))
