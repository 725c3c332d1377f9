"""Tests for augmentation on the model's device (svhn.data.batch_augment, augment_on: device).

The albumentations presets are the reference: the device path must give the same
distribution of crops, boxes and colours (statistics, not pixels), keep each box on its
digits, repeat under a seed and run inside a Trainer, also under 2-process CPU DDP.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.drawing import bright_extent, rectangles
from helpers.runs import run_module
from lightning.pytorch.callbacks import Callback

from svhn.data.batch_augment import BatchAugment, affine_grid, derive_seed
from svhn.data.datamodule import SVHNDataModule
from svhn.model.training import DigitSequenceModel

PRESETS = ("baseline", "strong", "zoom")
IMAGE_SIZE = (32, 64)


def datamodule(data_dir: Path, cache_dir: Path, preset: str = "zoom", **kwargs
               ) -> SVHNDataModule:
    kwargs = {"image_size": IMAGE_SIZE, "cache_scale": 2.0, "num_workers": 0,
              "batch_size": 16, "augment": preset, "box_targets": True, **kwargs}
    return SVHNDataModule(str(data_dir), cache_dir=str(cache_dir), **kwargs)


@pytest.mark.parametrize("backend", ["torch", "opencv"])
@pytest.mark.parametrize("preset", PRESETS)
def test_moved_boxes_still_bound_the_digits(preset, backend):
    generator = torch.Generator().manual_seed(0)
    n = 64
    corner = torch.rand(n, 2, generator=generator) * 0.5 + 0.05
    size = torch.rand(n, 2, generator=generator) * 0.3 + 0.15
    boxes = torch.cat([corner, corner + size], 1)
    images = rectangles(boxes, (64, 128))  # cache size: twice the output size
    augment = BatchAugment(preset, IMAGE_SIZE, seed=1, backend=backend)
    augment.colour = None  # geometry only: inversion or jitter would hide the rectangle
    out, moved = augment(images, boxes)
    assert out.shape == (n, 3, *IMAGE_SIZE) and out.dtype == torch.uint8
    seen = bright_extent(out)
    pixel = torch.tensor([1 / IMAGE_SIZE[1], 1 / IMAGE_SIZE[0]]).repeat(2)
    # Within 1.5 output pixels of where the bright pixels are (bilinear edges blur by ~1).
    assert ((seen - moved).abs() <= 1.5 * pixel).all(), (seen - moved).abs().max(0)
    assert not torch.allclose(moved, boxes, atol=0.02)  # the boxes did move


@pytest.mark.parametrize("preset", ["none", *PRESETS])
def test_both_backends_make_the_same_batch(preset):
    # The same seed draws the same parameters; torch (grid_sample, batched colour) and
    # OpenCV (warpAffine, cv2.transform per image) then differ only by rounding. Noise
    # itself is drawn by each backend (for the whole batch / the chosen samples): left out.
    generator = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (32, 3, 64, 128), dtype=torch.uint8, generator=generator)
    images = F.avg_pool2d(noise.float(), 5, 1, 2).round().to(torch.uint8)  # smooth, not flat
    boxes = torch.tensor([[0.3, 0.25, 0.6, 0.8]]).repeat(32, 1)
    made = []
    for backend in ("torch", "opencv"):
        augment = BatchAugment(preset, IMAGE_SIZE, seed=3, backend=backend)
        if augment.colour is not None:
            augment.colour = replace(augment.colour, noise_p=0.0)
        made.append(augment(images, boxes))
    by_torch, by_opencv = made
    difference = (by_torch[0].float() - by_opencv[0].float()).abs()
    assert difference.mean() < 0.5 and difference.max() <= 3
    assert torch.allclose(by_torch[1], by_opencv[1])
    if preset != "none":  # and the batch did change
        plain = BatchAugment("none", IMAGE_SIZE, backend="torch")(images, boxes)[0]
        assert (by_torch[0].float() - plain.float()).abs().mean() > 5


def test_boxes_that_leave_the_image_become_the_whole_image():
    boxes = torch.tensor([[0.2, 0.2, 0.4, 0.4], [0.2, 0.2, 0.4, 0.4]])
    shift_out = torch.eye(3).repeat(2, 1, 1)
    shift_out[0, 0, 2] = 2.0  # the first box moves right, past the image's edge
    moved = BatchAugment.move_boxes(boxes, shift_out)
    assert moved[0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert moved[1].tolist() == pytest.approx([0.2, 0.2, 0.4, 0.4])


def test_the_grid_is_torch_s_affine_grid():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = F.affine_grid(theta, (5, 3, 7, 11), align_corners=False)
    assert torch.allclose(affine_grid(theta, (7, 11)), expected, atol=1e-5)


def test_no_augmentation_is_a_plain_resize():
    images = torch.randint(0, 256, (4, 3, 64, 128), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9]]).repeat(4, 1)
    out, moved = BatchAugment("none", IMAGE_SIZE)(images, boxes)
    resized = F.interpolate(images.float(), size=IMAGE_SIZE, mode="bilinear",
                            align_corners=False).round()
    assert (out.float() - resized).abs().max() <= 1
    assert torch.allclose(moved, boxes, atol=1e-6)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_seed_repeats_and_other_seeds_differ(preset):
    images = torch.randint(0, 256, (8, 3, 64, 128), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.3, 0.2, 0.6, 0.8]]).repeat(8, 1)
    first = BatchAugment(preset, IMAGE_SIZE, seed=5)
    runs = [first(images, boxes) for _ in range(2)]  # one stream: batches differ
    again = BatchAugment(preset, IMAGE_SIZE, seed=5)(images, boxes)
    other = BatchAugment(preset, IMAGE_SIZE, seed=6)(images, boxes)
    assert torch.equal(runs[0][0], again[0]) and torch.equal(runs[0][1], again[1])
    assert not torch.equal(runs[0][0], runs[1][0])
    assert not torch.equal(runs[0][0], other[0])
    first.reseed(5)
    assert torch.equal(first(images, boxes)[0], again[0])


def test_seeds_differ_by_rank_and_epoch_and_repeat(synthetic_data_dir, image_cache_dir,
                                                   monkeypatch):
    seeds = {derive_seed(42, rank, epoch) for rank in range(4) for epoch in range(4)}
    assert len(seeds) == 16 and derive_seed(42, 1, 2) == derive_seed(42, 1, 2)
    assert all(0 <= s < 2**63 for s in seeds)
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")
    dm = datamodule(synthetic_data_dir, image_cache_dir, augment_on="device")
    by_rank = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, current_epoch=3)
        by_rank.append(dm._augment_seed())
    assert by_rank == [derive_seed(42, 0, 3), derive_seed(42, 1, 3)]


# -- the same distribution as the albumentations presets ------------------------------------
def box_statistics(boxes: np.ndarray) -> np.ndarray:
    """Mean and spread of box width, height and centre (normalised)."""
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return np.array([f(v) for v in (width, height, cx, cy) for f in (np.mean, np.std)])


def colour_statistics(images: torch.Tensor) -> np.ndarray:
    """Over draws of one image: mean and spread of its brightness, contrast and colourfulness."""
    images = images.float()
    brightness, contrast = images.mean((1, 2, 3)), images.std((1, 2, 3))
    colourful = (images - images.mean(1, keepdim=True)).abs().mean((1, 2, 3))
    return np.array([f(v).item() for v in (brightness, contrast, colourful)
                     for f in (torch.mean, torch.std)])


@pytest.mark.parametrize("preset", PRESETS)
def test_crops_and_boxes_are_distributed_as_the_albumentations_preset(
        preset, synthetic_data_dir, image_cache_dir):
    dm = datamodule(synthetic_data_dir, image_cache_dir, preset)
    reference = dm.dataset("train", preset)
    reference.transform.set_random_seed(0)
    gathered = dm.dataset("train", preset, gather_only=True)
    augment = BatchAugment(preset, IMAGE_SIZE, seed=0)
    passes, everything = 3, list(range(len(gathered)))
    cpu = np.stack([reference[i]["box"].numpy() for _ in range(passes) for i in everything])
    device = []
    for _ in range(passes):
        batch = gathered.__getitems__(everything)
        device.append(augment(batch["image"], batch["box"])[1].numpy())
    device = np.concatenate(device)
    cpu_stats, device_stats = box_statistics(cpu), box_statistics(device)
    # Both moved the boxes the same way: the same means and spreads, within 0.03 (about
    # three standard errors of a difference over these 480 draws each) ...
    assert np.abs(cpu_stats - device_stats).max() < 0.03, (cpu_stats, device_stats)
    # ... and that tolerance tells the preset apart from no augmentation at all.
    assert np.abs(box_statistics(gathered.boxes) - cpu_stats).max() > 0.05


@pytest.mark.parametrize("preset", PRESETS)
def test_colours_are_distributed_as_the_albumentations_preset(
        preset, synthetic_data_dir, image_cache_dir):
    dm = datamodule(synthetic_data_dir, image_cache_dir, preset)
    reference = dm.dataset("train", preset)
    reference.transform.set_random_seed(0)
    gathered = dm.dataset("train", preset, gather_only=True)
    draws = 600
    for index in (0, 7):
        cpu = torch.stack([reference[index]["image"] for _ in range(draws)])
        cpu_stats = colour_statistics(cpu)
        batch = gathered.__getitems__([index] * draws)
        for backend in ("torch", "opencv"):
            augment = BatchAugment(preset, IMAGE_SIZE, seed=0, backend=backend)
            device_stats = colour_statistics(augment(batch["image"], batch["box"])[0])
            # Means within 10 %, spreads within 25 % (a spread's standard error is ~4 %
            # here). Measured with 1,500 draws: brightness ~4 % higher and colourfulness
            # ~5 % lower than albumentations (one clip after the whole jitter, not after
            # each of its steps; hue turned in YIQ, not HSV).
            means, spreads = slice(0, None, 2), slice(1, None, 2)
            assert np.allclose(device_stats[means], cpu_stats[means], rtol=0.1), (
                backend, cpu_stats, device_stats)
            assert np.allclose(device_stats[spreads], cpu_stats[spreads], rtol=0.25), (
                backend, cpu_stats, device_stats)
        augment.colour = None
        no_colour = colour_statistics(augment(batch["image"], batch["box"])[0])
        assert no_colour[1] < 0.6 * cpu_stats[1]  # the statistic sees the jitter


# -- in the data module and a Trainer ------------------------------------------------------
def test_gather_only_batches_are_cached_images_with_unmoved_boxes(
        synthetic_data_dir, image_cache_dir):
    dm = datamodule(synthetic_data_dir, image_cache_dir, augment_on="device")
    dm.setup("fit")
    assert dm.batch_augment is not None and dm.batch_augment.preset == "zoom"
    batch = next(iter(dm.train_dataloader()))
    cache = dm.train_set.datasets[0]
    assert batch["image"].shape == (16, 3, 64, 128) and batch["image"].dtype == torch.uint8
    positions = [cache.names.index(name) for name in batch["file_name"]]
    assert torch.equal(batch["box"], torch.from_numpy(cache.boxes[positions]))
    assert torch.equal(batch["target"], cache.targets[positions])
    expected = torch.from_numpy(np.array(cache.cache.array[cache.cache_index[positions]]))
    assert torch.equal(batch["image"], expected.permute(0, 3, 1, 2))


def test_cpu_choice_keeps_albumentations_and_auto_follows_the_device(
        synthetic_data_dir, image_cache_dir):
    dm = datamodule(synthetic_data_dir, image_cache_dir, augment_on="cpu")
    dm.setup("fit")
    assert dm.batch_augment is None
    assert next(iter(dm.train_dataloader()))["image"].shape[-2:] == IMAGE_SIZE
    auto = datamodule(synthetic_data_dir, image_cache_dir, augment_on="auto")
    auto._device_type = lambda: "cuda"
    assert auto.augments_on_device()
    with pytest.raises(ValueError, match="augment_on"):
        datamodule(synthetic_data_dir, image_cache_dir, augment_on="gpu")


class BatchSpy(Callback):
    """What the model receives: training and validation batch shapes and boxes."""

    def __init__(self):
        self.train, self.val = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append((tuple(batch["image"].shape), batch["box"].clone()))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(tuple(batch["image"].shape))


def test_fit_augments_training_batches_on_the_device_only(synthetic_data_dir, image_cache_dir):
    dm = datamodule(synthetic_data_dir, image_cache_dir, augment_on="device")
    spy = BatchSpy()
    trainer = L.Trainer(accelerator="cpu", devices=1, fast_dev_run=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[spy])
    model = DigitSequenceModel(image_size=IMAGE_SIZE, box_head=True)
    trainer.fit(model, datamodule=dm)
    assert trainer.state.finished
    # Gathered at cache size (64x128), the model sees the augmented 32x64 batch...
    assert [shape for shape, _ in spy.train] == [(16, 3, *IMAGE_SIZE)] * 2
    assert spy.val == [(16, 3, *IMAGE_SIZE)] * 2  # ... and validation is resized, not augmented
    raw = torch.from_numpy(dm.train_set.datasets[0].boxes)
    for _, boxes in spy.train:  # moved boxes (zoom leaves ~6 % as they were)
        unmoved = torch.cdist(boxes, raw).min(1).values < 1e-6
        assert unmoved.float().mean() < 0.5


def test_a_seeded_fit_augments_the_same_batches_again(synthetic_data_dir, image_cache_dir):
    def boxes_seen() -> list[torch.Tensor]:
        L.seed_everything(3, verbose=False)
        spy = BatchSpy()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, limit_train_batches=2,
                            limit_val_batches=0, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[spy])
        trainer.fit(DigitSequenceModel(image_size=IMAGE_SIZE, box_head=True),
                    datamodule=datamodule(synthetic_data_dir, image_cache_dir,
                                          augment_on="device"))
        return [boxes for _, boxes in spy.train]

    first, second = boxes_seen(), boxes_seen()
    assert len(first) == 4 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], first[2])  # epoch 1 is not epoch 0 again


def test_ddp_two_cpu_processes_train_with_device_augmentation(synthetic_data_dir, tmp_path):
    args = ["svhn.fit", "--data.data_dir", str(synthetic_data_dir), "--data.cache_dir",
            str(tmp_path / "cache"), "--data.num_workers", "0", "--data.image_size", "[32, 64]",
            "--data.batch_size", "16", "--data.augment", "zoom", "--data.cache_scale", "2",
            "--data.augment_on", "device", "--model.box_head", "true",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3",
            "--trainer.limit_val_batches", "2", "--trainer.accelerator", "cpu",
            "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.enable_progress_bar", "false"]
    result = run_module(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "default" / "version_0"
    assert "augment_on: device" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
