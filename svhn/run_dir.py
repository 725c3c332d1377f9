"""One run's folder as ``svhn.fit`` writes it: the one owner of its layout.

``runs/<name>/version_N/`` holds ``config.yaml`` (a resume adds ``config_resumed_K.yaml``),
``hparams.yaml``, ``metrics.csv``, ``run_summary.json`` and ``checkpoints/`` (the best by
val/seq_acc and ``last.ckpt``). Nothing here imports Lightning, so ``svhn.runs`` starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDir"]


@dataclass(frozen=True)
class RunDir:
    """A run folder; ``RunDir.of_checkpoint`` finds the one a checkpoint was saved in."""

    path: Path

    CONFIG = "config.yaml"
    HPARAMS = "hparams.yaml"
    METRICS = "metrics.csv"
    SUMMARY = "run_summary.json"
    CHECKPOINTS = "checkpoints"
    LAST = "last.ckpt"

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> RunDir | None:
        """The run folder of ``<run>/checkpoints/x.ckpt``; None for a checkpoint elsewhere."""
        path = Path(checkpoint).resolve()
        return cls(path.parent.parent) if path.parent.name == cls.CHECKPOINTS else None

    @property
    def name(self) -> str:
        """``<name>/version_N``, as svhn.runs lists it."""
        return f"{self.path.parent.name}/{self.path.name}"

    @property
    def config(self) -> Path:
        return self.path / self.CONFIG

    def resumed_configs(self) -> list[Path]:
        """``config_resumed_K.yaml`` files, oldest first."""
        found = self.path.glob("config_resumed_*.yaml")
        return sorted(found, key=lambda p: int("".join(filter(str.isdigit, p.stem)) or 0))

    @property
    def metrics(self) -> Path:
        return self.path / self.METRICS

    @property
    def summary(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / self.LAST

    @property
    def files(self) -> tuple[str, ...]:
        """The entries whose presence marks a folder as a run."""
        return (self.CONFIG, self.HPARAMS, self.METRICS, self.CHECKPOINTS, self.SUMMARY)
