"""Image input benchmark: raw decode per DICOM transfer syntax and PNG, against the decode-once cache.

Measures images/s of the full ``read_image`` path on the real RG1 chest radiograph (pydicom-data,
1955×1841, 15-bit) in four transfer syntaxes, on PNG chest X-rays, and of the training read path with
a cache (random ``ImageSource.load`` + evaluation transform at ``size`` px), with ``workers`` processes.

Example:
    >>> result = run_io_benchmark("io.json", workers=2)
    >>> result["cache_vs_raw_dicom"] >= 10
    True
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

RG1_SYNTAXES = ("UNCR", "UNCI", "J2KR", "J2KI")
TARGET_CACHE_VS_RAW = 10.0
_SHARED_CXR_PNG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr_png"

# per-process state of the cache-read workers (built once per process, not per task)
_WORKER_STATE: dict = {}


def _decode_task(path: str) -> int:
    from medclipin.data.readers import read_image

    read_image(path)
    return 1


def _cache_read_task(cache_dir: str, size: int, keys: list[str]) -> int:
    from medclipin.config import ImageConfig
    from medclipin.data.image_source import open_image_source
    from medclipin.data.transforms import build_image_transform

    state_key = (cache_dir, size)
    if _WORKER_STATE.get("key") != state_key:
        cfg = ImageConfig(size=size)
        _WORKER_STATE.update(key=state_key, source=open_image_source(cfg, cache_dir),
                             transform=build_image_transform(cfg, train=False))
    source, transform = _WORKER_STATE["source"], _WORKER_STATE["transform"]
    for key in keys:
        transform(source.load(key))
    return len(keys)


def _noop(_: int) -> int:
    return 0


class _Runner:
    """Runs tasks in this process (workers <= 1) or in a warm process pool, and times them."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.pool = None
        if self.workers > 1:
            from medclipin.data.preprocess import process_pool

            self.pool = process_pool(self.workers)  # workers end with this process, even on SIGKILL
            list(self.pool.map(_noop, range(self.workers * 2)))  # start the processes before timing

    def rate(self, fn, tasks: list[tuple]) -> float:
        """Images per second over ``tasks`` (each returns how many images it handled)."""
        start = time.perf_counter()
        if self.pool is None:
            count = sum(fn(*task) for task in tasks)
        else:
            count = sum(self.pool.map(fn, *zip(*tasks)))
        return count / (time.perf_counter() - start)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _png_sources(tmp: Path) -> tuple[list[str], str]:
    pngs = sorted(str(p) for p in _SHARED_CXR_PNG.glob("*.png")) if _SHARED_CXR_PNG.is_dir() else []
    if pngs:
        return pngs, "shared cxr_png (512², 8-bit)"
    import cv2

    rng = np.random.default_rng(0)
    made = []
    for i in range(2):  # a 16-bit radiograph-sized stand-in
        image = cv2.GaussianBlur(rng.integers(0, 4096, (2048, 2048)).astype(np.float32), (0, 0), 8)
        path = tmp / f"generated_{i}.png"
        cv2.imwrite(str(path), (image * 16).astype(np.uint16))
        made.append(str(path))
    return made, "generated 16-bit PNG (2048²)"


def run_io_benchmark(out_json: str | None, workers: int, size: int = 224, repeats: int = 3,
                     cache_entries: int = 256, reads: int = 2000, verbose: bool = True) -> dict:
    """Measure images/s: raw DICOM per transfer syntax, PNG, and cache read + eval transform.

    Args:
        out_json: write the result here (None: do not write).
        workers: processes used for every measurement (≤ 1: this process).
        size: image side of the cache and the transform.
        repeats: decodes per file for the raw measurements (per worker).
        cache_entries: entries in the temporary cache (links to the measured files under distinct names).
        reads: random cache reads timed.
        verbose: print the table.

    Returns:
        dict with ``raw_dicom`` (per syntax: images_per_s, ms_per_image_per_worker, transfer_syntax),
        ``png``, ``cache`` (build and read rates), ``raw_dicom_mean_images_per_s``, ``cache_vs_raw_dicom``
        (cache read rate / mean raw-DICOM rate), ``target`` and ``workers``.
    """
    from pydicom.data import get_testdata_file

    from medclipin.data.preprocess import build_cache
    from medclipin.data.readers import read_image

    workers = max(1, int(workers))
    runner = _Runner(workers)
    result: dict = {"workers": workers, "size": size, "cpu_count": os.cpu_count(), "raw_dicom": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="medclipin-io-") as tmp_name:
            tmp = Path(tmp_name)
            dicoms = {}
            for key in RG1_SYNTAXES:
                path = get_testdata_file(f"RG1_{key}.dcm", download=False)
                if path is None:
                    raise RuntimeError("pydicom-data is not installed (pip install pydicom-data): the RG1 files are needed")
                dicoms[key] = path
            for key, path in dicoms.items():
                meta = read_image(path).meta
                runner.rate(_decode_task, [(path,)] * workers)  # warm-up: decoder plugin imports in each worker
                rate = runner.rate(_decode_task, [(path,)] * (repeats * workers))
                result["raw_dicom"][key] = {"transfer_syntax": meta.transfer_syntax, "images_per_s": rate,
                                            "ms_per_image_per_worker": 1000.0 * workers / rate,
                                            "shape": list(meta.original_size)}
            pngs, png_label = _png_sources(tmp)
            runner.rate(_decode_task, [(pngs[0],)] * workers)
            rate = runner.rate(_decode_task, [(p,) for p in pngs] * (repeats * workers * 4))
            result["png"] = {"source": png_label, "images_per_s": rate, "ms_per_image_per_worker": 1000.0 * workers / rate}

            # a cache of a few hundred entries: distinct names (symlinks) for the fast-to-decode files
            sources = [dicoms["UNCR"], dicoms["UNCI"], *pngs]
            links = []
            for i in range(cache_entries):
                link = tmp / "src" / f"{i:05d}{Path(sources[i % len(sources)]).suffix}"
                link.parent.mkdir(exist_ok=True)
                os.symlink(sources[i % len(sources)], link)
                links.append(str(link))
            summary = build_cache(links, tmp / "cache", size=size, workers=workers if workers > 1 else 0,
                                  progress=False)
            rng = random.Random(0)
            keys = [rng.choice(links) for _ in range(reads)]
            chunk = 100
            tasks = [(str(tmp / "cache"), size, keys[i:i + chunk]) for i in range(0, len(keys), chunk)]
            runner.rate(_cache_read_task, tasks[: max(1, workers)])  # warm: index load + memmap per process
            rate = runner.rate(_cache_read_task, tasks)
            result["cache"] = {"entries": summary.total, "build_images_per_s": summary.decoded / summary.seconds,
                               "read_transform_images_per_s": rate, "ms_per_image_per_worker": 1000.0 * workers / rate}
    finally:
        runner.close()
    raw_mean = float(np.mean([v["images_per_s"] for v in result["raw_dicom"].values()]))
    result["raw_dicom_mean_images_per_s"] = raw_mean
    result["cache_vs_raw_dicom"] = result["cache"]["read_transform_images_per_s"] / raw_mean
    result["target"] = {"cache_vs_raw_dicom": TARGET_CACHE_VS_RAW,
                        "met": result["cache_vs_raw_dicom"] >= TARGET_CACHE_VS_RAW}
    if verbose:
        print(format_io_table(result))
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def format_io_table(result: dict) -> str:
    """A small text table of a :func:`run_io_benchmark` result."""
    lines = [f"image input, {result['workers']} worker(s), {result['size']} px", f"{'path':<44} {'images/s':>9} {'ms/img/worker':>14}"]
    for key, row in result["raw_dicom"].items():
        lines.append(f"{'DICOM RG1_' + key + ' ' + row['transfer_syntax']:<44.44} {row['images_per_s']:>9.1f} "
                     f"{row['ms_per_image_per_worker']:>14.1f}")
    png = result["png"]
    lines.append(f"{'PNG ' + png['source']:<44.44} {png['images_per_s']:>9.1f} {png['ms_per_image_per_worker']:>14.1f}")
    cache = result["cache"]
    lines.append(f"{'cache read + eval transform':<44} {cache['read_transform_images_per_s']:>9.1f} "
                 f"{cache['ms_per_image_per_worker']:>14.2f}")
    lines.append(f"cache build (preprocess): {cache['build_images_per_s']:.1f} images/s over {cache['entries']} entries")
    lines.append(f"cache vs mean raw DICOM: {result['cache_vs_raw_dicom']:.1f}x "
                 f"(target >= {result['target']['cache_vs_raw_dicom']:.0f}x: {'met' if result['target']['met'] else 'NOT met'})")
    return "\n".join(lines)
