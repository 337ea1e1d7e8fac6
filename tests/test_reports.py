"""Report sections, cleaning, sentence splitting and CLIPin text views."""

import random
import tarfile
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from medclipin.data.manifest import Record
from medclipin.data.reports import (
    ReportSections, clean_text, extract_sections, normalize_whitespace, record_text, split_sentences, text_view,
)

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough  // eval for pneumonia

 TECHNIQUE:  Chest PA and lateral

 COMPARISON:  ___

 FINDINGS:

 The lungs are clear without focal consolidation.  No pleural effusion or
 pneumothorax is seen.  Heart size is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def test_mimic_style_report():
    s = extract_sections(MIMIC_STYLE)
    assert isinstance(s, ReportSections)
    assert s.findings == ("The lungs are clear without focal consolidation. No pleural effusion or "
                          "pneumothorax is seen. Heart size is normal.")
    assert s.impression == "No acute cardiopulmonary process."
    assert "INDICATION:" in s.other and "TECHNIQUE:" in s.other and "FINAL REPORT" in s.other
    assert set(s.sections) >= {"examination", "indication", "technique", "comparison"}
    assert s.headers[0] == "FINAL REPORT"


@pytest.mark.parametrize("findings_header, impression_header", [
    ("Findings:", "Impression:"),
    ("FINDING:", "IMPRESSIONS:"),
    ("findings", "CONCLUSION:"),
    ("FINDNGS:", "IMPRESSOIN:"),
    ("  Findings :", "  impression"),
    ("FINDINGS", "CONCLUSIONS"),
])
def test_header_variants_and_misspellings(findings_header, impression_header):
    text = f"Final Report\nHISTORY: fever.\n{findings_header}\n  Small left effusion.\n{impression_header}\n  Effusion."
    s = extract_sections(text)
    assert s.findings == "Small left effusion."
    assert s.impression == "Effusion."
    assert s.sections["history"] == "fever."


def test_wet_read_and_inline_upper_headers():
    text = ("WET READ: ___ ___ 10:25 AM  No pneumothorax.\n\nFINAL REPORT\nPA and lateral views. "
            "FINDINGS: Mild cardiomegaly. IMPRESSION: Cardiomegaly without edema.")
    s = extract_sections(text)
    assert s.findings == "Mild cardiomegaly."
    assert s.impression == "Cardiomegaly without edema."
    assert s.sections["wet_read"].endswith("No pneumothorax.")


def test_mixed_case_inline_word_is_not_a_header():
    s = extract_sections("FINDINGS: No change since the prior. Comparison: stable. Impression: none here.")
    assert s.findings == "No change since the prior. Comparison: stable. Impression: none here."
    assert s.impression == ""


def test_wrapped_lowercase_word_alone_is_not_a_header():
    s = extract_sections("FINDINGS: Unchanged compared to the\nprior\nexamination. Heart normal.\nIMPRESSION: Stable.")
    assert s.findings == "Unchanged compared to the prior examination. Heart normal."
    assert s.impression == "Stable."


def test_findings_and_impression_combined_header_counts_as_impression():
    s = extract_sections("FINDINGS AND IMPRESSION: Normal chest.")
    assert s.impression == "Normal chest." and s.findings == ""


def test_report_without_findings_or_impression():
    s = extract_sections("INDICATION: pain.\n\nThe chest is unremarkable.")
    assert not s.has_findings_or_impression
    assert s.sections["indication"] == "pain. The chest is unremarkable."
    assert extract_sections("").findings == ""
    assert extract_sections("Just some text.").sections == {"preamble": "Just some text."}


def test_clean_text_removes_placeholders():
    assert clean_text("  Dr. ___ was   paged at ___ .\n\nNo   change. ") == "Dr. was paged at. No change."
    assert clean_text("Heart size XXXX normal.") == "Heart size normal."
    assert clean_text("") == ""


def test_split_sentences_keeps_abbreviations_decimals_and_list_numbers():
    text = ("1. A 2.5 cm nodule in the right upper lobe. 2. Dr. Smith was notified at 10 a.m. by phone. "
            "3. No effusion, e.g. on the lateral view.")
    assert split_sentences(text) == [
        "1. A 2.5 cm nodule in the right upper lobe.",
        "2. Dr. Smith was notified at 10 a.m. by phone.",
        "3. No effusion, e.g. on the lateral view.",
    ]


def test_split_sentences_units_and_no_at_sentence_end():
    assert split_sentences("Nodule measures 2.5 cm. Effusion? No. Follow-up at 10 a.m. Tuesday.") == [
        "Nodule measures 2.5 cm.", "Effusion?", "No.", "Follow-up at 10 a.m. Tuesday."]


def test_split_sentences_line_breaks():
    wrapped = "The lungs are clear without\nconsolidation. Heart is normal.\n\nNo effusion"
    assert split_sentences(wrapped) == ["The lungs are clear without consolidation.", "Heart is normal.",
                                        "No effusion"]
    listed = "IMPRESSION:\n1. Pneumonia\n2. Small effusion"
    assert split_sentences(listed) == ["IMPRESSION:", "1. Pneumonia", "2. Small effusion"]
    assert split_sentences("") == []


def test_record_text_joins_sections_and_falls_back():
    r = Record("r1", "p1", "s1", "x.png", "train", findings="Lungs ___ clear.", impression="Normal.")
    assert record_text(r) == "Lungs clear. Normal."
    assert record_text(r, sections=("impression",)) == "Normal."
    assert record_text(r, sections=("impression", "findings")) == "Normal. Lungs clear."
    caption = Record("r2", "p2", "s2", "y.png", "train", text="  COVID-19   pneumonia ")
    assert record_text(caption) == "COVID-19 pneumonia"
    with pytest.raises(ValueError):
        record_text(r, sections=("indication",))


@pytest.mark.parametrize("make_rng", [lambda s: random.Random(s), lambda s: np.random.default_rng(s)])
def test_text_view_deterministic_never_empty(make_rng):
    text = "One. Two. Three. Four. Five."
    sentences = set(split_sentences(text))
    assert text_view(text, make_rng(0)) == text_view(text, make_rng(0))
    for seed in range(50):
        view = text_view(text, make_rng(seed), drop_prob=0.99)
        parts = split_sentences(view)
        assert 1 <= len(parts) and set(parts) <= sentences
    assert text_view(text, make_rng(1), shuffle=False, drop_prob=0.0) == text
    shuffled = {text_view(text, make_rng(s), drop_prob=0.0) for s in range(20)}
    assert len(shuffled) > 1 and all(sorted(split_sentences(v)) == sorted(sentences) for v in shuffled)
    assert text_view("Only one.", make_rng(0), drop_prob=1.0) == "Only one."


def _open_i_reports(tgz):
    with tarfile.open(tgz) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".xml"):
                root = ET.parse(archive.extractfile(member)).getroot()
                yield [(a.get("Label"), (a.text or "").strip()) for a in root.iter("AbstractText")]


def test_open_i_section_recovery(shared_data):
    """Rebuild each Open-i report as it reads ("COMPARISON: ...\\nINDICATION: ...\\nFINDINGS: ...") from
    its AbstractText elements, extract sections from that text only, and compare with the XML fields.
    Recovered = normalised-whitespace equality of a non-empty field."""
    tgz = shared_data / "iu_xray_reports" / "NLMCXR_reports.tgz"
    n = findings_ok = impression_ok = 0
    for parts in _open_i_reports(tgz):
        n += 1
        text = "\n".join(f"{label}: {body}" for label, body in parts if body)
        fields = dict(parts)
        s = extract_sections(text)
        expected_f = normalize_whitespace(fields.get("FINDINGS", ""))
        expected_i = normalize_whitespace(fields.get("IMPRESSION", ""))
        findings_ok += bool(expected_f) and s.findings == expected_f
        impression_ok += bool(expected_i) and s.impression == expected_i
    assert n == 3955
    assert findings_ok >= 3400, findings_ok
    assert impression_ok >= 3900, impression_ok
