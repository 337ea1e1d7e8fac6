"""Format detection by content, PNG 8/16-bit and JPEG reading, clear errors."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medclipin.data.readers import DecodedImage, ImageReadError, read_image, sniff_format


def test_png_8_and_16_bit(tmp_path):
    gradient8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    cv2.imwrite(str(tmp_path / "g8.png"), gradient8)
    image = read_image(tmp_path / "g8.png")
    assert isinstance(image, DecodedImage) and image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, gradient8 / 255.0, atol=1e-6)
    assert image.meta.source_format == "png" and image.meta.bits_stored == 8 and image.meta.original_size == (4, 256)

    gradient16 = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (3, 1))
    cv2.imwrite(str(tmp_path / "g16.png"), gradient16)
    image16 = read_image(tmp_path / "g16.png")
    assert image16.meta.bits_stored == 16
    np.testing.assert_allclose(image16.pixels, gradient16 / 65535.0, atol=1e-6)
    # a 12-bit image in a 16-bit PNG: "none" stretches it to the full range
    dim = (gradient16 // 16).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g12.png"), dim)
    assert read_image(tmp_path / "g12.png", window="none").pixels.max() == 1.0


def test_jpeg_colour_and_grey_stored_as_rgb(tmp_path):
    colour = np.zeros((32, 32, 3), np.uint8)
    colour[..., 2] = 200  # BGR on disk: red
    cv2.imwrite(str(tmp_path / "c.jpg"), colour)
    image = read_image(tmp_path / "c.jpg")
    assert image.meta.source_format == "jpeg" and image.pixels.shape == (32, 32, 3)
    assert image.pixels[..., 0].mean() > 0.7 and image.pixels[..., 2].mean() < 0.1  # returned as RGB
    grey = np.repeat(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))[..., None], 3, axis=2)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    assert read_image(tmp_path / "g.png").pixels.shape == (32, 32)  # grey-as-RGB becomes one channel


def test_wrong_extension_loads_by_content(tmp_path):
    cv2.imwrite(str(tmp_path / "real.png"), np.full((8, 8), 128, np.uint8))
    shutil.copy(tmp_path / "real.png", tmp_path / "named.dcm")
    image = read_image(tmp_path / "named.dcm")
    assert image.meta.source_format == "png" and image.pixels.shape == (8, 8)
    dicom = get_testdata_file("RG1_UNCR.dcm", download=False)
    if dicom is not None:
        shutil.copy(dicom, tmp_path / "xray.png")
        assert read_image(tmp_path / "xray.png").meta.source_format == "dicom"


def test_text_file_named_png_is_a_clear_error(tmp_path):
    (tmp_path / "notes.png").write_text("this is not an image\n" * 20)
    assert sniff_format(tmp_path / "notes.png") == "unknown"
    with pytest.raises(ImageReadError, match=r"notes\.png.*not a DICOM, PNG or JPEG"):
        read_image(tmp_path / "notes.png")
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.dcm"):
        read_image(tmp_path / "empty.dcm")
    with pytest.raises(ImageReadError, match=r"missing\.png.*cannot open"):
        read_image(tmp_path / "missing.png")


def test_corrupt_png_is_a_clear_error(tmp_path):
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((64, 64), np.uint8))
    (tmp_path / "bad.png").write_bytes((tmp_path / "ok.png").read_bytes()[:40])
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        read_image(tmp_path / "bad.png")


def test_shared_chest_pngs(shared_data):
    for path in sorted((shared_data / "cxr_png").glob("*.png")):
        image = read_image(path)
        assert image.pixels.shape == (512, 512) and image.pixels.dtype == np.float32
        assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0 and image.pixels.std() > 0.1


def test_shared_fundus_photo(shared_data):
    image = read_image(shared_data / "fundus_rfmid" / "1.png")
    assert image.pixels.shape == (1424, 2144, 3) and image.meta.photometric_interpretation == "RGB"
    red, green, blue = (image.pixels[500:900, 900:1300, c].mean() for c in range(3))
    assert red > green > blue  # a retina is red-orange


def test_grey_alpha_and_rgba_png(tmp_path):
    from PIL import Image

    Image.fromarray(np.dstack([np.full((6, 6), 100, np.uint8), np.full((6, 6), 255, np.uint8)]), "LA").save(tmp_path / "la.png")
    assert read_image(tmp_path / "la.png").pixels.shape == (6, 6)
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pixels = read_image(tmp_path / "rgba.png").pixels
    assert pixels.shape == (6, 6, 3) and pixels[0, 0, 0] == 1.0 and pixels[0, 0, 2] == 0.0


# ---------------------------------------------------------------------------------- bad input, named
def _bad_file(tmp_path, case: str):
    good_png = tmp_path / "good.png"
    cv2.imwrite(str(good_png), np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8))
    good_jpg = tmp_path / "good.jpg"
    cv2.imwrite(str(good_jpg), np.random.default_rng(0).integers(0, 255, (64, 64)).astype(np.uint8))
    path = tmp_path / {"zero_png": "zero.png", "zero_dcm": "zero.dcm", "truncated_png": "cut.png",
                       "truncated_jpeg": "cut.jpg", "text_png": "notes.png", "text_dcm": "notes.dcm",
                       "directory": "folder.png", "missing": "missing.dcm"}[case]
    if case.startswith("zero"):
        path.write_bytes(b"")
    elif case == "truncated_png":
        path.write_bytes(good_png.read_bytes()[: good_png.stat().st_size // 2])
    elif case == "truncated_jpeg":
        path.write_bytes(good_jpg.read_bytes()[: good_jpg.stat().st_size // 2])
    elif case.startswith("text"):
        path.write_text("Patient report, not an image.\n" * 30)
    elif case == "directory":
        path.mkdir()
    return path


@pytest.mark.parametrize("case, reason", [
    ("zero_png", "empty file"), ("zero_dcm", "empty file"), ("truncated_png", "truncated or corrupt"),
    ("truncated_jpeg", "truncated or corrupt"), ("text_png", "not a DICOM, PNG or JPEG"),
    ("text_dcm", "not a DICOM, PNG or JPEG"), ("directory", "not a regular file"), ("missing", "cannot open"),
])
def test_every_bad_file_is_an_image_read_error_naming_file_and_reason(tmp_path, case, reason):
    path = _bad_file(tmp_path, case)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(str(path)) and reason in message, message


@pytest.mark.timeout(30)
def test_non_regular_files_fail_fast(tmp_path):
    """A device, a FIFO or a directory is never opened for parsing (/dev/zero used to hang in dcmread)."""
    import os
    import time

    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)  # opening it for reading would block until a writer appears
    for path, kind in (("/dev/zero", "character device"), (fifo, "FIFO"), (tmp_path, "directory")):
        start = time.perf_counter()
        with pytest.raises(ImageReadError, match=rf"{os.fspath(path)}: not a regular file \(a {kind}\)"):
            read_image(path)
        assert time.perf_counter() - start < 1.0


def test_large_all_zero_dcm_is_rejected_quickly(tmp_path):
    """No magic bytes and no plausible DICOM start: rejected from a bounded read (took ~7 s for 20 MB)."""
    import time

    path = tmp_path / "zeros.dcm"
    with open(path, "wb") as handle:
        handle.truncate(20_000_000)
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match=r"zeros\.dcm: not a DICOM, PNG or JPEG"):
        read_image(path)
    assert time.perf_counter() - start < 1.0


def test_headerless_dicom_and_other_rasters_still_load(tmp_path, shared_data):
    assert read_image(shared_data / "dicom" / "cr_mono1_10bit_chest_no_meta.dcm").meta.original_size == (440, 440)
    cv2.imwrite(str(tmp_path / "x.tif"), np.full((9, 7), 77, np.uint8))
    image = read_image(tmp_path / "x.tif")
    assert image.meta.source_format == "other" and image.pixels.shape == (9, 7)


# ----------------------------------------------------------------------------- decompression bombs
def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose IHDR claims width × height, with one tiny (invalid) IDAT: a 'bomb' that costs nothing to make."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_pixel_limit_is_checked_from_the_header_before_decoding(tmp_path, monkeypatch):
    from medclipin.data.reader_base import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == 100_000_000
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    monkeypatch.setattr(cv2, "imdecode", lambda *a, **k: pytest.fail("decoded despite the pixel limit"))
    with pytest.raises(ImageReadError, match=r"bomb\.png: image is 20000×20000 = 400\.0 megapixels, above the "
                                             r"limit of 100\.0 megapixels \(max_pixels=100000000\)"):
        read_image(tmp_path / "bomb.png")


def test_pixel_limit_png_jpeg_dicom_and_off_switch(tmp_path, monkeypatch):
    from PIL import Image

    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((30, 40), np.uint8))
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "b.jpg", exif=Image.Exif())  # APP1 before SOF
    for name in ("a.png", "b.jpg"):
        with pytest.raises(ImageReadError, match=rf"{name}: image is 40×30 = 0\.0012 megapixels.*max_pixels=1000\)"):
            read_image(tmp_path / name, max_pixels=1000)
        assert read_image(tmp_path / name, max_pixels=1200).pixels.shape[:2] == (30, 40)
        assert read_image(tmp_path / name, max_pixels=None).pixels.shape[:2] == (30, 40)
    dicom = get_testdata_file("MR_small.dcm")
    import medclipin.data.dicom as dicom_module

    real = dicom_module.pixel_array
    monkeypatch.setattr(dicom_module, "pixel_array", lambda *a, **k: pytest.fail("decoded despite the pixel limit"))
    with pytest.raises(ImageReadError, match=r"MR_small\.dcm.*image is 64×64 = 0\.0041 megapixels.*max_pixels=4000\)"):
        read_image(dicom, max_pixels=4000)
    monkeypatch.setattr(dicom_module, "pixel_array", real)
    assert read_image(dicom, max_pixels=4096).pixels.shape == (64, 64)


def test_decoded_bytes_are_bounded_not_only_pixels(tmp_path, monkeypatch):
    """W4 (issue 25): a 9990² RGBA 16-bit PNG (776 KB, under the 100 MP limit) cost 7 s and 2 GB per read. The
    header's bit depth and colour type bound the decoded bytes too (4 bytes per pixel of max_pixels), before
    any decoder runs; an 8-bit RGBA image at the pixel limit still passes."""
    import medclipin.data.readers as readers_module

    rgba16 = np.zeros((30, 40, 4), np.uint16)
    cv2.imwrite(str(tmp_path / "rgba16.png"), rgba16)
    cv2.imwrite(str(tmp_path / "rgba8.png"), rgba16.astype(np.uint8))
    monkeypatch.setattr(readers_module, "_decode_raster", lambda *a: pytest.fail("decoded despite the limit"))
    with pytest.raises(ImageReadError, match=r"rgba16.png: image is 40×30 at 8 bytes per pixel = 0 MB decoded, "
                                             r"above the limit of 0 MB \(4 bytes per pixel of max_pixels=1200\)"):
        read_image(tmp_path / "rgba16.png", max_pixels=1200)
    monkeypatch.undo()
    assert read_image(tmp_path / "rgba8.png", max_pixels=1200).pixels.shape[:2] == (30, 40)
    assert read_image(tmp_path / "rgba16.png", max_pixels=2400).pixels.shape[:2] == (30, 40)
