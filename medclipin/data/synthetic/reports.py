"""Radiology-style reports (FINDINGS + IMPRESSION) written from the drawn findings.

Several phrasings per finding with location words that match the image (patient's right = image
left), negations of some absent findings and incidental normal sentences. The report draws from a
random stream of its own, so rewording never moves a pixel.

A report is first a :class:`ReportDraft` in which every sentence and impression item is tagged with
the class it describes; :meth:`ReportDraft.text` joins it, optionally leaving classes out (the
``loose_fraction`` option of :func:`~medclipin.data.synthetic.generate_synthetic_dataset`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medclipin.data.synthetic.design import CLASS_NAMES
from medclipin.data.synthetic.drawing import Finding

_ADVERB = {"mild": "mildly", "moderate": "moderately"}
NORMAL_IMPRESSIONS = ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                      "No acute intrathoracic process.", "Normal chest radiograph.",
                      "No radiographic evidence of acute cardiopulmonary disease."]


def _lobe(side: str, zone: str, rng: np.random.Generator) -> str:
    if rng.random() < 0.5:
        return f"{side} {zone} lung zone" if zone != "mid" else f"{side} mid lung"
    if zone == "upper":
        return f"{side} upper lobe"
    if zone == "mid":
        return "right middle lobe" if side == "right" else "lingula"
    return f"{side} lower lobe"


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


@dataclass
class ReportDraft:
    """A report before it is joined: FINDINGS sentences and IMPRESSION items, each tagged with the
    class it describes (``None``: a normal or negative statement)."""

    sentences: list[tuple[str | None, str]] = field(default_factory=list)
    impression: list[tuple[str, str]] = field(default_factory=list)
    normal_impression: str = ""  # the impression of a normal study
    numbered: bool = False  # impression items as "1. ... 2. ..."

    def say(self, label: str | None, sentence: str) -> None:
        self.sentences.append((label, sentence))

    def conclude(self, label: str, item: str) -> None:
        self.impression.append((label, item))

    def text(self, omit=frozenset(), rng: np.random.Generator | None = None) -> tuple[str, str]:
        """(findings, impression). ``omit``: classes whose sentences and impression items are left out;
        when none is left, the impression is a normal one (drawn from ``rng`` if the study had none)."""
        sentences = [s for label, s in self.sentences if label not in omit]
        items = [item for label, item in self.impression if label not in omit]
        if not items:
            impression = self.normal_impression or _pick(rng, NORMAL_IMPRESSIONS)
        elif self.numbered and len(items) > 1:
            impression = " ".join(f"{i}. {item}" for i, item in enumerate(items, start=1))
        else:
            impression = " ".join(items)
        return " ".join(sentences), impression


def _heart_and_mediastinum(rng: np.random.Generator, draft: ReportDraft, by: dict[str, list[Finding]]) -> None:
    if by["Cardiomegaly"]:
        ctr = by["Cardiomegaly"][0].words["ctr"]
        sev = "mild" if ctr < 0.6 else "moderate"
        draft.say("Cardiomegaly", _pick(rng, [f"The heart is {_ADVERB[sev]} enlarged.", f"{_cap(sev)} cardiomegaly.",
                                              "The cardiac silhouette is enlarged.",
                                              f"Enlarged cardiac silhouette with a cardiothoracic ratio of about {ctr:.2f}.",
                                              "Cardiac size is increased."]))
        draft.conclude("Cardiomegaly", _pick(rng, ["Cardiomegaly.", f"{_cap(sev)} cardiomegaly.", "Enlarged heart."]))
    elif rng.random() < 0.7:
        draft.say(None, _pick(rng, ["Heart size is normal.", "The cardiac silhouette is within normal limits.",
                                    "Normal heart size.", "No cardiomegaly.", "The heart is not enlarged."]))
    if rng.random() < 0.6:
        draft.say(None, _pick(rng, ["Mediastinal contours are unremarkable.",
                                    "The mediastinal and hilar contours are normal.",
                                    "Normal mediastinal contours.", "The trachea is midline."]))


def _lungs(rng: np.random.Generator, draft: ReportDraft, by: dict[str, list[Finding]]) -> None:
    for f in by["Consolidation"]:
        where = _lobe(f.words["side"], f.words["zone"], rng)
        text = _pick(rng, [f"Patchy consolidation in the {where}.",
                           f"There is airspace opacity in the {where}, compatible with consolidation.",
                           f"Ill-defined opacity in the {where} consistent with consolidation.",
                           f"Focal consolidation is present in the {where}."])
        if f.words["bronchograms"] and rng.random() < 0.7:
            text = text[:-1] + " with air bronchograms."
        draft.say("Consolidation", text)
        draft.conclude("Consolidation", _pick(rng, [
            f"{_cap(where)} consolidation, concerning for pneumonia.",
            f"{_cap(where)} consolidation.",
            f"Airspace consolidation in the {where}; pneumonia is possible in the appropriate clinical setting."]))
    for i, f in enumerate(by["Nodule"]):
        where = _lobe(f.words["side"], f.words["zone"], rng)
        mm = int(round(f.words["mm"]))
        size = f"{mm} mm" if mm < 10 or rng.random() < 0.5 else f"{mm / 10:.1f} cm"
        prefix = "An additional" if i else "A"
        draft.say("Nodule", _pick(rng, [f"{prefix} {size} rounded nodular opacity projects over the {where}.",
                                        f"{prefix} {size} nodule in the {where}.",
                                        f"{prefix} well-circumscribed {size} pulmonary nodule is seen in the {where}."]))
        draft.conclude("Nodule", _pick(rng, [f"{_cap(where)} nodule. Recommend CT for further characterization.",
                                             f"{size} pulmonary nodule in the {where}.",
                                             f"Nodule in the {where}; chest CT recommended."]))
    if not by["Consolidation"] and rng.random() < 0.7:
        if not by["Nodule"] and not by["Pneumothorax"] and not by["Pleural Effusion"]:
            draft.say(None, _pick(rng, ["The lungs are clear.", "Lungs are clear without focal consolidation.",
                                        "No focal airspace consolidation.", "The lungs are well expanded and clear."]))
        else:
            draft.say(None, _pick(rng, ["No focal consolidation.", "No airspace consolidation is seen.",
                                        "There is no focal airspace opacity."]))
    if not by["Nodule"] and rng.random() < 0.3:
        draft.say(None, _pick(rng, ["No suspicious pulmonary nodules.", "No discrete nodule is identified.",
                                    "No nodules or masses."]))


def _effusions(rng: np.random.Generator, draft: ReportDraft, by: dict[str, list[Finding]]) -> None:
    effusions = by["Pleural Effusion"]
    if len(effusions) == 2:
        size_word = effusions[0].words["size"] if effusions[0].words["size"] == effusions[1].words["size"] else "small to moderate"
        text = _pick(rng, [f"{_cap(size_word)} bilateral pleural effusions.",
                           "Bilateral pleural effusions with blunting of both costophrenic angles.",
                           f"There are {size_word} bilateral pleural effusions."])
        draft.conclude("Pleural Effusion", _pick(rng, ["Bilateral pleural effusions.",
                                                       f"{_cap(size_word)} bilateral pleural effusions."]))
    else:
        side, size_word = effusions[0].words["side"], effusions[0].words["size"]
        text = _pick(rng, [f"{_cap(size_word)} {side} pleural effusion.",
                           f"Blunting of the {side} costophrenic angle consistent with a {size_word} pleural effusion.",
                           f"There is a {size_word} {side} pleural effusion with a meniscus along the lateral chest wall.",
                           f"Fluid layers at the {side} lung base, compatible with pleural effusion."])
        draft.conclude("Pleural Effusion", _pick(rng, [f"{_cap(side)} pleural effusion.",
                                                       f"{_cap(size_word)} {side} pleural effusion."]))
    if not by["Pneumothorax"] and rng.random() < 0.35:
        draft.say("Pleural Effusion", text[:-1] + ", without pneumothorax.")
    else:
        draft.say("Pleural Effusion", text)
        if not by["Pneumothorax"] and rng.random() < 0.5:
            draft.say(None, _pick(rng, ["No pneumothorax.", "No pneumothorax is seen."]))


def _pleura(rng: np.random.Generator, draft: ReportDraft, by: dict[str, list[Finding]]) -> None:
    effusions = by["Pleural Effusion"]
    if effusions:
        _effusions(rng, draft, by)
    for f in by["Pneumothorax"]:
        side, where, size_word = f.words["side"], f.words["where"], f.words["size"]
        draft.say("Pneumothorax", _pick(rng, [
            f"{_cap(size_word)} {side} {where} pneumothorax.",
            f"A thin visceral pleural line is seen at the {side} {'apex' if where == 'apical' else 'lung periphery'} "
            "with absent lung markings peripherally, consistent with pneumothorax.",
            f"There is a {size_word} {side} {where} pneumothorax.",
            f"{_cap(side)} {where} pneumothorax, {size_word} in size."]))
        draft.conclude("Pneumothorax", _pick(rng, [f"{_cap(size_word)} {side} pneumothorax.",
                                                   f"{_cap(side)} {where} pneumothorax."]))
        if not effusions and rng.random() < 0.5:
            draft.say(None, _pick(rng, ["No pleural effusion.", "No pleural effusion is seen."]))
    if not effusions and not by["Pneumothorax"] and rng.random() < 0.8:
        draft.say(None, _pick(rng, ["No pleural effusion or pneumothorax.", "No pleural effusion. No pneumothorax.",
                                    "There is no pleural effusion or pneumothorax.",
                                    "No pneumothorax or pleural effusion is seen.",
                                    "Costophrenic angles are sharp without pleural effusion."]))


def draft_report(rng: np.random.Generator, findings: list[Finding], view: str) -> ReportDraft:
    """The report of one study, section by section, every sentence tagged with its class."""
    by = {c: [f for f in findings if f.label == c] for c in CLASS_NAMES}
    draft = ReportDraft()
    if rng.random() < 0.25:
        draft.say(None, _pick(rng, [f"{view} view of the chest.", f"Single frontal {view} view of the chest.",
                                    "Frontal view of the chest was obtained."]))
    _heart_and_mediastinum(rng, draft, by)
    _lungs(rng, draft, by)
    _pleura(rng, draft, by)
    # incidental normal sentences
    if rng.random() < 0.6:
        draft.say(None, _pick(rng, ["The osseous structures are intact.", "No acute osseous abnormality.",
                                    "Visualized osseous structures are unremarkable.",
                                    "Mild degenerative changes of the thoracic spine."]))
    if rng.random() < 0.15:
        draft.say(None, "The visualized upper abdomen is unremarkable.")
    if not findings:
        draft.normal_impression = _pick(rng, NORMAL_IMPRESSIONS)
    elif len(draft.impression) > 1 and rng.random() < 0.5:
        draft.numbered = True
    return draft
