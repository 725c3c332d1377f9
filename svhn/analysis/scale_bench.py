"""How costs grow with the work: ``python -m svhn.bench --scale [--scale_train 2000 8000
32000] [--scale_test 40000] [--backbones simple_cnn]``.

One synthetic set is generated (once, under ``--synthetic_dir``) with the largest train
count and the test count; each size is a competition layout of its own that links the first
n train images and a test set in proportion (the largest size: all of it), so the sizes
differ only in how many images there are. Each size is measured in a fresh process
(``python -m svhn.analysis.scale_bench LAYOUT``), so its memory peak is its own:

- cache build: decoding every train, val and test image into a fresh image cache;
- one epoch: a real ``Trainer.fit`` train epoch (no validation) of the first backbone;
- predict: ``svhn.predict``'s path over the test set (the fastest of PREDICT_PASSES passes);
- peak memory: the largest anonymous resident memory (RssAnon, the process and its loader
  workers, sampled every 50 ms), which the memory-mapped cache keeps out of: the images
  live in the page cache, which the kernel can drop, not in the process.

The report gives each per image, and the ratio of the largest size's to the smallest's
(flat is 1.0), with a log-log figure when ``--out`` names a file (beside it, .png).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from svhn.analysis.timing import (
    SYNTHETIC_VAL,
    EpochTimer,
    accelerator_for,
    describe_environment,
    prepare_synthetic,
    quiet_lightning,
    resolve_device,
)
from svhn.errors import SettingError

__all__ = ["build_layouts", "format_scale_table", "measure_one", "measure_scale"]

PREDICT_PASSES = 3


# -- the layouts ----------------------------------------------------------------------------
def build_layouts(source: Path, root: Path, train_sizes: Sequence[int], test_size: int
                  ) -> list[Path]:
    """A competition layout per train size under ``root``: symbolic links to the first n
    train images of ``source`` (and to a test set of test_size * n / max(train_sizes)), its
    own label files; the val split whole."""
    largest = max(train_sizes)
    train = json.loads((source / "mchar_train.json").read_text())
    names = sorted(train)
    tests = sorted(p.name for p in (source / "mchar_test_a").iterdir())
    layouts = []
    for size in train_sizes:
        layout = root / f"train_{size}"
        test_count = max(1, round(test_size * size / largest))
        if not (layout / "mchar_train.json").is_file():
            _link_split(source, layout, "mchar_train", names[:size])
            _link_split(source, layout, "mchar_test_a", tests[:test_count])
            (layout / "mchar_val").mkdir(exist_ok=True)
            _link_split(source, layout, "mchar_val",
                        sorted(p.name for p in (source / "mchar_val").iterdir()))
            (layout / "mchar_val.json").write_text((source / "mchar_val.json").read_text())
            # Last: a layout with its train labels is complete.
            (layout / "mchar_train.json").write_text(json.dumps(
                {name: train[name] for name in names[:size]}))
        layouts.append(layout)
    return layouts


def _link_split(source: Path, layout: Path, folder: str, names: Sequence[str]) -> None:
    target = layout / folder
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = target / name
        if not link.exists():
            link.symlink_to((source / folder / name).resolve())


# -- one size, in its own process ------------------------------------------------------------
class AnonymousMemoryPeak:
    """The largest RssAnon of this process plus its children, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> AnonymousMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, sum(_rss_anon_kb(pid) for pid in _family()))


def _family(pid: int | None = None) -> list[int]:
    pid = os.getpid() if pid is None else pid
    family = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                for child in handle.read().split():
                    family += _family(int(child))
    except OSError:  # gone meanwhile, or not Linux
        pass
    return family


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure_one(layout: Path, backbone: str, image_size: tuple[int, int], batch_size: int,
                num_workers: int, precision: str, accelerator: str) -> dict:
    """Cache build, one train epoch and prediction of ``layout``, each per image, and the
    anonymous memory peak over all three."""
    import lightning as L
    import torch

    from svhn.data.datamodule import SVHNDataModule
    from svhn.inference.predictor import build_trainer, predict_with_reader
    from svhn.model.training import DigitSequenceModel

    device = "cuda" if accelerator == "gpu" else "cpu"
    with tempfile.TemporaryDirectory(prefix="svhn-scale-") as cache, \
            AnonymousMemoryPeak() as memory, quiet_lightning():
        data = SVHNDataModule(data_dir=str(layout), cache_dir=cache, image_size=image_size,
                              batch_size=batch_size, num_workers=num_workers,
                              augment="baseline", predict_on="test_a")
        start = time.perf_counter()
        data.prepare_data()
        cache_seconds = time.perf_counter() - start
        images = {folder: len(os.listdir(layout / folder))
                  for folder in ("mchar_train", "mchar_val", "mchar_test_a")}
        cached = sum(images.values())
        model = DigitSequenceModel(backbone=backbone)
        timer = EpochTimer(torch.device(device))
        trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision,
                            max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                            enable_checkpointing=False, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[timer])
        trainer.fit(model, datamodule=data)
        # The fastest of a few passes: one pass over 2,500 images takes under a second,
        # which one stray stall of the machine can double.
        predict_timer = EpochTimer(torch.device(device))
        for _ in range(PREDICT_PASSES):
            predictions = predict_with_reader(
                model.reader.eval(), data, build_trainer(accelerator, precision=precision,
                                                         callbacks=[predict_timer],
                                                         progress_bar=False))
    return {
        "train_images": images["mchar_train"],
        "test_images": len(predictions), "cached_images": cached,
        "cache_seconds": cache_seconds, "cache_ms_per_image": 1000 * cache_seconds / cached,
        "epoch_ms_per_image": 1000 / timer.rates[0],
        "predict_ms_per_image": 1000 / max(predict_timer.rates),
        "peak_anonymous_mb": memory.peak_kb / 1024,
        "peak_resident_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# -- all sizes --------------------------------------------------------------------------------
def measure_scale(cfg, train_sizes: Sequence[int], test_size: int) -> dict:
    """Every size in its own process; ``cfg`` is the bench's ``BenchConfig``."""
    if min(train_sizes) < 1 or test_size < 1 or len(set(train_sizes)) < 2:
        raise SettingError("--scale needs two or more different --scale_train sizes >= 1 and "
                           "--scale_test >= 1.")
    device = resolve_device(cfg.device)
    source = Path(cfg.synthetic_dir) / f"scale_{max(train_sizes)}_{test_size}"
    prepare_synthetic(source, max(train_sizes), test_size)
    layouts = build_layouts(source, source.parent / f"{source.name}_layouts",
                            sorted(train_sizes), test_size)
    backbone = (cfg.backbones or ["simple_cnn"])[0]
    rows = []
    for size, layout in zip(sorted(train_sizes), layouts):
        print(f"scale: {size} train images ...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "svhn.analysis.scale_bench", str(layout),
                   "--backbone", backbone, "--image_size", *map(str, cfg.image_size),
                   "--batch_size", str(cfg.batch_size), "--num_workers", str(cfg.workers),
                   "--precision", cfg.precision,
                   "--accelerator", accelerator_for(device)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            raise SettingError(f"the scale run of {layout} failed:\n{done.stderr[-2000:]}")
        rows.append({"train_size": size, **json.loads(done.stdout.strip().splitlines()[-1])})
    first, last = rows[0], rows[-1]
    ratios = {key: last[key] / first[key] for key in
              ("cache_ms_per_image", "epoch_ms_per_image", "predict_ms_per_image")}
    return {"environment": describe_environment(cfg.workers, device, source, True),
            "backbone": backbone, "val_images": SYNTHETIC_VAL, "rows": rows,
            "largest_over_smallest": ratios}


def format_scale_table(report: dict) -> str:
    lines = [f"How costs grow with the data ({report['backbone']}, "
             f"{report['environment']['device_name']}):",
             "  train    test   cache ms/img  epoch ms/img  predict ms/img  peak anon MB  "
             "peak RSS MB"]
    for row in report["rows"]:
        lines.append(f"  {row['train_size']:6d}  {row['test_images']:6d}  "
                     f"{row['cache_ms_per_image']:12.3f}  {row['epoch_ms_per_image']:12.3f}  "
                     f"{row['predict_ms_per_image']:14.3f}  {row['peak_anonymous_mb']:12.0f}  "
                     f"{row['peak_resident_mb']:11.0f}")
    ratios = report["largest_over_smallest"]
    lines.append("  largest / smallest per image: " + ", ".join(
        f"{key.removesuffix('_ms_per_image')} {value:.2f}" for key, value in ratios.items()))
    return "\n".join(lines)


def plot_scale(report: dict, path: Path) -> Path:
    """The log-log figure: each cost per image and the memory peak against the train size."""
    from matplotlib.ticker import NullLocator

    from svhn.analysis.plots import new_figure, save

    sizes = [row["train_size"] for row in report["rows"]]
    figure = new_figure(10, 4)
    costs, memory = figure.subplots(1, 2)
    for key, label in (("cache_ms_per_image", "cache build"), ("epoch_ms_per_image", "epoch"),
                       ("predict_ms_per_image", "predict")):
        costs.loglog(sizes, [row[key] for row in report["rows"]], "o-", label=label)
    costs.set(xlabel="train images", ylabel="ms per image", title="time per image (flat = linear)")
    memory.loglog(sizes, [row["peak_anonymous_mb"] for row in report["rows"]], "o-",
                  label="anonymous (process + workers)")
    memory.loglog(sizes, [row["peak_resident_mb"] for row in report["rows"]], "s--",
                  label="resident, with mapped cache pages")
    memory.set(xlabel="train images", ylabel="MB", title="peak memory")
    for axis in (costs, memory):  # the measured sizes, not the log scale's minor ticks
        axis.legend()
        axis.xaxis.set_minor_locator(NullLocator())
        axis.set_xticks(sizes, [f"{size:,}" for size in sizes])
    return save(figure, path)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m svhn.analysis.scale_bench",
                                     description="one size of svhn.bench --scale")
    parser.add_argument("layout", type=Path)
    parser.add_argument("--backbone", default="simple_cnn")
    parser.add_argument("--image_size", type=int, nargs=2, default=(64, 128))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="cpu")
    args = parser.parse_args(argv)
    result = measure_one(args.layout, args.backbone, tuple(args.image_size), args.batch_size,
                         args.num_workers, args.precision, args.accelerator)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
