"""Decode-once image cache and the single image entry point of the dataset.

A full-resolution chest X-ray DICOM takes 5–800 ms to decode; a training step needs 50–300 images/s.
``medclipin preprocess`` therefore decodes every image once, normalises its geometry
(:func:`~medclipin.data.geometry.normalize_geometry`) and stores it as 8-bit pixels at a fixed size.

Cache layout (``CACHE/``)::

    cache.json         format, version, size, channels, domain, window, rows_per_shard
    shard_00000.u8     raw uint8 rows, each size × size × channels bytes (np.memmap-able)
    shard_00001.u8     ...
    index.json         source path → shard, row, source size + mtime_ns, original size, geometry
    rejects.csv        files that could not be read, with the reason (from the last run)

Why this format: a fixed-size row is addressed by arithmetic, so a random read is a page-cache
memcpy from a memory map (no decoder, no per-file open, no extra dependency). Shards keep files at a
manageable size (~256 MiB at 512² grey). The cost: a fixed size and 8 bits (enough for a network fed
8-bit-equivalent normalised inputs; the VOI window is applied before quantisation).

Example:
    >>> build_cache(["a.dcm", "b.png"], "cache/", size=512, domain="cxr", workers=2)
    >>> source = open_image_source(ImageConfig(), "cache/")
    >>> source.load("a.dcm").shape
    (512, 512)
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from medclipin.atomic import atomic_open
from medclipin.errors import MedclipinError
from medclipin.config import ImageConfig
from medclipin.data.geometry import DOMAINS, GeometryInfo, normalize_geometry
from medclipin.data.readers import ImageReadError, read_image

CACHE_FORMAT = "medclipin-image-cache"
CACHE_VERSION = 1
INDEX_FIELDS = ("shard", "row", "file_size", "mtime_ns", "height", "width", "x0", "y0", "x1", "y1", "scale", "pad_x", "pad_y")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class CacheError(MedclipinError, LookupError):
    """The cache is missing, incompatible with the configuration, or lacks an image (message says what to run)."""


def default_channels(domain: str) -> int:
    """Chest X-rays are grey (1 channel); fundus photographs are colour (3)."""
    return 3 if domain == "fundus" else 1


def _match_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1 and image.ndim == 3:
        if image.dtype == np.uint8:
            return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        return np.ascontiguousarray(image @ _LUMA, dtype=np.float32)
    if channels == 3 and image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def prepare_image(path: str, domain: str, size: int, channels: int, window: str = "first") -> tuple[np.ndarray, GeometryInfo]:
    """Decode, geometry-normalise and quantise one image: exactly what the cache stores.

    Returns:
        (uint8 array (size, size) or (size, size, 3), GeometryInfo original → output)

    Raises:
        ImageReadError: the file cannot be decoded.
    """
    pixels = read_image(path, window=window).pixels
    pixels = _match_channels(pixels, channels)
    # resize in float, quantise last: one rounding step only
    square, info = normalize_geometry(pixels, domain, size)
    return np.rint(square * np.float32(255.0)).astype(np.uint8), info


# ------------------------------------------------------------------------------------------ storage
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


def _write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_open(path, "w", fsync=True, encoding="utf-8") as handle:
        json.dump(payload, handle, separators=(",", ":"))


def read_cache_meta(cache_dir: str | os.PathLike) -> dict:
    """The cache's ``cache.json``; :class:`CacheError` when the folder is not a cache."""
    meta_path = Path(cache_dir) / "cache.json"
    if not meta_path.is_file():
        raise CacheError(f"{cache_dir} is not an image cache (no cache.json); build it with "
                         f"`medclipin preprocess --manifest MANIFEST --size 512 --out {cache_dir}`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise CacheError(f"{cache_dir}: unsupported cache format/version {meta.get('format')}/{meta.get('version')}; "
                         "rebuild it with `medclipin preprocess`")
    return meta


def read_cache_index(cache_dir: str | os.PathLike) -> dict[str, list]:
    """Source path → entry list (fields in ``INDEX_FIELDS`` order). Empty when no index yet."""
    index_path = Path(cache_dir) / "index.json"
    if not index_path.is_file():
        return {}
    payload = json.loads(index_path.read_text(encoding="utf-8"))
    if tuple(payload.get("fields", ())) != INDEX_FIELDS:
        raise CacheError(f"{index_path}: unexpected index fields; rebuild the cache with `medclipin preprocess`")
    return payload["entries"]


def cache_key(path: str | os.PathLike) -> str:
    """Index key of a source file: its absolute, normalised path (manifests hold absolute paths)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _decode_job(job: tuple[str, str, int, int, str]) -> tuple:
    """Worker: stat, decode, normalise one file. Returns (key, size, mtime, array|None, info|reason)."""
    key, domain, size, channels, window = job
    try:
        stat = os.stat(key)
    except OSError as exc:
        return key, 0, 0, None, f"cannot open ({exc.strerror or exc})"
    try:
        array, info = prepare_image(key, domain, size, channels, window)
    except ImageReadError as exc:
        return key, stat.st_size, stat.st_mtime_ns, None, str(exc)
    except Exception as exc:  # a decoder crash must not stop a 300k-image run; the file is rejected
        return key, stat.st_size, stat.st_mtime_ns, None, f"{key}: unexpected {type(exc).__name__}: {exc}"
    return key, stat.st_size, stat.st_mtime_ns, array, info


def _worker_init() -> None:
    # one decode per process: N processes × M OpenCV/OpenMP threads would oversubscribe the cores
    cv2.setNumThreads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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

    Returns:
        CacheSummary (counts, seconds, rejects). Rejected files are written to ``out_dir/rejects.csv``.
    """
    from tqdm import tqdm

    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    channels = channels or default_channels(domain)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "size": int(size), "channels": int(channels),
              "domain": domain, "window": window, "rows_per_shard": int(rows_per_shard)}
    if (out / "cache.json").is_file():
        meta = read_cache_meta(out)
        different = [k for k in ("size", "channels", "domain", "window") if meta.get(k) != wanted[k]]
        if different:
            raise CacheError(f"{out} holds a cache with different {', '.join(f'{k}={meta.get(k)}' for k in different)}; "
                             "use another --out folder (or delete this one)")
        rows_per_shard = int(meta["rows_per_shard"])
    else:
        _write_json_atomic(out / "cache.json", wanted)
    index = read_cache_index(out)
    row_bytes = int(size) * int(size) * int(channels)
    next_row = 1 + max((e[0] * rows_per_shard + e[1] for e in index.values()), default=-1)

    summary = CacheSummary()
    start = time.perf_counter()
    todo: list[str] = []
    seen: set[str] = set()
    for path in paths:
        key = cache_key(path)
        if key in seen:
            continue
        seen.add(key)
        entry = index.get(key)
        if entry is not None:
            try:
                stat = os.stat(key)
                if stat.st_size == entry[2] and stat.st_mtime_ns == entry[3]:
                    summary.reused += 1
                    continue
            except OSError:
                pass  # gone: the job below records the reason
        todo.append(key)
    summary.total = len(seen)

    handles: dict[int, int] = {}
    pending = 0
    last_flush = time.monotonic()

    def flush() -> None:
        # data before index: an index entry never points at rows that are not on disk
        for fd in handles.values():
            os.fsync(fd)
        _write_json_atomic(out / "index.json", {"fields": list(INDEX_FIELDS), "entries": index})

    def store(result: tuple) -> None:
        nonlocal next_row, pending, last_flush
        key, file_size, mtime_ns, array, info = result
        if array is None:
            summary.rejected += 1
            summary.rejects.append((key, info))
            return
        old = index.get(key)
        if old is not None:  # changed source: overwrite its row in place (rows have a fixed size)
            shard, row = old[0], old[1]
        else:
            shard, row = divmod(next_row, rows_per_shard)
            next_row += 1
        if shard not in handles:
            handles[shard] = os.open(out / f"shard_{shard:05d}.u8", os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(handles[shard], np.ascontiguousarray(array).tobytes(), row * row_bytes)
        index[key] = [shard, row, file_size, mtime_ns, *info.original_size, *info.crop,
                      info.scale, *info.pad]
        summary.decoded += 1
        pending += 1
        # batches grow with the index (O(N log N) bytes written overall) and are at most a minute apart
        if pending >= max(256, len(index) // 10) or time.monotonic() - last_flush > 60:
            flush()
            pending, last_flush = 0, time.monotonic()

    jobs = [(key, domain, int(size), int(channels), window) for key in todo]
    bar = tqdm(total=len(jobs), unit="img", desc="preprocess", disable=not progress, dynamic_ncols=True)
    try:
        if workers and workers > 1 and len(jobs) > 1:
            # forkserver/spawn, not fork: a forked child inherits OpenCV/OpenMP thread pools in an
            # undefined state and can deadlock in its first cv2.resize once the parent used them.
            method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(max_workers=workers, initializer=_worker_init,
                                     mp_context=multiprocessing.get_context(method)) as pool:
                chunk = max(1, min(16, len(jobs) // (workers * 8)))
                for result in pool.map(_decode_job, jobs, chunksize=chunk):
                    store(result)
                    bar.update(1)
        else:
            for job in jobs:
                store(_decode_job(job))
                bar.update(1)
    finally:
        bar.close()
        flush()
        for fd in handles.values():
            os.close(fd)
        _write_rejects(out / "rejects.csv", summary.rejects)
    summary.seconds = time.perf_counter() - start
    return summary


def _write_rejects(path: Path, rejects: list[tuple[str, str]]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows(rejects)


# -------------------------------------------------------------------------------------- the source
class ImageSource:
    """Where the dataset gets geometry-normalised images: the cache, or decoding on the fly.

    ``load(path)`` always returns **uint8**, (S, S) for ``channels == 1`` or (S, S, 3), where S is the
    cache's size (cache) or ``cfg.size`` (decoding). Both paths run :func:`prepare_image`, so a cached
    and an uncached run see the same pixels. Picklable: memory maps and the index open lazily in
    each process (DataLoader workers).
    """

    def __init__(self, cfg: ImageConfig, cache_dir: str = ""):
        self.cfg = cfg
        self.cache_dir = os.fspath(cache_dir) if cache_dir else ""
        self.channels = int(cfg.channels)
        self._meta: dict | None = None
        # path → position in _table (N × len(INDEX_FIELDS) float64): a compact in-memory index, since
        # every DataLoader worker holds its own copy (~100 B per image instead of a list per entry)
        self._index: dict[str, int] | None = None
        self._table: np.ndarray | None = None
        self._maps: dict[int, np.memmap] = {}
        if self.cache_dir:
            # validate in the main process, so a wrong folder fails before workers start
            self._meta = read_cache_meta(self.cache_dir)
            if self._meta["domain"] != cfg.domain:
                raise CacheError(f"{self.cache_dir} was built for domain {self._meta['domain']!r} but the config "
                                 f"says {cfg.domain!r}; run `medclipin preprocess --domain {cfg.domain}` into another folder")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_index"], state["_table"], state["_maps"] = None, None, {}  # reopened lazily in the worker
        return state

    @property
    def from_cache(self) -> bool:
        return bool(self.cache_dir)

    def _entry(self, path: str) -> np.ndarray:
        if self._index is None:
            entries = read_cache_index(self.cache_dir)
            self._table = np.array(list(entries.values()), dtype=np.float64).reshape(-1, len(INDEX_FIELDS))
            self._index = {key: i for i, key in enumerate(entries)}
        position = self._index.get(cache_key(path))
        if position is None:
            raise CacheError(f"{path} is not in the image cache {self.cache_dir}; run `medclipin preprocess "
                             f"--manifest MANIFEST --size {self._meta['size']} --domain {self._meta['domain']} "
                             f"--out {self.cache_dir}` for this manifest (or see {self.cache_dir}/rejects.csv)")
        return self._table[position]  # float64: exact for all fields the reader uses (not mtime_ns)

    def _row(self, shard: int, row: int) -> np.ndarray:
        meta = self._meta
        side, channels = int(meta["size"]), int(meta["channels"])
        shape_tail = (side, side) if channels == 1 else (side, side, channels)
        mapped = self._maps.get(shard)
        if mapped is None or row >= mapped.shape[0]:  # open (or reopen after the shard grew)
            file = Path(self.cache_dir) / f"shard_{shard:05d}.u8"
            rows = os.path.getsize(file) // (side * side * channels)
            mapped = np.memmap(file, dtype=np.uint8, mode="r", shape=(rows, *shape_tail))
            self._maps[shard] = mapped
        return np.array(mapped[row])  # a private copy: callers may modify it

    def load_with_geometry(self, path: str) -> tuple[np.ndarray, GeometryInfo]:
        """Like :meth:`load`, plus the mapping from original pixel coordinates to the returned image."""
        if not self.cache_dir:
            return prepare_image(path, self.cfg.domain, self.cfg.size, self.channels, self.cfg.window)
        entry = self._entry(path)
        image = _match_channels(self._row(int(entry[0]), int(entry[1])), self.channels)
        info = GeometryInfo(crop=tuple(int(v) for v in entry[6:10]), scale=float(entry[10]),
                            pad=tuple(int(v) for v in entry[11:13]), original_size=(int(entry[4]), int(entry[5])))
        return image, info

    def load(self, path: str) -> np.ndarray:
        """The geometry-normalised uint8 image of ``path``.

        Raises:
            CacheError: (cache) the path is not in the cache; the message says which command builds it.
            ImageReadError: (no cache) the file cannot be decoded.
        """
        return self.load_with_geometry(path)[0]


def open_image_source(cfg: ImageConfig, cache_dir: str = "") -> ImageSource:
    """The single image entry point of the dataset.

    Args:
        cfg: image configuration (domain, size, channels, window).
        cache_dir: a ``medclipin preprocess`` output folder, or ``""`` to decode originals on the fly.

    Returns:
        A picklable :class:`ImageSource`; ``source.load(path)`` returns a uint8 (S, S[, 3]) array.

    Example:
        >>> source = open_image_source(cfg.data.image, cfg.data.cache)
        >>> tensor = build_image_transform(cfg.data.image, train=True)(source.load(record.image_path))
    """
    return ImageSource(cfg, cache_dir)
