"""Manifest checks (``medclipin validate``): files exist and decode, counts per split, empty texts,
label prevalence, duplicate images and patient leakage across splits.

What is reported is counts, plus the path and reason of every bad file (paths, never report text or
patient identifiers). Failures (the command exits non-zero): no records, missing files, files that
are empty, not regular files or do not decode, a patient in more than one split, or one image (same
path, or same file content) in more than one split.

Every file is ``stat``-ed (missing, empty, not a regular file: cheap, so all of them); decoding is the
expensive check and covers a seeded sample unless ``check_all``. The sample is stratified by split
and file type, so a problem confined to one split or one format (every test image a JPEG 2000 DICOM,
say) is found by the default run.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from medclipin.data.manifest import SPLITS, Record, read_manifest
from medclipin.data.reader_base import DEFAULT_MAX_PIXELS, ImageReadError

__all__ = ["ValidationReport", "validate_manifest", "file_digest"]


@dataclass
class ValidationReport:
    """Counts from :func:`validate_manifest`; ``failures`` lists why the manifest is not usable and
    ``bad_files`` names every file found bad (``{"path", "reason"}``)."""

    manifest: str
    records: int
    records_per_split: dict[str, int]
    patients_per_split: dict[str, int]
    empty_text_per_split: dict[str, int]
    missing_files: int
    decode_checked: int
    decode_errors: int
    decode_error_reasons: dict[str, int]  # exception type -> count
    duplicate_paths: int  # records whose image path is shared with an earlier record
    duplicate_content: int  # records whose file content equals an earlier record's (different path)
    cross_split_images: int  # images (by path or content) appearing in more than one split
    leaked_patients: int  # patients appearing in more than one split
    label_prevalence: dict[str, dict[str, dict[str, int]]]  # label -> split -> {positive, negative, uncertain, missing}
    boxes: int
    failures: list[str] = field(default_factory=list)
    unreadable_files: int = 0  # empty or not regular files (found without decoding, for every file)
    existing_files: int = 0  # distinct image files that exist
    decode_sampled: bool = False  # decoding covered a sample, not every file
    decode_checked_per_split: dict[str, int] = field(default_factory=dict)
    bad_files: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"} for every bad file found
    warnings: list[str] = field(default_factory=list)  # what could not be checked, or looks wrong but may be meant

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "ok": self.ok}


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _file_problem(info: os.stat_result) -> str | None:
    if stat.S_ISDIR(info.st_mode):
        return "not a regular file (a directory)"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file (0 bytes)"
    return None


def _reason(exc: BaseException, path: str) -> str:
    """The error message without the leading path (the report names the path once)."""
    text = str(exc)
    if text.startswith(path):
        text = text[len(path):].lstrip(": ").strip()
    return text if isinstance(exc, ImageReadError) else f"{type(exc).__name__}: {text}"


def stratified_sample(paths_by_stratum: dict[tuple, list[str]], size: int, seed: int) -> list[str]:
    """``size`` paths drawn without replacement, at least one from every stratum (while ``size``
    allows) and the rest in proportion to the strata's sizes (largest remainder); seeded."""
    rng = random.Random(seed)
    strata = sorted(paths_by_stratum)
    total = sum(len(paths_by_stratum[s]) for s in strata)
    if size >= total:
        return sorted(p for s in strata for p in paths_by_stratum[s])
    quota = {s: 0 for s in strata}
    for s in sorted(strata, key=lambda s: -len(paths_by_stratum[s]))[:size]:
        quota[s] = 1
    left = size - sum(quota.values())
    if left > 0:
        room = {s: len(paths_by_stratum[s]) - quota[s] for s in strata}
        shares = {s: left * room[s] / max(1, sum(room.values())) for s in strata}
        for s in strata:
            quota[s] += int(shares[s])
        for s in sorted(strata, key=lambda s: shares[s] - int(shares[s]), reverse=True)[: size - sum(quota.values())]:
            quota[s] += 1
    chosen = []
    for s in strata:
        chosen += rng.sample(sorted(paths_by_stratum[s]), min(quota[s], len(paths_by_stratum[s])))
    return sorted(chosen)


def _stat_files(records: list[Record]) -> tuple[dict[str, int], dict[str, str]]:
    """Size of every distinct image path (-1: not usable) and the problem of each unusable one."""
    sizes: dict[str, int] = {}
    problems: dict[str, str] = {}
    for r in records:
        if r.image_path in sizes:
            continue
        try:
            info = os.stat(r.image_path)
        except OSError as exc:
            sizes[r.image_path] = -1
            problems[r.image_path] = f"missing ({exc.strerror or exc})"
            continue
        problem = _file_problem(info)
        sizes[r.image_path] = -1 if problem else info.st_size
        if problem:
            problems[r.image_path] = problem
    return sizes, problems


def _duplicates(records: list[Record], sizes: dict[str, int]) -> tuple[int, int, int]:
    """(same path, same content, images in more than one split). Content is hashed only where sizes collide."""
    by_size: dict[int, list[str]] = defaultdict(list)
    for image_path, size in sizes.items():
        if size >= 0:
            by_size[size].append(image_path)
    identity = {p: p for p in sizes}
    for paths in by_size.values():
        if len(paths) > 1:
            first_of_digest: dict[str, str] = {}
            for image_path in paths:
                digest = file_digest(image_path)
                identity[image_path] = first_of_digest.setdefault(digest, image_path)
    seen_paths: set[str] = set()
    seen_identity: set[str] = set()
    duplicate_paths = duplicate_content = 0
    splits_of_image: dict[str, set[str]] = defaultdict(set)
    for r in records:
        ident = identity[r.image_path]
        if r.image_path in seen_paths:
            duplicate_paths += 1
        elif ident in seen_identity:
            duplicate_content += 1
        seen_paths.add(r.image_path)
        seen_identity.add(ident)
        splits_of_image[ident].add(r.split)
    cross_split = sum(1 for splits in splits_of_image.values() if len(splits) > 1)
    return duplicate_paths, duplicate_content, cross_split


def _prevalence(records: list[Record], label_names: list[str]) -> dict[str, dict[str, dict[str, int]]]:
    prevalence: dict[str, dict[str, dict[str, int]]] = {}
    for name in label_names:
        table = {s: {"positive": 0, "negative": 0, "uncertain": 0, "missing": 0} for s in SPLITS}
        for r in records:
            value = r.labels.get(name)
            key = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}.get(value, "missing")
            table[r.split][key] += 1
        prevalence[name] = table
    return prevalence


@dataclass
class _DecodeCheck:
    checked: int = 0
    sampled: bool = False
    per_split: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)  # exception type -> count
    bad_files: list[dict[str, str]] = field(default_factory=list)


def _decode_check(records: list[Record], existing: set[str], check_all: bool, sample: int, seed: int,
                  max_pixels: int | None) -> _DecodeCheck:
    """Decode every existing file (``check_all``) or a sample stratified by split and extension."""
    from medclipin.data.readers import read_image  # lazy: image decoding pulls in pydicom/Pillow

    split_of = {r.image_path: r.split for r in records}
    strata: dict[tuple, list[str]] = defaultdict(list)
    for image_path in existing:
        strata[(split_of[image_path], os.path.splitext(image_path)[1].lower())].append(image_path)
    result = _DecodeCheck(sampled=not check_all and len(existing) > sample)
    for image_path in stratified_sample(strata, sample, seed) if result.sampled else sorted(existing):
        result.checked += 1
        result.per_split[split_of[image_path]] += 1
        try:
            read_image(image_path, max_pixels=max_pixels)
        except Exception as exc:  # any decoder failure counts, with its reason
            result.reasons[type(exc).__name__] += 1
            result.bad_files.append({"path": image_path, "reason": _reason(exc, image_path)})
    return result


def validate_manifest(path: str | os.PathLike, check_all: bool = False, sample: int = 32,
                      seed: int = 0, decode: bool = True, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ValidationReport:
    """Check a manifest.

    Every file is checked with a ``stat`` (missing, empty, not a regular file); decoding with
    :func:`medclipin.data.readers.read_image` covers a seeded sample of ``sample`` files stratified by
    split and file extension, or every file with ``check_all``. Content duplicates are found by
    hashing only files whose size collides with another file's, so the cost stays near one ``stat``
    per file.

    Args:
        max_pixels: passed to ``read_image``: larger images count as bad files.
    """
    manifest = read_manifest(path)
    records = manifest.records
    per_split = Counter(r.split for r in records)
    patients_split: dict[str, set[str]] = defaultdict(set)
    for r in records:
        patients_split[r.patient_id].add(r.split)
    leaked = sum(1 for splits in patients_split.values() if len(splits) > 1)
    empty_text = Counter(r.split for r in records if not (r.findings + r.impression + r.text).strip())

    sizes, problems = _stat_files(records)
    missing = sum(1 for reason in problems.values() if reason.startswith("missing"))
    missing_records = sum(1 for r in records if problems.get(r.image_path, "").startswith("missing"))
    unreadable = len(problems) - missing
    duplicate_paths, duplicate_content, cross_split = _duplicates(records, sizes)

    bad_files = [{"path": p, "reason": reason} for p, reason in problems.items()]
    existing = {r.image_path for r in records if sizes[r.image_path] >= 0}
    decoding = _decode_check(records, existing, check_all, sample, seed, max_pixels) if decode else _DecodeCheck()
    bad_files += decoding.bad_files
    decode_errors, checked, sampled = len(decoding.bad_files), decoding.checked, decoding.sampled

    failures = []
    if not records:
        failures.append("the manifest has no records (only a header?)")
    if missing_records:
        failures.append(f"{missing_records} records point to missing files")
    if unreadable:
        failures.append(f"{unreadable} files are empty or not regular files")
    if decode_errors:
        failures.append(f"{decode_errors} of {checked} {'sampled' if sampled else 'checked'} files do not decode")
    if leaked:
        failures.append(f"{leaked} patients appear in more than one split")
    if cross_split:
        failures.append(f"{cross_split} images appear in more than one split")
    warnings = []
    if len(records) > 1 and all(r.patient_id == r.record_id for r in records):
        # read_manifest gives each record its own id as patient when patient_id is absent or empty
        warnings.append("no patient_id: every record counts as its own patient, so a patient whose studies are in "
                        "more than one split (leakage) cannot be found; add a patient_id column")
    return ValidationReport(
        manifest=str(path),
        records=len(records),
        records_per_split={s: per_split.get(s, 0) for s in SPLITS},
        patients_per_split={s: len({r.patient_id for r in records if r.split == s}) for s in SPLITS},
        empty_text_per_split={s: empty_text.get(s, 0) for s in SPLITS},
        missing_files=missing,
        decode_checked=checked,
        decode_errors=decode_errors,
        decode_error_reasons=dict(decoding.reasons),
        duplicate_paths=duplicate_paths,
        duplicate_content=duplicate_content,
        cross_split_images=cross_split,
        leaked_patients=leaked,
        label_prevalence=_prevalence(records, manifest.label_names),
        boxes=sum(len(r.boxes) for r in records),
        failures=failures,
        unreadable_files=unreadable,
        existing_files=len(existing),
        decode_sampled=sampled,
        decode_checked_per_split={s: decoding.per_split.get(s, 0) for s in SPLITS},
        bad_files=sorted(bad_files, key=lambda e: e["path"]),
        warnings=warnings,
    )
