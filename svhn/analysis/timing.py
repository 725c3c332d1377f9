"""What every bench measures with: timers (a median of passes, a callback timing Lightning's
epochs), the device and a description of the machine, and the synthetic set benches time on
when no data is given. ``svhn.bench`` and its ``--scale`` and ``--search`` modes import it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from svhn.data.synthetic import MARKER_NAME, generate_dataset
from svhn.precision import cpu_name

__all__ = ["accelerator_for", "batch_images", "describe_environment",
           "EpochTimer", "median_rate", "prepare_synthetic", "progress", "quiet_lightning",
           "resolve_device", "synchronize", "SYNTHETIC_VAL"]

SYNTHETIC_VAL = 16  # validation never runs here: a token split only completes the layout


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(run_pass: Callable[[], int], repeats: int, device: torch.device) -> dict:
    """One warm-up pass, then the median images/s of ``repeats`` timed passes.

    ``run_pass`` does one pass and returns how many images it handled. ``warmup_s`` is the
    warm-up pass's time (with ``torch.compile`` it holds the compilation).
    """
    synchronize(device)
    start = time.perf_counter()
    run_pass()
    synchronize(device)
    warmup = time.perf_counter() - start
    rates = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        images = run_pass()
        synchronize(device)
        rates.append(images / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "runs": rates, "images": images,
            "warmup_s": warmup}


def batch_images(batch: dict | Sequence) -> torch.Tensor:
    """The image tensor of a datamodule batch (dict) or a tutorial batch (tuple)."""
    return batch["image"] if isinstance(batch, dict) else batch[0]


class EpochTimer(Callback):
    """Images/s of each train or predict epoch (epoch start to epoch end hooks). ``steady``
    times from the end of each epoch's first batch instead: the loader workers' start and
    the first batch left out, as the model alone is timed after its warm-up (on a GPU they
    can be most of a 10-batch epoch); an epoch of one batch is then timed whole."""

    def __init__(self, device: torch.device, steady: bool = False):
        self.device = device
        self.steady = steady
        self.rates: list[float] = []
        self._epoch_start = 0.0
        self._images = 0  # this epoch's, the first batch's included
        self._first: tuple[float, int] | None = None  # (time, images) after the first batch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        self._epoch_start, self._images, self._first = time.perf_counter(), 0, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch_images(batch))
        if self.steady and self._first is None:  # a steady timing starts here
            synchronize(self.device)
            self._first = (time.perf_counter(), self._images)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        synchronize(self.device)
        start, before = self._epoch_start, 0
        if self._first is not None and self._images > self._first[1]:
            start, before = self._first  # else one batch only: the epoch timed whole
        self.rates.append((self._images - before) / (time.perf_counter() - start))

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                             dataloader_idx: int = 0) -> None:
        self.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_train_epoch_end(trainer, pl_module)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available.")
    return torch.device(name)


def accelerator_for(device: torch.device) -> str:
    """Lightning's name for the accelerator of ``device``."""
    return "gpu" if device.type == "cuda" else "cpu"


def describe_environment(num_workers: int, device: torch.device, data_dir: Path,
                         synthetic: bool) -> dict:
    """The machine and settings a measurement ran on, recorded beside its figures."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": device.type, "device_name": name, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "num_workers": num_workers,
        "torch": torch.__version__, "data_dir": str(data_dir), "synthetic_data": synthetic,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Keep Lightning's per-fit banners out of the report (its harmless warnings are
    filtered for every command: ``svhn.console.quiet_libraries``)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def prepare_synthetic(out_dir: Path, n_train: int, n_test: int) -> Path:
    """Generate the synthetic set unless a matching one is already there."""
    wanted = {"n_train": n_train, "n_val": SYNTHETIC_VAL, "n_test": n_test}
    marker = out_dir / MARKER_NAME
    if marker.is_file() and (out_dir / "mchar_train.json").is_file():
        line = next((ln for ln in marker.read_text().splitlines()
                     if ln.startswith("parameters: ")), "")
        found = json.loads(line.removeprefix("parameters: ") or "{}")
        if all(found.get(k) == v for k, v in wanted.items()):
            return out_dir
    print(f"generating a synthetic set in {out_dir} ...", file=sys.stderr, flush=True)
    return generate_dataset(out_dir, n_train=n_train, n_val=SYNTHETIC_VAL, n_test=n_test, seed=0,
                            progress=True)
