"""The five findings of the synthetic dataset, drawn into a :class:`~.drawing.Scene`: which classes a
study has, and pleural effusion, pneumothorax, consolidation and nodules with their boxes and the
words their report will use.
"""

from __future__ import annotations

import numpy as np

from medclipin.data.synthetic.design import CLASS_NAMES, CLASS_WEIGHTS, DETECTOR_MM, FINDINGS_PER_ABNORMAL, NORMAL_FRACTION
from medclipin.data.synthetic.drawing import Finding, Lung, Scene, crop_px, fast_atan2, radial_streaks, ramp, smooth_noise

_F = np.float32


def choose_classes(rng: np.random.Generator) -> list[str]:
    """The study's findings: none (NORMAL_FRACTION of studies) or 1-3 classes by CLASS_WEIGHTS."""
    if rng.random() < NORMAL_FRACTION:
        return []
    counts, probs = zip(*FINDINGS_PER_ABNORMAL)
    n = int(rng.choice(counts, p=np.array(probs) / sum(probs)))
    weights = np.array([CLASS_WEIGHTS[c] for c in CLASS_NAMES])
    chosen = rng.choice(len(CLASS_NAMES), size=n, replace=False, p=weights / weights.sum())
    return [CLASS_NAMES[i] for i in sorted(chosen)]


def zone(lung: Lung, v: float) -> str:
    frac = (v - lung.apex()) / (lung.v_cp - lung.apex())
    return "upper" if frac < 0.36 else "mid" if frac < 0.66 else "lower"


def draw_effusion(rng: np.random.Generator, s: Scene) -> None:
    """Dependent fluid at the costophrenic angle, meniscus up the lateral wall; right, left or both."""
    r = rng.random()
    sides = ["right"] if r < 0.4 else ["left"] if r < 0.8 else ["right", "left"]
    for side in sides:
        part = s.lungs[side]
        lobj, a, vv, where = part["obj"], part["a"], part["v"], part["where"]
        height = rng.uniform(0.14, 0.42)
        v_top = lobj.v_cp - height * (lobj.v_cp - lobj.apex())
        a_lat, a_med = lobj.ac + lobj.ra, 0.1
        t = np.clip((a - _F(a_med)) / _F(a_lat - a_med), 0.0, 1.0)
        level = _F(v_top) + _F(rng.uniform(0.12, 0.26)) * (1.0 - t) ** 1.5
        haze = _F(0.03) + _F(0.10) * (1.0 - t)  # sharp meniscus laterally, hazy medially
        opacity = np.clip((vv - level) / haze, 0.0, 1.0) * part["mask"]
        s.lesion[where] = np.maximum(s.lesion[where], _F(rng.uniform(0.7, 0.95)) * opacity)
        s.effusion_mask[where] = np.maximum(s.effusion_mask[where], opacity)
        box = s.box_at(opacity > 0.3, where)
        if box is not None:
            size_word = "small" if height < 0.22 else "moderate" if height < 0.34 else "large"
            s.findings.append(Finding("Pleural Effusion", box, {"side": side, "size": size_word}))


def draw_pneumothorax(rng: np.random.Generator, s: Scene) -> None:
    """Peripheral apical/lateral rim without markings, more lucent, bounded by a pleural line."""
    px, iso, scale = s.px, s.iso, s.scale
    part = s.lungs["right" if rng.random() < 0.5 else "left"]
    lobj, a, vv, where = part["obj"], part["a"], part["v"], part["where"]
    depth = rng.uniform(0.12, 0.3)
    hil = (0.32, -0.05)
    rho_c = lobj.rho(a, vv, shrink=1.0 - depth, center=hil)
    dist_px = (rho_c - 1.0) * _F(lobj.ra * (1.0 - depth)) * px  # > 0 outside the collapsed lung
    phi = fast_atan2((vv - _F(hil[1])) * iso, a - _F(hil[0]))
    phi0 = rng.uniform(-1.8, -0.75)  # -pi/2: apical; towards 0: lateral
    spread = rng.uniform(0.7, 1.1)
    wang = np.clip((_F(spread) - np.abs(phi - _F(phi0))) / _F(0.35), 0.0, 1.0)
    region = part["mask"] * ramp(dist_px) * wang * (1.0 - s.effusion_mask[where])
    line = part["mask"] * wang * np.clip(1.0 - np.abs(dist_px) / _F(1.2 * scale + 0.4), 0.0, 1.0)
    s.lucency[where] = np.maximum(s.lucency[where], region)
    s.pleural_line[where] = np.maximum(s.pleural_line[where], line)
    box = s.box_at(region > 0.5, where)
    if box is not None:
        where_word = "apical" if phi0 < -1.25 else "apicolateral" if phi0 < -0.95 else "lateral"
        s.findings.append(Finding("Pneumothorax", box, {"side": lobj.side, "where": where_word,
                                                         "size": "small" if depth < 0.21 else "moderate"}))


def draw_consolidation(rng: np.random.Generator, s: Scene) -> None:
    """Patchy ill-defined opacity in one lung zone, half of them with air bronchograms."""
    size, scale = s.f.size, s.scale
    part = s.lungs["right" if rng.random() < 0.5 else "left"]
    lobj, a, vv, where = part["obj"], part["a"], part["v"], part["where"]
    zone_name = rng.choice(["upper", "mid", "lower"])
    lo, hi = {"upper": (0.16, 0.34), "mid": (0.40, 0.60), "lower": (0.68, 0.8)}[zone_name]
    c_v = lobj.apex() + rng.uniform(lo, hi) * (lobj.v_cp - lobj.apex())
    c_a = rng.uniform(0.4, 0.66)
    s_a, s_v = rng.uniform(0.09, 0.15), rng.uniform(0.10, 0.18)
    envelope = np.exp(_F(-0.5) * (((a - _F(c_a)) / _F(s_a)) ** 2 + ((vv - _F(c_v)) / _F(s_v)) ** 2))
    patches = np.clip(_F(0.55) + _F(0.6) * smooth_noise(rng, a.shape, max(4, size // 24)), 0.0, 1.0)
    opacity = (np.clip(envelope * _F(1.5) - _F(0.15), 0.0, 1.0) * (_F(0.3) + _F(0.7) * patches)
               * part["mask"] * (1.0 - s.solid[where]))
    s.lesion[where] = np.maximum(s.lesion[where], _F(rng.uniform(0.5, 0.85)) * opacity)
    bronchi = bool(rng.random() < 0.5)
    if bronchi:
        streaks = radial_streaks(rng, part["angle"], part["radius"], bins=int(200 * scale) + 40)
        s.bronchogram = s.full(opacity * np.minimum(streaks, 1.0), where)
    box = s.box_at(opacity > 0.35 * float(opacity.max()), where)
    if box is not None:
        s.findings.append(Finding("Consolidation", box, {"side": lobj.side, "zone": zone(lobj, c_v),
                                                          "bronchograms": bronchi}))


def draw_nodules(rng: np.random.Generator, s: Scene) -> None:
    """One (sometimes two) small round soft-tissue opacities in a lung field clear of heart, fluid and air."""
    u, v, f = s.u, s.v, s.f
    size = f.size
    candidates = np.flatnonzero(((s.lung > 0.95) & (s.solid < 0.05) & (s.effusion_mask < 0.05)
                                 & (s.lucency < 0.05)).ravel())
    n_nodules = 1 if rng.random() < 0.8 else 2
    for _ in range(n_nodules if candidates.size else 0):
        index = int(candidates[rng.integers(candidates.size)])
        row, col = divmod(index, size)
        x0, y0 = col + 0.5 + rng.uniform(-0.5, 0.5), row + 0.5 + rng.uniform(-0.5, 0.5)
        radius = rng.uniform(0.03, 0.065) * f.half_width
        nwhere = crop_px(size, x0, y0, radius + 2)
        yy, xx = np.ogrid[nwhere[0], nwhere[1]]
        d2 = ((xx + 0.5 - x0) ** 2 + (yy + 0.5 - y0) ** 2).astype(_F)
        sphere = np.sqrt(np.clip(1.0 - d2 / _F(radius * radius), 0.0, 1.0))
        # solid tissue: adds density on its own rather than replacing air
        s.attenuation[nwhere] += _F(rng.uniform(0.3, 0.6)) * s.air_k * _F(0.8) * sphere
        margin = 1.15 * radius
        box = (float(max(0, np.floor(x0 - margin))), float(max(0, np.floor(y0 - margin))),
               float(min(size, np.ceil(x0 + margin))), float(min(size, np.ceil(y0 + margin))))
        lobj = s.right if u.flat[index] < 0 else s.left
        s.findings.append(Finding("Nodule", box, {"side": lobj.side, "zone": zone(lobj, float(v.flat[index])),
                                                   "mm": 2 * radius * DETECTOR_MM / size}))


def draw_lesions(rng: np.random.Generator, s: Scene, classes: list[str]) -> None:
    """The study's findings, in a fixed order (nodules avoid the regions the others filled)."""
    s.lesion = np.zeros_like(s.u)
    s.lucency = np.zeros_like(s.u)
    s.pleural_line = np.zeros_like(s.u)
    s.effusion_mask = np.zeros_like(s.u)
    if "Pleural Effusion" in classes:
        draw_effusion(rng, s)
    if "Pneumothorax" in classes:
        draw_pneumothorax(rng, s)
    if "Consolidation" in classes:
        draw_consolidation(rng, s)
    if "Nodule" in classes:
        draw_nodules(rng, s)
