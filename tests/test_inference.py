"""The inference layer: checkpoint settings, older checkpoints, views, ensembles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PLAIN_MODEL

from svhn import inference
from svhn.checkpoints import CheckpointError, load_reader, read_checkpoint
from svhn.images import DEFAULT_IMAGE_SIZE
from svhn.reader import DigitReader

# Format 1 (svhn before the reader had its own module): weights at the top level of the
# state dict, ``zoom: bool`` beside ``zoom_steps``, no recorded format or precision. The
# checkpoints are written here from a seeded reader, in exactly the layout that code saved
# (checked against files it wrote), so no binary fixture lives in the repository.
FORMAT_1_SETTINGS = {
    "legacy_plain": {"feature_grid": None, "box_head": False, "zoom": False, "zoom_steps": 1},
    "legacy_zoom": {"feature_grid": (2, 4), "box_head": True, "zoom": True, "zoom_steps": 2},
}


def write_format_1_checkpoint(path: Path, name: str) -> DigitReader:
    """A format-1 checkpoint of a seeded simple_cnn reader at ``path``; returns the reader
    (today's code, the same weights) whose outputs the old checkpoint must reproduce."""
    old = FORMAT_1_SETTINGS[name]
    torch.manual_seed(0)
    reader = DigitReader(backbone="simple_cnn", image_size=(64, 128),
                         feature_grid=old["feature_grid"], box_head=old["box_head"],
                         zoom_steps=old["zoom_steps"] if old["zoom"] else 0).eval()
    zoom = name == "legacy_zoom"
    torch.save({
        "epoch": 1, "global_step": 4, "pytorch-lightning_version": "2.6.6",
        "state_dict": reader.state_dict(),  # top-level names: no "reader." prefix
        "hparams_name": "kwargs",
        "hyper_parameters": {
            "backbone": "simple_cnn", "pretrained": False, "pretrained_weights": None,
            "max_len": 5, "image_size": (64, 128), "hidden_dim": 0, "dropout": 0.0,
            "label_smoothing": 0.0, "box_loss_weight": 1.0, "zoom_margin": 0.15,
            "init_from": None, "optimizer": "adam", "lr": 0.001, "weight_decay": 0.0,
            "momentum": 0.9, "scheduler": "none", "step_epochs": 10,
            "channels_last": False, "compile": False, **old},
        "datamodule_hparams_name": "kwargs",
        "datamodule_hyper_parameters": {
            "data_dir": "/tmp/legacy_data/mchar", "image_size": (64, 128), "batch_size": 16,
            "num_workers": 0, "max_len": 5, "augment": "zoom" if zoom else "baseline",
            "train_on": ("train",), "val_on": "val", "predict_on": "test_a",
            "cache_dir": None, "cache_scale": 2.0 if zoom else 1.0,
            "eval_scale": 2.0 if zoom else 1.0, "box_targets": zoom,
            "synthetic_fallback": False, "synthetic_size": 2000, "extra_train": (),
            "synthetic_extra": 0},
    }, path)
    return reader


@pytest.fixture
def legacy_plain(tmp_path) -> Path:
    path = tmp_path / "legacy_plain.ckpt"
    write_format_1_checkpoint(path, "legacy_plain")
    return path


def legacy_images() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randint(0, 256, (4, 3, *size), generator=generator, dtype=torch.uint8)
            for name, size in (("legacy_plain", (64, 128)), ("legacy_zoom", (128, 256)))}


@pytest.mark.parametrize("name", ["legacy_plain", "legacy_zoom"])
def test_checkpoints_of_the_previous_format_predict_as_before(name, tmp_path):
    original = write_format_1_checkpoint(tmp_path / f"{name}.ckpt", name)
    reader = load_reader(tmp_path / f"{name}.ckpt")
    assert reader.zoom_steps == (2 if name == "legacy_zoom" else 0)  # zoom: bool mapped
    with torch.inference_mode():
        expected, out = original(legacy_images()[name]), reader(legacy_images()[name])
    probs = out["logits"].float().softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected["logits"].float().softmax(-1).numpy(),
                               atol=1e-5)
    if name == "legacy_zoom":
        np.testing.assert_allclose(out["box"].numpy(), expected["box"].numpy(), atol=1e-5)


def test_checkpoint_settings_come_from_the_checkpoint_or_defaults(trained_checkpoint,
                                                                  tmp_path):
    contents = read_checkpoint(trained_checkpoint.best)
    assert contents.image_size == DEFAULT_IMAGE_SIZE and contents.max_len == 5
    assert contents.precision == "32-true" and contents.epoch is not None
    raw = torch.load(trained_checkpoint.best, map_location="cpu", weights_only=False)
    assert raw["svhn_format"] == 2 and raw["trainer_precision"] == "32-true"
    del raw["datamodule_hyper_parameters"], raw["trainer_precision"]
    bare = tmp_path / "bare.ckpt"
    torch.save(raw, bare)
    contents = read_checkpoint(bare)
    assert contents.image_size == DEFAULT_IMAGE_SIZE and contents.precision == "32-true"


def test_a_format_1_checkpoint_takes_its_precision_from_its_run_config(tmp_path,
                                                                      legacy_plain):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer:\n  precision: bf16-mixed\n")
    ckpt = run / "checkpoints" / "old.ckpt"
    ckpt.write_bytes(legacy_plain.read_bytes())
    assert read_checkpoint(ckpt).precision == "bf16-mixed"
    assert read_checkpoint(legacy_plain).precision == "32-true"


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{junk}: not a checkpoint"):
        read_checkpoint(junk)
    weights_only = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, weights_only)
    with pytest.raises(CheckpointError, match="not a checkpoint of svhn.fit"):
        read_checkpoint(weights_only)


def test_ensemble_members_must_share_max_len(tmp_path, legacy_plain):
    members = []
    for name, max_len in (("a", 5), ("b", 6)):
        raw = torch.load(legacy_plain, weights_only=False)
        raw["hyper_parameters"]["max_len"] = max_len
        torch.save(raw, tmp_path / f"{name}.ckpt")
        members.append(read_checkpoint(tmp_path / f"{name}.ckpt"))
    with pytest.raises(CheckpointError, match=r"a.ckpt: 5, b.ckpt: 6"):
        inference.shared_max_len(members)


def test_views_are_deterministic_and_keep_the_shape():
    images = torch.randn(2, 3, 16, 32)
    assert torch.equal(inference.VIEWS["identity"](images), images)
    for name in inference.TTA_VIEWS:
        view = inference.VIEWS[name](images)
        assert view.shape == images.shape
        assert torch.equal(view, inference.VIEWS[name](images))
    assert not torch.allclose(inference.VIEWS["shift_left"](images), images)
    with pytest.raises(ValueError, match="unknown views"):
        inference.check_views(["upside_down"])


def test_tta_averages_the_views_probabilities(legacy_plain):
    reader = load_reader(legacy_plain)
    images = legacy_images()["legacy_plain"]
    batch = {"image": images, "file_name": list("abcd"), "target": torch.zeros(4, 5)}
    with torch.inference_mode():
        tta = inference.ReaderPredictor(reader, inference.TTA_VIEWS).predict_step(batch, 0)
        per_view = [inference.ReaderPredictor(reader, (v,)).predict_step(batch, 0)["probs"]
                    for v in inference.TTA_VIEWS]
    assert torch.allclose(tta["probs"], torch.stack(per_view).mean(0), atol=1e-6)
    assert not torch.allclose(per_view[0], per_view[1])  # the views really differ


def test_the_ensemble_averages_members_and_refuses_different_images():
    a = inference.Predictions(["x", "y"], torch.zeros(2, 5, 11))
    b = inference.Predictions(["x", "y"], torch.ones(2, 5, 11))
    assert torch.equal(inference.average([a, b]).probs, torch.full((2, 5, 11), 0.5))
    with pytest.raises(RuntimeError, match="different images"):
        inference.average([a, inference.Predictions(["x", "z"], torch.ones(2, 5, 11))])


def test_gathered_rows_must_cover_each_image_exactly_once():
    part = inference.Predictions(["b", "a"], torch.arange(2.0).view(2, 1, 1))
    merged = inference._merge_sorted([part], ["a", "b"])
    assert merged.file_names == ["a", "b"] and merged.probs.flatten().tolist() == [1.0, 0.0]
    with pytest.raises(RuntimeError, match="exactly once"):
        inference._merge_sorted([part, part], ["a", "b"])


def test_a_previous_format_checkpoint_validates_through_the_fit_cli(synthetic_data_dir,
                                                                     tmp_path, legacy_plain):
    from svhn.fit import build_cli

    legacy = legacy_plain
    cli = build_cli(["validate", *PLAIN_MODEL, "--ckpt_path", str(legacy),
                     "--data.data_dir", str(synthetic_data_dir), "--data.num_workers", "0",
                     "--data.cache_dir", str(tmp_path / "cache"),
                     "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    # Its weights (top-level names in format 1) were loaded into the reader, not ignored.
    expected = torch.load(legacy, weights_only=False)["state_dict"]
    name = next(k for k in expected if k.startswith("heads."))
    assert torch.equal(cli.model.reader.state_dict()[name], expected[name])
