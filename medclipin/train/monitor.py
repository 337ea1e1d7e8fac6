"""Training feedback: ``RUN/metrics.csv``, TensorBoard when it is installed, and a progress display.

Only numbers are written here: never report text or patient identifiers.
"""

from __future__ import annotations

import csv
import logging
import sys
import time
from pathlib import Path

from medclipin.atomic import atomic_open

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends rows to RUN/metrics.csv; columns are fixed by the first row written in this run folder.

    Args:
        extra_columns: columns that later rows may fill (e.g. validation results, empty on other rows).
    """

    def __init__(self, path: Path, extra_columns: list[str] | None = None):
        self.path = path
        self.extra_columns = list(extra_columns or [])
        self.columns: list[str] | None = None

    def write(self, row: dict) -> None:
        new_file = not self.path.exists()
        if self.columns is None:
            if not new_file:
                with self.path.open(newline="") as handle:
                    self.columns = next(csv.reader(handle), None)
            self.columns = self.columns or [*row, *(c for c in self.extra_columns if c not in row)]
        added = [key for key in row if key not in self.columns]
        if added and not new_file:
            # a column that appears later (e.g. a monitor logged every N steps): widen the file once
            self._rewrite([*self.columns, *added])
        elif added:
            self.columns = [*self.columns, *added]
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.columns, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
            handle.flush()

    def _rewrite(self, columns: list[str]) -> None:
        with self.path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        with atomic_open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self.columns = columns

    def has_step(self, step: int) -> bool:
        """Whether the file holds a complete row of ``step``."""
        if not self.path.exists():
            return False
        with self.path.open(newline="") as handle:
            return any(row.get("step") == str(step) and None not in row.values() for row in csv.DictReader(handle))

    def truncate_after(self, step: int) -> None:
        """Keep the rows of steps ``1..step`` only (resume: each step appears once, in order).

        A row cut short by a kill (missing fields) and anything after a step that does not increase
        are dropped too, so a torn last line can never masquerade as an earlier step.
        """
        if not self.path.exists():
            return
        with self.path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
        kept, last = [], 0
        for row in rows:
            if None in row.values() or None in row or not (row.get("step") or "").isdigit():
                break
            current = int(row["step"])
            if current <= last or current > step:
                break
            kept.append(row)
            last = current
        with atomic_open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(kept)
        self.columns = columns or None


class TensorBoardLog:
    """Scalars to ``RUN/tensorboard`` when the ``tensorboard`` package is installed; a no-op otherwise."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is an optional extra (pip install medclipin[tensorboard])
            return
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, row: dict, step: int) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}" if "/" not in key else key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A tqdm bar on a terminal; plain log lines with rate and ETA otherwise (CI logs, SLURM output files)."""

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.bar = None
        self.enabled = enabled
        self.total, self.initial = total, initial
        self.start = time.perf_counter()
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream)

    def update(self, step: int, fields: dict) -> None:
        if not self.enabled:
            return
        text = " ".join(f"{k}={v}" for k, v in fields.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        elapsed = time.perf_counter() - self.start
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        print(f"step {step}/{self.total} {text} eta={format_eta(eta)}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
