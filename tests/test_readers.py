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
