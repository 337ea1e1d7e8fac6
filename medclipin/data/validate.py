"""Manifest checks (``medclipin validate``): files exist and decode, counts per split, empty texts,
label prevalence, duplicate images and patient leakage across splits.

Everything reported is a count; no text or identifier leaves this module. Failures (the command
exits non-zero): missing files, files that do not decode, a patient in more than one split, or one
image (same path, or same file content) in more than one split.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from medclipin.data.manifest import SPLITS, read_manifest

__all__ = ["ValidationReport", "validate_manifest", "file_digest"]


@dataclass
class ValidationReport:
    """Counts from :func:`validate_manifest`; ``failures`` lists why the manifest is not usable."""

    manifest: str
    records: int
    records_per_split: dict[str, int]
    patients_per_split: dict[str, int]
    empty_text_per_split: dict[str, int]
    missing_files: int
    decode_checked: int
    decode_errors: int
    decode_error_reasons: dict[str, int]
    duplicate_paths: int  # records whose image path is shared with an earlier record
    duplicate_content: int  # records whose file content equals an earlier record's (different path)
    cross_split_images: int  # images (by path or content) appearing in more than one split
    leaked_patients: int  # patients appearing in more than one split
    label_prevalence: dict[str, dict[str, dict[str, int]]]  # label -> split -> {positive, negative, uncertain, missing}
    boxes: int
    failures: list[str] = field(default_factory=list)

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


def validate_manifest(path: str | os.PathLike, check_all: bool = False, sample: int = 32,
                      seed: int = 0, decode: bool = True) -> ValidationReport:
    """Check a manifest.

    Every file's existence is checked (a ``stat``); decoding with
    :func:`medclipin.data.readers.read_image` covers a seeded random ``sample`` of records, or all
    of them with ``check_all``. Content duplicates are found by hashing only files whose size
    collides with another file's, so the cost stays near one ``stat`` per file.
    """
    manifest = read_manifest(path)
    records = manifest.records
    per_split = Counter(r.split for r in records)
    patients_split: dict[str, set[str]] = defaultdict(set)
    for r in records:
        patients_split[r.patient_id].add(r.split)
    leaked = sum(1 for splits in patients_split.values() if len(splits) > 1)
    empty_text = Counter(r.split for r in records if not (r.findings + r.impression + r.text).strip())

    sizes: dict[str, int] = {}
    missing = 0
    for r in records:
        if r.image_path in sizes:
            continue
        try:
            sizes[r.image_path] = os.stat(r.image_path).st_size
        except OSError:
            sizes[r.image_path] = -1
            missing += 1
    missing_records = sum(1 for r in records if sizes[r.image_path] < 0)

    # image identity: the path, merged with content hashes where sizes collide
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

    decode_errors = 0
    reasons: Counter = Counter()
    checked = 0
    if decode:
        from medclipin.data.readers import read_image  # lazy: image decoding pulls in pydicom/Pillow

        existing = sorted({r.image_path for r in records if sizes[r.image_path] >= 0})
        chosen = existing if check_all or len(existing) <= sample else random.Random(seed).sample(existing, sample)
        for image_path in chosen:
            checked += 1
            try:
                read_image(image_path)
            except Exception as exc:  # any decoder failure counts; the reason is its type, not a path
                decode_errors += 1
                reasons[type(exc).__name__] += 1

    prevalence: dict[str, dict[str, dict[str, int]]] = {}
    for name in manifest.label_names:
        table = {s: {"positive": 0, "negative": 0, "uncertain": 0, "missing": 0} for s in SPLITS}
        for r in records:
            value = r.labels.get(name)
            key = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}.get(value, "missing")
            table[r.split][key] += 1
        prevalence[name] = table

    failures = []
    if missing_records:
        failures.append(f"{missing_records} records point to missing files")
    if decode_errors:
        failures.append(f"{decode_errors} of {checked} checked files do not decode")
    if leaked:
        failures.append(f"{leaked} patients appear in more than one split")
    if cross_split:
        failures.append(f"{cross_split} images appear in more than one split")
    return ValidationReport(
        manifest=str(path),
        records=len(records),
        records_per_split={s: per_split.get(s, 0) for s in SPLITS},
        patients_per_split={s: len({r.patient_id for r in records if r.split == s}) for s in SPLITS},
        empty_text_per_split={s: empty_text.get(s, 0) for s in SPLITS},
        missing_files=missing,
        decode_checked=checked,
        decode_errors=decode_errors,
        decode_error_reasons=dict(reasons),
        duplicate_paths=duplicate_paths,
        duplicate_content=duplicate_content,
        cross_split_images=cross_split,
        leaked_patients=leaked,
        label_prevalence=prevalence,
        boxes=sum(len(r.boxes) for r in records),
        failures=failures,
    )
