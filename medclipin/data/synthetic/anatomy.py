"""The normal chest of a synthetic radiograph, as an attenuation map: body, lungs, heart and
mediastinum, hila, ribs, clavicles, spine, breast shadows and lung markings.

The drawing steps share a :class:`Scene` and run in a fixed order (:func:`draw_anatomy`): every
random draw happens in the same sequence for the same seed, so the pixels are reproducible.
"""

from __future__ import annotations

import numpy as np

from medclipin.data.synthetic.drawing import Finding, Scene, crop, crop_px, fast_atan2, radial_streaks, ramp

_F = np.float32


def draw_body(rng: np.random.Generator, s: Scene) -> None:
    """Elliptic cross-section (thicker in the middle), rounded shoulders, neck, waist."""
    u, v, px = s.u, s.v, s.px
    body_half = _F(rng.uniform(1.08, 1.18))
    v_shoulder = _F(rng.uniform(-0.85, -0.7))
    shoulder = np.sqrt(np.clip(1.0 - (np.minimum(v - v_shoulder, 0.0) / _F(0.55)) ** 2, 0.0, 1.0))
    waist = 1.0 - _F(rng.uniform(0.02, 0.07)) * np.maximum(v - _F(0.1), 0.0) ** 2
    body_w = np.maximum(body_half * shoulder * waist, _F(rng.uniform(0.28, 0.36)))
    t_body = np.sqrt(np.clip(1.0 - (u / body_w) ** 2, 0.0, 1.0))
    s.body_w = body_w
    s.inside_body = ramp((body_w - s.a_abs) * px)
    s.attenuation = _F(0.28) * s.inside_body + _F(0.40) * t_body


def draw_lung_fields(s: Scene) -> None:
    """Both lung masks, each on its own crop (no random draws)."""
    u, v, f = s.u, s.v, s.f
    s.lung = np.zeros_like(u)
    for lobj in (s.right, s.left):
        lat = lobj.ac + lobj.ra + 0.03
        where = crop(f, (0.0, lobj.sign * lat), (lobj.apex() - 0.03, lobj.v_cp + 0.12))
        a, vv = u[where] * _F(lobj.sign), v[where]
        rho = lobj.rho(a, vv)
        dia = lobj.diaphragm(a)
        mask = ramp((1.0 - rho) * _F(lobj.ra) * s.px) * ramp((dia - vv) * s.pxv) * (a > 0.02)
        s.lungs[lobj.side] = {"obj": lobj, "where": where, "a": a, "v": vv, "rho": rho, "mask": mask}
        s.lung[where] += mask


def draw_heart_and_mediastinum(rng: np.random.Generator, s: Scene, classes: list[str]) -> None:
    """Heart resting on the diaphragm (width = cardiothoracic ratio × thoracic width), vascular
    pedicle widening into it, aortic knob on the left. Records the Cardiomegaly finding."""
    u, v, f, px, pxv, iso = s.u, s.v, s.f, s.px, s.pxv, s.iso
    right, left = s.right, s.left
    cardiomegaly = "Cardiomegaly" in classes
    ctr = rng.uniform(0.54, 0.66) if cardiomegaly else rng.uniform(0.38, 0.50)
    hw = ctr * 0.9  # the inner thoracic width is ~1.8 u units
    alpha = rng.uniform(0.35, 0.6)  # long axis towards the apex, down and to the patient's left
    ax = hw / np.sqrt(np.cos(alpha) ** 2 + 0.52 * np.sin(alpha) ** 2)
    bx = 0.72 * ax
    half_tall = np.sqrt((ax * np.sin(alpha)) ** 2 + (bx * np.cos(alpha)) ** 2) / iso  # in v units
    uh = hw / 3.0 + rng.uniform(-0.03, 0.03)  # one third right of the midline, two thirds left
    vh = 0.68 + rng.uniform(-0.03, 0.03) - 0.7 * half_tall  # the bottom sinks below the diaphragm
    where = crop(f, (uh - hw - 0.03, uh + hw + 0.03), (vh - half_tall - 0.03, vh + half_tall + 0.03))
    uu, vv = u[where], v[where]
    du, dvn = uu - _F(uh), (vv - _F(vh)) * iso
    ca, sa = _F(np.cos(alpha)), _F(np.sin(alpha))
    hu, hv = (du * ca + dvn * sa) / _F(ax), (dvn * ca - du * sa) / _F(bx)
    e = np.sqrt(hu * hu + hv * hv)
    heart_cut = np.where(uu < 0, right.diaphragm(np.abs(uu)), left.diaphragm(np.abs(uu))) + _F(0.03)
    heart_part = ramp((1.0 - e) * _F(bx) * px) * ramp((heart_cut - vv) * pxv)
    if cardiomegaly:
        s.findings.append(Finding("Cardiomegaly", s.box_at(heart_part > 0.5, where), {"ctr": ctr}))
    # mediastinum: vascular pedicle widening down into the heart, aortic knob on the left
    heart_top = vh - 0.6 * half_tall
    mwhere = crop(f, (-0.45, 0.45), (-1.3, heart_top + 0.05))
    mu, mv = u[mwhere], v[mwhere]
    m_half = _F(rng.uniform(0.11, 0.14)) + _F(0.35 * hw) * np.clip((mv + _F(0.35)) / _F(heart_top + 0.35), 0.0, 1.0) ** 2
    m_shift = _F(0.25 * hw) * np.clip((mv + _F(0.35)) / _F(heart_top + 0.35), 0.0, 1.0)
    medi = ramp((m_half - np.abs(mu - m_shift)) * px) * ramp((_F(heart_top + 0.05) - mv) * pxv)
    knob_u, knob_v = 0.14 + rng.uniform(-0.02, 0.03), -0.45 + rng.uniform(-0.05, 0.05)
    knob = ramp((_F(0.085) - np.sqrt((mu - _F(knob_u)) ** 2 + ((mv - _F(knob_v)) * iso) ** 2)) * px)
    heart = s.full(heart_part, where)
    s.solid = np.maximum(heart, s.full(np.maximum(medi, knob), mwhere))  # no air behind these


def draw_air_and_hila(rng: np.random.Generator, s: Scene) -> None:
    """Air in the lungs (deepest centrally, none behind the heart) and the pulmonary arteries at each root."""
    u, f = s.u, s.f
    size = f.size
    s.air_k = _F(rng.uniform(0.48, 0.6))
    lung_depth = np.zeros_like(u)
    for part in s.lungs.values():
        lung_depth[part["where"]] += part["mask"] * (_F(0.6) + _F(0.4) * np.sqrt(np.clip(1.0 - part["rho"], 0.0, 1.0)))
    s.air = s.air_k * lung_depth * (1.0 - _F(0.93) * s.solid)
    # hila: pulmonary arteries, a soft density at each lung root
    for lobj in (s.right, s.left):
        hx, hy = f.to_pixels(lobj.sign * rng.uniform(0.2, 0.26), rng.uniform(-0.15, -0.02))
        r = rng.uniform(0.07, 0.1) * f.half_width
        hwhere = crop_px(size, hx, hy, 2.5 * r)
        yy, xx = np.ogrid[hwhere[0], hwhere[1]]
        blob = np.exp(-(((xx + 0.5 - hx) ** 2 + (yy + 0.5 - hy) ** 2) / (2 * r * r))).astype(_F)
        s.attenuation[hwhere] += _F(rng.uniform(0.04, 0.07)) * blob


def draw_bones(rng: np.random.Generator, s: Scene) -> None:
    """Posterior ribs (irregular from rib to rib), anterior ribs, clavicles, spine and trachea."""
    u, v, f, px, pxv = s.u, s.v, s.f, s.px, s.pxv
    right, left, attenuation, inside_body = s.right, s.left, s.attenuation, s.inside_body
    bwhere = crop(f, (-1.2, 1.2), (-1.25, max(right.v_cp, left.v_cp) + 0.1))
    bu, bv = u[bwhere], v[bwhere]
    ba = np.abs(bu)
    rib_period = rng.uniform(0.18, 0.22)
    bend = _F(rng.uniform(0.45, 0.7)) + _F(0.2) * np.clip((bv + 1.0) * 0.5, 0.0, 1.0)
    phase = (bv - bend * (ba - _F(0.1)) ** 2) / _F(rib_period) + _F(rng.uniform(0, 1))
    rib_index = np.floor(phase)
    rib_frac = phase - rib_index
    rib_width = _F(rng.uniform(0.45, 0.6))
    inside_px = (rib_width * 0.5 - np.abs(rib_frac - rib_width * 0.5)) * _F(rib_period) * pxv  # >0 on a rib
    band = ramp(inside_px * 0.5)
    cortex = np.clip(1.0 - np.abs(inside_px) / _F(1.3 * s.scale + 0.3), 0.0, 1.0)
    gain = np.take(rng.uniform(0.6, 1.3, size=64).astype(_F), rib_index.astype(np.int32), mode="wrap")
    phase2 = (bv - _F(0.55) * (1.0 - ba)) / _F(rib_period * 1.3) + _F(rng.uniform(0, 1))
    band2 = np.clip((np.abs(phase2 - np.floor(phase2) - 0.5) * 2.0 - _F(0.55)) * 3.0, 0.0, 1.0)
    thorax = (ramp((_F(max(right.v_cp, left.v_cp) + 0.08) - bv) * pxv) * ramp((bv + _F(1.2)) * pxv)
              * (ba > 0.07) * ramp((s.body_w[bwhere] - _F(0.08) - ba) * px))
    rib_amp = _F(rng.uniform(0.035, 0.065))
    attenuation[bwhere] += rib_amp * thorax * (gain * (_F(0.8) * band + _F(0.5) * cortex) + _F(0.3) * band2)
    cwhere = crop(f, (-0.9, 0.9), (-1.3, -0.6))
    ca_abs, cv = np.abs(u[cwhere]), v[cwhere]
    clav_v = _F(-0.88 + rng.uniform(-0.05, 0.04)) - _F(0.14) * ca_abs + _F(0.25) * (ca_abs - _F(0.4)) ** 2
    clavicle = np.clip(1.0 - (((cv - clav_v) * pxv) / _F(0.04 * f.half_width)) ** 2, 0.0, 1.0)
    attenuation[cwhere] += _F(rng.uniform(0.06, 0.11)) * clavicle * ((ca_abs > 0.05) & (ca_abs < 0.82))
    swhere = crop(f, (-0.12, 0.12), (-1.6, 1.4))
    su, sv = u[swhere], v[swhere]
    vert = np.abs(sv / _F(rng.uniform(0.1, 0.12)) % 1.0 - 0.5)  # vertebral bodies and disc spaces
    spine = ramp((_F(0.075) - np.abs(su)) * px) * (_F(0.8) + _F(0.4) * vert)
    trachea = ramp((_F(0.045) - np.abs(su - _F(rng.uniform(-0.02, 0.02)))) * px) * ramp((_F(-0.33) - sv) * pxv)
    attenuation[swhere] += (_F(0.07) * spine - _F(0.10) * trachea) * inside_body[swhere]


def draw_breasts(rng: np.random.Generator, s: Scene, sex: str) -> None:
    """Breast soft tissue over the lower zones: a density distractor unrelated to the labels."""
    if sex != "F":
        return
    u, v = s.u, s.v
    brwhere = crop(s.f, (-1.2, 1.2), (-0.1, 1.2))
    b_a, b_v = np.abs(u[brwhere]), v[brwhere]
    breast = np.exp(-(((b_a - _F(0.55)) / _F(0.3)) ** 2 + ((b_v - _F(0.55)) / _F(0.3)) ** 2))
    s.attenuation[brwhere] += _F(rng.uniform(0.0, 0.1)) * breast * s.inside_body[brwhere]


def draw_lung_markings(rng: np.random.Generator, s: Scene) -> None:
    """Vessels radiating from the hila, tapering outwards, plus fine texture; they fade behind the heart."""
    scale, iso = s.scale, s.iso
    markings = np.zeros_like(s.u)
    for part in s.lungs.values():
        hil_a, hil_v = 0.22 + rng.uniform(-0.03, 0.03), -0.1 + rng.uniform(-0.05, 0.05)
        da, dv = part["a"] - _F(hil_a), (part["v"] - _F(hil_v)) * iso
        angle = fast_atan2(dv, da)
        radius = np.sqrt(da * da + dv * dv)
        taper = np.clip(1.0 - radius / _F(0.9), 0.0, 1.0) ** 2
        coarse = radial_streaks(rng, angle, radius, bins=int(160 * scale) + 40, threshold=1.0)
        fine_streaks = radial_streaks(rng, angle, radius, bins=int(420 * scale) + 60, threshold=0.9)
        part["angle"], part["radius"] = angle, radius
        texture = (rng.random(da.shape, dtype=_F) - _F(0.5)) * _F(0.5)  # fine texture once the image is blurred
        markings[part["where"]] += part["mask"] * (coarse * taper + _F(0.5) * fine_streaks * (_F(0.3) + _F(0.7) * taper)
                                                   + texture)
    markings *= _F(rng.uniform(0.08, 0.12)) * (1.0 - _F(0.8) * s.solid)  # vessels fade behind the heart
    s.markings = markings


def draw_anatomy(rng: np.random.Generator, s: Scene, sex: str, classes: list[str]) -> None:
    """All normal structures, in the order that fixes the random draws (heart size depends on Cardiomegaly)."""
    draw_body(rng, s)
    draw_lung_fields(s)
    draw_heart_and_mediastinum(rng, s, classes)
    draw_air_and_hila(rng, s)
    draw_bones(rng, s)
    draw_breasts(rng, s, sex)
    draw_lung_markings(rng, s)
