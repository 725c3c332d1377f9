"""The inference layer: checkpoint settings, older checkpoints, views, ensembles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import write_format_1_checkpoint
from helpers.layout import entry, write_split
from helpers.logits import reading_logits
from helpers.runs import PLAIN_MODEL
from lightning.pytorch.callbacks import ModelSummary
from PIL import Image

from svhn.checkpoint_format import CheckpointError, read_checkpoint
from svhn.data.images import DEFAULT_IMAGE_SIZE
from svhn.inference import cli as predict_cli
from svhn.inference import ensemble, predictions, predictor, views
from svhn.inference.checkpoints import load_reader
from svhn.model import vote


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
        ensemble.shared_max_len(members)


def test_views_are_deterministic_and_keep_the_shape():
    images = torch.randn(2, 3, 16, 32)
    assert torch.equal(views.VIEWS["identity"](images), images)
    for name in views.TTA_VIEWS:
        view = views.VIEWS[name](images)
        assert view.shape == images.shape
        assert torch.equal(view, views.VIEWS[name](images))
    assert not torch.allclose(views.VIEWS["shift_left"](images), images)
    with pytest.raises(ValueError, match="unknown views"):
        views.check_views(["upside_down"])


def test_tta_averages_the_views_probabilities(legacy_plain):
    reader = load_reader(legacy_plain)
    images = legacy_images()["legacy_plain"]
    batch = {"image": images, "file_name": list("abcd"), "target": torch.zeros(4, 5)}
    with torch.inference_mode():
        tta = predictor.ReaderPredictor(reader, views.TTA_VIEWS).predict_step(batch, 0)
        per_view = [predictor.ReaderPredictor(reader, (v,)).predict_step(batch, 0)["probs"]
                    for v in views.TTA_VIEWS]
    assert torch.allclose(tta["probs"], torch.stack(per_view).mean(0), atol=1e-6)
    assert not torch.allclose(per_view[0], per_view[1])  # the views really differ


def test_the_ensemble_averages_members_and_refuses_different_images():
    a = predictions.Predictions(["x", "y"], torch.zeros(2, 5, 11))
    b = predictions.Predictions(["x", "y"], torch.ones(2, 5, 11))
    assert torch.equal(ensemble.combine([a, b]).probs, torch.full((2, 5, 11), 0.5))
    with pytest.raises(RuntimeError, match="different images"):
        ensemble.combine([a, predictions.Predictions(["x", "z"], torch.ones(2, 5, 11))])


def chains_reading(readings: list[list[int]], confidences: list[float],
                   boxes: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's chains: (1, K, 5, 11) probabilities, chain k reading ``readings[k]``
    (padded with blanks) at ``confidences[k]`` per position, ending on (1, K, 4) ``boxes``."""
    probs = torch.cat([reading_logits([reading + [10] * (5 - len(reading))], confidence,
                                      max_len=5).exp()
                       for reading, confidence in zip(readings, confidences)])
    return probs[None], torch.tensor(boxes)[None]


def test_an_ensemble_of_searching_readers_votes_over_all_their_chains():
    here, there = [0.1, 0.2, 0.4, 0.8], [0.6, 0.2, 0.9, 0.8]
    # A chain's vote: its confidence ^ 5 positions (0.6: 0.078, 0.75: 0.237, 0.9: 0.590).
    # Member a: three chains read "12" here (0.23 in all), one "7" there: a answers "12".
    a_probs, a_boxes = chains_reading([[1, 2]] * 3 + [[7]], [0.6] * 3 + [0.5],
                                      [here] * 3 + [there])
    # Member b: "7" there at 0.9 (0.59) outweighs two "12" here at 0.75 (0.47): "7".
    b_probs, b_boxes = chains_reading([[7], [1, 2], [1, 2]], [0.9, 0.75, 0.75],
                                      [there, here, here])
    members = []
    for probs, boxes in ((a_probs, a_boxes), (b_probs, b_boxes)):
        voted, box = vote.vote_over_chains(probs, boxes)
        members.append(predictions.Predictions(file_names=["x"], probs=voted, boxes=box,
                                               chain_probs=probs, chain_boxes=boxes))
    assert members[0].probs.argmax(-1).tolist() == [[1, 2, 10, 10, 10]]
    assert members[1].probs.argmax(-1).tolist() == [[7, 10, 10, 10, 10]]
    # Averaging the two answers follows b's more confident "7"; all the chains together
    # back "12" here (0.23 + 0.47 against 0.03 + 0.59 for "7").
    mean = torch.stack([m.probs for m in members]).mean(0)
    assert mean.argmax(-1).tolist() == [[7, 10, 10, 10, 10]]
    both = ensemble.combine(members)
    assert both.probs.argmax(-1).tolist() == [[1, 2, 10, 10, 10]]
    torch.testing.assert_close(both.boxes, torch.tensor([here]))
    assert both.chain_probs.shape == (1, 7, 5, 11)
    paths = [Path("a.ckpt"), Path("b.ckpt")]
    assert "one vote over all 7 zoom chains" in ensemble.combination_notice(members, paths)
    # A member without chains (no search): the answers are averaged, and the user is told.
    plain = predictions.Predictions(file_names=["x"], probs=a_probs[:, 0],
                                    boxes=torch.tensor([here]))
    torch.testing.assert_close(ensemble.combine([members[1], plain]).probs,
                               (members[1].probs + plain.probs) / 2)
    notice = ensemble.combination_notice([members[1], plain], paths)
    assert "averaged" in notice and "b.ckpt does not run the zoom search" in notice


class ChainsOnly(torch.nn.Module):
    """A stand-in searching reader: three chains per image, reading "1", "1", "7" in
    whatever view it is given, all ending on the box (0.2, 0.2, 0.6, 0.6) of that view."""

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def forward(self, images: torch.Tensor) -> dict:
        n = len(images)
        probs, _ = chains_reading([[1], [1], [7]], [0.6, 0.6, 0.9], [[0.2, 0.2, 0.6, 0.6]] * 3)
        logits = probs.log().expand(n, -1, -1, -1)
        boxes = torch.tensor([0.2, 0.2, 0.6, 0.6]).expand(n, 3, 4)
        return {"logits": logits[:, 0], "box": boxes[:, 0], "chain_logits": logits,
                "chain_boxes": boxes}


def test_test_time_views_of_a_searching_reader_vote_with_all_their_chains():
    names = ("identity", "shift_right", "zoom_in")
    batch = {"image": torch.rand(2, 3, 16, 32), "file_name": ["a", "b"],
             "target": torch.zeros(2, 5)}
    out = predictor.ReaderPredictor(ChainsOnly(), names).predict_step(batch, 0)
    assert out["chain_probs"].shape == (2, 9, 5, 11)
    # Each view's boxes are put back where they are in the image, not the view.
    for index, name in enumerate(names):
        expected = views.VIEWS[name].box_to_image(torch.tensor([0.2, 0.2, 0.6, 0.6]))
        torch.testing.assert_close(out["chain_boxes"][:, 3 * index], expected.expand(2, 4))
    probs, box = vote.vote_over_chains(out["chain_probs"], out["chain_boxes"])
    torch.testing.assert_close(out["probs"], probs)
    torch.testing.assert_close(out["box"], box)


def test_views_map_the_boxes_they_find_back_to_the_image():
    image = torch.zeros(1, 1, 40, 100)
    image[..., 10:30, 30:50] = 1.0  # a block at x 0.3-0.5, y 0.25-0.75
    for name, view in views.VIEWS.items():
        seen = view(image)[0, 0] > 0.5
        columns, rows = seen.any(0).nonzero()[:, 0], seen.any(1).nonzero()[:, 0]
        found = torch.tensor([[columns.min() / 100, rows.min() / 40,
                               (columns.max() + 1) / 100, (rows.max() + 1) / 40]])
        torch.testing.assert_close(view.box_to_image(found),
                                   torch.tensor([[0.3, 0.25, 0.5, 0.75]]), atol=0.02,
                                   rtol=0, msg=name)


def test_gathered_rows_must_cover_each_image_exactly_once():
    part = predictions.Predictions(["b", "a"], torch.arange(2.0).view(2, 1, 1))
    merged = predictions.merge_sorted([part], ["a", "b"])
    assert merged.file_names == ["a", "b"] and merged.probs.flatten().tolist() == [1.0, 0.0]
    with pytest.raises(RuntimeError, match="exactly once"):
        predictions.merge_sorted([part, part], ["a", "b"])


def test_a_previous_format_checkpoint_validates_through_the_fit_cli(synthetic_data_dir,
                                                                     tmp_path, legacy_plain):
    from svhn.train.cli import build_cli

    legacy = legacy_plain
    with pytest.warns(UserWarning, match="model.zoom is replaced by model.zoom_steps"):
        cli = build_cli(["validate", *PLAIN_MODEL, "--ckpt_path", str(legacy),
                         "--data.data_dir", str(synthetic_data_dir), "--data.num_workers", "0",
                         "--data.cache_dir", str(tmp_path / "cache"),
                         "--trainer.default_root_dir", str(tmp_path),
                         "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    # Its weights (top-level names in format 1) were loaded into the reader, not ignored.
    expected = torch.load(legacy, weights_only=False)["state_dict"]
    name = next(k for k in expected if k.startswith("heads."))
    assert torch.equal(cli.model.reader.state_dict()[name], expected[name])


def test_views_move_and_zoom_the_image_about_its_centre():
    columns = torch.arange(40.0).expand(2, 3, 8, 40)  # each pixel holds its column index
    rows = torch.arange(8.0)[:, None].expand(2, 3, 8, 40)  # ... or its row index
    moved = views.AffineView(shift_x=0.1)  # 0.1 of the width: 4 columns right
    torch.testing.assert_close(moved(columns)[..., 4:], columns[..., :-4], atol=1e-4, rtol=0)
    torch.testing.assert_close(moved(rows), rows, atol=1e-4, rtol=0)  # rows stay
    zoomed = views.AffineView(scale=2.0)  # twice as large about the centre
    column, row = torch.arange(40.0), torch.arange(8.0)
    torch.testing.assert_close(zoomed(columns)[1, 2, 0], 19.5 + (column - 19.5) / 2,
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(zoomed(rows)[1, 2, :, 0], 3.5 + (row - 3.5) / 2, atol=1e-4,
                               rtol=0)
    wide = torch.arange(100.0).expand(1, 1, 4, 100)
    left = views.VIEWS["shift_left"](wide)
    torch.testing.assert_close(left[..., :-4], wide[..., 4:], atol=1e-3, rtol=0)
    closer = views.VIEWS["zoom_in"](wide)[0, 0, 0]
    assert closer[0] > 1.0 and closer[-1] < 98.0  # the edges move out of view
    farther = views.VIEWS["zoom_out"](wide)[0, 0, 0]
    assert farther[0] == 0.0 and farther[-1] == 99.0  # the border repeats, no black edge


def tiny_val_folder(root: Path, count: int = 5) -> Path:
    """A competition folder whose val split holds ``count`` noise images of varied sizes,
    labelled ``[i % 10, 3]``, written in reverse name order."""
    rng = np.random.default_rng(0)

    def noise(name: str) -> Image.Image:
        width, height = int(rng.integers(40, 90)), int(rng.integers(20, 50))
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    labels = {f"{i:06d}.png": entry([i % 10, 3], at=(2, 2), step=8, top=[2, 3])
              for i in reversed(range(count))}
    return write_split(root, "val", labels, image=noise)


def reader_outputs(checkpoint: Path, data_dir: Path, cache_dir: Path,
                   zoom_search: bool | None = None) -> dict:
    """The checkpoint's reader applied directly to the split's evaluation images."""
    contents = read_checkpoint(checkpoint)
    data = predictor.evaluation_datamodule(contents, data_dir, "val", cache_dir=cache_dir)
    data.setup("predict")
    items = [data.predict_set[i] for i in range(len(data.predict_set))]
    reader = load_reader(contents, zoom_search=zoom_search)
    with torch.inference_mode():
        out = reader(torch.stack([item["image"] for item in items]))
    return {"names": [item["file_name"] for item in items],
            "probs": out["logits"].float().softmax(-1), "box": out.get("box")}


def test_predict_split_returns_each_reader_s_reading_in_file_name_order(tmp_path):
    data_dir = tiny_val_folder(tmp_path / "mchar")
    plain, zoom = tmp_path / "plain.ckpt", tmp_path / "zoom.ckpt"
    write_format_1_checkpoint(plain, "legacy_plain")
    write_format_1_checkpoint(zoom, "legacy_zoom")
    names = [f"{i:06d}.png" for i in range(5)]
    options = {"batch_size": 2, "cache_dir": tmp_path / "cache", "accelerator": "cpu"}
    expected = {path: reader_outputs(path, data_dir, tmp_path / "cache") for path in
                (plain, zoom)}
    for path in (plain, zoom):
        assert expected[path]["names"] == names
        got = predictor.predict_split([path], data_dir, "val", **options)
        assert got.file_names == names and got.targets is None and len(got) == 5
        torch.testing.assert_close(got.probs, expected[path]["probs"], atol=1e-5, rtol=0)
        if path == zoom:
            torch.testing.assert_close(got.boxes, expected[zoom]["box"], atol=1e-5, rtol=0)
        else:
            assert got.boxes is None
    labelled = predictor.predict_split([plain], data_dir, "val", labelled=True, **options)
    assert labelled.targets.tolist() == [[i % 10, 3, 10, 10, 10] for i in range(5)]
    both = predictor.predict_split([plain, zoom], data_dir, "val", **options)
    mean = (expected[plain]["probs"] + expected[zoom]["probs"]) / 2
    torch.testing.assert_close(both.probs, mean, atol=1e-5, rtol=0)
    assert both.boxes is None  # not every member has a box
    assert both.checkpoints == [plain, zoom] and both.split == "val"
    twice = predictor.predict_split([zoom, zoom], data_dir, "val", **options)
    torch.testing.assert_close(twice.boxes, expected[zoom]["box"], atol=1e-5, rtol=0)
    tta = predictor.predict_split([plain], data_dir, "val", views=views.TTA_VIEWS,
                                  **options)
    per_view = [predictor.predict_split([plain], data_dir, "val", views=(view,), **options)
                for view in views.TTA_VIEWS]
    torch.testing.assert_close(tta.probs, torch.stack([v.probs for v in per_view]).mean(0),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(tta.probs, expected[plain]["probs"], atol=1e-4)


def test_zoom_search_is_as_trained_unless_told_and_needs_a_reader_that_zooms(tmp_path,
                                                                             capsys):
    data_dir = tiny_val_folder(tmp_path / "mchar", count=3)
    plain, zoom = tmp_path / "plain.ckpt", tmp_path / "zoom.ckpt"
    write_format_1_checkpoint(plain, "legacy_plain")
    write_format_1_checkpoint(zoom, "legacy_zoom")
    options = {"cache_dir": tmp_path / "cache", "accelerator": "cpu"}
    searched = predictor.predict_split([zoom], data_dir, "val", zoom_search=True, **options)
    expected = reader_outputs(zoom, data_dir, tmp_path / "cache", zoom_search=True)
    torch.testing.assert_close(searched.probs, expected["probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(searched.boxes, expected["box"], atol=1e-5, rtol=0)
    assert not load_reader(zoom).zoom_search and load_reader(zoom, zoom_search=True).zoom_search
    raw = torch.load(zoom, weights_only=False)
    raw["hyper_parameters"]["zoom_search"] = True  # trained with the search on
    torch.save(raw, zoom)
    assert load_reader(zoom).zoom_search and not load_reader(zoom, zoom_search=False).zoom_search
    with pytest.raises(CheckpointError, match=f"{plain}: zoom search needs a reader that"):
        predictor.predict_split([plain], data_dir, "val", zoom_search=True, **options)
    out = tmp_path / "out.csv"
    assert predict_cli.main([str(plain), "--data_dir", str(data_dir), "--split", "val",
                         "--zoom_search", "--out", str(out)]) == 2
    assert "zoom search needs" in capsys.readouterr().err and not out.exists()


def test_the_evaluation_data_module_takes_the_checkpoint_s_settings(tmp_path):
    data_dir = tiny_val_folder(tmp_path / "mchar")
    path = tmp_path / "zoom.ckpt"
    write_format_1_checkpoint(path, "legacy_zoom")
    raw = torch.load(path, weights_only=False)  # settings other than the defaults
    raw["hyper_parameters"]["max_len"] = 4
    raw["datamodule_hyper_parameters"]["image_size"] = (48, 96)
    torch.save(raw, path)
    contents = read_checkpoint(path)
    data = predictor.evaluation_datamodule(contents, data_dir, "val",
                                           cache_dir=tmp_path / "cache")
    settings = data.hparams
    assert (settings.cache_scale, settings.eval_scale) == (2.0, 2.0)
    assert tuple(settings.image_size) == (48, 96) and settings.max_len == 4
    assert settings.augment == "none" and not settings.predict_labelled
    data.setup("predict")
    assert data.predict_set[0]["image"].shape == (3, 96, 192)  # read at eval_scale
    assert any((tmp_path / "cache").iterdir())  # the cache went where it was told
    assert predictor.evaluation_datamodule(contents, data_dir, "val").hparams.cache_dir is None


def test_the_prediction_trainer_runs_as_asked_and_writes_nothing(tmp_path):
    trainer = predictor.build_trainer("cpu", 1, None, "bf16-mixed", limit_batches=3,
                                      progress_bar=False)
    assert trainer.precision == "bf16-mixed" and trainer.num_devices == 1
    assert trainer.logger is None and trainer.checkpoint_callback is None
    assert trainer.limit_predict_batches == 3 and trainer.progress_bar_callback is None
    assert not any(isinstance(c, ModelSummary) for c in trainer.callbacks)
    assert not any(tmp_path.iterdir())
    marker = ModelSummary()  # any callback given (the benchmark's timer) is used
    default = predictor.build_trainer(callbacks=[marker])
    assert marker in default.callbacks and default.progress_bar_callback is not None
    assert default.precision == "32-true" and default.num_devices == 1


def test_each_checkpoint_runs_in_its_validation_precision_unless_told(tmp_path, monkeypatch,
                                                                        capsys):
    data_dir = tiny_val_folder(tmp_path / "mchar", count=2)
    path = tmp_path / "plain.ckpt"
    write_format_1_checkpoint(path, "legacy_plain")
    raw = torch.load(path, weights_only=False)
    torch.save({**raw, "trainer_precision": "bf16-mixed"}, path)
    built, loaded = [], []
    real_trainer, real_reader = predictor.build_trainer, predictor.load_reader
    monkeypatch.setattr(predictor, "build_trainer",
                        lambda *a, **k: built.append(a) or real_trainer("cpu", 1, None, a[3]))
    monkeypatch.setattr(predictor, "load_reader",
                        lambda c, channels_last=None, **settings:
                        loaded.append(channels_last)
                        or real_reader(c, channels_last=channels_last, **settings))
    predictor.predict_split([path], data_dir, "val", cache_dir=tmp_path / "cache",
                            accelerator="cpu", strategy="ddp_spawn", channels_last=True)
    assert built[-1] == ("cpu", 1, "ddp_spawn", "bf16-mixed") and loaded[-1] is True
    assert "in bf16-mixed (as validated)" in capsys.readouterr().out
    predictor.predict_split([path], data_dir, "val", cache_dir=tmp_path / "cache",
                            precision="32-true")
    assert built[-1][3] == "32-true" and loaded[-1] is None
    assert "in 32-true (as given)" in capsys.readouterr().out


def test_only_the_first_process_of_a_distributed_run_writes(monkeypatch):
    assert predictor.is_global_zero()  # not distributed: this process writes
    monkeypatch.setattr(predictor.dist, "is_initialized", lambda: True)
    for rank, writes in ((0, True), (1, False), (2, False)):
        monkeypatch.setattr(predictor.dist, "get_rank", lambda rank=rank: rank)
        assert predictor.is_global_zero() is writes


def _rows_batch(start: int, size: int, searched: bool = True) -> dict:
    index = torch.arange(start, start + size, dtype=torch.float32)
    batch = {"file_name": [f"{i:06d}.png" for i in range(start, start + size)],
             "probs": index.view(-1, 1, 1).expand(-1, 5, 11).clone(),
             "box": index.view(-1, 1).expand(-1, 4).clone(),
             "target": torch.arange(start, start + size).view(-1, 1).expand(-1, 5).clone()}
    if searched:
        batch["searched"] = torch.ones(size, dtype=torch.bool)
    return batch


def test_prediction_rows_keep_every_row_in_order_past_their_first_buffers():
    rows = predictor.PredictionRows()
    sizes = [700, 700, 1, 1500]  # past the first 1,024 rows, and past the first doubling
    starts = [0, 700, 1400, 1401]
    for start, size in zip(starts, sizes):
        rows.add(_rows_batch(start, size))
    out = rows.predictions()
    count = sum(sizes)
    assert out.file_names == [f"{i:06d}.png" for i in range(count)]
    assert torch.equal(out.probs[:, 0, 0], torch.arange(count, dtype=torch.float32))
    assert torch.equal(out.targets[:, 4], torch.arange(count))
    assert torch.equal(out.boxes[:, 3], torch.arange(count, dtype=torch.float32))
    assert out.searched.all() and len(out.searched) == count
    assert out.chain_probs is None and out.chain_boxes is None
    # Copies of the rows alone: the buffers' spare rows are not kept alive by the result.
    assert out.probs.untyped_storage().nbytes() == count * 5 * 11 * 4


def test_prediction_rows_drop_a_key_some_batch_lacks():
    rows = predictor.PredictionRows()
    rows.add(_rows_batch(0, 4))
    rows.add(_rows_batch(4, 4, searched=False))
    rows.add(_rows_batch(8, 4))
    out = rows.predictions()
    assert out.searched is None and len(out.probs) == 12
