"""Replacing files and folders so that a crash never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
