"""What users rely on and no other test exercised (issue 15): local pretrained weights from
fit to predict, ``svhn.fit validate`` / ``test``, resuming a scheduled run from a named
checkpoint, the optimisers and schedules at run time, dataloader workers, ensembles of
checkpoints with different image sizes, and DDP exactness of every validation metric.

Each test fails if its feature is removed; all go through the command lines, the data
module and the submission/score helpers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from svhn import predict
from svhn.data import SVHNDataModule
from svhn.fit import build_cli
from svhn.labels import decode_probabilities
from svhn.submission import read_submission

REPO = Path(__file__).resolve().parents[1]
VAL_METRICS = ("val/seq_acc", "val/char_acc", "val/pos0_acc", "val/pos1_acc")


def run_predict(run, *checkpoints: Path, out: Path, split: str = "val",
                extra: tuple[str, ...] = ()) -> int:
    return predict.main([*map(str, checkpoints or (run.best,)), "--data_dir", str(run.data_dir),
                         "--split", split, "--out", str(out), "--cache_dir", str(run.cache_dir),
                         "--num_workers", "0", "--accelerator", "cpu", "--batch_size", "32",
                         *extra])


def logged_row(run, epoch: int) -> pd.Series:
    """The validation metrics the run logged at the end of ``epoch``."""
    metrics = pd.read_csv(run.metrics).dropna(subset=["val/seq_acc"])
    return metrics.loc[metrics["epoch"] == epoch].iloc[0]


def checkpoint_epoch(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def short_fit_args(*extra: str) -> tuple[str, ...]:
    return ("--data.image_size", "[32, 64]", "--data.augment", "none",
            "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1", *extra)


# ------------------------------------------------------------------ validate and test


def test_fit_validate_and_test_reproduce_the_logged_validation(easy_run, tmp_path):
    logged = logged_row(easy_run, checkpoint_epoch(easy_run.best))
    assert 0 < logged["val/seq_acc"] < 1
    common = [*easy_run.args, "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--ckpt_path", str(easy_run.best)]
    validated = build_cli(["validate", *common]).trainer.callback_metrics
    for key in (*VAL_METRICS, "val/loss"):
        assert validated[key].item() == pytest.approx(logged[key], abs=1e-6), key
    tested = build_cli(["test", *common]).trainer.callback_metrics  # test reads val_on
    for key in VAL_METRICS:
        test_key = key.replace("val/", "test/")
        assert tested[test_key].item() == pytest.approx(logged[key], abs=1e-6), test_key


def test_ddp_validation_counts_every_metric_exactly_once(easy_run, tmp_path):
    # 81 validation images on 2 processes: a padded, unsynchronised or double-counted
    # metric would differ from the single-process values the training run logged.
    logged = logged_row(easy_run, checkpoint_epoch(easy_run.best))
    command = [sys.executable, "-m", "svhn.fit", "validate", *easy_run.args,
               "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
               "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--ckpt_path", str(easy_run.best)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_csv,) = (tmp_path / "runs").glob("*/version_*/metrics.csv")
    distributed = pd.read_csv(metrics_csv).dropna(subset=["val/seq_acc"]).iloc[-1]
    assert {0.0, 1.0}.isdisjoint({logged[k] for k in VAL_METRICS})  # all informative
    for key in VAL_METRICS:
        assert distributed[key] == pytest.approx(logged[key], abs=1e-6), key


# --------------------------------------------------------- resume, optimisers, schedules


def scheduled_args(*extra: str) -> tuple[str, ...]:
    return short_fit_args("--model.optimizer", "adamw", "--model.scheduler", "cosine",
                          "--model.lr", "0.01", "--trainer.max_epochs", "3", *extra)


def learning_rates(metrics: Path, column: str) -> list[float]:
    frame = pd.read_csv(metrics)
    return frame.dropna(subset=[column]).sort_values("step")[column].tolist()


def test_resume_from_a_named_checkpoint_continues_run_and_schedule(easy_data_dir, easy_fit,
                                                                   tmp_path):
    cache = tmp_path / "cache"
    reference = easy_fit(easy_data_dir, cache, tmp_path / "reference", *scheduled_args())
    # AdamW with a per-step cosine schedule sized for 3 epochs of 3 steps.
    expected = [0.01 * (1 + math.cos(math.pi * step / 9)) / 2 for step in range(9)]
    assert learning_rates(reference.metrics, "lr-AdamW") == pytest.approx(expected, rel=1e-9)

    # The same run stopped after its first epoch (as if interrupted), then resumed by path.
    stop = tmp_path / "stop_after_first_epoch.yaml"
    stop.write_text("trainer:\n  callbacks:\n"
                    "    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
                    "      init_args: {monitor: val/seq_acc, mode: max, "
                    "stopping_threshold: -1.0}\n")
    runs = tmp_path / "runs"
    first = easy_fit(easy_data_dir, cache, runs, "--config", str(stop), *scheduled_args())
    run_dir = first.metrics.parent
    assert checkpoint_epoch(first.last) == 0
    resumed = easy_fit(easy_data_dir, cache, runs, *scheduled_args(),
                       "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"))
    assert resumed.metrics.parent == run_dir  # the same run folder, not version_1
    assert (run_dir / "config_resumed_1.yaml").is_file()
    assert sorted(pd.read_csv(run_dir / "metrics.csv")["epoch"].dropna().unique()) == [0, 1, 2]
    assert learning_rates(run_dir / "metrics.csv", "lr-AdamW") == pytest.approx(expected,
                                                                                 rel=1e-9)


def test_sgd_with_a_step_schedule_runs_as_configured(easy_data_dir, easy_fit, tmp_path):
    run = easy_fit(easy_data_dir, tmp_path / "cache", tmp_path / "runs",
                   *short_fit_args("--model.optimizer", "sgd", "--model.lr", "0.05",
                                   "--model.momentum", "0.8", "--model.scheduler", "step",
                                   "--model.step_epochs", "1", "--trainer.max_epochs", "3",
                                   "--trainer.limit_train_batches", "2"))
    # Logged once per epoch (the schedule steps per epoch): x0.1 every epoch.
    assert learning_rates(run.metrics, "lr-SGD") == pytest.approx([0.05, 0.005, 0.0005])
    group = torch.load(run.last, weights_only=False)["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.8 and group["nesterov"] is True


# ------------------------------------------------------------- local pretrained weights


def test_local_pretrained_weights_train_and_predict_without_the_file(easy_data_dir, easy_fit,
                                                                     tmp_path):
    reference = timm.create_model("test_resnet", num_classes=1000)
    marked = next(k for k, v in reference.state_dict().items() if v.dim() == 4)
    reference.state_dict()[marked].fill_(0.0123)
    weights = tmp_path / "test_resnet_imagenet.pth"
    torch.save(reference.state_dict(), weights)
    # lr 0: the saved backbone is exactly what was loaded.
    run = easy_fit(easy_data_dir, tmp_path / "cache", tmp_path / "runs",
                   *short_fit_args("--model.backbone", "test_resnet", "--model.lr", "0",
                                   "--model.pretrained_weights", str(weights),
                                   "--trainer.max_epochs", "1",
                                   "--trainer.limit_train_batches", "1"))
    state = torch.load(run.last, weights_only=False)["state_dict"]
    assert torch.all(state[f"reader.backbone.{marked}"] == 0.0123)

    weights.unlink()  # a checkpoint carries its weights: predict must not need the file
    out = tmp_path / "val.csv"
    assert run_predict(run, run.last, out=out) == 0
    assert len(read_submission(out)) == 81


# ---------------------------------------------------------------------------- ensembles


@pytest.fixture(scope="module")
def wider_run(easy_run, easy_fit, tmp_path_factory):
    """A second reader at another image size (40x80), briefly trained."""
    root = tmp_path_factory.mktemp("wider_run")
    return easy_fit(easy_run.data_dir, easy_run.cache_dir, root / "runs", "--model.lr", "0.01",
                    "--data.image_size", "[40, 80]", "--data.augment", "none",
                    "--trainer.max_epochs", "2")


def test_ensemble_feeds_each_checkpoint_its_own_image_size(easy_run, wider_run, easy_zoom_run,
                                                           tmp_path):
    # Three readers see 32x64, 40x80 and (zoom, eval_scale 2) 64x128 images. The ensemble's
    # probabilities must be the mean of each one predicting alone.
    members = [easy_run.best, wider_run.best, easy_zoom_run.last]
    alone = []
    for i, checkpoint in enumerate(members):
        out = tmp_path / f"member{i}.csv"
        assert run_predict(easy_run, checkpoint, out=out, extra=("--save_probs",)) == 0
        alone.append(np.load(out.with_suffix(".npz")))
    out = tmp_path / "ensemble.csv"
    assert run_predict(easy_run, *members, out=out, extra=("--save_probs",)) == 0
    ensemble = np.load(out.with_suffix(".npz"))
    assert ensemble["checkpoints"].tolist() == [str(m) for m in members]
    for member in alone:
        assert member["file_names"].tolist() == ensemble["file_names"].tolist()
    np.testing.assert_allclose(ensemble["probs"], np.mean([m["probs"] for m in alone], axis=0),
                               atol=1e-6)
    assert np.abs(alone[0]["probs"] - alone[1]["probs"]).max() > 1e-3  # members differ
    assert "boxes" not in ensemble  # only one member predicts boxes
    codes = read_submission(out)["file_code"].tolist()
    assert codes == decode_probabilities(torch.from_numpy(ensemble["probs"]))


# ------------------------------------------------------------------- dataloader workers


def test_worker_processes_build_the_same_image_cache(easy_data_dir, tmp_path, monkeypatch):
    import svhn.images

    pools = []

    class CountingPool(svhn.images.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args or kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(svhn.images, "ProcessPoolExecutor", CountingPool)
    serial = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=0,
                            cache_dir=str(tmp_path / "serial"))
    serial.prepare_data()
    assert pools == []
    parallel = SVHNDataModule(str(easy_data_dir), image_size=(32, 64), num_workers=2,
                              cache_dir=str(tmp_path / "parallel"))
    parallel.prepare_data()
    assert len(pools) >= 2  # train (300 images) and val (81) were decoded by a pool
    for split in ("train", "val"):
        a, b = serial.dataset(split), parallel.dataset(split)
        assert a.names == b.names
        for i in range(len(a)):
            assert torch.equal(a[i]["image"], b[i]["image"]), (split, a.names[i])
            assert torch.equal(a[i]["box"], b[i]["box"])


def test_each_dataloader_worker_draws_its_own_augmentations(easy_data_dir, tmp_path):
    # Eight copies of one image: without per-worker seeding, forked workers replay the same
    # augmentation stream and the first batch of each worker would be identical.
    root = tmp_path / "same"
    (root / "mchar_train").mkdir(parents=True)
    source = easy_data_dir / "mchar_train" / "000000.png"
    entry = json.loads((easy_data_dir / "mchar_train.json").read_text())["000000.png"]
    entries = {}
    for i in range(8):
        shutil.copy(source, root / "mchar_train" / f"{i:06d}.png")
        entries[f"{i:06d}.png"] = entry
    (root / "mchar_train.json").write_text(json.dumps(entries))
    shutil.copytree(root / "mchar_train", root / "mchar_val")
    shutil.copy(root / "mchar_train.json", root / "mchar_val.json")
    data = SVHNDataModule(str(root), image_size=(32, 64), num_workers=2, batch_size=1,
                          augment="baseline", augment_on="cpu",
                          cache_dir=str(tmp_path / "cache"))
    data.prepare_data()
    data.setup("fit")
    batches = iter(data.train_dataloader())
    first_of_worker0, first_of_worker1 = next(batches)["image"], next(batches)["image"]
    del batches  # stops the workers
    assert not torch.equal(first_of_worker0, first_of_worker1)


def test_prediction_with_workers_writes_the_same_csv(easy_run, tmp_path):
    plain, workers = tmp_path / "plain.csv", tmp_path / "workers.csv"
    assert run_predict(easy_run, out=plain) == 0
    assert run_predict(easy_run, out=workers, extra=("--num_workers", "2")) == 0
    assert workers.read_text() == plain.read_text()
