"""One synthetic radiograph: anatomy and lesions composed into an attenuation map, then passed
through a randomised acquisition (blur, noise, exposure curve, gamma, window, heel effect, marker).

The image statistics are randomised per image so that no single global pixel statistic predicts a
finding; a model has to look at the lesion.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from medclipin.data.synthetic.anatomy import draw_anatomy
from medclipin.data.synthetic.drawing import Finding, Scene, crop, make_frame, make_lungs, ramp
from medclipin.data.synthetic.lesions import draw_lesions

_F = np.float32


def compose(rng: np.random.Generator, s: Scene, classes: list[str]) -> np.ndarray:
    """Soft tissue + bone - air (minus what lesions fill) + markings, and the gastric bubble.

    Terms that are zero for this study are skipped: full-image temporaries dominate the run time.
    """
    attenuation, markings, air = s.attenuation, s.markings, s.air
    lucent_gain, line_gain = _F(rng.uniform(0.05, 0.08)), _F(rng.uniform(0.05, 0.08))
    if "Pneumothorax" in classes:
        markings *= 1.0 - s.lucency
        attenuation -= lucent_gain * s.lucency
        attenuation += line_gain * s.pleural_line
    if s.bronchogram is not None:  # air-filled bronchi stay lucent inside the consolidation
        attenuation -= _F(0.3) * air * s.bronchogram
    if "Pleural Effusion" in classes or "Consolidation" in classes:
        markings *= 1.0 - _F(0.7) * s.lesion
        air *= 1.0 - s.lesion
    attenuation += markings
    attenuation -= air
    # gastric bubble under the left hemidiaphragm
    if rng.random() < 0.6:
        u, v = s.u, s.v
        gb_a = rng.uniform(0.45, 0.65)
        gb_v = float(s.left.diaphragm(gb_a)) + rng.uniform(0.07, 0.14)
        gwhere = crop(s.f, (gb_a - 0.12, gb_a + 0.12), (gb_v - 0.1, gb_v + 0.1))
        bubble = ramp((_F(0.07) - np.sqrt(((u[gwhere] - _F(gb_a)) / _F(1.4)) ** 2
                                          + ((v[gwhere] - _F(gb_v)) * s.iso) ** 2)) * s.px)
        attenuation[gwhere] -= _F(rng.uniform(0.06, 0.14)) * bubble * s.inside_body[gwhere]
    return attenuation


def acquire(rng: np.random.Generator, attenuation: np.ndarray, size: int, scale: float) -> np.ndarray:
    """Blur (detector MTF), noise, exposure curve, gamma, window, heel effect and a side marker → [0, 1]."""
    attenuation = ndimage.gaussian_filter(attenuation, 0.7 * scale, truncate=2.5)
    # uniform rather than Gaussian noise: looks the same after the exposure curve, 3x cheaper to draw
    attenuation += _F(rng.uniform(0.006, 0.02) * np.sqrt(12.0)) * (rng.random((size, size), dtype=_F) - _F(0.5))
    # exposure curve, gamma and window as one lookup table over quantised attenuation
    k = rng.uniform(0.5, 1.6)
    gamma = np.exp(rng.uniform(np.log(0.75), np.log(1.4)))
    lo, hi = rng.uniform(-0.1, 0.1), rng.uniform(0.88, 1.12)
    levels = np.linspace(0.0, 1.5, 3001)
    lut = (np.clip((1.0 - np.exp(-k * levels)) / (1.0 - np.exp(-k)), 0.0, 1.0) ** gamma - lo) / (hi - lo)
    index = np.clip(attenuation * _F(2000.0) + _F(0.5), 0, 3000).astype(np.int32)
    d = np.take(lut.astype(_F), index)
    ys = (np.arange(size, dtype=_F)[:, None] + _F(0.5)) / _F(size) - _F(0.5)
    xs = (np.arange(size, dtype=_F)[None, :] + _F(0.5)) / _F(size) - _F(0.5)
    d *= 1.0 + _F(rng.uniform(-0.12, 0.12)) * ys + _F(rng.uniform(-0.06, 0.06)) * xs  # heel effect
    # side marker: a small bright tag in an upper corner (burned in, unrelated to the labels)
    if rng.random() < 0.7:
        m = max(2, int(round(size * rng.uniform(0.025, 0.04))))
        x_m = int(rng.integers(2, size // 8)) if rng.random() < 0.5 else int(rng.integers(size - size // 8 - m, size - m - 2))
        y_m = int(rng.integers(2, size // 6))
        d[y_m:y_m + m, x_m:x_m + m] = 0.97
    return np.clip(d, 0.0, 1.0)


def render(rng: np.random.Generator, size: int, view: str, sex: str, habitus: float,
           classes: list[str]) -> tuple[np.ndarray, list[Finding]]:
    """Draw one radiograph. Returns display intensities in [0, 1] (bright = dense) and the findings.

    Everything is built as an attenuation map (soft tissue + bone - air + lesions), then passed
    through a randomised acquisition. The steps run in a fixed order: it fixes the random draws.
    """
    f = make_frame(rng, size, habitus)
    right, left = make_lungs(rng, view)
    scene = Scene(f, right, left)
    draw_anatomy(rng, scene, sex, classes)
    draw_lesions(rng, scene, classes)
    attenuation = compose(rng, scene, classes)
    return acquire(rng, attenuation, size, scene.scale), scene.findings
