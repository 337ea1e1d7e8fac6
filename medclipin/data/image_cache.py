"""The decode-once image cache on disk, as written by ``medclipin preprocess``: layout, index, rejects.

Layout (``CACHE/``)::

    cache.json         format, version, size, channels, domain, window, rows_per_shard
    shard_00000.u8     raw uint8 rows, each size × size × channels bytes (np.memmap-able)
    shard_00001.u8     ...
    index.json         source path → shard, row, source size + mtime_ns, original size, geometry
    rejects.csv        files that could not be read, with the reason (from the last run)

Why this format: a fixed-size row is addressed by arithmetic, so a random read is a page-cache
memcpy from a memory map (no decoder, no per-file open, no extra dependency). Shards keep files at a
manageable size (~256 MiB at 512² grey). The cost: a fixed size and 8 bits (enough for a network fed
8-bit-equivalent normalised inputs; the VOI window is applied before quantisation).

This module stores and finds bytes only: :mod:`medclipin.data.preprocess` decodes images into it
(:class:`CacheWriter`) and :mod:`medclipin.data.image_source` reads them back (:class:`CacheReader`).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from medclipin.atomic import atomic_open
from medclipin.data.geometry import GeometryInfo
from medclipin.data.reader_base import ImageReadError
from medclipin.errors import MedclipinError
from medclipin.safe_parse import load_json

CACHE_FORMAT = "medclipin-image-cache"
CACHE_VERSION = 1
INDEX_FIELDS = ("shard", "row", "file_size", "mtime_ns", "height", "width", "x0", "y0", "x1", "y1", "scale", "pad_x", "pad_y")
# the settings that decide the stored pixels: a cache is only reused when all of them match
PIXEL_SETTINGS = ("size", "channels", "domain", "window")


class CacheError(MedclipinError, LookupError):
    """The cache is missing, incompatible with the configuration, or lacks an image (message says what to run)."""


def cache_key(path: str | os.PathLike) -> str:
    """Index key of a source file: its absolute, normalised path (manifests hold absolute paths)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _read_json(path: Path):
    try:
        return load_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise CacheError(f"{path}: cannot be read ({exc}); rebuild the cache with `medclipin preprocess`") from None


def read_cache_meta(cache_dir: str | os.PathLike) -> dict:
    """The cache's ``cache.json``; :class:`CacheError` when the folder is not a cache."""
    meta_path = Path(cache_dir) / "cache.json"
    if not meta_path.is_file():
        raise CacheError(f"{cache_dir} is not an image cache (no cache.json); build it with "
                         f"`medclipin preprocess --manifest MANIFEST --size 512 --out {cache_dir}`")
    meta = _read_json(meta_path)
    meta = meta if isinstance(meta, dict) else {}
    if meta.get("format") != CACHE_FORMAT or meta.get("version") != CACHE_VERSION:
        raise CacheError(f"{cache_dir}: unsupported cache format/version {meta.get('format')}/{meta.get('version')}; "
                         "rebuild it with `medclipin preprocess`")
    return meta


def read_cache_index(cache_dir: str | os.PathLike) -> dict[str, list]:
    """Source path → entry list (fields in ``INDEX_FIELDS`` order). Empty when no index yet."""
    index_path = Path(cache_dir) / "index.json"
    if not index_path.is_file():
        return {}
    payload = _read_json(index_path)
    if not isinstance(payload, dict) or tuple(payload.get("fields", ())) != INDEX_FIELDS:
        raise CacheError(f"{index_path}: unexpected index fields; rebuild the cache with `medclipin preprocess`")
    return payload["entries"]


def read_rejects(cache_dir: str | os.PathLike) -> dict[str, str]:
    """Source path → why the last ``medclipin preprocess`` run could not decode it (``rejects.csv``)."""
    path = Path(cache_dir) / "rejects.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["path"]: row["reason"] for row in csv.DictReader(handle) if row.get("path")}


def _write_json_atomic(path: Path, payload: dict) -> None:
    with atomic_open(path, "w", fsync=True, encoding="utf-8") as handle:
        json.dump(payload, handle, separators=(",", ":"))


def _write_rejects(path: Path, rejects: list[tuple[str, str]]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "reason"])
        writer.writerows(rejects)


class CacheWriter:
    """Adds decoded images to a cache folder (created, or resumed when its settings match).

    Rows are written in place with ``pwrite``; the index is flushed in batches, always after the
    shard data it points at, so an interrupted run leaves a consistent cache that the next run resumes.

    Args:
        out_dir: the cache folder.
        settings: ``size``, ``channels``, ``domain``, ``window`` of the stored pixels.
        rows_per_shard: images per shard file (a resumed cache keeps its own).

    Raises:
        CacheError: the folder cannot be created, or holds a cache with other settings.
    """

    def __init__(self, out_dir: str | os.PathLike, settings: dict, rows_per_shard: int = 1024):
        self.out = Path(out_dir)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"{self.out}: cannot create the cache folder ({exc.strerror or exc})") from exc
        wanted = {"format": CACHE_FORMAT, "version": CACHE_VERSION, **{k: settings[k] for k in PIXEL_SETTINGS},
                  "rows_per_shard": int(rows_per_shard)}
        if (self.out / "cache.json").is_file():
            meta = read_cache_meta(self.out)
            different = [k for k in PIXEL_SETTINGS if meta.get(k) != wanted[k]]
            if different:
                raise CacheError(f"{self.out} holds a cache with different "
                                 f"{', '.join(f'{k}={meta.get(k)}' for k in different)}; "
                                 "use another --out folder (or delete this one)")
            rows_per_shard = int(meta["rows_per_shard"])
        else:
            _write_json_atomic(self.out / "cache.json", wanted)
        self.rows_per_shard = rows_per_shard
        self.row_bytes = int(settings["size"]) ** 2 * int(settings["channels"])
        self.index = read_cache_index(self.out)
        self._next_row = 1 + max((e[0] * rows_per_shard + e[1] for e in self.index.values()), default=-1)
        self._handles: dict[int, int] = {}

    def is_current(self, key: str) -> bool:
        """True when ``key`` is cached and its source's size and mtime are unchanged."""
        entry = self.index.get(key)
        if entry is None:
            return False
        try:
            stat = os.stat(key)
        except OSError:
            return False  # gone: decoding it again records the reason
        return stat.st_size == entry[2] and stat.st_mtime_ns == entry[3]

    def put(self, key: str, file_size: int, mtime_ns: int, array: np.ndarray, info: GeometryInfo) -> None:
        """Store one image (a changed source overwrites its old row in place: rows have a fixed size)."""
        old = self.index.get(key)
        if old is not None:
            shard, row = old[0], old[1]
        else:
            shard, row = divmod(self._next_row, self.rows_per_shard)
            self._next_row += 1
        if shard not in self._handles:
            self._handles[shard] = os.open(self.out / f"shard_{shard:05d}.u8", os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides
        os.pwrite(self._handles[shard], np.ascontiguousarray(array).tobytes(), row * self.row_bytes)
        self.index[key] = [shard, row, file_size, mtime_ns, *info.original_size, *info.crop, info.scale, *info.pad]

    def flush(self) -> None:
        """Make the rows written so far durable, then the index that points at them."""
        for fd in self._handles.values():
            os.fsync(fd)
        _write_json_atomic(self.out / "index.json", {"fields": list(INDEX_FIELDS), "entries": self.index})

    def close(self, rejects: list[tuple[str, str]]) -> None:
        """Flush, close the shards and write ``rejects.csv`` (path, reason) for this run."""
        try:
            self.flush()
        finally:
            for fd in self._handles.values():
                os.close(fd)
            self._handles.clear()
            _write_rejects(self.out / "rejects.csv", rejects)


class CacheReader:
    """Reads cached images by source path. Picklable: the index and memory maps open lazily in
    each process (DataLoader workers), and a pickled reader carries neither.

    Raises:
        CacheError: ``cache_dir`` is not a cache (at construction), or a path is not in it.
        ImageReadError: the path was rejected when the cache was built (the message gives the reason).
    """

    def __init__(self, cache_dir: str | os.PathLike):
        self.cache_dir = os.fspath(cache_dir)
        self.meta = read_cache_meta(self.cache_dir)
        # path → position in _table (N × len(INDEX_FIELDS) float64): a compact in-memory index, since
        # every DataLoader worker holds its own copy (~100 B per image instead of a list per entry)
        self._index: dict[str, int] | None = None
        self._table: np.ndarray | None = None
        self._maps: dict[int, np.memmap] = {}
        self._rejects: dict[str, str] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # reopened lazily in the worker
        state["_index"], state["_table"], state["_maps"], state["_rejects"] = None, None, {}, None
        return state

    def _missing(self, path: str) -> MedclipinError:
        """Why ``path`` has no row: rejected by preprocess (with its reason), or never cached."""
        if self._rejects is None:
            self._rejects = read_rejects(self.cache_dir)
        key = cache_key(path)
        reason = self._rejects.get(key)
        if reason is not None:
            reason = reason[len(key) + 2:] if reason.startswith(key + ": ") else reason  # the path is named once
            return ImageReadError(f"{path}: rejected by medclipin preprocess when the cache {self.cache_dir} was "
                                  f"built: {reason}")
        meta = self.meta
        return CacheError(f"{path} is not in the image cache {self.cache_dir}; run `medclipin preprocess "
                          f"--manifest MANIFEST --size {meta['size']} --domain {meta['domain']} "
                          f"--out {self.cache_dir}` for this manifest")

    def _entry(self, path: str) -> np.ndarray:
        if self._index is None:
            entries = read_cache_index(self.cache_dir)
            self._table = np.array(list(entries.values()), dtype=np.float64).reshape(-1, len(INDEX_FIELDS))
            self._index = {key: i for i, key in enumerate(entries)}
        position = self._index.get(cache_key(path))
        if position is None:
            raise self._missing(path)
        return self._table[position]  # float64: exact for all fields the reader uses (not mtime_ns)

    def _row(self, shard: int, row: int) -> np.ndarray:
        side, channels = int(self.meta["size"]), int(self.meta["channels"])
        shape_tail = (side, side) if channels == 1 else (side, side, channels)
        mapped = self._maps.get(shard)
        if mapped is None or row >= mapped.shape[0]:  # open (or reopen after the shard grew)
            file = Path(self.cache_dir) / f"shard_{shard:05d}.u8"
            rows = os.path.getsize(file) // (side * side * channels)
            mapped = np.memmap(file, dtype=np.uint8, mode="r", shape=(rows, *shape_tail))
            self._maps[shard] = mapped
        return np.array(mapped[row])  # a private copy: callers may modify it

    def read(self, path: str) -> tuple[np.ndarray, GeometryInfo]:
        """The stored uint8 image of ``path`` (cache size, cache channels) and its geometry."""
        entry = self._entry(path)
        image = self._row(int(entry[0]), int(entry[1]))
        info = GeometryInfo(crop=tuple(int(v) for v in entry[6:10]), scale=float(entry[10]),
                            pad=tuple(int(v) for v in entry[11:13]), original_size=(int(entry[4]), int(entry[5])))
        return image, info
