"""`medclipin preprocess` worker processes die with their parent, even when it is killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def _children() -> dict[int, list[int]]:
    """parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process tree from /proc")
@pytest.mark.timeout(180)
def test_sigkill_of_preprocess_leaves_no_process_behind(tmp_path):
    from medclipin.data.manifest import Record, write_manifest

    # work for a while: one large noisy 16-bit PNG under many names (each name is decoded)
    noise = np.random.default_rng(0).integers(0, 65535, (1400, 1400), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "big.png"), noise)
    records = []
    for i in range(400):
        link = tmp_path / "src" / f"{i:04d}.png"
        link.parent.mkdir(exist_ok=True)
        os.symlink(tmp_path / "big.png", link)
        records.append(Record(f"r{i}", f"p{i}", f"s{i}", str(link), "train"))
    manifest = write_manifest(tmp_path / "m.csv", records)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "medclipin", "preprocess", "--manifest", str(manifest),
                             "--size", "64", "--out", str(tmp_path / "cache"), "--workers", "2", "--quiet"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_descendants(proc.pid)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # two workers and the semaphore tracker (and a forkserver, if one is used)
        time.sleep(1.0)  # let the workers start decoding
        assert proc.poll() is None, "preprocess finished before it could be killed: give it more work"
        spawned = _descendants(proc.pid)
        assert len(spawned) >= 3, spawned
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while any(_alive(pid) for pid in spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
                for pid in spawned if _alive(pid)}
        assert not left, f"processes left after SIGKILL of preprocess: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _descendants(proc.pid) | (spawned if "spawned" in dir() else set()):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # only the processes this test started
