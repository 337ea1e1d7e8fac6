"""Read one medical image file (DICOM, PNG 8/16-bit, JPEG) into float32 pixels in [0, 1].

The format is chosen by content first (the ``DICM`` tag at byte 128, the PNG and JPEG signatures) and
by extension second: a DICOM file without the 128-byte preamble (common in old archives) has no magic
bytes, so a file whose first element looks like a DICOM one (group 0002 or 0008) is read as DICOM with
``force=True``. A PNG named ``.dcm`` therefore still loads, and a text file named ``.png`` gets a clear
:class:`ImageReadError`. Only the first :data:`~medclipin.data.reader_base.SNIFF_BYTES` bytes decide;
non-regular files and images larger than ``max_pixels`` are refused before any decoder runs
(:mod:`medclipin.data.reader_base`).

The returned metadata is what training needs (modality, view, photometric interpretation, size,
spacing) and never includes patient identifiers.

Example:
    >>> image = read_image("chest.dcm")
    >>> image.pixels.shape, image.pixels.dtype, image.meta.view_position
    ((1955, 1841), dtype('float32'), 'PA')
"""

from __future__ import annotations

import os
import struct

import numpy as np

from medclipin.data.dicom import is_headerless_dicom, read_dicom
from medclipin.data.reader_base import (
    DEFAULT_MAX_PIXELS, WINDOWS, DecodedImage, ImageMeta, ImageReadError, check_max_pixels, decoded_size_reason,
    percentile_range, pixel_limit_reason, read_head, scale_to_unit,
)
from medclipin.errors import SettingError

# The shared image types are defined in reader_base; importing them from here keeps working.
__all__ = ["read_image", "sniff_format", "DecodedImage", "ImageMeta", "ImageReadError", "WINDOWS",
           "DEFAULT_MAX_PIXELS", "scale_to_unit", "percentile_range"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic", "")
# JPEG start-of-frame markers (they carry the image size): C0-CF except DHT (C4), JPG (C8), DAC (CC)
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _format_of(head: bytes) -> str:
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return "unknown"


def sniff_format(path: str | os.PathLike) -> str:
    """Return ``"dicom"``, ``"png"``, ``"jpeg"`` or ``"unknown"`` from the file's first bytes.

    Raises:
        ImageReadError: the file does not exist, is not a regular file, is empty or cannot be read.
    """
    return _format_of(read_head(path))


def _png_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from the IHDR chunk, which the PNG standard puts first."""
    if len(head) >= 24 and head[12:16] == b"IHDR":
        return struct.unpack(">II", head[16:24])
    return None


# PNG colour type -> samples per decoded pixel (a palette decodes to RGB)
_PNG_SAMPLES = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


def _png_bytes_per_pixel(head: bytes) -> int | None:
    """Decoded bytes per pixel from the IHDR chunk's bit depth and colour type."""
    if len(head) >= 26 and head[12:16] == b"IHDR" and head[25] in _PNG_SAMPLES:
        return _PNG_SAMPLES[head[25]] * (2 if head[24] == 16 else 1)
    return None


def _jpeg_size(path: str) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment, skipping the segments before it by their
    lengths (EXIF or ICC data can push it well past the first few KB). None when there is none."""
    with open(path, "rb") as handle:
        handle.seek(2)
        for _ in range(10_000):  # bounded: a crafted file cannot keep us here
            marker = handle.read(2)
            while len(marker) == 2 and marker[0] == 0xFF and marker[1] == 0xFF:  # fill bytes
                marker = marker[1:] + handle.read(1)
            if len(marker) < 2 or marker[0] != 0xFF:
                return None
            code = marker[1]
            if code == 0xD9:  # end of image before any frame
                return None
            if code in (0x01, *range(0xD0, 0xD8)):  # markers without a length
                continue
            length_bytes = handle.read(2)
            if len(length_bytes) < 2 or code == 0xDA:  # start of scan: no frame header before the data
                return None
            (length,) = struct.unpack(">H", length_bytes)
            if code in _JPEG_SOF:
                frame = handle.read(5)
                if len(frame) < 5:
                    return None
                height, width = struct.unpack(">HH", frame[1:5])
                return width, height
            handle.seek(length - 2, os.SEEK_CUR)
    return None


def _other_size(path: str, max_pixels: int | None) -> tuple[int, int] | None:
    """(width, height) of a TIFF/BMP/... from Pillow's header parser, or None when Pillow cannot tell."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError as exc:
        # Pillow refuses to report sizes above twice its own limit; below ours that is a refusal too
        if max_pixels and max_pixels < 2 * (Image.MAX_IMAGE_PIXELS or 0):
            raise ImageReadError(f"{path}: {exc}; above the limit of max_pixels={max_pixels}") from exc
        return None
    except Exception:  # not a format Pillow parses; OpenCV may still decode it
        return None


def _check_raster_size(path: str, source_format: str, head: bytes, max_pixels: int | None) -> None:
    if not max_pixels:
        return
    if source_format == "png":
        size = _png_size(head)
    elif source_format == "jpeg":
        size = _jpeg_size(path)
    else:
        size = _other_size(path, max_pixels)
    if size is not None and (reason := pixel_limit_reason(size[0], size[1], max_pixels)):
        raise ImageReadError(f"{path}: {reason}")
    depth = _png_bytes_per_pixel(head) if source_format == "png" else None
    if size is not None and depth is not None and (reason := decoded_size_reason(size[0], size[1], depth, max_pixels)):
        raise ImageReadError(f"{path}: {reason}")


def _decode_raster(path: str) -> np.ndarray | None:
    """OpenCV's decoding of the file (16-bit PNGs stay 16-bit), or None when it cannot decode it."""
    import cv2

    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:  # e.g. an assertion on a buffer OpenCV does not expect
        return None


def _to_decoded(array: np.ndarray, source_format: str, window: str) -> DecodedImage:
    """Decoded raster values → float32 [0, 1], grey kept one-channel, BGR returned as RGB."""
    import cv2

    if array.ndim == 3:
        if array.shape[2] == 4:
            array = array[:, :, :3]  # drop alpha
        if array.shape[2] <= 2:  # grey, or grey + alpha
            array = np.ascontiguousarray(array[:, :, 0])
        else:
            array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
            # Many chest X-ray JPEG/PNG files are grey images stored as RGB; keep them one-channel.
            if np.array_equal(array[:, :, 0], array[:, :, 1]) and np.array_equal(array[:, :, 0], array[:, :, 2]):
                array = np.ascontiguousarray(array[:, :, 0])
    if array.dtype == np.uint8:
        bits, high = 8, 255.0
    elif array.dtype == np.uint16:
        bits, high = 16, 65535.0
    else:  # float TIFF and the like
        bits, high = 32, float(array.max()) if array.size else 1.0
    if window == "none":
        low, high = float(array.min()), float(array.max())
    elif window == "percentile":
        low, high = percentile_range(array)
    else:  # "first": a raster file carries no window; use its full value range
        low = 0.0
    pixels = scale_to_unit(array, low, high)
    photometric = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    meta = ImageMeta(
        photometric_interpretation=photometric,
        original_size=(int(array.shape[0]), int(array.shape[1])),
        bits_stored=bits,
        source_format=source_format,
    )
    return DecodedImage(pixels=pixels, meta=meta)


def _read_raster(path: str, source_format: str, window: str, head: bytes, max_pixels: int | None) -> DecodedImage:
    """PNG/JPEG: size checked from the header, then decoded with OpenCV."""
    _check_raster_size(path, source_format, head, max_pixels)
    array = _decode_raster(path)
    if array is None:
        name = "PNG" if source_format == "png" else "JPEG"
        raise ImageReadError(f"{path}: the {name} decoder failed: the file is truncated or corrupt")
    return _to_decoded(array, source_format, window)


def _read_other(path: str, window: str, head: bytes, max_pixels: int | None) -> DecodedImage | None:
    """A format OpenCV reads without a signature we test for (TIFF, BMP, ...), or None."""
    _check_raster_size(path, "other", head, max_pixels)
    array = _decode_raster(path)
    if array is None:
        return None
    if reason := pixel_limit_reason(array.shape[1], array.shape[0], max_pixels):  # header was not parseable
        raise ImageReadError(f"{path}: {reason}")
    return _to_decoded(array, "other", window)


def read_image(path: str | os.PathLike, *, frame: int | None = None, window: str = "first",
               max_pixels: int | None = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode a DICOM, PNG (8- or 16-bit) or JPEG file into float32 pixels in [0, 1].

    Args:
        path: the image file. The format is detected from its content, not trusted from its name.
        frame: frame index for multi-frame DICOM (required when the file has more than one frame).
        window: DICOM VOI step: ``"first"`` (the file's first VOI LUT or window centre/width; the
            BitsStored range when it has none), ``"percentile"`` (0.5–99.5 percentiles) or ``"none"``
            (min–max). For PNG/JPEG, ``"first"`` uses the full range of the pixel type.
        max_pixels: refuse images with more pixels than this (width × height × decoded frames), checked
            from the header before decoding; default :data:`DEFAULT_MAX_PIXELS` (100 megapixels).
            ``None`` or 0: no limit.

    Returns:
        DecodedImage with ``pixels`` (H, W) or (H, W, 3) float32 in [0, 1], bright = dense
        (MONOCHROME1 is inverted), and ``meta`` without patient identifiers.

    Raises:
        ImageReadError: the file cannot be read: missing, not a regular file, empty, not an image,
            truncated or corrupt, too large; the message names the file, the transfer syntax (DICOM)
            and the reason.

    Example:
        >>> read_image("00000001_000.png").pixels.max() <= 1.0
        True
    """
    if window not in WINDOWS:
        raise SettingError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}")
    check_max_pixels(max_pixels)
    path = os.fspath(path)
    head = read_head(path)
    kind = _format_of(head)
    if kind == "dicom" or (kind == "unknown" and is_headerless_dicom(head)):
        return read_dicom(path, frame=frame, window=window, max_pixels=max_pixels)
    if kind in ("png", "jpeg"):
        return _read_raster(path, kind, window, head, max_pixels)
    if os.path.splitext(path)[1].lower() not in DICOM_EXTENSIONS:
        image = _read_other(path, window, head, max_pixels)
        if image is not None:
            return image
    raise ImageReadError(f"{path}: not a DICOM, PNG or JPEG file (content matches none of them)")
