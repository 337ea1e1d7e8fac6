"""One embedding path for every evaluation: a model, its processor and images/texts in, L2-normalised embeddings out.

``EmbeddingStore`` encodes each image and text once per model and keeps the result in memory and,
when given a folder, on disk (safetensors keyed by the model's weights and the inputs), so zero-shot,
retrieval, linear probe and Grad-CAM on one checkpoint never re-encode the same images.

Images that cannot be read are not a crash: their rows are NaN, ``store.rejected`` names each file
and why, and the evaluations drop those rows and report how many (:func:`readable_rows`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from medclipin.atomic import atomic_open
from medclipin.data.dataset import ImageTextDataset
from medclipin.data.manifest import Record
from medclipin.data.processor import Processor
from medclipin.errors import MedclipinError
from medclipin.models.model import MedClipModel

log = logging.getLogger(__name__)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


def default_embedding_cache(model_dir: Path, out_dir: str | os.PathLike | None) -> Path | None:
    """``<model_dir>/../embeddings`` when writable, else ``<out>/embeddings`` (None without an --out)."""
    beside = model_dir.resolve().parent / "embeddings"
    if _writable(beside):
        return beside
    return Path(out_dir) / "embeddings" if out_dir else None


def _model_fingerprint(model: MedClipModel, processor: Processor) -> str:
    # cheap and exact enough: the saved configuration (towers, image geometry, tokenisation) and a
    # strided sample of values from every tensor
    config = {"model": model.config_dict(), "processor": processor.to_dict()}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(name.encode())
        digest.update(flat[:: max(1, flat.numel() // 16)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _as_record(item) -> Record:
    """A manifest record, or a bare image path wrapped as one (its id is the path)."""
    if isinstance(item, Record):
        return item
    path = os.fspath(item)
    return Record(record_id=path, patient_id="", study_id="", image_path=path, split="")


class NonFiniteEmbeddingError(MedclipinError, ValueError):
    """The model gives NaN or infinite embeddings: its weights are broken (tampered, or from a diverged run)."""


def _finite(embeddings: torch.Tensor, what: str) -> torch.Tensor:
    """``embeddings`` when every value is finite. A NaN from the model would otherwise pass for an unreadable
    image (a NaN row) or score as "+nan", and a command would exit 0 with nothing measured."""
    if not torch.isfinite(embeddings).all():
        bad = int((~torch.isfinite(embeddings)).any(dim=1).sum())
        raise NonFiniteEmbeddingError(f"the model gives non-finite {what} embeddings ({bad} of {len(embeddings)} in "
                                      "a batch): its weights are broken; use another model or checkpoint")
    return embeddings


def readable_rows(embeddings: torch.Tensor) -> torch.Tensor:
    """Boolean mask of rows that hold an embedding (unreadable images are NaN rows)."""
    return ~torch.isnan(embeddings).any(dim=1) if len(embeddings) else torch.zeros(0, dtype=torch.bool)


class EmbeddingStore:
    """Image and text embeddings of one model, computed once.

    Args:
        model, processor: from :func:`medclipin.load`.
        cache_dir: optional folder for on-disk caching across processes (e.g. several CLI commands).
        image_cache: decode-once image cache from ``medclipin preprocess``.
        batch_size, num_workers: encoding throughput knobs.

    Attributes:
        rejected: image path → reason, for every image that could not be read.
    """

    def __init__(self, model: MedClipModel, processor: Processor, cache_dir: str | os.PathLike | None = None,
                 image_cache: str = "", batch_size: int = 64, num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.model, self.processor = model, processor
        self.device = next(model.parameters()).device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.image_cache, self.batch_size, self.num_workers = image_cache, batch_size, num_workers
        self._fingerprint = _model_fingerprint(model, processor)
        self._memory: dict[str, torch.Tensor] = {}
        self.rejected: dict[str, str] = {}

    @property
    def fingerprint(self) -> str:
        """Identifies the model's weights and configuration; part of every cache key."""
        return self._fingerprint

    def _key(self, kind: str, items: Sequence) -> str:
        digest = hashlib.sha256(json.dumps([kind, self._fingerprint, list(items)]).encode()).hexdigest()[:24]
        return f"{kind}-{digest}"

    @staticmethod
    def _file_identity(path: str) -> list:
        # a changed file under the same name must not hit a stale entry
        try:
            stat = os.stat(path)
            return [path, stat.st_size, stat.st_mtime_ns]
        except OSError:
            return [path, None, None]

    def _cached(self, key: str, compute) -> torch.Tensor:
        if key in self._memory:
            return self._memory[key]
        path = self.cache_dir / f"{key}.safetensors" if self.cache_dir else None
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            value = load_file(str(path))["embeddings"]
        else:
            # encode in eval mode (no dropout: deterministic embeddings, e.g. for validation during
            # training) and give the model back in the mode it came in
            was_training = self.model.training
            self.model.eval()
            try:
                value = compute()
            finally:
                self.model.train(was_training)
            # a result with unreadable rows is not written to disk: the file may be fixed next time
            if path is not None and bool(readable_rows(value).all()):
                from safetensors.torch import save

                path.parent.mkdir(parents=True, exist_ok=True)
                # serialised in memory (N × D floats: small), then written through a unique temporary
                # file and renamed: concurrent evaluations and crashes never leave a torn cache file
                with atomic_open(path, "wb") as handle:
                    handle.write(save({"embeddings": value.contiguous()}))
        self._memory[key] = value
        return value

    @torch.no_grad()
    def images(self, items: Sequence[Record | str | os.PathLike], features: str = "embedding") -> torch.Tensor:
        """(N, D) image features in input order; rows of unreadable images are NaN (see :attr:`rejected`).

        Args:
            items: manifest records or image file paths.
            features: ``"embedding"`` — the L2-normalised contrastive embedding (zero-shot, retrieval);
                ``"encoder"`` — the image tower's pooled feature before any projection (linear probe).
        """
        if features not in ("embedding", "encoder"):
            raise ValueError(f"features must be 'embedding' or 'encoder', got {features!r}")
        records = [_as_record(item) for item in items]
        kind = "image" if features == "embedding" else "image-encoder"
        key = self._key(kind, [self._file_identity(r.image_path) for r in records])
        encode = self.model.encode_image if features == "embedding" else self.model.image_encoder
        dim = self.model.embed_dim if features == "embedding" else self.model.image_encoder.out_dim

        def compute() -> torch.Tensor:
            dataset = ImageTextDataset(records, self.processor, train=False, cache_dir=self.image_cache,
                                       require_text=False, substitute_unreadable=False)
            for path in dataset.missing:
                self.rejected[path] = dataset.image_problems.get(path, "image file missing")
            out = torch.full((len(records), dim), float("nan"))
            kept = [i for i, r in enumerate(records) if r.image_path not in dataset.missing]
            if len(kept) != len(dataset):  # duplicated paths etc. cannot happen; a guard for the mapping below
                raise RuntimeError("image dataset and records disagree")
            loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                collate_fn=_stack_readable)
            for positions, images, rejected in loader:
                for path, reason in rejected:
                    self.rejected[path] = reason
                if len(positions):
                    rows = torch.tensor([kept[p] for p in positions])
                    out[rows] = _finite(encode(images.to(self.device)).float().cpu(), "image")
            if self.rejected:
                bad = sum(1 for r in records if r.image_path in self.rejected)
                if bad:
                    log.warning("%d of %d images could not be read and are left out", bad, len(records))
            return out

        return self._cached(key, compute)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) normalised text embeddings, in order, tokenised by the model's processor."""
        key = self._key("text", list(texts))

        def compute() -> torch.Tensor:
            chunks = []
            for start in range(0, len(texts), self.batch_size):
                tokens = self.processor.texts(list(texts[start:start + self.batch_size]))
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                encoded = self.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().cpu()
                chunks.append(_finite(encoded, "text"))
            return torch.cat(chunks) if chunks else torch.zeros(0, self.model.embed_dim)

        return self._cached(key, compute)

    def rejected_records(self, records: Sequence[Record]) -> list[dict]:
        """``[{"image_path", "reason"}]`` for the records whose image could not be read."""
        return [{"image_path": r.image_path, "reason": self.rejected[r.image_path]}
                for r in records if r.image_path in self.rejected]


def _stack_readable(items: list[dict]) -> tuple[list[int], torch.Tensor, list]:
    # module level (not a lambda) so DataLoader workers can pickle it
    good = [item for item in items if item["image"] is not None]
    rejected = [pair for item in items for pair in item.get("rejected", ())]
    images = torch.stack([item["image"] for item in good]) if good else torch.zeros(0)
    return [item["index"] for item in good], images, rejected


def keep_readable(records: Sequence[Record], *arrays) -> tuple:
    """``records`` and row-aligned arrays/tensors restricted to the rows of readable images.

    The first array decides (its NaN rows are the unreadable images)."""
    mask = readable_rows(torch.as_tensor(np.asarray(arrays[0]) if not torch.is_tensor(arrays[0]) else arrays[0]))
    index = mask.nonzero().flatten().tolist()
    return ([records[i] for i in index], *[a[mask.numpy()] if isinstance(a, np.ndarray) else a[mask] for a in arrays])
