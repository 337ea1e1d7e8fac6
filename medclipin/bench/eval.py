"""``medclipin bench eval``: embedding extraction (images/s, texts/s) and retrieval (queries/s).

* Embedding: ``MedClipModel.encode_image`` / ``encode_text`` — the calls ``EmbeddingStore`` makes per
  batch — on random tensors of the configured size, eval mode, ``no_grad``, in the precision training
  would use. Decoding and tokenising are not included (see ``medclipin bench io`` for decoding).
* Retrieval: :func:`medclipin.eval.retrieval.ranks` (the chunked ranking behind ``retrieval_metrics``)
  on random L2-normalised embeddings, N candidates, for N = 10k (all queries) and 100k (a subset of the
  queries against all 100k candidates: the full 100k × 100k run would take minutes on a CPU and is
  linear in the number of queries; the JSON says how many queries were timed).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from medclipin.bench.flops import synchronize
from medclipin.bench.train import machine_info, synthetic_batch, vocab_size
from medclipin.config import Config
from medclipin.eval.retrieval import ranks, retrieval_metrics
from medclipin.train.step import autocast_context, resolve_device, resolve_precision


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def bench_embedding(cfg: Config, device: torch.device, precision: str, batch_size: int, batches: int,
                    warmup: int = 1) -> dict:
    """images/s and texts/s of the model's encoders on random inputs (alternating image and text batches)."""
    from medclipin.models.model import MedClipModel

    torch.manual_seed(0)
    model = MedClipModel.from_config(cfg.model, cfg.data.image.size, cfg.data.image.channels,
                                     vocab_size=vocab_size(cfg)).to(device).eval()
    shape_cfg = _with_batch(cfg, batch_size)
    batch = synthetic_batch(shape_cfg, device, two_views=False)
    image_times, text_times = [], []
    with torch.no_grad():
        for i in range(warmup + batches):
            with autocast_context(precision, device):
                t_img = _timed(lambda: model.encode_image(batch["image"]).float(), device, 1)[0]
                t_txt = _timed(lambda: model.encode_text(batch["input_ids"], batch["attention_mask"]).float(),
                               device, 1)[0]
            if i >= warmup:
                image_times.append(t_img)
                text_times.append(t_txt)
    image_s, text_s = statistics.median(image_times), statistics.median(text_times)
    return {
        "path": "MedClipModel.encode_image / encode_text on random tensors (EmbeddingStore's per-batch calls; "
                "image decoding and tokenisation excluded)",
        "batch_size": batch_size,
        "batches": batches,
        "image_size": cfg.data.image.size,
        "text_length": cfg.data.text.max_length,
        "image_median_batch_s": image_s,
        "text_median_batch_s": text_s,
        "images_per_s": batch_size / image_s,
        "texts_per_s": batch_size / text_s,
    }


def _with_batch(cfg: Config, batch_size: int) -> Config:
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.train.batch_size = batch_size
    return cfg


def bench_retrieval(n: int, dim: int, max_queries: int | None, chunk_size: int = 1024, repeats: int = 3,
                    seed: int = 0) -> dict:
    """queries/s of ``ranks`` for ``min(n, max_queries)`` queries against ``n`` candidates."""
    g = torch.Generator().manual_seed(seed)
    candidates = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    queries_n = n if not max_queries else min(n, max_queries)
    # the queries are the first rows' partners (image i ↔ text i); a slightly perturbed copy
    queries = F.normalize(candidates[:queries_n] + 0.5 * torch.randn(queries_n, dim, generator=g), dim=-1)
    groups = torch.arange(n)
    times = _timed(lambda: ranks(queries, candidates, groups[:queries_n], groups, chunk_size),
                   torch.device("cpu"), repeats)
    best = min(times)
    return {
        "candidates": n,
        "queries_timed": queries_n,
        "subset": queries_n < n,
        "dim": dim,
        "chunk_size": chunk_size,
        "best_s": best,
        "median_s": statistics.median(times),
        "queries_per_s": queries_n / best,
        "estimated_full_s": n / (queries_n / best),
    }


def run_eval_benchmark(cfg: Config, out_json: str | os.PathLike | None = None, sizes: tuple[int, ...] = (10_000, 100_000),
                       dim: int | None = None, max_queries: int = 2048, batch_size: int | None = None,
                       batches: int = 5, device: str | None = None, config_path: str = "",
                       metrics_n: int | None = 10_000, full_up_to: int = 10_000, progress=None) -> dict:
    """Embedding throughput and retrieval queries/s; writes ``out_json`` when given.

    Args:
        sizes: candidate counts for retrieval; all ``n`` queries are timed when ``n <= full_up_to``,
            otherwise ``max_queries`` of them against all ``n`` candidates (recorded as ``subset: true``).
        dim: embedding width (default: the config's ``model.contrastive.embed_dim``).
        metrics_n: also time the whole ``retrieval_metrics`` (both directions, R@K, chance) at this N.
    """
    say = progress or (lambda message: None)
    device_t = resolve_device(cfg.train.device if device is None else device)
    precision = resolve_precision(cfg.train.precision, device_t)
    dim = dim or cfg.model.contrastive.embed_dim
    batch_size = batch_size or cfg.eval.batch_size
    result: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(device_t),
        "torch": torch.__version__,
        "config_path": str(config_path),
        "precision": precision,
    }
    say(f"embedding: batch {batch_size} x {batches}")
    result["embedding"] = bench_embedding(cfg, device_t, precision, batch_size, batches)
    result["images_per_s"] = result["embedding"]["images_per_s"]
    result["texts_per_s"] = result["embedding"]["texts_per_s"]
    result["retrieval"] = {}
    for n in sizes:
        say(f"retrieval: {n} candidates")
        result["retrieval"][str(n)] = bench_retrieval(n, dim, max_queries if n > full_up_to else None)
        result[f"retrieval_{n}_queries_per_s"] = result["retrieval"][str(n)]["queries_per_s"]
    result["retrieval_note"] = (
        "ranks() in chunks of 1024 queries (peak memory O(chunk x N)); where subset is true, "
        f"{max_queries} queries were timed against all N candidates (N > {full_up_to}) and estimated_full_s "
        "extrapolates linearly"
    )
    if metrics_n:
        say(f"retrieval_metrics at N={metrics_n}")
        g = torch.Generator().manual_seed(1)
        img = F.normalize(torch.randn(metrics_n, dim, generator=g), dim=-1)
        txt = F.normalize(img + 0.5 * torch.randn(metrics_n, dim, generator=g), dim=-1)
        start = time.perf_counter()
        retrieval_metrics(img, txt)
        elapsed = time.perf_counter() - start
        result["retrieval_metrics"] = {"n": metrics_n, "dim": dim, "seconds": elapsed,
                                       "queries_per_s": 2 * metrics_n / elapsed,
                                       "note": "both directions (image->text and text->image), strict pairs"}
    if out_json:
        path = Path(out_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str))
    return result
