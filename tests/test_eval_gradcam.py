"""Grad-CAM geometry and localisation metrics, without a model: CAMs mapped back onto originals,
pointing game and IoU."""

import numpy as np
import pytest

from medclipin.data.geometry import normalize_geometry
from medclipin.eval.gradcam import (
    TextRelevance,
    box_to_input,
    cam_box_iou,
    cam_to_original,
    pointing_game_hit,
    save_gradcam_figure,
)


def _blob(side, x, y, sigma=1.5):
    yy, xx = np.mgrid[0:side, 0:side]
    return np.exp(-((xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2) / (2 * sigma ** 2)).astype(np.float32)


@pytest.mark.parametrize("domain,shape", [("cxr", (90, 150)), ("cxr", (160, 100)), ("fundus", (120, 160, 3))])
def test_cam_peak_maps_back_to_the_same_original_point(domain, shape):
    image = np.zeros(shape, dtype=np.float32)
    if domain == "fundus":  # a bright disc: the field of view the crop keeps
        yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
        image[(yy - 60) ** 2 + (xx - 80) ** 2 < 55 ** 2] = 0.8
    else:
        image[:] = 0.5
    square, geometry = normalize_geometry(image, domain, 64)
    point = (shape[1] * 0.6, shape[0] * 0.4)  # x, y in the original
    x, y = geometry.to_output(point)
    factor = 32 / square.shape[0]  # the model input (32) is smaller than the normalised image (64)
    cam = _blob(32, x * factor, y * factor)
    back = cam_to_original(cam, geometry, square.shape[0], shape[:2])
    assert back.shape == shape[:2] and 0 <= back.min() and back.max() <= 1
    py, px = np.unravel_index(np.argmax(back), back.shape)
    tolerance = 1.5 / (geometry.scale * factor) + 1  # one CAM pixel in original pixels
    assert abs(px + 0.5 - point[0]) <= tolerance and abs(py + 0.5 - point[1]) <= tolerance


def test_box_to_input_follows_the_geometry():
    image = np.full((100, 200), 0.5, dtype=np.float32)  # wide: padded top and bottom
    square, geometry = normalize_geometry(image, "cxr", 64)
    x0, y0, x1, y1 = box_to_input((0, 0, 200, 100), geometry, 64, 32)
    assert (x0, x1) == pytest.approx((0, 32), abs=0.5) and (y0, y1) == pytest.approx((8, 24), abs=0.5)


def test_pointing_game_and_iou():
    cam = np.zeros((10, 10), dtype=np.float32)
    cam[2:4, 2:4] = 0.6
    cam[3, 3] = 1.0
    assert pointing_game_hit(cam, (2, 2, 5, 5))
    assert not pointing_game_hit(cam, (5, 5, 9, 9))
    assert pointing_game_hit(cam, (5, 5, 9, 9), tolerance=2)
    assert not pointing_game_hit(np.zeros((10, 10)), (0, 0, 10, 10))  # an all-zero map points nowhere
    assert cam_box_iou(cam, (2, 2, 4, 4), threshold=0.5) == pytest.approx(1.0)
    assert cam_box_iou(cam, (2, 2, 6, 4), threshold=0.5) == pytest.approx(0.5)
    assert cam_box_iou(np.zeros((10, 10)), (0, 0, 2, 2)) == 0.0


def test_figure_handles_grey_colour_and_no_positive_words(tmp_path):
    cam = _blob(48, 20, 30, sigma=6)
    words = TextRelevance(words=["no", "effusion."], scores=np.zeros(2, dtype=np.float32),
                          signed=np.array([-1.0, -0.5], dtype=np.float32))
    assert not words.any_positive
    grey = save_gradcam_figure(tmp_path / "g.png", np.random.default_rng(0).random((48, 48)), cam, words,
                               boxes=[(10, 20, 30, 40)])
    colour = save_gradcam_figure(tmp_path / "c.png", np.random.default_rng(0).random((48, 48, 3)), cam, None)
    assert grey.stat().st_size > 10_000 and colour.stat().st_size > 5_000


# ------------------------------------------------------------------ on a trained model, through its processor
def test_explain_a_path_and_an_array_with_the_processor(eval_model, eval_data, tmp_path):
    """``explain`` takes an image path or an array; both are fed to the model exactly as evaluation feeds
    it (``model_input``), the similarity is the model's, and the words are the text's."""
    import torch

    import medclipin
    from medclipin.data.manifest import read_manifest
    from medclipin.data.readers import read_image
    from medclipin.eval.gradcam import explain, model_input, save_explanation, text_relevance

    model, processor = medclipin.load(eval_model)
    record = next(r for r in read_manifest(eval_data).records if r.boxes)
    text = "large right pleural effusion."
    tensor, pixels, geometry = model_input(processor, record.image_path)
    assert torch.equal(tensor, processor.images([record.image_path])[0])  # what evaluation sees
    assert tensor.shape == (1, 64, 64) and pixels.dtype == np.uint8
    from_path = explain(model, processor, record.image_path, text)
    tokens = processor.texts([text])
    with torch.no_grad():
        similarity = float(model.similarity(tensor[None], tokens["input_ids"], tokens["attention_mask"])[0])
    assert from_path.similarity == pytest.approx(similarity, abs=1e-5)
    assert from_path.cam.shape == (64, 64) and 0 <= from_path.cam.min() and from_path.cam.max() <= 1 + 1e-6
    assert from_path.cam_original.shape == from_path.original.shape[:2]
    assert from_path.relevance.words == ["large", "right", "pleural", "effusion."]
    relevance = text_relevance(model, processor, tensor, text)
    assert relevance.words == from_path.relevance.words
    np.testing.assert_allclose(relevance.signed, from_path.relevance.signed, rtol=1e-5, atol=1e-6)
    # the decoded original as an array: the same model input (up to 8-bit rounding), the same explanation
    original = read_image(record.image_path, window=processor.image_cfg.window).pixels
    array_tensor, _, _ = model_input(processor, original)
    from medclipin.data.transforms import normalization

    one_level = 1.0 / 255 / min(normalization(processor.image_cfg)[1])  # one 8-bit step, normalised
    assert (array_tensor - tensor).abs().max() <= 1.01 * one_level
    from_array = explain(model, processor, original, text)
    assert from_array.similarity == pytest.approx(from_path.similarity, abs=0.02)
    assert from_array.original.shape == original.shape[:2] and from_array.relevance.words == from_path.relevance.words
    summary = save_explanation(from_path, tmp_path / "e.png", boxes=[record.boxes[0].box])
    assert (tmp_path / "e.png").stat().st_size > 10_000 and summary
    # the public API gives the same explanation
    again = medclipin.explain(model, processor, record.image_path, text)
    assert again.similarity == pytest.approx(from_path.similarity, abs=1e-6)
    np.testing.assert_allclose(again.cam, from_path.cam, atol=1e-5)
