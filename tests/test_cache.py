"""Decode-once cache: build, read back, resume, redo changed files, rejects, the ImageSource entry point
(medclipin.data.image_source, image_cache, preprocess)."""

from __future__ import annotations

import csv
import os
import pickle

import cv2
import numpy as np
import pytest

from medclipin.config import ImageConfig
from medclipin.data import preprocess as preprocess_module
from medclipin.data.image_cache import CacheError
from medclipin.data.image_source import open_image_source, prepare_image
from medclipin.data.preprocess import build_cache


def _pngs(folder, count: int, shape=(40, 60)) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = np.full(shape, 10 * i, np.uint8)
        image[5:15, 5:15] = 255
        path = folder / f"img{i:03d}.png"
        cv2.imwrite(str(path), image)
        paths.append(str(path))
    return paths


def test_build_and_read_back_matches_decoding(tmp_path):
    paths = _pngs(tmp_path / "src", 5)
    summary = build_cache(paths, tmp_path / "cache", size=32, workers=0, rows_per_shard=2, progress=False)
    assert (summary.total, summary.decoded, summary.rejected) == (5, 5, 0)
    assert sorted(p.name for p in (tmp_path / "cache").glob("shard_*.u8")) == [
        "shard_00000.u8", "shard_00001.u8", "shard_00002.u8"]
    cached = open_image_source(ImageConfig(size=32), str(tmp_path / "cache"))
    decoded = open_image_source(ImageConfig(size=32))
    for path in paths:
        image = cached.load(path)
        assert image.dtype == np.uint8 and image.shape == (32, 32)
        np.testing.assert_array_equal(image, decoded.load(path))
    image, info = cached.load_with_geometry(paths[1])
    assert info.original_size == (40, 60) and info.pad == (0, 5)
    x, y = info.to_output((5, 5))  # the white square's corner
    assert image[int(y) + 1, int(x) + 1] == 255


def test_parallel_build_with_rejects(tmp_path):
    paths = _pngs(tmp_path / "src", 6)
    (tmp_path / "src" / "bad.png").write_text("not an image")
    paths += [str(tmp_path / "src" / "bad.png"), str(tmp_path / "src" / "missing.png"), paths[0]]
    summary = build_cache(paths, tmp_path / "cache", size=16, workers=2, progress=False)
    assert (summary.total, summary.decoded, summary.rejected) == (8, 6, 2)
    with open(tmp_path / "cache" / "rejects.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {os.path.basename(r["path"]) for r in rows} == {"bad.png", "missing.png"}
    assert all(r["reason"] for r in rows)


def test_resume_after_interruption_and_redo_changed(tmp_path, monkeypatch):
    paths = _pngs(tmp_path / "src", 6)
    real_job, calls = preprocess_module._decode_job, []

    def interrupted(job):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(job)
        return real_job(job)

    monkeypatch.setattr(preprocess_module, "_decode_job", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_cache(paths, tmp_path / "cache", size=16, progress=False)
    monkeypatch.setattr(preprocess_module, "_decode_job", real_job)
    resumed = build_cache(paths, tmp_path / "cache", size=16, progress=False)
    assert (resumed.reused, resumed.decoded) == (3, 3)

    cv2.imwrite(paths[0], np.full((40, 60), 200, np.uint8))  # new content (and size / mtime)
    os.utime(paths[0], ns=(1, 1))
    again = build_cache(paths, tmp_path / "cache", size=16, progress=False)
    assert (again.reused, again.decoded) == (5, 1)
    source = open_image_source(ImageConfig(size=16), str(tmp_path / "cache"))
    assert source.load(paths[0])[8, 8] == 200
    assert os.path.getsize(tmp_path / "cache" / "shard_00000.u8") == 6 * 16 * 16  # redone in place


def test_source_is_picklable_and_errors_are_clear(tmp_path):
    paths = _pngs(tmp_path / "src", 2)
    build_cache(paths[:1], tmp_path / "cache", size=16, progress=False)
    source = open_image_source(ImageConfig(size=16), str(tmp_path / "cache"))
    source.load(paths[0])  # opens the memmap in this process
    clone = pickle.loads(pickle.dumps(source))
    assert clone._cache._maps == {} and clone._cache._index is None and clone.load(paths[0]).shape == (16, 16)
    with pytest.raises(CacheError, match=r"img001\.png is not in the image cache.*medclipin preprocess"):
        clone.load(paths[1])
    with pytest.raises(CacheError, match="no cache.json"):
        open_image_source(ImageConfig(), str(tmp_path / "nowhere"))
    with pytest.raises(CacheError, match="domain"):
        open_image_source(ImageConfig(domain="fundus", channels=3), str(tmp_path / "cache"))
    with pytest.raises(CacheError, match="size=16"):
        build_cache(paths, tmp_path / "cache", size=32, progress=False)


def test_channels_follow_the_config(tmp_path):
    paths = _pngs(tmp_path / "src", 1)
    build_cache(paths, tmp_path / "cache", size=16, progress=False)
    assert open_image_source(ImageConfig(size=16, channels=3), str(tmp_path / "cache")).load(paths[0]).shape == (16, 16, 3)


def test_fundus_cache_from_real_photo(shared_data, tmp_path):
    path = str(shared_data / "fundus_rfmid" / "1.png")
    image, info = prepare_image(path, "fundus", 64, 3)
    assert image.shape == (64, 64, 3) and info.crop[0] > 200  # the black side borders were cropped
    summary = build_cache([path], tmp_path / "cache", size=64, domain="fundus", progress=False)
    assert summary.decoded == 1
    cfg = ImageConfig(domain="fundus", size=64, channels=3)
    np.testing.assert_array_equal(open_image_source(cfg, str(tmp_path / "cache")).load(path), image)


def test_preprocess_command(tmp_path, capsys):
    import argparse

    from medclipin.commands import preprocess
    from medclipin.data.manifest import Record, write_manifest

    paths = _pngs(tmp_path / "src", 3)
    (tmp_path / "src" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    records = [Record(record_id=f"r{i}", patient_id=f"p{i}", study_id=f"s{i}", image_path=p, split="train")
               for i, p in enumerate(paths + [str(tmp_path / "src" / "broken.png")])]
    write_manifest(tmp_path / "manifest.csv", records)
    parser = argparse.ArgumentParser()
    preprocess.add_arguments(parser)
    args = parser.parse_args(["--manifest", str(tmp_path / "manifest.csv"), "--size", "24", "--out",
                              str(tmp_path / "cache"), "--workers", "2", "--quiet"])
    assert preprocess.run(args) == 0
    output = capsys.readouterr().out
    assert "3 decoded" in output and "1 unreadable" in output and "rejects.csv" in output
    assert "broken.png" not in output  # paths may hold patient ids: only counts on the console
    source = open_image_source(ImageConfig(size=24), str(tmp_path / "cache"))
    assert source.load(paths[2]).shape == (24, 24)
    assert preprocess.run(args) == 0 and "3 already cached" in capsys.readouterr().out


@pytest.mark.slow
def test_io_benchmark_runs_and_reports(tmp_path, capsys):
    from medclipin.bench.io import run_io_benchmark

    result = run_io_benchmark(str(tmp_path / "io.json"), workers=1, size=64, repeats=1, cache_entries=8, reads=40)
    assert set(result["raw_dicom"]) == {"UNCR", "UNCI", "J2KR", "J2KI"}
    assert result["cache"]["entries"] == 8 and result["cache_vs_raw_dicom"] > 1
    assert (tmp_path / "io.json").is_file() and "cache vs mean raw DICOM" in capsys.readouterr().out


def test_pixel_limit_in_the_source_and_the_cache(tmp_path):
    """max_pixels reaches read_image from open_image_source (argument, or a config field of that name)
    and from build_cache / preprocess --max-pixels (a rejected file, with the reason)."""
    import dataclasses

    from medclipin.data.readers import ImageReadError

    paths = _pngs(tmp_path / "src", 1)  # 40 × 60 = 2,400 pixels
    with pytest.raises(ImageReadError, match=r"img000\.png: image is 60×40 .*max_pixels=2000\)"):
        open_image_source(ImageConfig(size=16), max_pixels=2000).load(paths[0])
    assert open_image_source(ImageConfig(size=16), max_pixels=0).load(paths[0]).shape == (16, 16)

    @dataclasses.dataclass
    class ConfigWithLimit(ImageConfig):  # what the lead adds as data.image.max_pixels
        max_pixels: int = 2000

    with pytest.raises(ImageReadError, match="max_pixels=2000"):
        open_image_source(ConfigWithLimit(size=16)).load(paths[0])
    assert open_image_source(ConfigWithLimit(size=16), max_pixels=2400).load(paths[0]).shape == (16, 16)
    with pytest.raises(ValueError, match="max_pixels"):
        open_image_source(ImageConfig(), max_pixels=-1)
    summary = build_cache(paths, tmp_path / "cache", size=16, progress=False, max_pixels=2000)
    assert summary.rejected == 1 and "max_pixels=2000" in summary.rejects[0][1]


def test_loading_a_rejected_file_names_the_original_reason(tmp_path):
    """A file preprocess rejected is not 'missing from the cache': re-running preprocess cannot help."""
    from medclipin.data.readers import ImageReadError

    paths = _pngs(tmp_path / "src", 1)
    (tmp_path / "src" / "bad.png").write_text("a report, not an image")
    (tmp_path / "src" / "empty.dcm").write_bytes(b"")
    build_cache([*paths, tmp_path / "src" / "bad.png", tmp_path / "src" / "empty.dcm"], tmp_path / "cache",
                size=16, progress=False)
    source = open_image_source(ImageConfig(size=16), str(tmp_path / "cache"))
    with pytest.raises(ImageReadError, match=r"bad\.png: rejected by medclipin preprocess .*: not a DICOM, PNG or JPEG"):
        source.load(str(tmp_path / "src" / "bad.png"))
    with pytest.raises(ImageReadError, match=r"empty\.dcm: rejected .*: empty file \(0 bytes\)") as info:
        source.load(str(tmp_path / "src" / "empty.dcm"))
    assert "run `medclipin preprocess" not in str(info.value)
    with pytest.raises(CacheError, match="is not in the image cache"):  # never seen by preprocess
        source.load(str(tmp_path / "src" / "other.png"))


def test_a_cache_of_another_dicom_window_is_refused_and_a_smaller_one_is_named(tmp_path, caplog):
    """Pre-flight (issue 25): a cache holds the pixels of one DICOM window; a config with another would train
    on other pixels than it says. A cache smaller than data.image.size is enlarged: said once."""
    import logging

    paths = _pngs(tmp_path / "png", 1)
    build_cache(paths, tmp_path / "cache", size=16, window="percentile", progress=False)
    with pytest.raises(CacheError, match=r"built with DICOM window 'percentile' but the config says 'first'"):
        open_image_source(ImageConfig(size=16), tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="medclipin.data.image_source"):
        open_image_source(ImageConfig(size=32, window="percentile"), tmp_path / "cache")
    assert "holds 16 px images, smaller than data.image.size=32" in caplog.text
