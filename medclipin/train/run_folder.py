"""The run folder: who may write in it, and what a resume may change.

Three promises, kept here before a run writes anything into ``RUN``:

* **Nothing the user made is deleted or overwritten.** A fresh run needs a folder that does not exist
  or is empty; a resume needs a medclipin run folder (one that holds its lock file or checkpoints).
  Any other folder is refused in one line naming it.
* **One run at a time.** ``RUN/.medclipin.lock`` is locked with ``fcntl.flock`` for the whole run; a
  second run on the folder fails at once, naming the process that holds it. The operating system
  releases the lock when that process ends, however it ends (``kill -9`` too), so a killed run never
  leaves a stale lock. Under DDP only rank 0 takes it. Whatever deletes inside the folder (staging
  folders of interrupted saves, the logs of a run killed before its first checkpoint) runs under it.
* **A resume continues the run that ``RUN/config.yaml`` describes.** A configuration that would change
  the run's math is refused, listing the changed keys; keys that only change how the run is watched,
  paced or stored (:data:`RESUME_MAY_CHANGE`) may differ. ``config.yaml`` is written once, by the run
  that starts the folder, and never rewritten by a resume.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any

from medclipin.atomic import check_output_dir, file_sha256
from medclipin.config import Config, ConfigError, config_from_dict, config_to_dict, load_config, save_config
from medclipin.errors import MedclipinError

log = logging.getLogger(__name__)

LOCK_NAME = ".medclipin.lock"
# flock errors that mean "this file system has no locks", not "someone holds it"
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP}
CONFIG_NAME = "config.yaml"

# What a resume may change: how the run is logged, checkpointed, validated, paced and stored, never what it
# computes. Everything else (data, model, objective, optimiser, schedule, seed, precision, device) is the
# run's math. A prefix covers its whole section ("eval": every eval.* key).
RESUME_MAY_CHANGE = (
    "train.log_every",                 # how often a metrics row is written
    "train.checkpoint_every",          # how often a checkpoint is written
    "train.keep_checkpoints",          # how many are kept
    "train.validate_every",            # validation runs in eval mode on the main process: no effect on training
    "train.max_nonfinite_steps",       # when a diverging run is stopped
    "train.threads",                   # CPU threads (bit-identical results need the same count: docs/reliability.md)
    "train.retain_freed_memory",       # how the C allocator reuses memory: the same kernels, the same numbers
    "train.compile",                   # torch.compile: the same computation, other kernels
    "train.deterministic",             # deterministic kernels: the same computation, slower
    "data.num_workers",                # augmentation is a function of (seed, epoch, index), not of the worker
    "data.max_bad_fraction",           # when a run with unreadable images is stopped
    "model.image_encoder.grad_checkpointing",  # memory for compute: the same gradients
    "model.text_encoder.grad_checkpointing",
    "eval",                            # validation prompts and evaluation settings
)


class RunFolderError(MedclipinError, OSError):
    """The run folder cannot be used as asked; the message names it and what to do."""


class RunFolderNotEmptyError(RunFolderError, FileExistsError):
    """A fresh run was pointed at a folder that already holds files."""


class RunFolderInUseError(RunFolderError):
    """Another process holds the run folder's lock."""


class ResumeConfigError(MedclipinError, ValueError):
    """A resume with a configuration that changes the run's math."""


# ------------------------------------------------------------------------------------------------ lock
class RunLock:
    """An exclusive ``fcntl.flock`` on ``RUN/.medclipin.lock``, held until :meth:`release` or the end of
    the process. The file holds the holder's pid and host, for the message another run gets."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        """Take the lock now (creating the folder if needed) or raise :class:`RunFolderInUseError` (never waits)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a POSIX system: runs are not locked
            log.warning("%s: no fcntl on this platform: the run folder is not locked", self.run_dir)
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderInUseError(
                f"{self.run_dir}: in use by another medclipin run ({holder}); wait for it to end or stop it, "
                "or choose another folder (the lock goes when that process ends)") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                os.close(fd)
                raise
            # e.g. Lustre mounted without -o flock: run unlocked rather than not at all, and say so
            log.warning("%s: the file system does not support locks (%s): this run folder is not protected "
                        "against a second run", self.run_dir, exc.strerror)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:  # no locks on this file system (see acquire); closing is what matters
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "pid unknown"


# --------------------------------------------------------------------------------------- ownership
def _entries(run_dir: Path) -> list[str]:
    """What the folder holds, its own lock file aside."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir() if p.name != LOCK_NAME)


def is_run_folder(run_dir: str | os.PathLike) -> bool:
    """A folder a medclipin run has started in (its lock file) or written checkpoints to (older versions)."""
    from medclipin.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    return (run_dir / LOCK_NAME).is_file() or bool(list_checkpoints(run_dir))


def check_folder(run_dir: str | os.PathLike, resume: str) -> None:
    """Refuse a folder this run may not write in (read-only: nothing is created).

    A fresh run (``resume == ""``) needs a folder that does not exist or is empty (its lock file aside);
    a resume, a new or empty folder or a medclipin run folder.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: is a file; a run needs a folder")
    entries = _entries(run_dir)
    if not entries:
        return
    shown = ", ".join(entries[:4]) + (", …" if len(entries) > 4 else "")
    if not resume:
        what = "already holds a medclipin run" if is_run_folder(run_dir) else "is not empty"
        raise RunFolderNotEmptyError(
            f"{run_dir}: {what} ({shown}) and a new run never overwrites files: choose a new or empty folder, "
            "or pass --resume auto (resume='auto') to continue the medclipin run in it")
    if not is_run_folder(run_dir):
        raise RunFolderNotEmptyError(
            f"{run_dir}: not a medclipin run folder ({shown}): nothing to resume there, and its files are left "
            "alone; choose a new or empty folder")


# ---------------------------------------------------------------------------------- pinned config
def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(values, dict):
        flat: dict[str, Any] = {}
        for key, value in values.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat or {prefix[:-1]: {}}
    return {prefix[:-1]: values}


def may_change_on_resume(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUME_MAY_CHANGE)


_MISSING = object()


def changed_math(saved: Config, new: Config) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key that differs and may not change on a resume."""
    before, after = _flatten(config_to_dict(saved)), _flatten(config_to_dict(new))
    changes = []
    for key in sorted(set(before) | set(after)):
        old, value = before.get(key, _MISSING), after.get(key, _MISSING)
        if old != value and not may_change_on_resume(key):
            changes.append((key, old, value))
    return changes


def _short(value: Any) -> str:
    text = "(absent)" if value is _MISSING else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume_config(run_dir: str | os.PathLike, cfg: Config) -> None:
    """Refuse to resume ``run_dir`` with a configuration that changes its math (nothing to check before the
    run has written its ``config.yaml``)."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return
    try:
        saved = load_config(path)
    except ConfigError as exc:
        raise ResumeConfigError(f"{path}: the run's configuration cannot be read, so a resume cannot be checked "
                                f"against it ({exc}); start a new run folder") from None
    changes = changed_math(saved, cfg)
    if changes:
        listed = "; ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in changes[:8])
        more = f" (and {len(changes) - 8} more)" if len(changes) > 8 else ""
        raise ResumeConfigError(
            f"{path}: resuming would change the run's math ({listed}{more}). Resume with the run's own settings, "
            f"or continue from a checkpoint in a new folder (--resume {Path(run_dir) / 'checkpoints' / 'step_N'} "
            "--out NEW_FOLDER)")


def check_resume_state(run_dir: str | os.PathLike, checkpoint: Path, state: dict, cfg: Config,
                       manifest_sha256: str) -> None:
    """Refuse to continue a run in its own folder on other data or other math than its checkpoint was trained
    with: the manifest's bytes (its SHA-256: a manifest edited in place keeps its path), and the configuration
    kept in the checkpoint (which still holds when ``RUN/config.yaml`` was deleted). A checkpoint continued in a
    new folder (``--resume CHECKPOINT --out NEW``) may change both. Checkpoints of older versions, which keep
    neither, are not checked."""
    if Path(checkpoint).resolve().parent.parent != Path(run_dir).resolve():
        return
    saved_hash = state.get("manifest_sha256")
    if saved_hash and saved_hash != manifest_sha256:
        raise ResumeConfigError(
            f"{cfg.data.manifest}: changed since this run's checkpoint {Path(checkpoint).name} was written "
            f"(SHA-256 {saved_hash[:12]}... then, {manifest_sha256[:12]}... now), and a resume must read the same "
            "records. Restore the manifest, or continue from the checkpoint in a new folder "
            f"(--resume {checkpoint} --out NEW_FOLDER)")
    saved = state.get("config")
    if isinstance(saved, dict):
        try:
            saved_cfg = config_from_dict(saved)
        except ConfigError:
            return  # a configuration of another version: RUN/config.yaml (check_resume_config) is the check
        changes = changed_math(saved_cfg, cfg)
        if changes:
            listed = "; ".join(f"{key}: {_short(old)} -> {_short(new)}" for key, old, new in changes[:8])
            raise ResumeConfigError(
                f"{checkpoint}: resuming would change the run's math ({listed}). Resume with the run's own "
                f"settings, or continue from the checkpoint in a new folder (--resume {checkpoint} --out NEW_FOLDER)")


def write_config(run_dir: str | os.PathLike, cfg: Config) -> bool:
    """Write ``RUN/config.yaml`` unless the run already has one (a resume never rewrites it). True when written."""
    path = Path(run_dir) / CONFIG_NAME
    if path.exists():
        return False
    save_config(cfg, path)
    return True


# ------------------------------------------------------------------------------------------ claim
# the staging names of what a run writes (medclipin.atomic: mkdtemp ".NAME.tmpXXXX", mkstemp ".NAME.XXXX.tmp",
# replace_directory's ".NAME.old"); nothing else in the folder is ever removed
_OWN = ("model", "best", "tokenizer", "config.yaml", "metrics.csv", "rejects.csv", "validation.jsonl")
_STAGING = re.compile(r"^\.(%s)\.(tmp.*|.*\.tmp|old)$" % "|".join(re.escape(name) for name in _OWN))
_CHECKPOINT_STAGING = re.compile(r"^\.step_\d{8}\.(tmp.*|old)$")


def remove_interrupted_saves(run_dir: Path) -> None:
    """Staging files and folders left by saves that were killed (checkpoints, the model, the logs). Called
    only under the run folder's lock, so a save in progress is never mistaken for an interrupted one."""
    found = [p for p in run_dir.iterdir() if _STAGING.match(p.name)]
    if (run_dir / "checkpoints").is_dir():
        found += [p for p in (run_dir / "checkpoints").iterdir() if _CHECKPOINT_STAGING.match(p.name)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def claim(run_dir: str | os.PathLike, cfg: Config, resume: str) -> RunLock:
    """Check the folder, take its lock, check again under the lock, check the configuration of a resume,
    and clean up interrupted saves. Returns the held lock (release it when the run ends).

    Raises:
        RunFolderError: not a folder this run may use, or in use by another run.
        ResumeConfigError: a resume whose configuration changes the run's math.
    """
    run_dir = Path(run_dir)
    check_folder(run_dir, resume)  # before the lock file exists: a user's folder gets nothing
    check_output_dir(run_dir)  # a read-only place: one line now, not a traceback from mkdir
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        check_folder(run_dir, resume)  # another run may have filled the folder between the two checks
        if resume:
            check_resume_config(run_dir, cfg)
        remove_interrupted_saves(run_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def discard(run_dir: str | os.PathLike) -> bool:
    """Empty a medclipin run folder so that a new run can start there (``medclipin demo`` replaces its
    previous run). Refused for a folder that is not a run folder or that a run is using. True when a
    previous run was removed."""
    run_dir = Path(run_dir)
    entries = _entries(run_dir)
    if not entries:
        return False
    if not is_run_folder(run_dir):
        raise RunFolderNotEmptyError(f"{run_dir}: not a medclipin run folder ({', '.join(entries[:4])}), so it is "
                                     "not replaced: move it away or choose another output folder")
    with RunLock(run_dir):
        for path in run_dir.iterdir():
            if path.name == LOCK_NAME:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    return True
