"""Loosely aligned and repetitive image–text pairs in the train split, for controlled studies of
objectives (such as CLIPin) meant to be robust to them. Only train records change; validate and test
are never altered, and labels and boxes always stay those of the image (the truth).

* ``loose_fraction``: that fraction of the train records carries a report that does not describe its
  image. Half of them (``omitted``) keep their own report with one or more of its findings left out
  (every sentence and impression item about those classes; only studies with findings qualify), the
  others (``swapped``) carry the report of another random train study of another patient. With too
  few abnormal studies among the loosened ones, the rest are swapped.
* ``repetitive_fraction``: that fraction of the train-split normal studies gets one of
  :data:`NORMAL_TEMPLATES` as its report instead of its generated one.

Which records are chosen depends only on ``(seed, study id)`` (a hash rank within the train split), not
on generation order, and each knob chooses independently of the other. A swapped record carries its
partner's own report: a template when the partner was chosen as repetitive.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from medclipin.data.synthetic.reports import ReportDraft

NORMAL_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("The lungs are clear. Heart size is normal. No pleural effusion or pneumothorax.",
     "No acute cardiopulmonary process."),
    ("Heart size is normal. Lungs are clear without focal consolidation. No pleural effusion. No pneumothorax.",
     "Normal chest radiograph."),
    ("The cardiomediastinal silhouette is within normal limits. The lungs are clear. No pleural effusion or "
     "pneumothorax. The osseous structures are intact.",
     "No acute cardiopulmonary abnormality."),
)


@dataclass
class TrainReport:
    """One train-split study as the noise planner sees it."""

    study_id: str
    patient_id: str
    patient_index: int
    study_index: int
    findings: str
    impression: str
    draft: ReportDraft  # the report with sentences tagged by class (for omissions)
    classes: list[str]  # the findings present in the image


@dataclass
class NoisyReport:
    """The report a train record carries, and what was done to it."""

    findings: str
    impression: str
    pair_noise: str = ""  # "", "swapped" or "omitted"
    template: str = ""  # "1"-"3" when the carried text is a NORMAL_TEMPLATES entry


def _rank(seed: int, purpose: str, study_id: str) -> str:
    """Seeded, order-independent sort key (the same study always ranks the same way)."""
    return hashlib.sha256(f"medclipin-synthetic:{seed}:{purpose}:{study_id}".encode()).hexdigest()


def _study_rng(seed: int, purpose: int, report: TrainReport) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(purpose, report.patient_index,
                                                                         report.study_index)))


def check_fraction(name: str, value: float) -> float:
    """``value`` as a float in [0, 1] (ValueError naming ``name`` otherwise)."""
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")
    return float(value)


def _pick(seed: int, purpose: str, reports: list[TrainReport], fraction: float) -> list[TrainReport]:
    count = int(round(fraction * len(reports)))
    return sorted(reports, key=lambda r: _rank(seed, purpose, r.study_id))[:count]


def plan_pair_noise(seed: int, train: list[TrainReport], loose_fraction: float = 0.0,
                    repetitive_fraction: float = 0.0) -> dict[str, NoisyReport]:
    """The changed train reports, by study id (studies left as generated are absent).

    Raises:
        ValueError: a fraction outside [0, 1].
    """
    loose_fraction = check_fraction("loose_fraction", loose_fraction)
    repetitive_fraction = check_fraction("repetitive_fraction", repetitive_fraction)
    train = sorted(train, key=lambda r: r.study_id)  # the order records were generated in plays no part
    own: dict[str, NoisyReport] = {r.study_id: NoisyReport(r.findings, r.impression) for r in train}
    changed: dict[str, NoisyReport] = {}

    for report in _pick(seed, "repetitive", [r for r in train if not r.classes], repetitive_fraction):
        number = int(_study_rng(seed, 7, report).integers(len(NORMAL_TEMPLATES)))
        findings, impression = NORMAL_TEMPLATES[number]
        own[report.study_id] = changed[report.study_id] = NoisyReport(findings, impression, template=str(number + 1))

    loose = _pick(seed, "loose", train, loose_fraction)
    abnormal = sorted((r for r in loose if r.classes), key=lambda r: _rank(seed, "omit", r.study_id))
    omitted = abnormal[: len(loose) // 2]
    for report in omitted:
        rng = _study_rng(seed, 5, report)
        count = int(rng.integers(1, len(report.classes) + 1))
        left_out = {str(c) for c in rng.choice(report.classes, size=count, replace=False)}
        findings, impression = report.draft.text(omit=left_out, rng=rng)
        changed[report.study_id] = NoisyReport(findings, impression, pair_noise="omitted")
    omitted_ids = {r.study_id for r in omitted}
    for report in loose:
        if report.study_id in omitted_ids:
            continue
        others = [r for r in train if r.patient_id != report.patient_id]
        if not others:  # a train split of one patient: nothing to swap with
            continue
        partner = own[others[int(_study_rng(seed, 6, report).integers(len(others)))].study_id]
        changed[report.study_id] = NoisyReport(partner.findings, partner.impression, pair_noise="swapped",
                                               template=partner.template)
    return changed
