"""The EMA and TensorBoard overlays (configs/ema.yaml, configs/tensorboard.yaml), each run
for a few steps on the tiny synthetic set (issue #27, part 4)."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

from svhn.inference.checkpoints import load_reader
from svhn.paths import CONFIGS_DIR
from svhn.train.cli import build_cli
from svhn.train.cli import main as fit_main

TENSORBOARD = ("tensorboard", "tensorboardX")


def overlay_fit_args(data_dir: Path, cache_dir: Path, root: Path, overlay: str,
                     *extra: str) -> list[str]:
    """A tiny fit on the neutral base (float32) with the overlay on top of it."""
    plain = root / "plain.yaml"
    plain.write_text("trainer:\n  precision: 32-true\n")
    return ["--config", str(plain), "--config", str(CONFIGS_DIR / overlay),
            "--data.data_dir", str(data_dir), "--data.cache_dir", str(cache_dir),
            "--data.num_workers", "0", "--data.image_size", "[32, 64]",
            "--data.batch_size", "32", "--data.augment", "none", "--model.scheduler", "none",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(root / "runs"), *extra]


def test_ema_overlay_keeps_the_averaged_weights_in_the_checkpoints(
        synthetic_data_dir, image_cache_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = build_cli(overlay_fit_args(synthetic_data_dir, image_cache_dir, tmp_path,
                                         "ema.yaml"))
    ema = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMAWeightAveraging"]
    assert len(ema) == 1
    assert cli.config["fit"]["trainer"]["callbacks"][0]["init_args"]["decay"] == 0.998
    # Lightning's warning about sharded models does not apply (nothing is sharded): hidden
    assert not [w for w in caught if "WeightAveraging" in str(w.message)]
    run = Path(cli.trainer.log_dir)
    for path in (Path(cli.trainer.checkpoint_callback.best_model_path),
                 run / "checkpoints" / "last.ckpt"):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        averaged, current = saved["state_dict"], saved["current_model_state"]
        name = next(k for k in averaged
                    if k.startswith("reader.backbone.") and k.endswith("weight"))
        assert not torch.equal(averaged[name], current[name])  # the average, not the last
        reader = load_reader(path)  # what svhn.predict reads: the averaged weights
        assert torch.equal(reader.state_dict()[name.removeprefix("reader.")], averaged[name])


@pytest.mark.skipif(not any(importlib.util.find_spec(n) for n in TENSORBOARD),
                    reason="needs tensorboard or tensorboardX (the dev extra)")
def test_tensorboard_overlay_writes_an_event_file_into_the_run_folder(
        synthetic_data_dir, image_cache_dir, tmp_path):
    cli = build_cli(overlay_fit_args(synthetic_data_dir, image_cache_dir, tmp_path,
                                     "tensorboard.yaml"))
    assert type(cli.trainer.logger).__name__ == "TensorBoardLogger"
    run = tmp_path / "runs" / "svhn" / "version_0"
    assert Path(cli.trainer.log_dir) == run
    events = list(run.glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    # the run folder is still the run's: config, checkpoints and the run summary in it
    assert (run / "config.yaml").is_file() and (run / "run_summary.json").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_tensorboard_overlay_without_the_package_says_what_to_install(
        synthetic_data_dir, image_cache_dir, tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in TENSORBOARD else find_spec(name, *a))
    code = fit_main(overlay_fit_args(synthetic_data_dir, image_cache_dir, tmp_path,
                                     "tensorboard.yaml"))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: trainer.logger lightning.pytorch.loggers.TensorBoardLogger")
    assert "neither tensorboard nor tensorboardX is installed: pip install tensorboard" in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()
