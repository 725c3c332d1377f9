"""A CSV logger that keeps a run's history when the run is resumed, and never shares a
run folder with another run.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it opens a run folder again,
so ``--ckpt_path last`` would lose every epoch before the resume. This one appends.

Lightning picks a new run's ``version_N`` by listing the folder, so two runs started
together pick the same one and write into each other. This one claims the folder with an
exclusive create (``mkdir`` fails when it exists) and takes the next number if it lost.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["ResumableCSVLogger"]


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = next(csv.reader(file), [])


class ResumableCSVLogger(CSVLogger):
    """CSVLogger (same arguments) that appends to the metrics of a resumed run and claims
    each new run's folder atomically. ``claimed_dir``: the folder this process created
    (None when resuming a named version, or on ranks other than 0)."""

    claimed_dir: Path | None = None

    def _get_next_version(self) -> int:
        version = super()._get_next_version()
        if rank_zero_only.rank != 0:  # rank 0's folder reaches the others by broadcast
            return version
        root = Path(self.root_dir)
        root.mkdir(parents=True, exist_ok=True)
        while True:
            folder = root / f"version_{version}"
            try:
                os.mkdir(folder)  # atomic: exactly one process creates it
            except FileExistsError:
                version += 1
                continue
            self.claimed_dir = folder
            return version

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
