"""Augmentation pipelines: shapes, channels, normalisation, determinism, independence, speed."""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import torch

from medclipin.config import AugmentConfig, ImageConfig
from medclipin.data.transforms import TwoViewTransform, build_image_transform


def _image(shape=(300, 260), dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return array if dtype == np.uint8 else (array / 255.0).astype(np.float32)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape", [(300, 260), (300, 260, 3), (64, 64)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_dtype(channels, shape, dtype, train):
    cfg = ImageConfig(size=32, channels=channels)
    out = build_image_transform(cfg, train=train)(_image(shape, dtype))
    assert out.shape == (channels, 32, 32) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_eval_is_deterministic_and_normalised():
    cfg = ImageConfig(size=16, channels=1, mean=0.5, std=0.25)
    transform = build_image_transform(cfg, train=False)
    flat = np.full((40, 40), 0.75, np.float32)
    np.testing.assert_allclose(transform(flat).numpy(), 1.0, atol=1e-5)  # (0.75 - 0.5) / 0.25
    assert torch.equal(transform(flat), transform(flat))
    # uint8 and float input of the same image agree
    image = _image((64, 64))
    a, b = transform(image), transform(image.astype(np.float32) / 255.0)
    assert torch.allclose(a, b, atol=0.02)


def test_non_square_input_is_padded_not_stretched():
    cfg = ImageConfig(size=20, channels=1, mean=0.0, std=1.0)
    wide = np.ones((50, 100), np.float32)
    out = build_image_transform(cfg, train=False)(wide)[0]
    assert out[0].max() == 0.0 and out[10].min() == pytest.approx(1.0, abs=1e-5)  # zero bars above/below


def test_channel_conversion():
    grey = _image((32, 32))
    out3 = build_image_transform(ImageConfig(size=32, channels=3), train=False)(grey)
    assert torch.equal(out3[0], out3[1]) and torch.equal(out3[1], out3[2])
    rgb = np.zeros((32, 32, 3), np.float32)
    rgb[..., 1] = 1.0  # pure green: luminance 0.587
    out1 = build_image_transform(ImageConfig(size=32, channels=1, mean=0.0, std=1.0), train=False)(rgb)
    assert out1.mean().item() == pytest.approx(0.587, abs=0.01)


def test_train_views_differ_and_cxr_has_no_vertical_flip():
    cfg = ImageConfig(size=32, channels=1, augment=AugmentConfig(vertical_flip=0.5))
    transform = build_image_transform(cfg, train=True)
    assert "VerticalFlip" not in repr(transform.pipeline)
    first, second = TwoViewTransform(transform)(_image((64, 64)))
    assert first.shape == second.shape == (1, 32, 32) and not torch.equal(first, second)
    disabled = build_image_transform(ImageConfig(size=32, augment=AugmentConfig(enabled=False)), train=True)
    assert torch.equal(disabled(_image((64, 64))), disabled(_image((64, 64))))


def test_fundus_pipeline_has_flips_and_colour_jitter():
    cfg = ImageConfig(domain="fundus", size=32, channels=3,
                      augment=AugmentConfig(horizontal_flip=0.5, vertical_flip=0.5, color_jitter=0.2))
    text = repr(build_image_transform(cfg, train=True).pipeline)
    for name in ("HorizontalFlip", "VerticalFlip", "ColorJitter", "RandomResizedCrop"):
        assert name in text


def test_picklable_for_dataloader_workers():
    transform = build_image_transform(ImageConfig(size=32), train=True)
    clone = pickle.loads(pickle.dumps(TwoViewTransform(transform)))
    assert clone(_image((64, 64)))[0].shape == (1, 32, 32)


def test_fast_enough_for_cpu_training():
    # the CPU training step consumes ~50–100 images/s; one augmentation must cost well under 10 ms
    cfg = ImageConfig(size=224, channels=1)
    transform = build_image_transform(cfg, train=True)
    image = _image((512, 512))
    transform(image)
    start = time.perf_counter()
    for _ in range(20):
        transform(image)
    assert (time.perf_counter() - start) / 20 < 0.010


class _SameImage(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform, self.image = transform, _image((64, 64))

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.image)


def test_dataloader_workers_draw_different_augmentations():
    # forked workers copy the random state; without re-seeding, worker 0 and 1 would return equal first draws
    transform = build_image_transform(ImageConfig(size=32), train=True)
    loader = torch.utils.data.DataLoader(_SameImage(transform), batch_size=1, num_workers=2,
                                         multiprocessing_context="fork")
    first, second = list(loader)[:2]  # first draw of worker 0 and of worker 1
    assert not torch.equal(first, second)


def test_explicit_reseed_repeats_draws():
    transform = build_image_transform(ImageConfig(size=32), train=True)
    image = _image((64, 64))
    transform.reseed(5)
    first, second = transform(image), transform(image)
    transform.reseed(5)
    assert torch.equal(transform(image), first) and not torch.equal(first, second)


def test_ops_draw_from_one_stream_not_correlated_copies():
    # Compose.set_random_seed gives every op the same seed: both flips would always fire together
    cfg = ImageConfig(domain="fundus", size=4, channels=1, mean=0.0, std=1.0,
                      augment=AugmentConfig(horizontal_flip=0.5, vertical_flip=0.5, rotate_limit=0, translate=0,
                                            scale_min=1.0, scale_max=1.0, brightness_contrast=0, gamma=(100.0, 100.0)))
    transform = build_image_transform(cfg, train=True)
    image = np.arange(16, dtype=np.float32).reshape(4, 4) / 16
    outcomes = set()
    for seed in range(40):
        transform.reseed(seed)
        out = transform(image)[0].numpy()
        outcomes.add(next(name for name, ref in [("id", image), ("h", image[:, ::-1]), ("v", image[::-1]),
                                                 ("hv", image[::-1, ::-1])] if np.allclose(out, ref, atol=1e-4)))
    assert outcomes == {"id", "h", "v", "hv"}
