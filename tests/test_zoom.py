"""Two-pass "zoom" reading, sharper evaluation images, fine-tuning and extra training data."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import PLAIN_MODEL

import svhn.module
from svhn.data import SVHNDataModule
from svhn.fit import build_cli
from svhn.module import (
    DigitSequenceModel,
    box_from_crop,
    crop_boxes,
    crop_region,
    normalize_images,
)
from svhn.predict import main as predict_main
from svhn.score import score_file


def test_crop_boxes_cuts_out_the_box_and_resamples_it():
    images = torch.zeros(2, 1, 40, 80)
    images[0, :, 10:20, 40:60] = 1.0  # a white block at x 0.5-0.75, y 0.25-0.5
    boxes = torch.tensor([[0.5, 0.25, 0.75, 0.5], [0.0, 0.0, 1.0, 1.0]])
    crops = crop_boxes(images, boxes, margin=0.0, output_size=(20, 40))
    assert crops.shape == (2, 1, 20, 40)
    assert crops[0, :, 2:-2, 2:-2].min() > 0.99  # inside the box: all block
    assert crops[1].abs().max().item() == 0.0  # an empty image stays empty


def test_uint8_batches_are_normalised_like_imagenet():
    pixels = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize_images(pixels)
    assert out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    floats = torch.randn(1, 3, 2, 2)
    assert normalize_images(floats) is floats


def test_zoom_reads_a_second_time_on_the_predicted_box():
    model = DigitSequenceModel(backbone="simple_cnn", box_head=True, zoom=True,
                               image_size=(32, 64)).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 255, (3, 3, 64, 128), dtype=torch.uint8))
    assert out["logits"].shape == (3, 5, 11) and out["box"].shape == (3, 4)
    assert not torch.allclose(out["logits"], out["first_pass_logits"])
    model.train()
    assert "first_pass_logits" not in model(torch.zeros(2, 3, 32, 64))


def test_a_box_predicted_in_a_crop_maps_back_to_the_whole_image():
    boxes = torch.tensor([[0.4, 0.2, 0.6, 0.4]])
    region = crop_region(boxes, margin=0.5)  # grown by half its size per side
    assert torch.allclose(region, torch.tensor([[0.3, 0.1, 0.7, 0.5]]))
    whole_crop = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.allclose(box_from_crop(whole_crop, region), region)
    middle = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    assert torch.allclose(box_from_crop(middle, region), boxes)


def test_each_zoom_step_crops_around_the_box_the_last_crop_found(monkeypatch):
    model = DigitSequenceModel(backbone="simple_cnn", box_head=True, zoom=True, zoom_steps=3,
                               zoom_margin=0.0, image_size=(32, 64)).eval()
    # Every read says "the digits are in the left half of what I see", so each crop should
    # be the left half of the previous one: widths 1/2, 1/4, 1/8 of the image.
    reads, cropped_around = [], []

    def fake_read(images):
        reads.append(images.shape)
        return {"logits": torch.full((len(images), 5, 11), float(len(reads))),
                "box": torch.tensor([[0.0, 0.0, 0.5, 1.0]]).expand(len(images), 4)}

    def recording_crop(images, boxes, *args, **kwargs):
        cropped_around.append(boxes.clone())
        return crop_boxes(images, boxes, *args, **kwargs)

    monkeypatch.setattr(model, "read", fake_read)
    monkeypatch.setattr(svhn.module, "crop_boxes", recording_crop)
    out = model(torch.zeros(1, 3, 32, 64))
    assert len(reads) == 4  # the whole image, then three crops
    assert out["logits"].max() == 4 and out["first_pass_logits"].max() == 1
    widths = [box[0, 2].item() for box in cropped_around]
    assert widths == pytest.approx([0.5, 0.25, 0.125])
    assert torch.allclose(out["box"], torch.tensor([[0.0, 0.0, 0.0625, 1.0]]))


def test_zoom_steps_must_be_positive():
    with pytest.raises(ValueError, match="zoom_steps must be at least 1"):
        DigitSequenceModel(box_head=True, zoom=True, zoom_steps=0)


def test_zoom_without_box_head_is_an_error():
    with pytest.raises(ValueError, match="zoom needs box_head"):
        DigitSequenceModel(zoom=True)


def test_eval_scale_gives_sharper_eval_images_and_tracks_boxes_in_training(
        synthetic_data_dir, tmp_path):
    dm = SVHNDataModule(str(synthetic_data_dir), image_size=(32, 64), cache_scale=2.0,
                        eval_scale=2.0, augment="zoom", num_workers=0,
                        cache_dir=str(tmp_path / "cache"))
    assert dm.dataset("val")[0]["image"].shape == (3, 64, 128)
    train_item = dm.dataset("train", "zoom")[0]
    assert train_item["image"].shape == (3, 32, 64)
    box = train_item["box"]
    assert (box >= 0).all() and (box <= 1).all() and (box[2:] > box[:2]).all()


@pytest.fixture(scope="module")
def zoom_run(synthetic_data_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("zoom_runs")
    cli = build_cli([
        *PLAIN_MODEL,
        "--data.data_dir", str(synthetic_data_dir), "--data.num_workers", "0",
        "--data.cache_dir", str(runs / "cache"), "--data.image_size", "[32, 64]",
        "--data.augment", "zoom", "--data.cache_scale", "2", "--data.eval_scale", "2",
        "--model.box_head", "true", "--model.zoom", "true", "--model.zoom_steps", "2",
        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(runs / "runs"),
    ])
    return cli, runs


def test_zoom_run_logs_both_passes_and_predict_scores_the_same(zoom_run, synthetic_data_dir):
    cli, runs = zoom_run
    metrics = pd.read_csv(Path(cli.trainer.log_dir) / "metrics.csv")
    assert {"val/first_pass_seq_acc", "train/box_loss", "val/box_loss"} <= set(metrics)
    last = Path(cli.trainer.checkpoint_callback.last_model_path)
    logged = metrics["val/seq_acc"].dropna().iloc[-1]
    out = runs / "val.csv"
    assert predict_main([str(last), "--data_dir", str(synthetic_data_dir), "--split", "val",
                         "--out", str(out), "--num_workers", "0",
                         "--cache_dir", str(runs / "cache")]) == 0
    report = score_file(out, synthetic_data_dir / "mchar_val.json")
    assert report.seq_acc == pytest.approx(logged, abs=1e-6)


def test_init_from_starts_from_a_checkpoint_s_weights(zoom_run, tmp_path):
    cli, _ = zoom_run
    last = cli.trainer.checkpoint_callback.last_model_path
    source = torch.load(last, weights_only=False)["state_dict"]
    model = DigitSequenceModel(backbone="simple_cnn", box_head=True, max_len=4,
                               init_from=last)
    for name, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, source[f"backbone.{name}"])
    with pytest.raises(ValueError, match="no backbone weights match"):
        DigitSequenceModel(backbone="vgg", init_from=last)
    with pytest.raises(FileNotFoundError, match="init_from checkpoint not found"):
        DigitSequenceModel(init_from=str(tmp_path / "none.ckpt"))


def test_extra_training_data_joins_the_real_train_split(synthetic_data_dir, tmp_path,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = SVHNDataModule(str(synthetic_data_dir), extra_train=(str(synthetic_data_dir),),
                        synthetic_extra=12, num_workers=0, cache_dir=str(tmp_path / "c"))
    dm.prepare_data()
    dm.setup("fit")
    base = len(dm.dataset("train"))
    assert len(dm.train_set) == 2 * base + 12
    assert (tmp_path / "data" / "synthetic_extra_12" / "mchar_train.json").is_file()


def test_channels_last_can_be_chosen_at_inference(zoom_run):
    cli, _ = zoom_run
    last = cli.trainer.checkpoint_callback.last_model_path
    model = DigitSequenceModel.load_for_inference(last, channels_last=True)
    weight = next(p for p in model.backbone.parameters() if p.dim() == 4)
    assert model.hparams.channels_last
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not DigitSequenceModel.load_for_inference(last).hparams.channels_last
