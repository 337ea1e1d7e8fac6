"""What every image reader shares: the result types, the error and the scaling to [0, 1].

The bottom of the image readers, like MONAI's ``image_reader`` base: :mod:`medclipin.data.dicom`
(DICOM) and :mod:`medclipin.data.readers` (PNG/JPEG and the format dispatch, ``read_image``) both
import this module, and it imports neither of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medclipin.errors import MedclipinError

WINDOWS = ("first", "percentile", "none")
# Percentiles used by window="percentile": robust to burned-in labels and collimator edges.
PERCENTILE_WINDOW = (0.5, 99.5)


class ImageReadError(MedclipinError, ValueError):
    """An image file cannot be read. The message names the file, (for DICOM) the transfer syntax, and the reason."""


@dataclass(frozen=True)
class ImageMeta:
    """Training-relevant metadata of a decoded image. Contains no patient identifiers.

    Attributes:
        modality: DICOM Modality (``"CR"``, ``"DX"``, ...) or ``""`` for PNG/JPEG.
        view_position: DICOM ViewPosition (``"PA"``, ``"AP"``, ``"LL"``, ...) or ``""``.
        photometric_interpretation: ``"MONOCHROME1"``, ``"MONOCHROME2"``, ``"RGB"``, ... as stored in
            the file (the pixels are always returned with bright = dense/white, i.e. MONOCHROME2-like).
        original_size: (height, width) of the stored image.
        pixel_spacing: (row, column) spacing in mm from PixelSpacing or ImagerPixelSpacing, or None.
        bits_stored: significant bits per sample (8 for 8-bit PNG/JPEG).
        transfer_syntax: DICOM transfer syntax name (``""`` for PNG/JPEG).
        source_format: ``"dicom"``, ``"png"``, ``"jpeg"`` or ``"other"`` (another format OpenCV reads).
        number_of_frames: frames in the file (DICOM multi-frame), 1 otherwise.
    """

    modality: str = ""
    view_position: str = ""
    photometric_interpretation: str = ""
    original_size: tuple[int, int] = (0, 0)
    pixel_spacing: tuple[float, float] | None = None
    bits_stored: int = 8
    transfer_syntax: str = ""
    source_format: str = ""
    number_of_frames: int = 1


@dataclass
class DecodedImage:
    """Pixels float32 in [0, 1], shape (H, W) or (H, W, 3), plus :class:`ImageMeta`."""

    pixels: np.ndarray
    meta: ImageMeta


def scale_to_unit(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map [low, high] to [0, 1] (clipped), as float32. A flat range gives zeros."""
    out = values.astype(np.float32, copy=False)
    span = float(high) - float(low)
    if span <= 0:
        return np.zeros(values.shape, np.float32)
    out = (out - np.float32(low)) * np.float32(1.0 / span)
    return np.clip(out, 0.0, 1.0, out=out)


def percentile_range(values: np.ndarray) -> tuple[float, float]:
    """The PERCENTILE_WINDOW range, estimated on a strided subsample (the full image is 10× slower, same result)."""
    step = max(1, int(np.sqrt(values.shape[0] * values.shape[1] / 250_000)))
    sample = values[::step, ::step]
    low, high = np.percentile(sample, PERCENTILE_WINDOW)
    return float(low), float(high)
