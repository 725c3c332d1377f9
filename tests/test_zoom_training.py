"""Training the zoom reader: sharper evaluation images, a fit + predict round trip,
fine-tuning from a checkpoint, extra training data, and the removed ``zoom`` flag."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers.runs import PLAIN_MODEL

from svhn.checkpoint_format import CheckpointError
from svhn.data.datamodule import SVHNDataModule
from svhn.inference.checkpoints import load_reader
from svhn.inference.cli import main as predict_main
from svhn.inference.scoring import score_file
from svhn.model.training import DigitSequenceModel
from svhn.train.cli import build_cli


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
        "--model.box_head", "true", "--model.zoom_steps", "2",
        "--model.lr", "0.003", "--model.scheduler", "onecycle",
        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(runs / "runs"),
    ])
    return cli, runs


def test_zoom_run_logs_both_passes_and_predict_scores_the_same(zoom_run, synthetic_data_dir):
    cli, runs = zoom_run
    metrics = pd.read_csv(Path(cli.trainer.log_dir) / "metrics.csv")
    assert {"val/first_pass_seq_acc", "train/box_loss", "val/box_loss"} <= set(metrics)
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    logged = metrics["val/seq_acc"].dropna().iloc[-1]
    out = runs / "val.csv"
    assert predict_main([str(last), "--data_dir", str(synthetic_data_dir), "--split", "val",
                         "--out", str(out), "--num_workers", "0",
                         "--cache_dir", str(runs / "cache")]) == 0
    report = score_file(out, synthetic_data_dir / "mchar_val.json")
    assert report.seq_acc == pytest.approx(logged, abs=1e-6)


def test_init_from_starts_from_a_checkpoint_s_weights(zoom_run, tmp_path):
    cli, _ = zoom_run
    last = str(Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt")
    source = torch.load(last, weights_only=False)["state_dict"]
    model = DigitSequenceModel(backbone="simple_cnn", box_head=True, max_len=4,
                               init_from=last)
    for name, tensor in model.reader.backbone.state_dict().items():
        assert torch.equal(tensor, source[f"reader.backbone.{name}"])
    other_backbone = (r"only 0 of [\d,]+ backbone weights of 'vgg' match it \(first "
                      r"difference: backbone\.")
    with pytest.raises(CheckpointError, match=other_backbone):
        DigitSequenceModel(backbone="vgg", init_from=last)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
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
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    reader = load_reader(last, channels_last=True)
    weight = next(p for p in reader.backbone.parameters() if p.dim() == 4)
    assert reader.channels_last and weight.is_contiguous(memory_format=torch.channels_last)
    assert not load_reader(last).channels_last


def test_the_replaced_zoom_flag_keeps_its_meaning_and_names_its_replacement():
    with pytest.warns(UserWarning, match="model.zoom is replaced by model.zoom_steps"):
        off = DigitSequenceModel(box_head=True, zoom=False, zoom_steps=1)
    assert off.reader.zoom_steps == 0 and off.hparams.zoom_steps == 0
    with pytest.warns(UserWarning, match="zoom_steps"):
        on = DigitSequenceModel(box_head=True, zoom=True, zoom_steps=2)
    assert on.reader.zoom_steps == 2 and "zoom" not in on.hparams
