"""What every image reader shares: the result types, the error, the checks made before any decoder
runs, and the scaling to [0, 1].

The bottom of the image readers, like MONAI's ``image_reader`` base: :mod:`medclipin.data.dicom`
(DICOM) and :mod:`medclipin.data.readers` (PNG/JPEG and the format dispatch, ``read_image``) both
import this module, and it imports neither of them.

Checks before decoding:

* only a non-empty **regular file** is an image: a directory, FIFO, socket or device (``/dev/zero``)
  fails at once, without being opened for parsing (a parser reading ``/dev/zero`` never ends, and
  opening a FIFO blocks);
* the format is sniffed from the first :data:`SNIFF_BYTES` bytes, never by parsing the whole file;
* the image's size from its header must not exceed ``max_pixels`` (decompression bombs: a 390 KB PNG
  can declare 20000×20000 pixels, 1.6 GB as float32).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

import numpy as np

from medclipin.errors import MedclipinError, SettingError

WINDOWS = ("first", "percentile", "none")
# Percentiles used by window="percentile": robust to burned-in labels and collimator edges.
PERCENTILE_WINDOW = (0.5, 99.5)
# Enough for every format signature and the first DICOM elements of a header-less file.
SNIFF_BYTES = 4096
# 100 megapixels: far above any radiograph (~9 MP for 3000×3000) or fundus photo (~12 MP).
DEFAULT_MAX_PIXELS = 100_000_000
_NOT_REGULAR = ((stat.S_ISDIR, "directory"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))


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


def _require_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _NOT_REGULAR if test(mode)), "special file")
        raise ImageReadError(f"{path}: not a regular file (a {kind}); an image path must name a file")


def check_image_file(path: str | os.PathLike) -> os.stat_result:
    """``stat`` of ``path`` after checking that it can be an image: it exists, is a regular file and is not empty.

    Raises:
        ImageReadError: naming the file and which of these it is not.
    """
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    _require_regular(path, info.st_mode)
    if info.st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    return info


def read_head(path: str | os.PathLike, size: int = SNIFF_BYTES) -> bytes:
    """The first ``size`` bytes of an image file (see :func:`check_image_file`), read without blocking.

    The file is opened non-blocking and checked again on the open descriptor, so a path swapped for a
    FIFO between the checks cannot hang the read.
    """
    path = os.fspath(path)
    check_image_file(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        return os.read(fd, size)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)


def check_max_pixels(max_pixels: int | None) -> None:
    """``max_pixels`` must be a positive int, or ``None``/``0`` for no limit (ValueError otherwise)."""
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0):
        raise SettingError(f"max_pixels must be a positive integer, or None/0 for no limit; got {max_pixels!r}")


def _megapixels(count: int) -> str:
    return f"{count / 1e6:.1f}" if count >= 100_000 else f"{count / 1e6:.2g}"


def pixel_limit_reason(width: int, height: int, max_pixels: int | None, frames: int = 1) -> str | None:
    """Why an image of ``width`` × ``height`` (× ``frames``) pixels is refused, or None when it is within
    ``max_pixels`` (None or 0: no limit). Checked from the header, before anything is decoded."""
    count = int(width) * int(height) * int(frames)
    if not max_pixels or count <= max_pixels:
        return None
    frames_text = f" × {frames} frames" if frames > 1 else ""
    return (f"image is {width}×{height}{frames_text} = {_megapixels(count)} megapixels, above the limit of "
            f"{_megapixels(max_pixels)} megapixels (max_pixels={max_pixels}); a genuine image this large "
            "needs a higher max_pixels")


# decoded bytes allowed per pixel of max_pixels: an 8-bit RGBA image at the pixel limit; a 16-bit RGBA one
# just under it (800 MB decoded, then copied while converting) is refused from its header too
MAX_DECODED_BYTES_PER_PIXEL = 4


def decoded_size_reason(width: int, height: int, bytes_per_pixel: int, max_pixels: int | None) -> str | None:
    """Why an image whose decoded pixels take ``width × height × bytes_per_pixel`` bytes is refused, or None.
    The pixel limit alone lets through a file with few pixels of many bytes (16-bit RGBA)."""
    if not max_pixels:
        return None
    size = int(width) * int(height) * int(bytes_per_pixel)
    limit = MAX_DECODED_BYTES_PER_PIXEL * max_pixels
    if size <= limit:
        return None
    return (f"image is {width}×{height} at {bytes_per_pixel} bytes per pixel = {size / 1e6:.0f} MB decoded, above "
            f"the limit of {limit / 1e6:.0f} MB ({MAX_DECODED_BYTES_PER_PIXEL} bytes per pixel of "
            f"max_pixels={max_pixels}); a genuine image this large needs a higher max_pixels")
