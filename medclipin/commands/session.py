"""What the evaluation commands share: common arguments and their checks (outputs writable before any work,
positive sizes), loading a checkpoint into an
:class:`EmbeddingStore` with its on-disk cache, selecting records, and the "what ran" block of reports.

Embedding cache default (``--embedding-cache``): ``<model folder>/../embeddings`` — for a run folder
``RUN/model`` that is ``RUN/embeddings``, shared by every command evaluating that checkpoint whatever
its ``--out`` — when that folder can be created and written; otherwise ``<--out>/embeddings``.
``--embedding-cache none`` disables the disk cache. Entries are keyed by the model's weights and
configuration fingerprint and by the inputs (image path, size and mtime; exact text), so a retrained
model or a changed image never reads a stale entry.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

from medclipin.data.manifest import Manifest, ManifestError, Record, read_manifest


def add_model_arguments(parser, manifest_required: bool = True, checkpoint: bool = True) -> None:
    if checkpoint:  # `compare` takes --checkpoints A B instead
        parser.add_argument("--checkpoint", required=True,
                            help="model folder (model.safetensors + config.json), a run folder (uses RUN/model), a "
                                 "checkpoint folder, or a third-party CLIP: open_clip:local-dir:DIR, hf:DIR, "
                                 "open_clip:ARCH with --weights FILE")
        parser.add_argument("--weights", default="",
                            help="weights file of an open_clip:ARCH checkpoint (OpenAI .pt archive, epoch_N.pt, "
                                 ".safetensors)")
    parser.add_argument("--manifest", required=manifest_required, default=None, help="manifest CSV/JSONL")
    parser.add_argument("--embedding-cache", default="",
                        help="folder for cached embeddings (default: <checkpoint model folder>/../embeddings if "
                             "writable, else OUT/embeddings; 'none' = do not cache on disk)")
    parser.add_argument("--image-cache", default="", help="decode-once image cache from `medclipin preprocess`")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="encoding batch size (default 64)")
    parser.add_argument("--num-workers", type=non_negative_int, default=0,
                        help="image decoding worker processes (default 0)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu; evaluation runs in fp32)")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (batch sizes, top-k, chunk sizes)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (worker counts, resamples, figures)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def query_text(text: str) -> str:
    """argparse type: a query sentence with words in it (an empty one scores every image alike and would
    still list "hits")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a sentence to search for")
    return text


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def check_outputs(args) -> None:
    """Fail at once, in one line, when ``--out`` or an explicit ``--embedding-cache`` cannot be written (a
    file where a folder is needed, a read-only place): before the model, the manifest or any image is read."""
    from medclipin.atomic import check_output_dir

    if getattr(args, "out", None):
        check_output_dir(args.out)
    cache = (getattr(args, "embedding_cache", "") or "").strip()
    if cache and cache.lower() != "none":
        check_output_dir(cache)


def open_store(args, out_dir: str | os.PathLike | None = None):
    """(EmbeddingStore, model folder, embedding cache folder or None) for a command's arguments."""
    from medclipin.api import load, resolve_model_dir
    from medclipin.eval.embeddings import EmbeddingStore, default_embedding_cache
    from medclipin.models.bases import is_base_spec

    weights = getattr(args, "weights", "") or ""
    third_party = is_base_spec(args.checkpoint)
    if third_party:  # the spec (and its weights file) stands for the model folder in reports
        model, processor = load(args.checkpoint, device=args.device, weights=weights)
        model_dir = Path(args.checkpoint + (f"@{weights}" if weights else ""))
    else:
        model_dir = resolve_model_dir(args.checkpoint)
        model, processor = load(model_dir, device=args.device, weights=weights)  # fp32: bf16 is ~100x slower on CPUs without AMX
    choice = (args.embedding_cache or "").strip()
    if choice.lower() == "none":
        cache_dir = None
    elif choice:
        cache_dir = Path(choice)
    elif third_party:  # no folder of ours to cache beside: under --out
        cache_dir = Path(out_dir) / "embeddings" if out_dir else None
    else:
        cache_dir = default_embedding_cache(model_dir, out_dir)
    store = EmbeddingStore(model, processor, cache_dir=cache_dir, image_cache=args.image_cache,
                           batch_size=args.batch_size, num_workers=args.num_workers)
    return store, model_dir, cache_dir


def load_split(manifest_path: str, split: str) -> tuple[Manifest, list[Record]]:
    """The manifest and its records of ``split`` (``all`` = every record)."""
    manifest = read_manifest(manifest_path)
    records = manifest.records if split == "all" else manifest.split(split)
    if not records:
        counts = {s: len(manifest.split(s)) for s in ("train", "validate", "test")}
        raise ManifestError(f"{manifest_path} has no records in split {split!r} (splits: {counts})")
    return manifest, records


def add_test_manifest_argument(parser) -> None:
    parser.add_argument("--test-manifest", default=None,
                        help="an external test set (another hospital's manifest): every record of it is scored, "
                             "its split column ignored; --manifest's train/validate splits still train the probe "
                             "and choose thresholds and calibration")


def test_records(args, split: str) -> list[Record]:
    """The records to score: every record of ``--test-manifest`` when given (its split ignored), else
    ``--manifest``'s ``split``."""
    if getattr(args, "test_manifest", None):
        manifest = read_manifest(args.test_manifest)
        if not manifest.records:
            raise ManifestError(f"{args.test_manifest}: no records")
        return manifest.records
    return load_split(args.manifest, split)[1]


def run_info(args, store, model_dir: Path, cache_dir: Path | None, split: str | None = None,
             n_records: int | None = None) -> dict:
    """The "what ran" block: checkpoint, model fingerprint, manifest + sha256, split, counts, arguments, date."""
    from medclipin.eval.zeroshot import file_sha256  # lazily: this module is imported to build `--help`

    info = {
        "checkpoint": str(model_dir),
        "model_fingerprint": store.fingerprint,
        "manifest": str(args.manifest) if getattr(args, "manifest", None) else None,
        "manifest_sha256": file_sha256(args.manifest) if getattr(args, "manifest", None) else None,
        "split": split,
        **({"test_manifest": str(args.test_manifest), "test_manifest_sha256": file_sha256(args.test_manifest),
            "split": "all records of the test manifest (its split column ignored)"}
           if getattr(args, "test_manifest", None) else {}),
        "n_records": n_records,
        "embedding_cache": str(cache_dir) if cache_dir else "none",
        "arguments": {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_") and k != "command"},
        "medclipin_version": _version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    return info


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("medclipin")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "unknown"
