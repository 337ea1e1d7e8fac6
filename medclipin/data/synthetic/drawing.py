"""Drawing primitives of the synthetic radiograph: the body coordinate frame, the lung outlines,
the :class:`Scene` the drawing steps share, and small vectorised helpers (float32 throughout;
structures are drawn on crops around them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

_F = np.float32


def ramp(signed_distance_px: np.ndarray) -> np.ndarray:
    """Anti-aliased inside indicator from a signed distance in pixels (positive inside)."""
    return np.clip(signed_distance_px + _F(0.5), _F(0.0), _F(1.0))


def bbox(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))


def fast_atan2(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Fast float32 ``arctan2`` (max error ~0.005 rad, plenty for drawing; numpy's is ~20x slower)."""
    ax, ay = np.abs(x), np.abs(y)
    z = np.minimum(ax, ay) / (np.maximum(ax, ay) + _F(1e-12))
    r = z * (_F(np.pi / 4) + _F(0.273) * (1.0 - z))
    r = np.where(ay > ax, _F(np.pi / 2) - r, r)
    r = np.where(x < 0, _F(np.pi) - r, r)
    return np.where(y < 0, -r, r)


def crop_px(size: int, x: float, y: float, half: float) -> tuple[slice, slice]:
    """Rows/columns of a square of half-side ``half`` pixels around (x, y), clipped to the image."""
    x0, x1 = max(0, int(np.floor(x - half))), min(size, int(np.ceil(x + half)) + 1)
    y0, y1 = max(0, int(np.floor(y - half))), min(size, int(np.ceil(y + half)) + 1)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def crop(f: "Frame", u_range: tuple[float, float], v_range: tuple[float, float], pad: int = 2) -> tuple[slice, slice]:
    """Rows/columns of the image holding the (rotated) frame rectangle u_range x v_range."""
    corners = [f.to_pixels(uu, vv) for uu in u_range for vv in v_range]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    x0, x1 = max(0, int(np.floor(min(xs))) - pad), min(f.size, int(np.ceil(max(xs))) + pad)
    y0, y1 = max(0, int(np.floor(min(ys))) - pad), min(f.size, int(np.ceil(max(ys))) + pad)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Band-limited noise (about ``cells`` blobs across the longer side), zero mean, unit std."""
    step = max(shape) / cells
    coarse_shape = (int(np.ceil(shape[0] / step)) + 2, int(np.ceil(shape[1] / step)) + 2)
    coarse = ndimage.gaussian_filter(rng.standard_normal(coarse_shape).astype(_F), 0.7)
    rows = (np.arange(shape[0], dtype=_F) + 0.5) / _F(step) + 0.5
    cols = (np.arange(shape[1], dtype=_F) + 0.5) / _F(step) + 0.5
    fine = ndimage.map_coordinates(coarse, np.meshgrid(rows, cols, indexing="ij"), order=1, mode="nearest")
    fine = fine - fine.mean()
    return (fine / (fine.std() + _F(1e-6))).astype(_F)


@dataclass
class Frame:
    """Body coordinate frame: u across the thorax (±1 near the chest wall, negative = patient's
    right = image left), v down the thorax (about -0.95 at the lung apices, +0.85 at the
    costophrenic angles)."""

    size: int
    cx: float
    cy: float
    half_width: float  # pixels per u unit
    half_height: float  # pixels per v unit
    theta: float
    u: np.ndarray
    v: np.ndarray

    def to_pixels(self, u: float, v: float) -> tuple[float, float]:
        c, s = np.cos(self.theta), np.sin(self.theta)
        du, dv = u * self.half_width, v * self.half_height
        return float(self.cx + du * c - dv * s), float(self.cy + du * s + dv * c)


def make_frame(rng: np.random.Generator, size: int, habitus: float) -> Frame:
    half_width = size * float(np.clip(habitus + rng.normal(0, 0.012), 0.31, 0.43))
    half_height = size * rng.uniform(0.36, 0.43)
    cx = size * (0.5 + rng.uniform(-0.045, 0.045))
    cy = size * (0.5 + rng.uniform(-0.03, 0.04))
    theta = float(np.clip(rng.normal(0, 0.04), -0.09, 0.09))
    coords = np.arange(size, dtype=_F) + _F(0.5)
    dx, dy = coords[None, :] - _F(cx), coords[:, None] - _F(cy)
    c, s = _F(np.cos(theta)), _F(np.sin(theta))
    u = (dx * c + dy * s) / _F(half_width)
    v = (dy * c - dx * s) / _F(half_height)
    return Frame(size, cx, cy, half_width, half_height, theta, u, v)


@dataclass
class Lung:
    """One lung in the frame; ``a`` = lateral coordinate (|u| on its side)."""

    side: str  # "right" (patient's right = image left) or "left"
    sign: float
    ac: float
    vc: float
    ra: float
    rv_top: float
    rv_bottom: float
    dome_a: float
    dome_h: float
    v_cp: float

    def apex(self) -> float:
        return self.vc - self.rv_top

    def diaphragm(self, a):
        """Lung base level at lateral position ``a``: a dome, lowest at the costophrenic angle."""
        a = np.asarray(a, dtype=_F)
        width = np.where(a < self.dome_a, _F(0.5), _F(0.28))  # broad medially, steep laterally
        return _F(self.v_cp) - _F(self.dome_h) * np.exp(-(((a - _F(self.dome_a)) / width) ** 2))

    def rho(self, a: np.ndarray, v: np.ndarray, shrink: float = 1.0, center=(0.0, 0.0)) -> np.ndarray:
        """Superellipse radius (1 on the lung outline): round apex, boxy base.

        ``shrink`` < 1 gives the outline scaled towards ``center`` (a collapsed lung)."""
        if shrink != 1.0:
            a = _F(center[0]) + (a - _F(center[0])) / _F(shrink)
            v = _F(center[1]) + (v - _F(center[1])) / _F(shrink)
        da = (a - _F(self.ac)) / _F(self.ra)
        dv_top = (v - _F(self.vc)) / _F(self.rv_top)
        dv_bottom = (v - _F(self.vc)) / _F(self.rv_bottom)
        round_part = np.sqrt(da * da + dv_top * dv_top)
        da2, dv2 = da * da, dv_bottom * dv_bottom
        boxy_part = np.sqrt(np.sqrt(da2 * da2 + dv2 * dv2))
        return np.where(v < _F(self.vc), round_part, boxy_part)


def make_lungs(rng: np.random.Generator, view: str) -> tuple[Lung, Lung]:
    # AP (often portable) films are usually taken at lower inspiration: higher diaphragms.
    inspiration = rng.uniform(-0.06, 0.06) - (0.07 if view == "AP" else 0.0)
    lungs = []
    for side, sign in (("right", -1.0), ("left", 1.0)):
        v_cp = 0.85 + inspiration + rng.uniform(-0.02, 0.02)
        apex = -0.95 + rng.uniform(-0.03, 0.03)
        vc = -0.05
        lungs.append(Lung(
            side=side, sign=sign, ac=0.5 + rng.uniform(-0.02, 0.02), vc=vc,
            ra=0.38 + rng.uniform(-0.02, 0.02), rv_top=vc - apex, rv_bottom=v_cp + 0.08 - vc,
            dome_a=0.42 + rng.uniform(-0.05, 0.05),
            # the right hemidiaphragm sits higher (liver)
            dome_h=rng.uniform(0.22, 0.32) + (0.05 if side == "right" else 0.0), v_cp=v_cp,
        ))
    return lungs[0], lungs[1]


def radial_streaks(rng: np.random.Generator, angle: np.ndarray, radius: np.ndarray, bins: int,
                    threshold: float = 0.8) -> np.ndarray:
    """Thin streaks radiating from a point, given polar coordinates around it (vessels, bronchi)."""
    profile = ndimage.gaussian_filter1d(rng.standard_normal(bins), 0.9, mode="wrap")
    profile = np.clip(profile / (profile.std() + 1e-6) - threshold, 0, None).astype(_F)
    wiggle = _F(0.06) * np.sin(radius * _F(rng.uniform(9, 15)) + _F(rng.uniform(0, 2 * np.pi)))
    idx = ((angle + wiggle) * _F(bins / (2 * np.pi))).astype(np.int32)
    return np.take(profile, idx, mode="wrap")


@dataclass
class Finding:
    """A drawn lesion: its class, its box (x0, y0, x1, y1 in pixels) and the words the report uses."""

    label: str
    box: tuple[float, float, float, float]
    words: dict


@dataclass
class Scene:
    """What the drawing steps of one radiograph share: the body frame, the two lungs and the layers
    built so far (attenuation and the masks that later steps consult)."""

    f: Frame
    right: Lung
    left: Lung
    findings: list[Finding] = field(default_factory=list)
    lungs: dict = field(default_factory=dict)  # side -> {"obj", "where", "a", "v", "rho", "mask", ...}
    attenuation: np.ndarray | None = None
    inside_body: np.ndarray | None = None
    body_w: np.ndarray | None = None
    lung: np.ndarray | None = None  # the lung fields (sum of both masks)
    solid: np.ndarray | None = None  # heart and mediastinum: no air behind them
    air_k: np.float32 | None = None
    air: np.ndarray | None = None
    markings: np.ndarray | None = None
    # lesion layers (lesions.py): the fraction of local air a lesion replaces, pneumothorax lucency and
    # its pleural line, the effusion mask (nodules avoid it), air bronchograms inside a consolidation
    lesion: np.ndarray | None = None
    lucency: np.ndarray | None = None
    pleural_line: np.ndarray | None = None
    effusion_mask: np.ndarray | None = None
    bronchogram: np.ndarray | None = None

    def __post_init__(self):
        f = self.f
        self.px, self.pxv = _F(f.half_width), _F(f.half_height)  # pixels per u / v unit
        self.iso = _F(f.half_height / f.half_width)  # v -> u units, for shapes that are round in pixels
        self.scale = f.size / 256.0
        self.a_abs = np.abs(f.u)

    @property
    def u(self) -> np.ndarray:
        return self.f.u

    @property
    def v(self) -> np.ndarray:
        return self.f.v

    def full(self, part: np.ndarray, where: tuple[slice, slice]) -> np.ndarray:
        """A crop's values placed into a full-size zero image."""
        out = np.zeros_like(self.f.u)
        out[where] = part
        return out

    def box_at(self, mask: np.ndarray, where: tuple[slice, slice]):
        """Bounding box of a crop's mask in image pixels, or None when the mask is empty."""
        box = bbox(mask)
        if box is None:
            return None
        x0, y0 = where[1].start, where[0].start
        return (box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0)
