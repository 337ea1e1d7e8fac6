"""Read one medical image file (DICOM, PNG 8/16-bit, JPEG) into float32 pixels in [0, 1].

The format is chosen by content first (the ``DICM`` tag at byte 128, the PNG and JPEG signatures) and
by extension second: a DICOM file without the 128-byte preamble (common in old archives) has no magic
bytes, so anything that is not a known raster image is tried as DICOM with ``force=True``. A PNG named
``.dcm`` therefore still loads, and a text file named ``.png`` gets a clear :class:`ImageReadError`.

The returned metadata is what training needs (modality, view, photometric interpretation, size,
spacing) and never includes patient identifiers.

Example:
    >>> image = read_image("chest.dcm")
    >>> image.pixels.shape, image.pixels.dtype, image.meta.view_position
    ((1955, 1841), dtype('float32'), 'PA')
"""

from __future__ import annotations

import os

import numpy as np

from medclipin.data.dicom import looks_like_dicom, read_dicom
from medclipin.data.reader_base import (
    WINDOWS, DecodedImage, ImageMeta, ImageReadError, percentile_range, scale_to_unit,
)

# The shared image types are defined in reader_base; importing them from here keeps working.
__all__ = ["read_image", "sniff_format", "DecodedImage", "ImageMeta", "ImageReadError", "WINDOWS",
           "scale_to_unit", "percentile_range"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic", "")


def sniff_format(path: str | os.PathLike) -> str:
    """Return ``"dicom"``, ``"png"``, ``"jpeg"`` or ``"unknown"`` from the file's first 132 bytes.

    Raises:
        ImageReadError: the file does not exist or cannot be opened.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot open ({exc.strerror or exc})") from exc
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(PNG_MAGIC):
        return "png"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    return "unknown"


def _read_raster(path: str, source_format: str, window: str) -> DecodedImage:
    """PNG/JPEG (and other formats OpenCV reads) via cv2.imdecode, which keeps 16-bit PNGs 16-bit."""
    import cv2

    data = np.fromfile(path, dtype=np.uint8)
    array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageReadError(f"{path}: not a readable DICOM, PNG or JPEG file (the {source_format} decoder failed)")
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


def read_image(path: str | os.PathLike, *, frame: int | None = None, window: str = "first") -> DecodedImage:
    """Decode a DICOM, PNG (8- or 16-bit) or JPEG file into float32 pixels in [0, 1].

    Args:
        path: the image file. The format is detected from its content, not trusted from its name.
        frame: frame index for multi-frame DICOM (required when the file has more than one frame).
        window: DICOM VOI step: ``"first"`` (the file's first VOI LUT or window centre/width; the
            BitsStored range when it has none), ``"percentile"`` (0.5–99.5 percentiles) or ``"none"``
            (min–max). For PNG/JPEG, ``"first"`` uses the full range of the pixel type.

    Returns:
        DecodedImage with ``pixels`` (H, W) or (H, W, 3) float32 in [0, 1], bright = dense
        (MONOCHROME1 is inverted), and ``meta`` without patient identifiers.

    Raises:
        ImageReadError: the file cannot be read; the message names the file, the transfer syntax
            (DICOM) and the reason.

    Example:
        >>> read_image("00000001_000.png").pixels.max() <= 1.0
        True
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}")
    path = os.fspath(path)
    kind = sniff_format(path)
    if kind == "dicom":
        return read_dicom(path, frame=frame, window=window)
    if kind in ("png", "jpeg"):
        return _read_raster(path, kind, window)
    # No magic bytes: a header-less DICOM (no preamble) or a format OpenCV recognises (TIFF, BMP).
    if looks_like_dicom(path):
        return read_dicom(path, frame=frame, window=window)
    if os.path.splitext(path)[1].lower() not in DICOM_EXTENSIONS:
        try:
            return _read_raster(path, "other", window)
        except ImageReadError:
            pass
    raise ImageReadError(f"{path}: not a DICOM, PNG or JPEG file (content matches none of them)")
