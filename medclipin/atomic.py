"""Replacing files and folders so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` in one rename.

    A failure (or a kill) inside the ``with`` block leaves ``path`` as it was and removes the temporary
    file. The file gets mode 0644 (``mkstemp`` would make it 0600; manifests and caches are shared).
    ``fsync`` flushes it to disk before the rename (for files that mark something complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, mode, **open_kwargs) as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_directory(staging: Path, directory: Path) -> None:
    """Move the finished folder ``staging`` to ``directory``.

    An existing ``directory`` is first renamed aside, never deleted before the new one is in place,
    so a kill at any moment leaves either the old or the new folder complete (plus, at worst, a
    hidden ``.NAME.old`` that the next call removes).
    """
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)
