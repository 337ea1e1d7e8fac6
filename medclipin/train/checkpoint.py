"""Checkpoints that survive anything.

A checkpoint is a folder ``RUN/checkpoints/step_00001200/`` holding the model in its
``save_pretrained`` form (``model/``: ``model.safetensors`` + ``config.json`` + processor and tokenizer,
loadable for evaluation like any model folder), the training objective's own tensors
(``objective.safetensors``: CLIPin heads, predictors, λ, EMA target except its copies of frozen layers,
which equal the model's; xCLIP heads) and
``training_state.pt`` (optimizer, scheduler, scaler, RNG states, step, counters). The folder is
assembled under a temporary name and renamed into place in one ``os.replace``: a kill at any moment
leaves either the complete new checkpoint or none, and the previous one is intact. Loading uses
safetensors and ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from medclipin.atomic import replace_directory
from medclipin.errors import MedclipinError
from medclipin.models.model import (CONFIG_NAME, WEIGHTS_NAME, ModelFolderError, WeightsMismatchError,
                                    check_weights_match, read_model_config, read_safetensors_header, _load_weights)

log = logging.getLogger(__name__)
STATE_NAME = "training_state.pt"
OBJECTIVE_NAME = "objective.safetensors"


class CheckpointError(MedclipinError, RuntimeError):
    """A checkpoint cannot be resumed from; the message names the folder and why."""
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def rng_state() -> dict:
    """RNG states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(_python_state_from_plain(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state):
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _python_state_from_plain(plain):
    version, internal, gauss = plain
    return (version, tuple(int(v) for v in internal.tolist()), gauss)


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(run_dir, step: int, objective, processor, training_state: dict, keep: int = 3) -> Path:
    """Write a complete checkpoint atomically, then delete all but the newest ``keep``.

    Staging folders of saves that were killed are left alone here: the trainer removes them when it takes
    the run folder's lock (:func:`medclipin.train.run_folder.claim`), where no other save can be running.

    Args:
        objective: the :class:`~medclipin.train.objective.TrainingObjective` (its ``model`` goes to ``model/``).
        processor: saved beside the model, so ``model/`` is a complete model folder.
    """
    from safetensors.torch import save_file

    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".step_{step:08d}.tmp"))
    try:
        objective.model.save_pretrained(staging / "model", processor=processor)
        save_file({k: v.contiguous() for k, v in objective.training_state_dict().items()}, str(staging / OBJECTIVE_NAME))
        torch.save({**training_state, "step": step}, staging / STATE_NAME)
        _fsync_tree(staging)
        replace_directory(staging, final)  # re-saving a step (a resumed run) swaps, never deletes first
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(folder: Path) -> None:
    # make the rename itself durable (POSIX); not supported on every platform
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # flush file contents before the rename makes them visible: a power cut must not expose empty files
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def list_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoint folders, oldest first (temporary folders of interrupted saves are ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def is_valid_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in (STATE_NAME, f"model/{WEIGHTS_NAME}", f"model/{CONFIG_NAME}"))


def is_checkpoint_folder(path: Path) -> bool:
    """A folder that looks like a checkpoint (a training state next to a model folder)."""
    return (path / STATE_NAME).is_file() and (path / "model").is_dir()


def latest_checkpoint(run_dir) -> Path | None:
    """The newest checkpoint whose files are all present, or None."""
    for path in reversed(list_checkpoints(run_dir)):
        if is_valid_checkpoint(path):
            return path
        log.warning("ignoring incomplete checkpoint %s", path)
    return None


def load_training_state(path: Path) -> dict:
    """The training state (optimizer, scheduler, scaler, RNG, counters); tensors and plain values only.

    Raises:
        CheckpointError: the file cannot be read (truncated, tampered, or not a training state).
    """
    import pickle

    try:
        return torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path / STATE_NAME}: cannot be read ({problem}); resume from an earlier "
                              "checkpoint") from None


def load_checkpoint_weights(objective, path: Path) -> None:
    """Load a checkpoint's model and objective tensors into an already built objective (strict; names and
    shapes are checked from the files' headers before any tensor is read).

    Raises:
        CheckpointError: the checkpoint predates the model/objective split (format 1), does not match the
            configuration (another architecture or objective), or a file in it is corrupt.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    saved = read_model_config(path / "model")
    if int(saved.get("format_version", 1)) < 2 or not (path / OBJECTIVE_NAME).is_file():
        raise CheckpointError(
            f"{path}: written by medclipin before the model/objective split (format 1). Its model/ folder loads "
            "for evaluation (medclipin.load), but training cannot resume from it: start a new run folder")
    objective_file = path / OBJECTIVE_NAME
    try:
        _load_weights(objective.model, path / "model" / WEIGHTS_NAME, "cpu")
        expected = {k: tuple(v.shape) for k, v in objective.training_state_dict().items()}
        found = read_safetensors_header(objective_file)
        # checkpoints written before the EMA target's frozen copies were left out still hold them
        expected |= {k: tuple(v.shape) for k, v in objective.frozen_target_parameters().items() if k in found}
        check_weights_match(expected, found, objective_file, "this run's configuration")
        try:
            state = load_file(str(objective_file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise ModelFolderError(f"{objective_file}: cannot read weights ({exc})") from None
        objective.load_training_state_dict(state)
    except (WeightsMismatchError, ValueError) as exc:
        raise CheckpointError(f"{path}: does not match this run's configuration ({exc})") from None
    except MedclipinError as exc:
        raise CheckpointError(f"{path}: cannot be resumed from ({exc})") from None
