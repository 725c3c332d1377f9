"""Speed benchmark: ``python -m svhn.bench [--data_dir DIR] [--backbones simple_cnn resnet18]``.

Measures images/s, each as the median of ``--repeats`` timed passes after one warm-up pass,
every pass capped at ``--max_batches`` batches:

- cache build: the one-off decode of every PNG into the image cache (not paid per epoch);
- pipeline: the train dataloader alone (cached uint8 -> ``--augment`` preset per item with
  albumentations -> batch), as ``augment_on: cpu`` trains;
- stages, where the time goes: gather + collate only (the loader of ``augment_on: device``),
  the preset batched on the device (``svhn.data.batch_augment``, batches already there), the
  host-to-device copy (GPU only), and the worker-side work per CPU core (one process, one
  thread: gather only vs gather + albumentations), which says how many cores feed a model;
- model alone: forward + backward + optimizer step on a batch already on the device (the
  upper bound for training); with ``--compile`` also in eager mode, to show the gain;
- end to end: a real ``lightning.Trainer.fit`` train epoch (no validation, no checkpoints),
  with the preset on the CPU (albumentations) and on the device (``augment_on`` cpu/device),
  timed from the end of its first batch to its last (the steady state: the loader workers'
  start and the first batch are left out, as the model alone's warm-up is);
- predict: ``svhn.inference.predictor``'s prediction path (the one ``svhn.predict`` uses: the data
  module's predict loader and ``Trainer.predict``), timed likewise from the end of the
  first batch to the last: no checkpoint loading, Trainer set-up or workers' start;
- tutorial pipeline / tutorial predict: the competition tutorial's way on the same files
  (PIL decode + torchvision transforms per item, batch 40) as the reference.

Without ``--data_dir`` a synthetic set is generated (once) into ``--synthetic_dir``. The
image cache always goes to a fresh temporary folder, so its build time is real. The report is
printed as a table; ``--json`` prints one JSON object instead (the table goes to stderr) and
``--out FILE`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from svhn.analysis.timing import (
    EpochTimer,
    accelerator_for,
    batch_images,
    describe_environment,
    median_rate,
    prepare_synthetic,
    progress,
    quiet_lightning,
    resolve_device,
)
from svhn.data.batch_augment import BatchAugment
from svhn.data.datamodule import SVHNDataModule, default_num_workers
from svhn.data.images import DEFAULT_IMAGE_SIZE
from svhn.data.labels import DEFAULT_MAX_LEN, NUM_CLASSES, encode_label
from svhn.data.layout import list_split
from svhn.data.transforms import PRESETS
from svhn.errors import SettingError, command
from svhn.inference import predictor
from svhn.inference.predictor import PRECISIONS
from svhn.model.backbones import IMAGENET_MEAN, IMAGENET_STD
from svhn.model.reader import DigitReader
from svhn.model.training import DigitSequenceModel
from svhn.paths import BENCH_SYNTHETIC_DIR

__all__ = ["autocast", "AUTOCAST_DTYPES", "BACKBONE_RATIOS", "BenchConfig",
           "benchmark_backbone", "build_datamodule", "build_model", "capped_batches",
           "COMPILE_RATIO", "compute_ratios", "cores_to_feed",
           "format_stages", "format_table",
           "gathered_batches", "loader_pass", "main", "measure_cache_build",
           "measure_end_to_end_turns", "measure_model_alone", "measure_our_predict",
           "measure_pipeline", "measure_predictions", "measure_stages",
           "one_thread", "parse_args", "PER_CORE_RATIO", "PIPELINE_RATIO",
           "ratio_entry", "run_benchmark",
           "TARGETED_END_TO_END", "TUTORIAL_BATCH_SIZE",
           "TUTORIAL_CROP", "tutorial_eval_transform", "tutorial_loader",
           "tutorial_predict_pass", "TUTORIAL_RESIZE", "tutorial_settings",
           "tutorial_train_transform", "TutorialDataset"]

TUTORIAL_BATCH_SIZE = 40
TUTORIAL_RESIZE = DEFAULT_IMAGE_SIZE  # the tutorial's 64x128, the project's default too
TUTORIAL_CROP = (60, 120)
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# (name, numerator, denominator, target): numerator / denominator should reach the target.
PIPELINE_RATIO = ("pipeline / tutorial pipeline", "pipeline", "tutorial_pipeline", 3.0)
# Worker-side CPU work per image: gathering for device augmentation vs albumentations.
PER_CORE_RATIO = ("per-core: gather / albumentations", "gather", "albumentations", 10.0)
BACKBONE_RATIOS = (
    ("end-to-end / model alone", "end_to_end", "model_alone", 0.9),
    ("e2e device aug / e2e cpu aug", "end_to_end_device_augment", "end_to_end", 1.0),
    ("predict / tutorial predict", "predict", "tutorial_predict", 2.0),
)
COMPILE_RATIO = ("compiled / eager model alone", "model_alone", "model_alone_eager", None)
# The end-to-end targets are set for the model worth feeding.
TARGETED_END_TO_END = ("resnet18",)


@dataclass
class BenchConfig:
    """Everything a benchmark run depends on (recorded in the JSON report)."""

    data_dir: str | None = None
    synthetic_dir: str = str(BENCH_SYNTHETIC_DIR)
    synthetic_train: int = 2000
    synthetic_test: int = 1000
    backbones: list[str] = field(default_factory=lambda: ["simple_cnn", "resnet18"])
    timm_args: dict | None = None  # as --model.timm_args: e.g. a narrower timm ResNet
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    batch_size: int = 64
    num_workers: int | None = None
    split: str = "test_a"
    repeats: int = 3
    max_batches: int = 20
    device: str = "auto"
    precision: str = "32-true"
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None
    augment: str = "baseline"
    cache_scale: float = 1.0

    @property
    def max_images(self) -> int:
        return self.max_batches * self.batch_size

    @property
    def workers(self) -> int:
        return default_num_workers() if self.num_workers is None else self.num_workers


# -- timing ---------------------------------------------------------------------------------


def capped_batches(loader: DataLoader, max_images: int) -> Iterator:
    """The loader's batches until ``max_images`` images have been produced."""
    seen = 0
    for batch in loader:
        yield batch
        seen += len(batch_images(batch))
        if seen >= max_images:
            return


def loader_pass(loader: DataLoader, max_images: int) -> Callable[[], int]:
    """A pass that only pulls batches out of the loader (decode, augment, collate)."""
    def run() -> int:
        return sum(len(batch_images(b)) for b in capped_batches(loader, max_images))
    return run


# -- data -----------------------------------------------------------------------------------


def build_datamodule(cfg: BenchConfig, data_dir: Path, cache_dir: Path,
                     augment_on: str = "cpu", num_workers: int | None = None) -> SVHNDataModule:
    return SVHNDataModule(
        data_dir=str(data_dir), image_size=cfg.image_size, batch_size=cfg.batch_size,
        num_workers=cfg.workers if num_workers is None else num_workers,
        augment=cfg.augment, augment_on=augment_on, predict_on=cfg.split,
        cache_dir=str(cache_dir), cache_scale=cfg.cache_scale,
    )


def measure_cache_build(datamodule: SVHNDataModule) -> dict:
    """The one-off decode of every split in use into the (empty) cache folder."""
    start = time.perf_counter()
    datamodule.prepare_data()
    seconds = time.perf_counter() - start
    # Count what was decoded: one row per image in each <split>_<H>x<W>.npy cache file.
    caches = sorted(Path(datamodule.cache_dir).glob("*.npy"))
    images = sum(len(np.load(path, mmap_mode="r")) for path in caches)
    return {"images_per_s": images / seconds, "seconds": seconds, "images": images,
            "cache_files": [path.name for path in caches]}


def measure_pipeline(datamodule: SVHNDataModule, cfg: BenchConfig, device: torch.device) -> dict:
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    result = median_rate(loader_pass(loader, cfg.max_images), cfg.repeats, device)
    del loader
    gc.collect()  # ends its persistent workers so they do not linger through later runs
    return result


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch and OpenCV on one thread: what one loader worker (one core) does."""
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def gathered_batches(datamodule: SVHNDataModule, cfg: BenchConfig) -> list[dict]:
    """Up to ``max_batches`` batches of the gather-only loader (device augmentation's)."""
    datamodule.setup("fit")
    return list(capped_batches(datamodule.train_dataloader(), cfg.max_images))


def measure_stages(cfg: BenchConfig, data_dir: Path, cache_dir: Path,
                   device: torch.device) -> dict:
    """Where the time goes, stage by stage (``pipeline`` is gather + albumentations)."""
    stages: dict = {}
    gather_dm = build_datamodule(cfg, data_dir, cache_dir, augment_on="device")
    stages["gather"] = measure_pipeline(gather_dm, cfg, device)
    # Worker-side work per core: one process, one thread, no loader workers.
    with one_thread():
        stages["per_core"] = {
            "gather": measure_pipeline(
                build_datamodule(cfg, data_dir, cache_dir, "device", num_workers=0), cfg,
                device),
            "albumentations": measure_pipeline(
                build_datamodule(cfg, data_dir, cache_dir, "cpu", num_workers=0), cfg, device),
        }
    batches = gathered_batches(gather_dm, cfg)
    if device.type == "cpu":
        stages["host_to_device"] = None  # the model's memory: nothing is copied
    else:
        def copy() -> int:
            for batch in batches:
                batch["image"].to(device, non_blocking=True)
                batch["box"].to(device, non_blocking=True)
            return sum(len(b["image"]) for b in batches)
        stages["host_to_device"] = median_rate(copy, cfg.repeats, device)
    on_device = [(b["image"].to(device), b["box"].to(device)) for b in batches]
    augment = BatchAugment(cfg.augment, cfg.image_size, seed=0)

    def augment_pass() -> int:
        for images, boxes in on_device:
            augment(images, boxes)
        return sum(len(images) for images, _ in on_device)

    stages["device_augment"] = median_rate(augment_pass, cfg.repeats, device)
    stages["device_augment"]["backend"] = "opencv" if augment.use_opencv(
        on_device[0][0]) else "torch"
    return stages


class TutorialDataset(Dataset):
    """The competition tutorial's dataset: decode the PNG with PIL on every access."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[Sequence[int]],
                 transform: Callable):
        self.paths = list(paths)
        self.labels = [encode_label(digits, DEFAULT_MAX_LEN) for digits in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.open(self.paths[index]).convert("RGB")
        return self.transform(image), torch.tensor(self.labels[index])


def tutorial_train_transform() -> T.Compose:
    return T.Compose([
        T.Resize(TUTORIAL_RESIZE), T.RandomCrop(TUTORIAL_CROP), T.ColorJitter(0.3, 0.3, 0.2),
        T.RandomRotation(10), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def tutorial_eval_transform() -> T.Compose:
    return T.Compose([T.Resize(TUTORIAL_CROP), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def tutorial_loader(data_dir: Path, split: str, train: bool, num_workers: int) -> DataLoader:
    """The tutorial's loader: batch 40, shuffled for training, workers not kept alive."""
    files = list_split(data_dir, split, DEFAULT_MAX_LEN)  # the tutorial also keeps 5 digits
    labels = ([s.digits for s in files.samples] if files.samples is not None
              else [()] * len(files.image_paths))
    transform = tutorial_train_transform() if train else tutorial_eval_transform()
    dataset = TutorialDataset(files.image_paths, labels, transform)
    return DataLoader(dataset, batch_size=TUTORIAL_BATCH_SIZE, shuffle=train,
                      num_workers=num_workers)


# -- model ----------------------------------------------------------------------------------


def build_model(backbone: str, cfg: BenchConfig, device: torch.device) -> DigitReader:
    """A fresh reader on the device with the run's channels-last and compile settings."""
    reader = DigitReader(backbone=backbone, channels_last=cfg.channels_last,
                         timm_args=cfg.timm_args)
    reader.to(device).apply_memory_format()
    if cfg.compile:
        reader.compile_backbone()  # what DigitSequenceModel.configure_model does in a fit
    return reader


def autocast(cfg: BenchConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The same mixed precision the Trainer applies for ``--precision``."""
    dtype = AUTOCAST_DTYPES.get(cfg.precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def tutorial_settings(cfg: BenchConfig) -> BenchConfig:
    """The tutorial runs its model as PyTorch does by default: float32, channels-first,
    eager. The reference keeps that whatever the run's own settings are."""
    return replace(cfg, precision="32-true", channels_last=False, compile=False)


def measure_model_alone(backbone: str, cfg: BenchConfig, device: torch.device) -> dict:
    """Training steps on one batch already on the device: no data loading at all."""
    model = build_model(backbone, cfg, device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # the model's default optimizer
    images = torch.randn(cfg.batch_size, 3, *cfg.image_size, device=device)
    targets = torch.randint(0, NUM_CLASSES, (cfg.batch_size, DEFAULT_MAX_LEN), device=device)
    steps = max(1, cfg.max_batches)

    def run() -> int:
        for _ in range(steps):
            with autocast(cfg, device):
                logits = model(images)["logits"]
            loss = F.cross_entropy(logits.reshape(-1, NUM_CLASSES).float(), targets.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps * cfg.batch_size

    return median_rate(run, cfg.repeats, device)


def measure_end_to_end_turns(backbone: str, cfg: BenchConfig,
                             datamodules: dict[str, SVHNDataModule],
                             device: torch.device) -> dict[str, dict]:
    """Train epochs of real Trainer.fit runs for each data module (augmentation on the CPU,
    on the device), taking turns epoch by epoch, so that a shared machine's changing load
    falls on both alike: one fit of one epoch per turn, on the same model; the first turn
    is the warm-up. The later data modules' measurements keep ``paired``: their ratios to
    the first's epoch of the same turn. Each epoch is timed after its first batch
    (``EpochTimer`` steady): a new fit starts its loader workers again."""
    model = DigitSequenceModel(backbone=backbone, channels_last=cfg.channels_last,
                               compile=cfg.compile, timm_args=cfg.timm_args)
    rates: dict[str, list[float]] = {name: [] for name in datamodules}
    for turn in range(cfg.repeats + 1):
        for name, datamodule in datamodules.items():
            timer = EpochTimer(device, steady=True)
            trainer = L.Trainer(
                accelerator=accelerator_for(device), devices=1,
                precision=cfg.precision, max_epochs=1, limit_train_batches=cfg.max_batches,
                limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                logger=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[timer],
            )
            trainer.fit(model, datamodule=datamodule)
            if turn:
                rates[name].extend(timer.rates)
            del trainer
            gc.collect()
    first_name, first = next(iter(rates.items()))
    results = {name: {"images_per_s": statistics.median(runs), "runs": runs}
               for name, runs in rates.items()}
    for name, runs in rates.items():
        if name != first_name:
            results[name]["paired"] = [run / base for run, base in zip(runs, first)]
    return results


def tutorial_predict_pass(model: DigitReader, loader_factory: Callable[[], DataLoader],
                          cfg: BenchConfig, device: torch.device) -> Callable[[], int]:
    """The tutorial's predict loop over a fresh loader, under no_grad: images to the
    device, forward, probabilities back."""
    def run() -> int:
        images = 0
        loader = loader_factory()
        with torch.no_grad(), autocast(cfg, device):
            for batch in capped_batches(loader, cfg.max_images):
                batch_on_device = batch_images(batch).to(device, non_blocking=True)
                model(batch_on_device)["logits"].float().softmax(-1).cpu()
                images += len(batch_on_device)
        return images
    return run


def measure_our_predict(reader: DigitReader, datamodule: SVHNDataModule, cfg: BenchConfig,
                        device: torch.device) -> dict:
    """``svhn.inference.predictor``'s path, one warm-up pass then ``repeats`` timed passes
    (each after its first batch)."""
    timer = EpochTimer(device, steady=True)
    trainer = predictor.build_trainer(
        accelerator=accelerator_for(device), precision=cfg.precision,
        callbacks=[timer], progress_bar=False, limit_batches=cfg.max_batches)
    for _ in range(cfg.repeats + 1):
        predictor.predict_with_reader(reader, datamodule, trainer, subset=True)
    runs = timer.rates[1:]
    return {"images_per_s": statistics.median(runs), "runs": runs}


def measure_predictions(backbone: str, cfg: BenchConfig, datamodule: SVHNDataModule,
                        data_dir: Path, device: torch.device) -> dict[str, dict]:
    """Our prediction path vs the tutorial's loop, both with the same weights."""
    model = build_model(backbone, cfg, device).eval()
    reference_cfg = tutorial_settings(cfg)
    reference = build_model(backbone, reference_cfg, device).eval()
    reference.load_state_dict(model.state_dict())  # the same network, the tutorial's way
    tutorial = tutorial_predict_pass(
        reference, lambda: tutorial_loader(data_dir, cfg.split, False, cfg.workers),
        reference_cfg, device)
    return {"predict": measure_our_predict(model, datamodule, cfg, device),
            "tutorial_predict": median_rate(tutorial, cfg.repeats, device)}


# -- report ---------------------------------------------------------------------------------
def ratio_entry(name: str, backbone: str | None, numerator: float, denominator: float,
                target: float | None) -> dict:
    value = numerator / denominator
    return {"name": name, "backbone": backbone, "value": value, "target": target,
            "pass": None if target is None else value >= target}


def compute_ratios(report: dict) -> list[dict]:
    """The ratios with their targets, computed from the measured images/s."""
    name, numerator, denominator, target = PIPELINE_RATIO
    ratios = [ratio_entry(name, None, report[numerator]["images_per_s"],
                          report[denominator]["images_per_s"], target)]
    if "stages" in report:
        per_core = report["stages"]["per_core"]
        name, numerator, denominator, target = PER_CORE_RATIO
        ratios.append(ratio_entry(name, None, per_core[numerator]["images_per_s"],
                                  per_core[denominator]["images_per_s"], target))
    for backbone, results in report["backbones"].items():
        for name, numerator, denominator, target in (*BACKBONE_RATIOS, COMPILE_RATIO):
            if numerator not in results or denominator not in results:
                continue
            if numerator.startswith("end_to_end") and backbone not in TARGETED_END_TO_END:
                target = None
            if "paired" in results[numerator]:  # epochs that took turns: their ratios' median
                value, base = statistics.median(results[numerator]["paired"]), 1.0
            else:
                value, base = (results[numerator]["images_per_s"],
                               results[denominator]["images_per_s"])
            ratios.append(ratio_entry(name, backbone, value, base, target))
    return ratios


def cores_to_feed(model_rate: float, per_core_rate: float) -> int:
    """CPU cores whose worker-side work keeps up with a model step rate."""
    return max(1, math.ceil(model_rate / per_core_rate))


def _fmt_rate(measurement: dict) -> str:
    return f"{measurement['images_per_s']:,.0f}"


def _fmt_optional(measurement: dict | None, missing: str) -> str:
    return missing if measurement is None else _fmt_rate(measurement)


def format_stages(report: dict) -> list[str]:
    """Where the time goes, and how many CPU cores a model's step rate needs."""
    stages, preset = report["stages"], report["config"]["augment"]
    per_core = stages["per_core"]
    gather_core = per_core["gather"]["images_per_s"]
    albu_core = per_core["albumentations"]["images_per_s"]
    lines = [
        f"{'stage (time per image, where the work runs)':<52}{'images/s':>12}",
        f"{'CPU: gather + collate (device augmentation loader)':<52}"
        f"{_fmt_rate(stages['gather']):>12}",
        f"{'CPU: gather + albumentations ' + preset + ' per item':<52}"
        f"{_fmt_rate(report['pipeline']):>12}",
        f"{'device: ' + preset + ' batched, ' + stages['device_augment']['backend']:<52}"
        f"{_fmt_rate(stages['device_augment']):>12}",
        f"{'host-to-device copy':<52}"
        f"{_fmt_optional(stages['host_to_device'], 'no copy (cpu)'):>12}",
        f"{'device: model step':<52}{'model alone, below':>12}",
        "",
        f"pipeline capacity per CPU core (1 process, 1 thread): {gather_core:,.0f} images/s "
        f"gathering for device augmentation, {albu_core:,.0f} with albumentations {preset} "
        f"({gather_core / albu_core:.1f}x)",
    ]
    for backbone, results in report["backbones"].items():
        rate = results["model_alone"]["images_per_s"]
        device = report["environment"]["device"]
        lines.append(
            f"cores to feed {backbone} alone ({rate:,.0f} images/s on {device}): "
            f"{cores_to_feed(rate, albu_core)} with albumentations, "
            f"{cores_to_feed(rate, gather_core)} with device augmentation")
    return lines


def format_table(report: dict) -> str:
    """The human-readable report."""
    env, cfg = report["environment"], report["config"]
    cache = report["cache_build"]
    load = env.get("load_average")
    lines = [
        f"SVHN speed benchmark on {env['data_dir']}"
        f"{' (synthetic)' if env['synthetic_data'] else ''}",
        f"device: {env['device']} ({env['device_name']}), cpus: {env['cpu_count']}, "
        f"torch threads: {env['torch_threads']}, num_workers: {env['num_workers']}"
        + (f", load average at start: {load[0]:.1f}" if load else ""),
        f"image size: {cfg['image_size'][0]}x{cfg['image_size'][1]}, cache scale: "
        f"{cfg['cache_scale']:g}, batch: {cfg['batch_size']}, augment: {cfg['augment']}, "
        f"precision: {cfg['precision']}, channels_last: {cfg['channels_last']}, "
        f"compile: {cfg['compile']}"
        + (f", timm_args: {json.dumps(cfg['timm_args'])}" if cfg.get("timm_args") else ""),
        f"median of {cfg['repeats']} runs after a warm-up, each capped at "
        f"{cfg['max_batches']} batches; images/s",
        "",
        f"{'data (no model)':<44}{'images/s':>12}",
        f"{'cache build, one-off (decode every PNG once)':<44}{_fmt_rate(cache):>12}"
        f"   {cache['images']} images in {cache['seconds']:.1f} s",
        f"{'pipeline: train loader, ' + cfg['augment'] + ' augment':<44}"
        f"{_fmt_rate(report['pipeline']):>12}",
        f"{'tutorial pipeline: PIL + torchvision':<44}"
        f"{_fmt_rate(report['tutorial_pipeline']):>12}",
        "",
    ]
    if "stages" in report:
        lines += [*format_stages(report), ""]
    compiled = any("model_alone_eager" in r for r in report["backbones"].values())
    if report["backbones"]:
        lines.append(
            f"{'backbone':<14}{'model alone':>13}"
            + (f"{'eager':>10}" if compiled else "")
            + f"{'e2e cpu aug':>13}{'e2e dev aug':>13}{'predict':>11}{'tutorial pred.':>16}")
    for backbone, results in report["backbones"].items():
        device_e2e = results.get("end_to_end_device_augment")
        lines.append(
            f"{backbone:<14}{_fmt_rate(results['model_alone']):>13}"
            + (f"{_fmt_optional(results.get('model_alone_eager'), '-'):>10}" if compiled
               else "")
            + f"{_fmt_rate(results['end_to_end']):>13}"
            f"{_fmt_optional(device_e2e, '-'):>13}{_fmt_rate(results['predict']):>11}"
            f"{_fmt_rate(results['tutorial_predict']):>16}")
        if "model_alone_eager" in results:
            compiled_run = results["model_alone"]
            steady = compiled_run["images"] / compiled_run["images_per_s"]
            lines.append(f"{'':<14}torch.compile warm-up: {compiled_run['warmup_s']:.1f} s "
                         f"(a steady pass: {steady:.1f} s)")
    lines += ["", f"{'ratio':<36}{'backbone':<14}{'value':>7}{'target':>9}  result"]
    for ratio in report["ratios"]:
        target = f">= {ratio['target']:g}" if ratio["target"] is not None else "-"
        result = {True: "PASS", False: "FAIL", None: "-"}[ratio["pass"]]
        lines.append(f"{ratio['name']:<36}{ratio['backbone'] or '-':<14}"
                     f"{ratio['value']:>7.2f}{target:>9}  {result}")
    lines += ["", "tutorial pred.: the tutorial's loop (PIL + torchvision per item, batch 40) "
                  "and model settings (float32, channels-first, eager), same weights",
              "e2e cpu aug / dev aug: Trainer.fit epochs with augment_on cpu (albumentations "
              "in the loader) / device (svhn.data.batch_augment after the copy), taking turns; "
              "their ratio is the median of the turns' ratios"]
    if compiled:
        lines.append("model alone with --compile: the backbone through torch.compile (what "
                     "--model.compile does); eager: the same step without it")
    return "\n".join(lines)


# -- running --------------------------------------------------------------------------------


def benchmark_backbone(backbone: str, cfg: BenchConfig, datamodule: SVHNDataModule,
                       data_dir: Path, device: torch.device,
                       device_datamodule: SVHNDataModule) -> dict:
    progress(f"{backbone}: model alone" + (" (compiled, then eager)" if cfg.compile else ""))
    results = {"model_alone": measure_model_alone(backbone, cfg, device)}
    if cfg.compile:
        results["model_alone_eager"] = measure_model_alone(
            backbone, replace(cfg, compile=False), device)
    progress(f"{backbone}: end-to-end Trainer.fit, augmentation on the CPU and on the "
             "device, taking turns")
    results.update(measure_end_to_end_turns(
        backbone, cfg, {"end_to_end": datamodule,
                        "end_to_end_device_augment": device_datamodule}, device))
    progress(f"{backbone}: predict and tutorial predict")
    results.update(measure_predictions(backbone, cfg, datamodule, data_dir, device))
    return results


def run_benchmark(cfg: BenchConfig) -> dict:
    """Run every measurement and return the report (JSON-ready)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run_measurements(cfg)
    finally:
        torch.set_num_threads(threads)


def _run_measurements(cfg: BenchConfig) -> dict:
    device = resolve_device(cfg.device)
    synthetic = cfg.data_dir is None
    data_dir = (prepare_synthetic(Path(cfg.synthetic_dir), cfg.synthetic_train,
                                  cfg.synthetic_test) if synthetic else Path(cfg.data_dir))
    report: dict = {"config": asdict(cfg),
                    "environment": describe_environment(cfg.workers, device, data_dir, synthetic)}
    with tempfile.TemporaryDirectory(prefix="svhn-bench-cache-") as cache_dir:
        datamodule = build_datamodule(cfg, data_dir, Path(cache_dir))
        progress("cache build")
        report["cache_build"] = measure_cache_build(datamodule)
        progress("pipeline and tutorial pipeline")
        report["pipeline"] = measure_pipeline(datamodule, cfg, device)
        report["tutorial_pipeline"] = median_rate(
            loader_pass(tutorial_loader(data_dir, "train", True, cfg.workers), cfg.max_images),
            cfg.repeats, device)
        progress("stages: gather, per-core work, device augmentation, copy")
        report["stages"] = measure_stages(cfg, data_dir, Path(cache_dir), device)
        device_datamodule = build_datamodule(cfg, data_dir, Path(cache_dir), "device")
        report["backbones"] = {
            b: benchmark_backbone(b, cfg, datamodule, data_dir, device, device_datamodule)
            for b in cfg.backbones}
    report["ratios"] = compute_ratios(report)
    return report


def _mapping(text: str) -> dict:
    """A mapping from the command line, read as ``svhn.fit --model.timm_args`` reads it
    (YAML, so JSON and the flow form ``{stem_width: 16}`` both); argparse turns the error
    into a usage line naming the option."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"not YAML or JSON ({error}): {text}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a mapping ({{name: value, ...}}): {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> tuple[BenchConfig, dict]:
    """The run's settings, and where its report goes (``json``, ``out``)."""
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(prog="python -m svhn.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", help="competition layout to measure on "
                        "(default: a synthetic set in --synthetic_dir)")
    parser.add_argument("--synthetic_dir", default=defaults.synthetic_dir)
    parser.add_argument("--synthetic_train", type=int, default=defaults.synthetic_train)
    parser.add_argument("--synthetic_test", type=int, default=defaults.synthetic_test)
    parser.add_argument("--backbones", nargs="*", default=defaults.backbones,
                        help="models to measure (none: the data rows and stages only)")
    parser.add_argument("--timm_args", type=_mapping, default=None,
                        help="arguments for timm.create_model, written as fit's "
                             "--model.timm_args, e.g. '{channels: [32, 64, 128, 256], "
                             "stem_width: 16}' (configs/real_cpu.yaml's)")
    parser.add_argument("--image_size", type=int, nargs=2, default=defaults.image_size,
                        metavar=("H", "W"))
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"images per batch (default {defaults.batch_size}; with "
                             f"--search svhn.predict's, {predictor.PREDICT_BATCH_SIZE})")
    parser.add_argument("--num_workers", type=int, default=None,
                        help=f"dataloader workers (default: the datamodule's, here "
                             f"{default_num_workers()})")
    parser.add_argument("--split", default=defaults.split, help="split to predict")
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--max_batches", type=int, default=defaults.max_batches,
                        help="batches per timed pass")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=defaults.device)
    parser.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    parser.add_argument("--channels_last", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="compile the backbone (as --model.compile); model alone is then "
                             "also measured eager")
    parser.add_argument("--augment", choices=PRESETS, default=defaults.augment,
                        help="training preset for the pipeline, stage and end-to-end rows")
    parser.add_argument("--cache_scale", type=float, default=defaults.cache_scale,
                        help="cache images at this multiple of image_size (as --data.cache_scale)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object (the table goes to stderr)")
    parser.add_argument("--out", help="also write the JSON report to this file")
    modes = parser.add_argument_group("other measurements (instead of the stages above)")
    modes.add_argument("--search", nargs="+", metavar="CKPT", default=None,
                       help="the gated zoom search against the full one, per checkpoint, "
                            "on the labelled --split of --data_dir (svhn.analysis.search_bench)")
    modes.add_argument("--gate", type=float, default=None,
                       help="with --search: the gate timed (default: each checkpoint's own)")
    modes.add_argument("--search_majority", type=float, default=None,
                       help="with --search: the two-step search's majority, timed and swept "
                            "(default: each checkpoint's own)")
    modes.add_argument("--search_merge", type=float, default=None,
                       help="with --search: the gated pass merges chains whose boxes overlap "
                            "by this IoU (default: each checkpoint's own)")
    modes.add_argument("--pseudo_labels", metavar="CKPT", default=None,
                       help="how well the checkpoint's confidence picks right answers on "
                            "--split (kept share and precision by threshold) and its "
                            "reading pass's time (svhn.analysis.pseudo_label_bench)")
    modes.add_argument("--single_read", action="store_true",
                       help="with --pseudo_labels: read with one zoom chain, not the search")
    modes.add_argument("--onnx", metavar="CKPT", default=None,
                       help="the checkpoint's reader exported to ONNX (svhn.export) against "
                            "the PyTorch reader: images/s of each on this CPU over --split of "
                            "--data_dir (default: generated images), and whether they agree "
                            "(svhn.analysis.onnx_bench)")
    modes.add_argument("--onnx_search", action="store_true",
                       help="with --onnx: the full zoom search exported and timed, not one "
                            "zoom chain")
    modes.add_argument("--scale", action="store_true",
                       help="how costs grow with the data: synthetic sets of --scale_train "
                            "train images and a --scale_test test set (svhn.analysis.scale_bench)")
    modes.add_argument("--scale_train", type=int, nargs="+", default=[2000, 8000, 32000])
    modes.add_argument("--scale_test", type=int, default=40000)
    args = vars(parser.parse_args(argv))
    output = {key: args.pop(key) for key in ("json", "out", "search", "gate",
                                               "search_majority", "search_merge", "scale",
                                               "scale_train", "scale_test", "pseudo_labels",
                                               "single_read", "onnx", "onnx_search")}
    args["image_size"] = tuple(args["image_size"])
    if args["batch_size"] is None:  # the search is timed at the batch svhn.predict reads in
        args["batch_size"] = predictor.PREDICT_BATCH_SIZE \
            if output["search"] or output["pseudo_labels"] or output["onnx"] \
            else defaults.batch_size
    return BenchConfig(**args), output


def _search_report(cfg: BenchConfig, output: dict) -> tuple[dict, str]:
    from svhn.analysis.search_bench import format_search_table, measure_search

    if not cfg.data_dir:
        raise SettingError("--search reads a labelled split: give --data_dir (and --split "
                           "val, say).")
    device = resolve_device(cfg.device)
    reports = [measure_search(path, cfg.data_dir, cfg.split, gate=output["gate"],
                              majority=output["search_majority"],
                              merge=output["search_merge"],
                              batch_size=cfg.batch_size, num_workers=cfg.workers,
                              accelerator=accelerator_for(device), repeats=cfg.repeats)
               for path in output["search"]]
    report = {"environment": describe_environment(cfg.workers, device, Path(cfg.data_dir),
                                                  False),
              "search": reports}
    return report, "\n\n".join(format_search_table(r) for r in reports)


def _pseudo_label_report(cfg: BenchConfig, output: dict) -> tuple[dict, str]:
    from svhn.analysis.pseudo_label_bench import format_pseudo_label_table, measure_pseudo_labels

    if not cfg.data_dir:
        raise SettingError("--pseudo_labels reads a split: give --data_dir (and --split val, "
                           "say).")
    device = resolve_device(cfg.device)
    report = measure_pseudo_labels(output["pseudo_labels"], cfg.data_dir, cfg.split,
                                   single_read=output["single_read"],
                                   batch_size=cfg.batch_size, num_workers=cfg.workers,
                                   accelerator=accelerator_for(device))
    report["environment"] = describe_environment(cfg.workers, device, Path(cfg.data_dir),
                                                 False)
    return report, format_pseudo_label_table(report)


def _onnx_report(cfg: BenchConfig, output: dict) -> tuple[dict, str]:
    from svhn.analysis.onnx_bench import format_onnx_table, measure_onnx
    from svhn.inference.export import require_export_packages

    require_export_packages("python -m svhn.bench --onnx")
    # Always on the CPU, whatever --device says: the question is onnxruntime's CPU speed.
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)  # onnxruntime is given as many
    try:
        report = measure_onnx(output["onnx"], cfg.data_dir,
                              cfg.split if cfg.data_dir else "val", batch_size=cfg.batch_size,
                              repeats=cfg.repeats, search=output["onnx_search"])
    finally:
        torch.set_num_threads(threads)
    report["environment"] = describe_environment(
        0, torch.device("cpu"), Path(cfg.data_dir) if cfg.data_dir else Path("generated"),
        cfg.data_dir is None)
    return report, format_onnx_table(report)


def _scale_report(cfg: BenchConfig, output: dict) -> tuple[dict, str]:
    from svhn.analysis.scale_bench import format_scale_table, measure_scale, plot_scale

    report = measure_scale(cfg, output["scale_train"], output["scale_test"])
    table = format_scale_table(report)
    if output["out"]:
        figure = plot_scale(report, Path(output["out"]).with_suffix(".png"))
        table += f"\nFigure: {figure}"
    return report, table


@command
def main(argv: Sequence[str] | None = None) -> int:
    cfg, output = parse_args(argv)
    if cfg.repeats < 1 or cfg.max_batches < 1:
        raise SettingError("--repeats and --max_batches must be at least 1.")
    with quiet_lightning():  # also Lightning's per-fit banners
        if output["search"]:
            report, table = _search_report(cfg, output)
        elif output["pseudo_labels"]:
            report, table = _pseudo_label_report(cfg, output)
        elif output["onnx"]:
            report, table = _onnx_report(cfg, output)
        elif output["scale"]:
            report, table = _scale_report(cfg, output)
        else:
            report = run_benchmark(cfg)
            table = format_table(report)
    text = json.dumps(report, indent=2)
    if output["out"]:
        Path(output["out"]).write_text(text + "\n")
    if output["json"]:
        print(table, file=sys.stderr)
        print(text)
    else:
        print(table)
    return 0
