"""Resume rules: which ``--ckpt_path`` continues which run, and what it may not change.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from lightning.pytorch.callbacks import Callback

from svhn.checkpoint_format import CheckpointContents, CheckpointError, read_checkpoint
from svhn.errors import SvhnError
from svhn.run_dir import RunDir
from svhn.train.time_budget import TimeBudget

__all__ = ["check_resume_settings", "checkpoint_to_resume", "find_last_checkpoint",
           "LIGHTNING_CKPT_KEYWORDS", "RESUME_FIXED_MODEL_SETTINGS", "ResumeError",
           "ResumeScheduleCheck", "saved_schedule_steps"]

LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")
# A resumed run continues the checkpoint's own network, optimiser and schedule: these may
# not change (a changed one would be ignored or crash deep inside torch).
RESUME_FIXED_MODEL_SETTINGS = ("backbone", "hidden_dim", "feature_grid", "box_head",
                               "optimizer", "lr", "weight_decay", "momentum", "scheduler",
                               "step_epochs")


class ResumeError(SvhnError, ValueError):
    """A ``--ckpt_path`` that cannot be resumed (or evaluated) as asked."""


class ResumeScheduleCheck(Callback):
    """Refuses a resume whose schedule would not fit the checkpoint's, before anything of
    the run is written (first among the callbacks' setup hooks).

    One-cycle and cosine schedules are sized for a run's total number of optimiser steps
    (max_epochs x batches per epoch); a resume restores that size from the checkpoint, so
    a run planned for more steps crashes mid-way ("Tried to step N times") and one planned
    for fewer never finishes its schedule.
    """

    def __init__(self, checkpoint: Path, scheduler: str, saved_steps: int,
                 budget_epochs: int | None = None):
        self.checkpoint, self.scheduler, self.saved_steps = checkpoint, scheduler, saved_steps
        self.budget_epochs = budget_epochs  # the epochs a time budget shortened it to

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        needed = trainer.estimated_stepping_batches
        if self.budget_epochs is not None and _has_time_budget(trainer):
            # Shortened by the run's time budget, which this run continues: the same steps
            # per epoch (the same data, batch size and devices) are what must not change.
            needed = round(needed / trainer.max_epochs * self.budget_epochs)
        if needed == self.saved_steps:
            return
        _remove_if_empty(trainer.log_dir)  # the logger may have made this run's folder
        planned = _planned_max_epochs(self.checkpoint)
        was = f" (its run had max_epochs {planned})" if planned is not None else ""
        raise ResumeError(
            f"{self.checkpoint}: its {self.scheduler} schedule is sized for {self.saved_steps} "
            f"optimiser steps{was}, but this run would take {needed:g} (max_epochs "
            f"{trainer.max_epochs}). A resume continues the checkpoint's schedule: keep "
            "max_epochs, time_budget, batch size, devices and training data as they were "
            "(the run's config.yaml), or start a new run from its weights with --model.init_from "
            "CKPT instead of --ckpt_path."
        )


def _planned_max_epochs(checkpoint: Path) -> int | None:
    run = RunDir.of_checkpoint(checkpoint)
    if run is None or not run.config.is_file():
        return None
    try:
        return yaml.safe_load(run.config.read_text())["trainer"]["max_epochs"]
    except (yaml.YAMLError, KeyError, TypeError):
        return None


def _remove_if_empty(folder: str | None) -> None:
    """An empty run folder (and its empty parent) made by this run is removed."""
    if folder is None:
        return
    for path in (Path(folder), Path(folder).parent):
        try:
            path.rmdir()  # only ever removes an empty folder
        except OSError:
            return


def checkpoint_to_resume(path: Path, for_resume: bool) -> CheckpointContents:
    """The checkpoint (through ``svhn.checkpoint_format``, the one reader); ResumeError
    when it is
    not one of this project's, or, to resume, holds no training state."""
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as err:
        raise ResumeError(str(err)) from None
    if for_resume and not checkpoint.training_state:
        raise ResumeError(
            f"{path}: holds weights only, no training state, so it cannot be resumed. Start "
            "a new run from its weights with --model.init_from instead of --ckpt_path."
        )
    return checkpoint


def _comparable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def check_resume_settings(path: Path, checkpoint: CheckpointContents, model: dict,
                          data: dict) -> None:
    """ResumeError naming every model setting that differs from the checkpoint's."""
    saved = checkpoint.model
    now = {key: model.get(key) for key in RESUME_FIXED_MODEL_SETTINGS}
    now["max_len"] = data.get("max_len")  # linked into the model from the data settings
    changed = [f"{'data' if key == 'max_len' else 'model'}.{key} {saved[key]!r} -> {value!r}"
               for key, value in now.items()
               if key in saved and _comparable(saved[key]) != _comparable(value)]
    if changed:
        raise ResumeError(
            f"{path}: cannot resume with changed settings ({'; '.join(changed)}). A resume "
            "continues the checkpoint's own network, optimiser and schedule: give the run's "
            "settings (its config.yaml), or start a new run from its weights with "
            "--model.init_from CKPT instead of --ckpt_path."
        )


def _has_time_budget(trainer) -> bool:
    return any(isinstance(c, TimeBudget) and c.minutes is not None for c in trainer.callbacks)


def saved_schedule_steps(checkpoint: CheckpointContents) -> int | None:
    """The total steps a per-step schedule (one-cycle, cosine) in the checkpoint is sized
    for; None for schedules that do not depend on the run's length."""
    scheduler = checkpoint.model.get("scheduler")
    states = checkpoint.lr_schedulers
    if scheduler not in ("onecycle", "cosine") or not states:
        return None
    state = states[0]
    steps = state.get("total_steps") if scheduler == "onecycle" else state.get("T_max")
    return int(steps) if steps is not None else None


def find_last_checkpoint(save_dir: str | Path, name: str, seed: int | None = None
                         ) -> Path | None:
    """The newest ``<save_dir>/<name>/<version>/checkpoints/last.ckpt``, if any; with
    ``seed``, the newest of the runs with that ``seed_everything`` (their config.yaml), so
    a preempted seed of a multi-seed recipe resumes its own run, not the seed started
    after it. ResumeError when runs are there but none has that seed."""
    found = sorted(Path(save_dir, name).glob("*/checkpoints/last.ckpt"),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    if seed is None or isinstance(seed, bool) or not found:
        return found[0] if found else None
    seeds = {path: _run_seed(RunDir.of_checkpoint(path)) for path in found}
    for path, run_seed in seeds.items():
        if run_seed == seed:
            return path
    listed = ", ".join(f"{RunDir.of_checkpoint(p).path.name} (seed {s})"
                       for p, s in seeds.items())
    raise ResumeError(
        f"--ckpt_path last: no run of {Path(save_dir, name)} has seed_everything {seed} "
        f"(found: {listed}). Give that run's seed, or its checkpoint: --ckpt_path "
        "<run>/checkpoints/last.ckpt.")


def _run_seed(run: RunDir | None) -> int | None:
    """The seed a run was trained with: its newest config (a resume writes one more)."""
    if run is None:
        return None
    for config in [*reversed(run.resumed_configs()), run.config]:
        try:
            seed = (yaml.safe_load(config.read_text()) or {}).get("seed_everything")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None
    return None
