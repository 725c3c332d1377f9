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

FIXTURES = Path(__file__).parent / "fixtures"


def legacy_images() -> dict[str, torch.Tensor]:
    """The images the legacy outputs were computed on (see fixtures/README.md)."""
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randint(0, 256, (4, 3, *size), generator=generator, dtype=torch.uint8)
            for name, size in (("legacy_plain", (64, 128)), ("legacy_zoom", (128, 256)))}


@pytest.mark.parametrize("name", ["legacy_plain", "legacy_zoom"])
def test_checkpoints_of_the_previous_format_predict_as_before(name):
    expected = np.load(FIXTURES / "legacy_outputs.npz")
    reader = load_reader(FIXTURES / f"{name}.ckpt")
    assert reader.zoom_steps == (2 if name == "legacy_zoom" else 0)  # zoom: bool mapped
    with torch.inference_mode():
        out = reader(legacy_images()[name])
    probs = out["logits"].float().softmax(-1).numpy()
    np.testing.assert_allclose(probs, expected[f"{name}_probs"], atol=1e-5)
    if name == "legacy_zoom":
        np.testing.assert_allclose(out["box"].numpy(), expected["legacy_zoom_box"], atol=1e-5)


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


def test_a_format_1_checkpoint_takes_its_precision_from_its_run_config(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("trainer:\n  precision: bf16-mixed\n")
    ckpt = run / "checkpoints" / "old.ckpt"
    ckpt.write_bytes((FIXTURES / "legacy_plain.ckpt").read_bytes())
    assert read_checkpoint(ckpt).precision == "bf16-mixed"
    assert read_checkpoint(FIXTURES / "legacy_plain.ckpt").precision == "32-true"


def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=f"{junk}: not a checkpoint"):
        read_checkpoint(junk)
    weights_only = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, weights_only)
    with pytest.raises(CheckpointError, match="not a checkpoint of svhn.fit"):
        read_checkpoint(weights_only)


def test_ensemble_members_must_share_max_len(tmp_path):
    members = []
    for name, max_len in (("a", 5), ("b", 6)):
        raw = torch.load(FIXTURES / "legacy_plain.ckpt", weights_only=False)
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


def test_tta_averages_the_views_probabilities():
    reader = load_reader(FIXTURES / "legacy_plain.ckpt")
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
                                                                     tmp_path):
    from svhn.fit import build_cli

    legacy = FIXTURES / "legacy_plain.ckpt"
    cli = build_cli(["validate", *PLAIN_MODEL, "--ckpt_path", str(legacy),
                     "--data.data_dir", str(synthetic_data_dir), "--data.num_workers", "0",
                     "--data.cache_dir", str(tmp_path / "cache"),
                     "--trainer.default_root_dir", str(tmp_path),
                     "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    # Its weights (top-level names in format 1) were loaded into the reader, not ignored.
    expected = torch.load(legacy, weights_only=False)["state_dict"]
    name = next(k for k in expected if k.startswith("heads."))
    assert torch.equal(cli.model.reader.state_dict()[name], expected[name])
