"""Radiology report text: section extraction, cleaning, sentence splitting and CLIPin text views.

A free-text report (MIMIC-CXR ``sXXXX.txt``, a reconstructed Open-i report, ...) is split into
sections by its headers. ``FINDINGS`` and ``IMPRESSION`` (with their common variants and
misspellings, e.g. ``Finding:``, ``IMPRESSIONS``, ``IMPRESSOIN``, ``CONCLUSION``) become
:attr:`ReportSections.findings` / :attr:`ReportSections.impression`; everything else
(``WET READ``, ``INDICATION``, ``COMPARISON``, ``TECHNIQUE``, ``HISTORY``, the ``FINAL REPORT``
preamble, ...) is kept, with its header, in :attr:`ReportSections.other`.

Header rule (documented because it decides what the model is trained on):

* a known header word at the start of a line, in any case, followed by ``:`` (``Findings: ...``), or
  alone on its line with or without a colon (``IMPRESSION``; other than FINDINGS/IMPRESSION
  variants, a bare header must start with a capital, so a wrapped word "prior" is not a header);
* a known header word in UPPER CASE followed by ``:`` after a sentence end on the same line
  (``... two views. FINDINGS: ...``) -- mixed-case words mid-line are left alone, because Open-i
  and MIMIC texts use ``comparison:``/``findings:`` inside sentences.

Section text is returned whitespace-normalised but otherwise verbatim; :func:`clean_text`
(de-identification placeholders, whitespace) is a separate step applied by :func:`record_text`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Sequence

from medclipin.errors import SettingError

__all__ = [
    "ReportSections",
    "extract_sections",
    "clean_text",
    "normalize_whitespace",
    "split_sentences",
    "record_text",
    "text_view",
    "SECTION_ALIASES",
]

# canonical section name -> header spellings seen in MIMIC-CXR / Open-i / CheXpert-style reports
# (lower case; regex fragments). Misspellings are the ones that occur in MIMIC-CXR reports.
SECTION_ALIASES: dict[str, tuple[str, ...]] = {
    "findings": (
        r"findings?", r"findngs?", r"finidngs?", r"fidnings?", r"findins?", r"finding\(s\)",
        r"findings? and comments?",
    ),
    "impression": (
        r"impressions?", r"impresions?", r"impressoins?", r"impessions?", r"imprssions?",
        r"impresson", r"conclusions?", r"findings? and impressions?", r"findings?/impressions?",
        r"impressions? and recommendations?", r"summary", r"opinion",
    ),
    "final_report": (r"final report", r"final addendum", r"addendum"),
    "wet_read": (r"wet read",),
    "examination": (r"examination", r"exam", r"study", r"procedure"),
    "indication": (r"indications?", r"clinical indications?", r"reason for (?:exam|examination|study)"),
    "history": (r"history", r"clinical history", r"clinical information", r"clinical data"),
    "comparison": (r"comparisons?", r"prior studies", r"priors?"),
    "technique": (r"techniques?", r"views?", r"procedure details"),
    "recommendation": (r"recommendations?", r"notification", r"communication"),
}

# Headers that are exclusive to a role and unlikely as ordinary words; the rest need a line start.
_SECTION_OF: dict[str, str] = {}
_ALTERNATIVES: list[str] = []
for _name, _aliases in SECTION_ALIASES.items():
    for _alias in _aliases:
        _ALTERNATIVES.append(_alias)
# longest first so "findings and impression" wins over "findings"
_ALTERNATIVES.sort(key=len, reverse=True)
_HEADER_WORDS = "|".join(_ALTERNATIVES)
_COMPILED_ALIASES = [(name, re.compile(rf"(?:{alias})\Z", re.IGNORECASE))
                     for name, aliases in SECTION_ALIASES.items() for alias in aliases]

# 1) line-start header with colon, any case: "Findings: text" / "  IMPRESSION:"
_LINE_COLON = re.compile(rf"^[ \t]*(?P<h>{_HEADER_WORDS})[ \t]*:", re.IGNORECASE | re.MULTILINE)
# 2) a header alone on its line, any case, optional colon: "IMPRESSION" / "Final Report"
_LINE_ALONE = re.compile(rf"^[ \t]*(?P<h>{_HEADER_WORDS})[ \t]*:?[ \t]*$", re.IGNORECASE | re.MULTILINE)
# 3) UPPER-CASE header with colon after a sentence end on the same line: "... views. FINDINGS: ..."
_INLINE_UPPER = re.compile(rf"(?<=[.;!?])[ \t]+(?P<h>(?:{_HEADER_WORDS.upper()}))[ \t]*:")

_WHITESPACE = re.compile(r"\s+")
_PLACEHOLDER = re.compile(r"_{2,}|\bX{3,}\b")  # MIMIC "___", Open-i "XXXX"


def normalize_whitespace(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space and strip the ends."""
    return _WHITESPACE.sub(" ", text or "").strip()


def _canonical(header: str) -> str:
    header = normalize_whitespace(header)
    for name, pattern in _COMPILED_ALIASES:
        if pattern.match(header):
            return name
    return "other"


@dataclass
class ReportSections:
    """The sections of one report.

    Attributes:
        findings: text of the FINDINGS section(s), whitespace-normalised ("" if none).
        impression: text of the IMPRESSION/CONCLUSION section(s) ("" if none).
        other: every other section and the preamble, one per line as ``HEADER: text``.
        sections: canonical section name -> text for every section found (``preamble`` for text
            before the first header); repeated sections are joined with a space.
        headers: the header strings as they appeared, in order (for debugging/statistics).
    """

    findings: str = ""
    impression: str = ""
    other: str = ""
    sections: dict[str, str] = field(default_factory=dict)
    headers: list[str] = field(default_factory=list)

    @property
    def has_findings_or_impression(self) -> bool:
        return bool(self.findings or self.impression)


def _header_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, header) of every header, sorted, overlaps removed (first wins)."""
    spans = []
    for pattern in (_LINE_COLON, _LINE_ALONE, _INLINE_UPPER):
        for match in pattern.finditer(text):
            header = match.group("h")
            # a bare lower-case "history"/"prior"/"study" line is more likely a hard-wrapped word than
            # a header; only FINDINGS/IMPRESSION variants may stand alone in lower case
            if pattern is _LINE_ALONE and header[0].islower() and \
                    _canonical(header) not in ("findings", "impression"):
                continue
            spans.append((match.start("h"), match.end(), header))
    spans.sort(key=lambda s: (s[0], -s[1]))
    kept: list[tuple[int, int, str]] = []
    for span in spans:
        if kept and span[0] < kept[-1][1]:
            continue
        kept.append(span)
    return kept


def extract_sections(report_text: str) -> ReportSections:
    """Split a free-text radiology report into sections (see the module docstring for the rule).

    >>> s = extract_sections("FINAL REPORT\\nINDICATION: cough.\\nFINDINGS: Lungs clear.\\nIMPRESSION: Normal.")
    >>> s.findings, s.impression
    ('Lungs clear.', 'Normal.')
    """
    text = (report_text or "").replace("\r\n", "\n").replace("\r", "\n")
    spans = _header_spans(text)
    parts: list[tuple[str, str, str]] = []  # (canonical, header as written, body)
    preamble = text[: spans[0][0]] if spans else text
    if normalize_whitespace(preamble):
        parts.append(("preamble", "", normalize_whitespace(preamble)))
    for i, (start, end, header) in enumerate(spans):
        body_end = spans[i + 1][0] if i + 1 < len(spans) else len(text)
        parts.append((_canonical(header), normalize_whitespace(header), normalize_whitespace(text[end:body_end])))

    sections: dict[str, str] = {}
    other_lines: list[str] = []
    for name, header, body in parts:
        if body:
            sections[name] = f"{sections[name]} {body}" if sections.get(name) else body
        if name not in ("findings", "impression"):
            line = f"{header.upper()}: {body}" if header else body
            if line.strip(": "):
                other_lines.append(line.strip())
    return ReportSections(
        findings=sections.get("findings", ""),
        impression=sections.get("impression", ""),
        other="\n".join(other_lines),
        sections=sections,
        headers=[header for _, header, _ in parts if header],
    )


def clean_text(text: str) -> str:
    """Model-ready text: de-identification placeholders (MIMIC ``___``, Open-i ``XXXX``) removed,
    whitespace collapsed, and the punctuation left dangling by a removed placeholder tidied."""
    text = _PLACEHOLDER.sub(" ", text or "")
    text = normalize_whitespace(text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)  # "Dr. ___ ." -> "Dr."
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"\(\s*\)", "", text)
    return normalize_whitespace(text)


# Abbreviations after which a period does not end a sentence (lower case, without the period).
# Units ("cm.", "mm.") and "no." are deliberately absent: report sentences often end with them.
_ABBREVIATIONS = {
    "dr", "drs", "mr", "mrs", "ms", "prof", "st", "vs", "etc", "e.g", "i.e", "eg", "ie", "approx",
    "a.m", "p.m", "fig", "figs", "ca", "cf", "incl", "hx", "ref", "sr", "jr", "resp", "u.s",
}
_LIST_MARKER = re.compile(r"^(?:\(?\d{1,2}[.)]|[-*\u2022]|[a-z][.)])$", re.IGNORECASE)
_BOUNDARY = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_BREAK = re.compile(r"\n[ \t]*\n|\n(?=[ \t]*(?:\(?\d{1,2}[.)]|[-*\u2022])[ \t]+)")


def split_sentences(text: str) -> list[str]:
    """Split report text into sentences.

    Periods in ``Dr.``, ``e.g.``, ``a.m.``, decimals (``2.5 cm``) and list numbers (``1. ...``) do
    not end a sentence; a period followed by a lower-case word does not either. Blank lines and
    line breaks before list items are boundaries; other line breaks (hard wrapping) are not.
    """
    sentences: list[str] = []
    for chunk in _BREAK.split((text or "").replace("\r\n", "\n")):
        chunk = normalize_whitespace(chunk)
        start = 0
        for match in _BOUNDARY.finditer(chunk):
            end = match.end()
            candidate = chunk[start:end].strip()
            words = chunk[start:match.start()].split()
            last_word = words[-1].lower().rstrip(".") if words else ""
            rest = chunk[end:].lstrip()
            if not words or _LIST_MARKER.match(candidate):
                continue  # "1." on its own is a list marker, not a sentence
            if match.group().startswith(".") and len(match.group()) == 1 and last_word in _ABBREVIATIONS:
                continue
            if rest and rest[0].islower():
                continue  # "... 3 mm. in the ..." / unknown abbreviations: a sentence starts upper-case
            sentences.append(candidate)
            start = end
        tail = chunk[start:].strip()
        if tail:
            sentences.append(tail)
    return [s for s in sentences if s]


def record_text(record, sections: Sequence[str] = ("findings", "impression")) -> str:
    """The training text of a manifest :class:`~medclipin.data.manifest.Record`.

    Joins the chosen non-empty sections (attribute names of the record: ``findings``,
    ``impression``, ``text``) in the given order, cleaned with :func:`clean_text`. When all chosen
    sections are empty, falls back to ``record.text`` (a caption or note), cleaned.
    """
    if isinstance(sections, str):
        sections = (sections,)
    parts = []
    for name in sections:
        if name not in ("findings", "impression", "text"):
            raise SettingError(f"unknown report section {name!r}; expected findings, impression or text")
        value = clean_text(getattr(record, name, "") or "")
        if value:
            parts.append(value)
    if parts:
        return " ".join(parts)
    return clean_text(getattr(record, "text", "") or "")


def _uniform(rng) -> float:
    # random.Random and numpy.random.Generator both provide .random() -> float in [0, 1)
    return float(rng.random())


def text_view(text: str, rng, shuffle: bool = True, drop_prob: float = 0.2) -> str:
    """A second, augmented view of a report for CLIPin: sentences dropped with probability
    ``drop_prob`` (never all of them) and, if ``shuffle``, put in random order.

    Args:
        rng: a ``random.Random`` or ``numpy.random.Generator`` (deterministic given its seed).
    """
    if rng is None:
        rng = random.Random()
    sentences = split_sentences(text)
    if len(sentences) <= 1:
        return " ".join(sentences) if sentences else (text or "").strip()
    kept = [s for s in sentences if _uniform(rng) >= drop_prob] if drop_prob > 0 else list(sentences)
    if not kept:
        kept = [sentences[min(int(_uniform(rng) * len(sentences)), len(sentences) - 1)]]
    if shuffle and len(kept) > 1:
        keys = [_uniform(rng) for _ in kept]
        kept = [s for _, s in sorted(zip(keys, kept), key=lambda pair: pair[0])]
    return " ".join(kept)
