"""Atomic writes: a failure inside the block leaves the old file and no temporary behind."""

import stat

import pytest

from medclipin.atomic import atomic_open


def test_atomic_open_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "sub" / "manifest.csv"
    with atomic_open(path, "w", fsync=True) as handle:
        handle.write("first\n")
    assert path.read_text() == "first\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # shared files are readable by others

    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write("half of the second")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "first\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.csv"]  # no temporary left
