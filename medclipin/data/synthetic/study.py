"""One synthetic study: a patient's radiograph, stored as 12-bit DICOM values and as the rendered
8-bit image, with its report, labels and boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np

from medclipin.data.manifest import Box
from medclipin.data.synthetic.cohort import patient_id, patient_rng, study_id, study_rngs
from medclipin.data.synthetic.design import CLASS_NAMES, DETECTOR_MM
from medclipin.data.synthetic.lesions import choose_classes
from medclipin.data.synthetic.radiograph import render
from medclipin.data.synthetic.reports import ReportDraft, draft_report


@dataclass
class SyntheticStudy:
    """One generated study: stored DICOM pixels, the rendered image, report, labels and boxes.

    ``stored`` holds the 12-bit DICOM values (already inverted for MONOCHROME1); ``rendered`` is the
    8-bit display image (bright = dense), i.e. ``stored`` windowed with ``window`` and inverted back
    for MONOCHROME1. Boxes are ``(x0, y0, x1, y1)`` in pixels of the stored image, exclusive ends.
    """

    patient_id: str
    study_id: str
    study_date: str
    view: str
    photometric: str
    sex: str
    stored: np.ndarray
    rendered: np.ndarray
    window: tuple[float, float]
    pixel_spacing_mm: float
    findings: str
    impression: str
    labels: dict[str, int]
    boxes: list[Box] = field(default_factory=list)
    # the report with its sentences tagged by class; findings/impression are its full text
    report: ReportDraft | None = field(default=None, repr=False, compare=False)


def synthesize_study(seed: int, patient_index: int, study_index: int, image_size: int = 256) -> SyntheticStudy:
    """Generate one study deterministically from ``(seed, patient_index, study_index)``.

    The result does not depend on any other study, so a subset can be regenerated on its own.
    """
    prng = patient_rng(seed, patient_index)
    prng.random()  # the draw that decides the number of studies (see cohort.n_studies)
    sex = "F" if prng.random() < 0.5 else "M"
    habitus = prng.uniform(0.34, 0.41)
    first_day = date(2015, 1, 1) + timedelta(days=int(prng.integers(0, 3000)))

    image_rng, text_rng = study_rngs(seed, patient_index, study_index)
    view = "PA" if image_rng.random() < 0.7 else "AP"
    photometric = "MONOCHROME1" if image_rng.random() < 0.4 else "MONOCHROME2"
    classes = choose_classes(image_rng)
    display, findings = render(image_rng, image_size, view, sex, habitus, classes)

    # 12-bit storage: the display range maps onto [lo, hi]; the window recovers it exactly
    lo = int(image_rng.integers(0, 600))
    hi = int(image_rng.integers(3000, 4096))
    levels = np.rint(display * (hi - lo)).astype(np.int32)
    stored = (lo + levels) if photometric == "MONOCHROME2" else (hi - levels)
    rendered = np.rint(levels * (255.0 / (hi - lo))).astype(np.uint8)
    # DICOM linear VOI (PS3.3 C.11.2.1.2.1) maps [c - 0.5 - (w-1)/2, c - 0.5 + (w-1)/2] onto the output
    window = (0.5 * (lo + hi) + 0.5, float(hi - lo + 1))

    report = draft_report(text_rng, findings, view)
    findings_text, impression_text = report.text()
    labels = {c: int(any(f.label == c for f in findings)) for c in CLASS_NAMES}
    boxes = [Box(f.label, f.box) for f in findings]
    study_date = first_day + timedelta(days=int(study_index * (30 + image_rng.integers(0, 300))))
    return SyntheticStudy(
        patient_id=patient_id(patient_index), study_id=study_id(patient_index, study_index),
        study_date=study_date.strftime("%Y%m%d"), view=view, photometric=photometric, sex=sex,
        stored=stored.astype(np.uint16), rendered=rendered, window=window,
        pixel_spacing_mm=DETECTOR_MM / image_size, findings=findings_text, impression=impression_text,
        labels=labels, boxes=boxes, report=report,
    )
