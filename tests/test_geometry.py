"""Fundus field-of-view crop and chest X-ray aspect-preserving resize + pad."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from medclipin.data.geometry import fundus_fov_box, normalize_geometry, pad_to_square, resize_pad
from medclipin.data.readers import read_image


def _synthetic_fundus(height=300, width=420, radius=130) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    cv2.circle(image, (width // 2, height // 2), radius, (180, 90, 40), -1)
    cv2.putText(image, "OD 2024", (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)  # a border label
    return image


def test_fov_on_synthetic_disc_ignores_border_text():
    x0, y0, x1, y1 = fundus_fov_box(_synthetic_fundus())
    assert abs(x0 - 80) <= 3 and abs(x1 - 340) <= 3 and abs(y0 - 20) <= 3 and abs(y1 - 280) <= 3


def test_fov_falls_back_to_whole_image_when_nothing_found():
    assert fundus_fov_box(np.zeros((50, 70), np.float32)) == (0, 0, 70, 50)


def test_fov_on_real_rfmid_photos(shared_data):
    for path in sorted((shared_data / "fundus_rfmid").glob("*.png"))[:4]:
        pixels = read_image(path).pixels
        height, width = pixels.shape[:2]
        x0, y0, x1, y1 = fundus_fov_box(pixels)
        box_w, box_h = x1 - x0, y1 - y0
        assert 0.9 < box_w / box_h < 1.1, path.name  # the retina is a disc
        assert box_w < 0.9 * width  # the black side borders are gone
        # the brightest smoothed spot (the optic disc) lies inside the crop
        blurred = cv2.GaussianBlur(pixels[:, :, 1], (0, 0), 15)
        bright_y, bright_x = np.unravel_index(np.argmax(blurred), blurred.shape)
        assert x0 <= bright_x < x1 and y0 <= bright_y < y1
        square, info = normalize_geometry(pixels, "fundus", 128)
        assert square.shape == (128, 128, 3) and info.crop == (x0, y0, x1, y1)


def test_fov_on_skimage_retina():
    data = pytest.importorskip("skimage.data")
    try:
        retina = data.retina()  # 1411×1411 RGB fundus photo; the disc touches the frame
    except ImportError as exc:  # scikit-image without its optional image I/O packages
        pytest.skip(f"skimage.data.retina() unavailable: {exc}")
    x0, y0, x1, y1 = fundus_fov_box(retina)
    assert 0.85 < (x1 - x0) / (y1 - y0) < 1.15
    assert (x1 - x0) * (y1 - y0) > 0.5 * retina.shape[0] * retina.shape[1]


def test_cxr_resize_keeps_aspect_and_pads_with_zero():
    image = np.ones((200, 100), np.float32)
    out, info = normalize_geometry(image, "cxr", 64)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert info.scale == pytest.approx(0.32) and info.pad == (16, 0)
    assert out[:, :16].max() == 0.0 and out[:, 48:].max() == 0.0 and out[:, 16:48].min() == pytest.approx(1.0)
    assert info.to_output((100, 200)) == pytest.approx((48.0, 64.0))  # bottom-right corner maps to the content edge


def test_resize_pad_colour_uint8_and_square_noop():
    out, scale, pad = resize_pad(np.full((30, 60, 3), 7, np.uint8), 30)
    assert out.shape == (30, 30, 3) and out.dtype == np.uint8 and pad == (0, 7) and scale == 0.5
    square = np.zeros((16, 16), np.uint8)
    assert resize_pad(square, 16)[0] is square
    padded, offset = pad_to_square(np.ones((4, 10), np.uint8))
    assert padded.shape == (10, 10) and offset == (0, 3)
    with pytest.raises(ValueError, match="domain"):
        normalize_geometry(square, "ct", 16)
