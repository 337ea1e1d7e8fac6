"""One embedding path for every evaluation: a checkpoint and records in, L2-normalised embeddings out.

``EmbeddingStore`` encodes each image and text once per model and keeps the result in memory and,
when given a folder, on disk (safetensors keyed by the model's weights and the inputs), so zero-shot,
retrieval, linear probe and Grad-CAM on one checkpoint never re-encode the same images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch.utils.data import DataLoader

from medclipin.atomic import atomic_open
from medclipin.data.dataset import ImageTextDataset, TextImageCollator
from medclipin.data.manifest import Record
from medclipin.data.tokenizer import load_tokenizer
from medclipin.models.model import WEIGHTS_NAME, MedClipModel

log = logging.getLogger(__name__)


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Accept a model folder, a run folder (uses RUN/model) or a checkpoint folder (uses its model/)."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{path}: no medclipin model here (expected {WEIGHTS_NAME} + config.json in it or in its model/ folder)"
    )


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[MedClipModel, object]:
    """Load a saved model and its tokenizer for evaluation (eval mode, on ``device``)."""
    model_dir = resolve_model_dir(path)
    model = MedClipModel.from_pretrained(model_dir).to(device).eval()
    return model, load_tokenizer(str(model_dir))


def _model_fingerprint(model: MedClipModel) -> str:
    # cheap and exact enough: the saved configuration (towers, image geometry, tokenisation) and a
    # strided sample of values from every tensor
    digest = hashlib.sha256(json.dumps(model.config_dict(), sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(name.encode())
        digest.update(flat[:: max(1, flat.numel() // 16)].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class EmbeddingStore:
    """Image and text embeddings of one model, computed once.

    Args:
        model, tokenizer: from :func:`load_model`.
        cache_dir: optional folder for on-disk caching across processes (e.g. several CLI commands).
        image_cache: decode-once image cache from ``medclipin preprocess``.
        batch_size, num_workers: encoding throughput knobs.
    """

    def __init__(self, model: MedClipModel, tokenizer, cache_dir: str | os.PathLike | None = None,
                 image_cache: str = "", batch_size: int = 64, num_workers: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.image_cache, self.batch_size, self.num_workers = image_cache, batch_size, num_workers
        self._fingerprint = _model_fingerprint(model)
        self._memory: dict[str, torch.Tensor] = {}
        self.collate = TextImageCollator(tokenizer, model.text_cfg.max_length)

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
            if path is not None:
                from safetensors.torch import save

                path.parent.mkdir(parents=True, exist_ok=True)
                # serialised in memory (N × D floats: small), then written through a unique temporary
                # file and renamed: concurrent evaluations and crashes never leave a torn cache file
                with atomic_open(path, "wb") as handle:
                    handle.write(save({"embeddings": value.contiguous()}))
        self._memory[key] = value
        return value

    @torch.no_grad()
    def images(self, records: Sequence[Record], features: str = "embedding") -> torch.Tensor:
        """(N, D) image features of the records' images, in record order.

        Args:
            features: ``"embedding"`` — the L2-normalised contrastive embedding (zero-shot, retrieval);
                ``"encoder"`` — the image tower's pooled feature before any projection (linear probe).
        """
        if features not in ("embedding", "encoder"):
            raise ValueError(f"features must be 'embedding' or 'encoder', got {features!r}")
        kind = "image" if features == "embedding" else "image-encoder"
        key = self._key(kind, [self._file_identity(r.image_path) for r in records])
        encode = self.model.encode_image if features == "embedding" else self.model.image_encoder

        def compute() -> torch.Tensor:
            dataset = ImageTextDataset(records, self.model.image_cfg, self.model.text_cfg, train=False,
                                       cache_dir=self.image_cache, require_text=False)
            if len(dataset) != len(records):
                raise FileNotFoundError(f"{len(records) - len(dataset)} image files are missing: {dict(dataset.skipped)}")
            loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                collate_fn=_stack_images)
            chunks = [encode(batch.to(self.device)).float().cpu() for batch in loader]
            if chunks:
                return torch.cat(chunks)
            dim = self.model.cfg.contrastive.embed_dim if features == "embedding" else self.model.image_encoder.out_dim
            return torch.zeros(0, dim)

        return self._cached(key, compute)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) normalised text embeddings, in order."""
        key = self._key("text", list(texts))

        def compute() -> torch.Tensor:
            chunks = []
            for start in range(0, len(texts), self.batch_size):
                tokens = self.collate.tokenize(list(texts[start:start + self.batch_size]))
                tokens = {k: v.to(self.device) for k, v in tokens.items()}
                chunks.append(self.model.encode_text(tokens["input_ids"], tokens["attention_mask"]).float().cpu())
            return torch.cat(chunks) if chunks else torch.zeros(0, self.model.cfg.contrastive.embed_dim)

        return self._cached(key, compute)


def _stack_images(items: list[dict]) -> torch.Tensor:
    # module level (not a lambda) so DataLoader workers can pickle it
    return torch.stack([item["image"] for item in items])
