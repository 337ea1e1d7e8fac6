"""Replacing files and folders so that a crash never leaves a half-written one behind.

Outputs follow the umask like any file the user creates: ``tempfile.mkstemp``/``mkdtemp`` make 0600
files and 0700 folders, and some libraries write 0600 files (safetensors), so a staged file or folder
gets ``0666 & ~umask`` / ``0777 & ~umask`` before it is moved into place. On a shared lab server with
umask 002 or 022 that keeps models, checkpoints, manifests and caches readable by the group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

from medclipin.errors import MedclipinError


class OutputPathError(MedclipinError, OSError):
    """An output path cannot be written: it is a file where a folder is needed (or the reverse), or
    the folder it would go in is not writable. Raised before any work starts."""


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux ≥ 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the portable way: set and restore
    os.umask(mask)
    return mask


def _chmod_as_umask_allows(path: str | os.PathLike, is_dir: bool, mask: int) -> None:
    mode = 0o777 if is_dir else (0o777 if os.stat(path).st_mode & stat.S_IXUSR else 0o666)
    try:
        os.chmod(path, mode & ~mask)
    except OSError:  # e.g. a file system without Unix permissions: nothing to fix there
        pass


def apply_umask(path: str | os.PathLike) -> None:
    """Give a staged file, or a staged folder and everything in it, the permissions the umask allows
    (``0666``/``0777 & ~umask``; executables keep their execute bits). Symbolic links are left alone."""
    mask = current_umask()
    path = Path(path)
    if path.is_symlink():
        return
    if not path.is_dir():
        _chmod_as_umask_allows(path, False, mask)
        return
    _chmod_as_umask_allows(path, True, mask)
    for folder, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(folder, name)):
                _chmod_as_umask_allows(os.path.join(folder, name), True, mask)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _chmod_as_umask_allows(os.path.join(folder, name), False, mask)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, fsync: bool = False, **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` in one rename.

    A failure (or a kill) inside the ``with`` block leaves ``path`` as it was and removes the temporary
    file. The file gets the permissions the umask allows (``mkstemp`` would make it 0600).
    ``fsync`` flushes it to disk before the rename (for files that mark something complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
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

    The staging folder (typically from ``tempfile.mkdtemp``, 0700) and its contents first get the
    permissions the umask allows (:func:`apply_umask`). An existing ``directory`` is renamed aside,
    never deleted before the new one is in place, so a kill at any moment leaves either the old or
    the new folder complete (plus, at worst, a hidden ``.NAME.old`` that the next call removes).
    """
    apply_umask(staging)
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(staging, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, directory)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, target: Path) -> None:
    """Create and remove a file in ``folder``: the only test that also sees read-only mounts, ACLs and root squash."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".medclipin-write-test.")
    except OSError as exc:
        raise OutputPathError(f"{target}: cannot write in {folder} ({exc.strerror or exc})") from exc
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | os.PathLike) -> Path:
    """Fail now, not after the work, when ``path`` cannot be an output folder.

    Raises:
        OutputPathError: ``path`` (or a parent) exists and is not a folder, or the folder (or the
            nearest existing parent, when it is still to be made) is not writable.
    """
    path = Path(path)
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        what = "is a file" if existing == path.absolute() else f"cannot be made: {existing} is a file"
        raise OutputPathError(f"{path}: {what}; an output folder is needed")
    _probe_writable(existing, path)
    return path


def check_output_file(path: str | os.PathLike) -> Path:
    """Fail now, not after the work, when ``path`` cannot be written as a file.

    Raises:
        OutputPathError: ``path`` is a folder, a parent is a file, or its folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path}: is a folder; an output file is needed")
    existing = _nearest_existing(path.absolute().parent)
    if not existing.is_dir():
        raise OutputPathError(f"{path}: cannot be made: {existing} is a file")
    _probe_writable(existing, path)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (manifests a run or a report reads, named with their hash)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
