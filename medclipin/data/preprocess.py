"""Decode every image once into the cache store (the work of ``medclipin preprocess``).

Each file goes through :func:`~medclipin.data.image_source.prepare_image` (decode, normalise the
geometry, quantise), in worker processes, and is stored by a
:class:`~medclipin.data.image_cache.CacheWriter`. Resumable: a file already cached with the same size
and mtime is skipped, a changed one is decoded again; unreadable files are listed in ``rejects.csv``.

Example:
    >>> summary = build_cache(["a.dcm", "b.png"], "cache/", size=512, domain="cxr", workers=2)
    >>> summary.line()
    '2 images: 2 decoded (9.5/s), 0 already cached, 0 rejected'
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import cv2

from medclipin.data.geometry import DOMAINS
from medclipin.data.image_cache import CacheWriter, cache_key
from medclipin.data.image_source import default_channels, prepare_image
from medclipin.data.reader_base import DEFAULT_MAX_PIXELS, ImageReadError, check_max_pixels
from medclipin.errors import SettingError


@dataclass
class CacheSummary:
    """What one ``build_cache`` run did."""

    total: int = 0  # unique source paths asked for
    decoded: int = 0  # newly decoded this run (new or changed files)
    reused: int = 0  # already in the cache and unchanged
    rejected: int = 0  # unreadable; listed in rejects.csv
    seconds: float = 0.0
    rejects: list[tuple[str, str]] = field(default_factory=list)

    def line(self) -> str:
        rate = self.decoded / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.total} images: {self.decoded} decoded ({rate:.1f}/s), {self.reused} already cached, "
                f"{self.rejected} rejected")


def _decode_job(job: tuple[str, str, int, int, str, int | None]) -> tuple:
    """Worker: stat, decode, normalise one file. Returns (key, size, mtime, array|None, info|reason)."""
    key, domain, size, channels, window, max_pixels = job
    try:
        stat = os.stat(key)
    except OSError as exc:
        return key, 0, 0, None, f"cannot open ({exc.strerror or exc})"
    try:
        array, info = prepare_image(key, domain, size, channels, window, max_pixels=max_pixels)
    except ImageReadError as exc:
        return key, stat.st_size, stat.st_mtime_ns, None, str(exc)
    except Exception as exc:  # a decoder crash must not stop a 300k-image run; the file is rejected
        return key, stat.st_size, stat.st_mtime_ns, None, f"{key}: unexpected {type(exc).__name__}: {exc}"
    return key, stat.st_size, stat.st_mtime_ns, array, info


def _worker_init() -> None:
    # one decode per process: N processes × M OpenCV/OpenMP threads would oversubscribe the cores
    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """End this worker as soon as ``parent_pid`` ends, however it ends (SIGKILL included).

    Linux: the kernel sends SIGKILL on the parent's death (``prctl(PR_SET_PDEATHSIG)``). Elsewhere (or
    if prctl fails) a daemon thread polls the parent id once a second. Either way the parent may have
    died before this ran, so the parent id is checked once right away.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def _start_worker(parent_pid: int, initializer: Callable[[], None] | None) -> None:
    _die_with_parent(parent_pid)
    if initializer is not None:
        initializer()


def process_pool(workers: int, initializer: Callable[[], None] | None = None) -> ProcessPoolExecutor:
    """A process pool whose workers end with this process, even when it is killed with SIGKILL.

    Workers are started with ``spawn``: not ``fork`` (a forked child inherits OpenCV/OpenMP thread pools
    in an undefined state and can deadlock in its first ``cv2.resize``), and not ``forkserver`` (its
    server process and the workers it forks outlive a killed parent). Each worker ties its life to
    this process (:func:`_die_with_parent`); with the workers gone, multiprocessing's resource tracker
    sees its pipe close and exits too.

    Args:
        workers: number of processes.
        initializer: called once in each worker after that (must be picklable: a module-level function).
    """
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(os.getpid(), initializer))


def build_cache(
    paths: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    size: int = 512,
    domain: str = "cxr",
    channels: int | None = None,
    window: str = "first",
    workers: int = 0,
    rows_per_shard: int = 1024,
    progress: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> CacheSummary:
    """Decode every image once into the cache (resumable; changed files are redone).

    Args:
        paths: source image files (duplicates are decoded once).
        out_dir: cache folder (created). An existing cache must have the same size/channels/domain/window.
        size: side of the stored square images.
        domain: ``"cxr"`` or ``"fundus"`` (geometry normalisation).
        channels: 1 or 3; default 1 for cxr, 3 for fundus.
        window: DICOM VOI choice passed to :func:`~medclipin.data.readers.read_image`.
        workers: decoding processes; 0 or 1 decodes in this process.
        rows_per_shard: images per shard file.
        progress: show a tqdm progress bar.
        max_pixels: images with more pixels are rejected before decoding (None or 0: no limit).

    Returns:
        CacheSummary (counts, seconds, rejects). Rejected files are written to ``out_dir/rejects.csv``.
    """
    from tqdm import tqdm

    if domain not in DOMAINS:
        raise SettingError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    check_max_pixels(max_pixels)
    channels = channels or default_channels(domain)
    writer = CacheWriter(out_dir, {"size": int(size), "channels": int(channels), "domain": domain, "window": window},
                         rows_per_shard=rows_per_shard)

    summary = CacheSummary()
    start = time.perf_counter()
    todo: list[str] = []
    seen: set[str] = set()
    for path in paths:
        key = cache_key(path)
        if key in seen:
            continue
        seen.add(key)
        if writer.is_current(key):
            summary.reused += 1
        else:
            todo.append(key)
    summary.total = len(seen)

    pending = 0
    last_flush = time.monotonic()

    def store(result: tuple) -> None:
        nonlocal pending, last_flush
        key, file_size, mtime_ns, array, info = result
        if array is None:
            summary.rejected += 1
            summary.rejects.append((key, info))
            return
        writer.put(key, file_size, mtime_ns, array, info)
        summary.decoded += 1
        pending += 1
        # batches grow with the index (O(N log N) bytes written overall) and are at most a minute apart
        if pending >= max(256, len(writer.index) // 10) or time.monotonic() - last_flush > 60:
            writer.flush()
            pending, last_flush = 0, time.monotonic()

    jobs = [(key, domain, int(size), int(channels), window, max_pixels) for key in todo]
    bar = tqdm(total=len(jobs), unit="img", desc="preprocess", disable=not progress, dynamic_ncols=True)
    try:
        for result in _decoded(jobs, workers):
            store(result)
            bar.update(1)
    finally:
        bar.close()
        writer.close(summary.rejects)
    summary.seconds = time.perf_counter() - start
    return summary


def _decoded(jobs: list[tuple], workers: int) -> Iterator[tuple]:
    """The results of :func:`_decode_job` for every job, in order: in a process pool, or in this process."""
    if workers and workers > 1 and len(jobs) > 1:
        with process_pool(workers, initializer=_worker_init) as pool:
            yield from pool.map(_decode_job, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 8))))
    else:
        for job in jobs:
            yield _decode_job(job)
