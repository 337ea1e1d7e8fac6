"""The synthetic dataset on disk: every study's DICOM and PNG, the two manifests, ``labels.csv`` and
``synthetic.json`` (written last: a folder without it is an interrupted generation)."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from medclipin.atomic import atomic_open
from medclipin.data.manifest import Record, write_manifest
from medclipin.data.synthetic.cohort import assign_splits, n_studies
from medclipin.data.synthetic.design import CLASS_NAMES, GENERATOR_VERSION, SPLIT_FRACTIONS
from medclipin.data.synthetic.pair_noise import TrainReport, check_fraction, plan_pair_noise
from medclipin.data.synthetic.study import synthesize_study
from medclipin.data.synthetic.writers import DicomWriter, write_png
from medclipin.errors import MedclipinError

_METADATA_FILE = "synthetic.json"
# written before the first file of a generation and kept: a folder with it is this generator's (an interrupted
# generation when synthetic.json is missing), whose own files may be replaced; any other non-empty folder is
# the user's and is refused
_STARTED_FILE = ".medclipin-synthetic"


class SyntheticDatasetError(MedclipinError, FileExistsError):
    """The output folder holds a synthetic dataset made with other parameters (and overwrite is False), or
    files that this generator did not write."""


class SyntheticSettingsError(MedclipinError, ValueError):
    """A generation setting out of range (patients, image size, a fraction)."""


def _check_folder_is_ours(out_dir: Path) -> None:
    """Refuse a non-empty folder that holds neither a synthetic dataset nor an interrupted generation: the
    generator writes ``manifest.csv``, ``labels.csv``, ``png/`` ... and must never replace the user's."""
    if not out_dir.is_dir() or (out_dir / _METADATA_FILE).is_file() or (out_dir / _STARTED_FILE).is_file():
        return
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir())
    if entries:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise SyntheticDatasetError(f"{out_dir}: not empty and not a synthetic dataset ({shown}); its files are "
                                    "left alone: choose a new or empty folder")


def _parameters(n_patients: int, image_size: int, seed: int, loose_fraction: float = 0.0,
                repetitive_fraction: float = 0.0) -> dict:
    params = {"n_patients": int(n_patients), "image_size": int(image_size), "seed": int(seed)}
    # the pair-noise knobs appear only when used, so a default dataset's synthetic.json is unchanged
    if loose_fraction:
        params["loose_fraction"] = float(loose_fraction)
    if repetitive_fraction:
        params["repetitive_fraction"] = float(repetitive_fraction)
    return params


def _is_complete(out_dir: Path, meta: dict) -> bool:
    files = meta.get("files", {})
    needed = [files.get(k) for k in ("manifest", "manifest_png", "labels")]
    if not all(needed) or not all((out_dir / name).is_file() for name in needed):
        return False
    n = meta.get("counts", {}).get("studies", -1)
    return (sum(1 for _ in (out_dir / "dicom").glob("SYN*.dcm")) == n
            and sum(1 for _ in (out_dir / "png").glob("SYN*.png")) == n)


def _existing_manifest(out_dir: Path, params: dict, overwrite: bool) -> Path | None:
    """The manifest of a complete dataset with these parameters in ``out_dir``, else None.

    Raises:
        SyntheticDatasetError: ``out_dir`` holds one with other parameters and ``overwrite`` is False.
    """
    meta_path = out_dir / _METADATA_FILE
    if not meta_path.is_file():
        return None
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        old = {}
    same = old.get("version") == GENERATOR_VERSION and old.get("parameters") == params
    if same and _is_complete(out_dir, old):
        return out_dir / old["files"]["manifest"]
    if not same and not overwrite:
        raise SyntheticDatasetError(
            f"{out_dir} already holds a synthetic dataset generated with parameters "
            f"{old.get('parameters')} (version {old.get('version')}); requested {params} "
            f"(version {GENERATOR_VERSION}). Pass overwrite=True (--overwrite) to replace it, "
            "or choose another folder."
        )
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def _clear_own_files(out_dir: Path) -> None:
    """Remove files this generator writes (and nothing else) before a fresh generation."""
    (out_dir / _METADATA_FILE).unlink(missing_ok=True)  # first: the folder is now "incomplete"
    for sub, pattern in (("dicom", "SYN*.dcm"), ("png", "SYN*.png")):
        for path in (out_dir / sub).glob(pattern):
            path.unlink()
    for name in ("manifest.csv", "manifest_png.csv", "labels.csv"):
        (out_dir / name).unlink(missing_ok=True)


@dataclass
class _WrittenStudy:
    """What the manifests need of one written study (its pixels stay in the worker that drew them)."""

    study_id: str
    patient_id: str
    patient: int
    index: int
    view: str
    findings: str
    impression: str
    report: str
    labels: dict
    boxes: list


_worker_writer: DicomWriter | None = None


def _write_study(job: tuple[Path, int, int, int, int]) -> _WrittenStudy:
    """Draw one study and write its DICOM and PNG (in a worker process, or in this one)."""
    global _worker_writer
    out_dir, seed, patient, index, image_size = job
    if _worker_writer is None or _worker_writer.seed != seed:
        _worker_writer = DicomWriter(seed)
    study = synthesize_study(seed, patient, index, image_size)
    _worker_writer.write(study, out_dir / "dicom" / f"{study.study_id}.dcm")
    write_png(study, out_dir / "png" / f"{study.study_id}.png")
    return _WrittenStudy(study.study_id, study.patient_id, patient, index, study.view, study.findings,
                         study.impression, study.report, dict(study.labels), list(study.boxes))


def _default_workers() -> int:
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _written_studies(jobs: list, workers: int) -> Iterator[_WrittenStudy]:
    """Each job's study, in job order; ``workers`` > 1 draws them in that many processes. Every study is a
    function of its own (seed, patient, index), so the files are the same bytes whatever ``workers`` is."""
    if workers <= 1 or len(jobs) < 2 * workers:
        yield from map(_write_study, jobs)
        return
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()  # fork where there is one: no re-import per worker
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers) as pool:
        yield from pool.imap(_write_study, jobs, chunksize=16)


def _write_studies(out_dir: Path, n_patients: int, image_size: int, seed: int, progress: bool,
                   keep_train_reports: bool = False, workers: int = 0,
                   ) -> tuple[list[Record], list[Record], list[list], list[TrainReport]]:
    """Generate and write every study (``workers`` processes; 0 = one per CPU, up to 4); returns the DICOM and
    PNG manifest records, the label rows and (with ``keep_train_reports``) the train studies' reports for
    :func:`plan_pair_noise`."""
    dicom_dir, png_dir = out_dir / "dicom", out_dir / "png"
    dicom_dir.mkdir(parents=True, exist_ok=True)
    png_dir.mkdir(parents=True, exist_ok=True)
    splits = assign_splits(seed, n_patients)
    jobs = [(out_dir, seed, p, s, image_size) for p in range(n_patients) for s in range(n_studies(seed, p))]
    studies = _written_studies(jobs, workers or _default_workers())
    if progress:
        from tqdm import tqdm

        studies = tqdm(studies, total=len(jobs), desc="synthetic studies", unit="study")

    dicom_records: list[Record] = []
    png_records: list[Record] = []
    label_rows: list[list] = []
    train_reports: list[TrainReport] = []
    for study in studies:
        split = splits[study.patient]
        common = dict(record_id=study.study_id, patient_id=study.patient_id, study_id=study.study_id,
                      split=split, view=study.view, findings=study.findings,
                      impression=study.impression, labels={c: float(v) for c, v in study.labels.items()},
                      boxes=study.boxes)
        dicom_records.append(Record(image_path=str((dicom_dir / f"{study.study_id}.dcm").resolve()), **common))
        png_records.append(Record(image_path=str((png_dir / f"{study.study_id}.png").resolve()), **common))
        label_rows.append([study.study_id] + [study.labels[c] for c in CLASS_NAMES])
        if keep_train_reports and split == "train":
            train_reports.append(TrainReport(
                study.study_id, study.patient_id, study.patient, study.index, study.findings, study.impression,
                study.report, [c for c in CLASS_NAMES if study.labels[c]]))
    return dicom_records, png_records, label_rows, train_reports


def _apply_pair_noise(records: list[list[Record]], seed: int, train_reports: list[TrainReport],
                      loose_fraction: float, repetitive_fraction: float) -> dict[str, int]:
    """Replace the chosen train reports in both manifests' records and record how (extra columns).
    Returns the counts for synthetic.json."""
    changed = plan_pair_noise(seed, train_reports, loose_fraction, repetitive_fraction)
    for manifest_records in records:
        for record in manifest_records:
            noisy = changed.get(record.study_id)
            if noisy is not None:
                record.findings, record.impression = noisy.findings, noisy.impression
            if loose_fraction:
                record.extra["pair_noise"] = noisy.pair_noise if noisy else ""
            if repetitive_fraction:
                record.extra["report_template"] = noisy.template if noisy else ""
    counts = {}
    if loose_fraction:
        counts["pair_noise"] = {kind: sum(1 for n in changed.values() if n.pair_noise == kind)
                                for kind in ("swapped", "omitted")}
    if repetitive_fraction:
        counts["report_templates"] = sum(1 for n in changed.values() if n.template)
    return counts


def _metadata(params: dict, n_patients: int, records: list[Record], label_rows: list[list], noise_counts: dict) -> dict:
    split_counts = {name: sum(1 for r in records if r.split == name) for name, _ in SPLIT_FRACTIONS}
    return {
        "name": "synthetic-cxr",
        "generator": "medclipin.data.synthetic",
        "version": GENERATOR_VERSION,
        "parameters": params,
        "class_names": list(CLASS_NAMES),
        "counts": {
            "patients": n_patients,
            "studies": len(records),
            "studies_per_split": split_counts,
            "positives": {c: int(sum(row[1 + i] for row in label_rows)) for i, c in enumerate(CLASS_NAMES)},
            "normal": int(sum(1 for row in label_rows if not any(row[1:]))),
            **noise_counts,
        },
        "files": {"manifest": "manifest.csv", "manifest_png": "manifest_png.csv", "labels": "labels.csv",
                  "dicom_dir": "dicom", "png_dir": "png"},
    }


def generate_synthetic_dataset(
    out_dir,
    n_patients: int = 1600,
    image_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    loose_fraction: float = 0.0,
    repetitive_fraction: float = 0.0,
    workers: int = 0,
) -> Path:
    """Write the synthetic chest X-ray dataset and return the path of its ``manifest.csv``.

    Layout under ``out_dir``: ``dicom/<study>.dcm`` (12-bit CR), ``png/<study>.png`` (8-bit rendered),
    ``manifest.csv`` (image_path → DICOM), ``manifest_png.csv`` (same rows, image_path → PNG),
    ``labels.csv`` (study_id + one 0/1 column per class) and ``synthetic.json`` (parameters, version,
    counts). ``synthetic.json`` is written last, so a folder without it is an interrupted generation.

    Args:
        out_dir: output folder (created if needed).
        n_patients: number of patients; each has 1 or 2 studies (1600 → about 2,300 studies).
        image_size: square image side in pixels.
        seed: the seed; same seed and parameters → identical pixels, reports and manifests.
        overwrite: replace a dataset generated with different parameters (or generator version).
        progress: show a tqdm progress bar.
        loose_fraction: fraction of the train records whose report does not describe their image (half
            the report of another train study, half their own with findings left out); the manifests
            get a ``pair_noise`` column (``""``, ``"swapped"``, ``"omitted"``). Labels, boxes, images and
            the validate/test splits are unchanged. See :mod:`medclipin.data.synthetic.pair_noise`.
        repetitive_fraction: fraction of the train-split normal studies whose report is one of three
            fixed templates; the manifests get a ``report_template`` column (``""`` or ``"1"``-``"3"``).
        workers: processes drawing the studies (0 = one per CPU, up to 4); the files are the same bytes
            whatever their number.

    Both fractions default to 0, which gives exactly the dataset of earlier versions (same bytes).

    Raises:
        SyntheticDatasetError: ``out_dir`` holds a complete dataset with other parameters and
            ``overwrite`` is False.
        SyntheticDatasetError: ``out_dir`` is not empty and holds neither a synthetic dataset nor an
            interrupted generation (the user's files are never replaced).
        SyntheticSettingsError: ``n_patients`` < 1, ``image_size`` < 64, or a fraction outside [0, 1].
    """
    if n_patients < 1:
        raise SyntheticSettingsError(f"n_patients must be at least 1, got {n_patients}")
    if image_size < 64:
        raise SyntheticSettingsError(f"image_size must be at least 64 pixels, got {image_size}")
    try:
        loose_fraction = check_fraction("loose_fraction", loose_fraction)
        repetitive_fraction = check_fraction("repetitive_fraction", repetitive_fraction)
    except ValueError as exc:
        raise SyntheticSettingsError(str(exc)) from None
    out_dir = Path(out_dir)
    params = _parameters(n_patients, image_size, seed, loose_fraction, repetitive_fraction)
    existing = _existing_manifest(out_dir, params, overwrite)
    if existing is not None:
        return existing
    _check_folder_is_ours(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / _STARTED_FILE).touch()
    _clear_own_files(out_dir)  # also tidies an interrupted run's leftovers
    noisy = bool(loose_fraction or repetitive_fraction)
    dicom_records, png_records, label_rows, train_reports = _write_studies(
        out_dir, n_patients, image_size, seed, progress, keep_train_reports=noisy, workers=workers)
    noise_counts = _apply_pair_noise([dicom_records, png_records], seed, train_reports, loose_fraction,
                                     repetitive_fraction) if noisy else {}

    manifest = write_manifest(out_dir / "manifest.csv", dicom_records, label_names=list(CLASS_NAMES))
    write_manifest(out_dir / "manifest_png.csv", png_records, label_names=list(CLASS_NAMES))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["study_id", *CLASS_NAMES])
    writer.writerows(label_rows)
    _atomic_write_text(out_dir / "labels.csv", buffer.getvalue())
    meta = _metadata(params, n_patients, dicom_records, label_rows, noise_counts)
    _atomic_write_text(out_dir / _METADATA_FILE, json.dumps(meta, indent=2) + "\n")  # last: marks the dataset complete
    return manifest
