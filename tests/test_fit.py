"""Training (svhn.fit): short fits that learn, resuming, validate and test, DDP, logging
integrations, optimisers and schedules at run time, and what each config resolves to."""

import math
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
import yaml
from helpers.repository import REPO
from helpers.runs import (
    PLAIN_MODEL,
    checkpoint_epoch,
    learning_rates,
    logged_row,
    run_module,
    short_fit_args,
)

from svhn.data.datamodule import SVHNDataModule
from svhn.data.synthetic import generate_dataset
from svhn.inference.checkpoints import load_reader
from svhn.model.training import DigitSequenceModel
from svhn.train.cli import build_cli

VAL_METRICS = ("val/seq_acc", "val/position_acc", "val/pos0_acc", "val/pos1_acc")


@pytest.fixture(scope="module")
def one_digit_data(tmp_path_factory):
    """Single digits: a model that learns anything clearly beats chance (0.1) here.

    95 validation images: not divisible by 2 processes, so padding would show under DDP.
    """
    root = tmp_path_factory.mktemp("one_digit")
    return generate_dataset(root, n_train=600, n_val=95, n_test=10, seed=1, max_digits=1)


def fit_args(data_dir, tmp_path, *extra: str) -> list[str]:
    return [
        *PLAIN_MODEL, "--data.data_dir", str(data_dir), "--data.cache_dir", str(tmp_path / "cache"),
        "--data.num_workers", "0", "--data.image_size", "[32, 64]", "--data.batch_size", "32",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false", *extra,
    ]


def metrics_of(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "metrics.csv")


def test_fast_dev_run(one_digit_data, tmp_path):
    cli = build_cli(fit_args(one_digit_data, tmp_path, "--trainer.fast_dev_run", "true"))
    assert cli.trainer.state.finished
    assert not (tmp_path / "checkpoints").exists()  # the working folder (conftest)


def test_short_fit_learns_well_above_chance(one_digit_data, tmp_path, capsys):
    cli = build_cli(fit_args(one_digit_data, tmp_path, "--trainer.max_epochs", "6",
                             "--model.backbone", "vgg", "--data.augment", "none",
                             "--data.max_len", "2", "--model.lr", "0.003",
                             "--model.scheduler", "onecycle"))
    best = float(cli.trainer.checkpoint_callback.best_model_score)
    assert best > 0.3, f"val/seq_acc {best} is not clearly above chance (0.1)"
    out = capsys.readouterr().out
    assert "Best val/seq_acc" in out and "python -m svhn.predict" in out


def test_resume_from_last_continues_the_same_run(one_digit_data, tmp_path):
    # A schedule is sized for the run's max_epochs; resuming continues the same schedule.
    first = build_cli(fit_args(one_digit_data, tmp_path, "--trainer.max_epochs", "1",
                               "--trainer.limit_train_batches", "2",
                               "--model.scheduler", "none"))
    run_dir = Path(first.trainer.log_dir)
    original_config = (run_dir / "config.yaml").read_text()
    resumed = build_cli(fit_args(one_digit_data, tmp_path, "--trainer.max_epochs", "2",
                                 "--trainer.limit_train_batches", "2",
                                 "--model.scheduler", "none", "--ckpt_path", "last"))
    assert Path(resumed.trainer.log_dir) == run_dir
    assert resumed.trainer.current_epoch == 2
    assert sorted(metrics_of(run_dir)["epoch"].dropna().unique()) == [0, 1]
    assert (run_dir / "config.yaml").read_text() == original_config  # never overwritten
    assert (run_dir / "config_resumed_1.yaml").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1


def test_cli_default_config_falls_back_to_synthetic_data(tmp_path):
    # The quick start exactly (no flags), only smaller and shorter.
    result = run_module(["svhn.fit", "--data.synthetic_size", "64", "--trainer.max_epochs", "1"],
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    lines = out.strip().splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=====")]
    assert len(rules) == 4 and rules[-1] == len(lines) - 1  # two frames; the last ends it
    start = "\n".join(lines[rules[0]:rules[1]])
    assert "NO COMPETITION DATA" in start and str(tmp_path / "data" / "mchar") in start
    # The last lines: what was trained on what, the score, the next commands, framed.
    text = "\n".join(lines[rules[2]:])
    assert "on 64 labelled images of the synthetic quick-start set: SYNTHETIC" in text
    assert "Best val/seq_acc" in text and "synthetic val set (16 val images)" in text
    assert "python -m svhn.predict" in text and "--data_dir data/synthetic --split val" in text
    assert "data/mchar/" in text and "--data.data_dir" in text
    for noise in ("Tip:", "does not have many workers", "LeafSpec", "model summary"):
        assert noise not in out + result.stderr, noise
    assert (tmp_path / "data/synthetic/mchar_train.json").is_file()
    config = tmp_path / "runs/default/version_0/config.yaml"
    assert (config.parent / "checkpoints/last.ckpt").is_file()
    assert "data_dir: null" in config.read_text()


@pytest.mark.slow
def test_the_quick_start_reads_its_synthetic_val(tmp_path):
    # README's first run, unchanged: about 1.5 minutes of training on a quiet 2-core CPU.
    result = run_module(["svhn.fit"], cwd=tmp_path, timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = metrics_of(tmp_path / "runs/default/version_0")["val/seq_acc"].dropna()
    assert scores.max() >= 0.80, scores.tolist()
    assert f"Best val/seq_acc: {scores.max():.4f} on the synthetic val set" in result.stdout


def test_print_config_shows_merged_settings(tmp_path):
    result = run_module(["svhn.fit", "--config", str(REPO / "configs/resnet18.yaml"),
                         "--print_config"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "backbone: resnet18" in result.stdout and "monitor: val/seq_acc" in result.stdout


def test_wandb_offline_run_writes_local_files(one_digit_data, tmp_path):
    args = ["svhn.fit", "--config", str(REPO / "configs/wandb.yaml"),
            *fit_args(one_digit_data, tmp_path, "--trainer.max_epochs", "1",
                      "--trainer.limit_train_batches", "2")]
    result = run_module(args, cwd=tmp_path, env={"WANDB_MODE": "offline",
                                                 "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("run-*.wandb"))
    assert list((tmp_path / "runs" / "svhn").glob("*/checkpoints/last.ckpt"))


def test_ddp_two_cpu_processes_count_each_val_image_once(one_digit_data, tmp_path):
    args = ["svhn.fit", *fit_args(one_digit_data, tmp_path, "--trainer.max_epochs", "3",
                                  "--model.lr", "0.01", "--model.scheduler", "onecycle",
                                  "--data.max_len", "2",
                                  "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                                  "--trainer.strategy", "ddp")]
    result = run_module(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "svhn" / "version_0"
    logged = metrics_of(run_dir)["val/seq_acc"].dropna().iloc[-1]

    model = DigitSequenceModel.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    data = SVHNDataModule(str(one_digit_data), image_size=(32, 64), max_len=2, num_workers=0,
                          cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False,
                        enable_progress_bar=False)
    single = trainer.validate(model, datamodule=data, verbose=False)[0]["val/seq_acc"]
    assert logged == pytest.approx(single, abs=1e-6)
    assert 0 < single < 1  # a value that duplicated or dropped images would change


def test_last_checkpoint_is_refreshed_even_when_val_does_not_improve(one_digit_data, tmp_path):
    # lr 0: every epoch scores the same, so only the first epoch is ever "best".
    cli = build_cli(fit_args(one_digit_data, tmp_path, "--trainer.max_epochs", "3",
                             "--trainer.limit_train_batches", "2", "--model.lr", "0",
                             "--model.scheduler", "none"))
    callback = cli.trainer.checkpoint_callback
    assert "epoch000" in Path(callback.best_model_path).name
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == [
        Path(callback.best_model_path).name, "last.ckpt"]  # no last-v1.ckpt copies


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as done:
        build_cli(["--config", str(REPO / "configs" / config), "--print_config"])
    assert done.value.code in (None, 0)
    assert "monitor: val/seq_acc" in capsys.readouterr().out


# What each config says it is: a --config starts from the neutral base (the classes' own
# defaults), not from default.yaml (the quick start), so each states what it changes.
CONFIG_MEANS = {
    "baseline.yaml": {"model.backbone": "resnet18", "model.feature_grid": None,
                      "model.box_head": False, "model.zoom_steps": 0, "model.optimizer": "adam",
                      "model.weight_decay": 0.0, "model.scheduler": "none",
                      "model.channels_last": False,
                      "trainer.precision": None,  # Lightning's default: 32-true
                      "data.image_size": [64, 128], "data.cache_scale": 1.0,
                      "data.eval_scale": 1.0, "data.batch_size": 40,
                      "data.augment": "baseline", "data.synthetic_fallback": False},
    "resnet18.yaml": {"model.backbone": "resnet18", "model.feature_grid": None,
                      "model.box_head": False, "model.zoom_steps": 0,
                      "data.image_size": [64, 128], "data.cache_scale": 1.0,
                      "data.eval_scale": 1.0, "data.augment": "strong"},
    # An overlay on resnet18.yaml (test_recipe_chains_of_overlays_compose reads the two).
    "resnet50.yaml": {"model.backbone": "resnet50", "model.feature_grid": None,
                      "model.box_head": False, "model.zoom_steps": 0,
                      "data.image_size": [96, 192], "data.cache_scale": 1.0,
                      "data.eval_scale": 1.0},
    "real_cpu.yaml": {"model.backbone": "resnet18d", "model.head": "detector",
                      "model.search_gate": 0.3, "model.search_majority": 0.5,
                      "model.feature_grid": [2, 4],
                      "model.zoom_steps": 3, "model.zoom_search": True,
                      "data.image_size": [64, 128], "data.augment": "zoom",
                      "data.batch_size": 64, "time_budget.minutes": 27.0,
                      "trainer.precision": "auto"},
    "default.yaml": {"model.backbone": "vgg", "model.zoom_steps": 2, "data.data_dir": None,
                     "trainer.precision": "auto",
                     "data.augment": "zoom_plain", "data.synthetic_fallback": True},
}


@pytest.mark.parametrize("config", sorted(CONFIG_MEANS))
def test_each_config_means_what_it_says(config, capsys):
    with pytest.raises(SystemExit):
        build_cli(["--config", str(REPO / "configs" / config), "--print_config"])
    resolved = yaml.safe_load(capsys.readouterr().out)
    for key, expected in CONFIG_MEANS[config].items():
        section, name = key.split(".")
        assert resolved[section][name] == expected, (config, key)


def test_zoom_overlay_composes_with_a_backbone_config(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--config", str(REPO / "configs/resnet50.yaml"),
                   "--config", str(REPO / "configs/zoom.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "backbone: resnet50" in out and "zoom_steps: 3" in out and "augment: zoom" in out


@pytest.mark.parametrize("chain,expected", [
    (["zoom.yaml", "real_cpu.yaml"], ["backbone: resnet18d", "zoom_steps: 3", "augment: zoom",
                                      "box_head: true", "eval_scale: 2.0"]),
    (["resnet18.yaml", "resnet50.yaml"], ["backbone: resnet50", "pretrained: true",
                                          "augment: strong", "precision: auto"]),
    (["real_cpu.yaml"], ["backbone: resnet18d", "head: detector",
                         "channels:\n    - 32\n    - 64\n    - 128\n    - 256",
                         "stem_width: 16", "max_epochs: 70", "search_merge: 0.9",
                         "precision: auto", "minutes: 27.0"]),
    (["real_cpu.yaml", "gpu_full.yaml"], ["accelerator: gpu", "augment_on: device",
                                          "max_epochs: 40", "backbone: resnet18d",
                                          "timm_args: null",  # the full width
                                          "time_budget:\n  minutes: null"]),
    (["real_cpu.yaml", "gpu_full.yaml", "unlabelled.yaml"],
     ["accelerator: gpu", "unlabelled: test_a", "rounds:\n  - 0.5\n  - 0.75",
      "threshold: 0.3", "char_boxes: true"]),
])
def test_recipe_chains_of_overlays_compose(chain, expected, capsys):
    args = [a for name in chain for a in ("--config", str(REPO / "configs" / name))]
    with pytest.raises(SystemExit):
        build_cli([*args, "--print_config"])
    out = capsys.readouterr().out
    assert all(line in out for line in expected), out


def test_ema_weights_are_what_the_checkpoints_keep(one_digit_data, tmp_path):
    # Lightning's EMAWeightAveraging added from a config (measured in the README; not in
    # the recipe): validation, checkpoints and predict must all see the averaged weights.
    overlay = tmp_path / "ema.yaml"
    overlay.write_text("trainer:\n  callbacks:\n"
                       "    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n"
                       "      init_args:\n        decay: 0.9\n")
    cli = build_cli(["--config", str(overlay),
                     *fit_args(one_digit_data, tmp_path, "--trainer.max_epochs", "2",
                               "--trainer.limit_train_batches", "3")])
    for path in (cli.trainer.checkpoint_callback.best_model_path,
                 Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"):
        saved = torch.load(path, weights_only=False)
        averaged, current = saved["state_dict"], saved["current_model_state"]
        name = next(k for k in averaged
                    if k.startswith("reader.backbone.") and k.endswith("weight"))
        assert not torch.equal(averaged[name], current[name])
        reader = load_reader(path)
        assert torch.equal(reader.state_dict()[name.removeprefix("reader.")],
                           averaged[name])  # predict reads the EMA


# -- validate and test, on the easy run -------------------------------------------------


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
    done = run_module(["svhn.fit", "validate", *easy_run.args,
                       "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
                       "--trainer.devices", "2", "--trainer.strategy", "ddp",
                       "--ckpt_path", str(easy_run.best)],
                      cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_csv,) = (tmp_path / "runs").glob("*/version_*/metrics.csv")
    distributed = pd.read_csv(metrics_csv).dropna(subset=["val/seq_acc"]).iloc[-1]
    assert {0.0, 1.0}.isdisjoint({logged[k] for k in VAL_METRICS})  # all informative
    for key in VAL_METRICS:
        assert distributed[key] == pytest.approx(logged[key], abs=1e-6), key


# -- resuming by name, optimisers and schedules at run time, on the easy set -------------


def scheduled_args(*extra: str) -> tuple[str, ...]:
    return short_fit_args("--model.optimizer", "adamw", "--model.scheduler", "cosine",
                          "--model.lr", "0.01", "--trainer.max_epochs", "3", *extra)


# The first fit stops early; the resumed one is asked to run on without the stop.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`, callbacks")
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
