"""k-fold cross-validation (issue #27, part 4): ``--data.folds K --data.fold i``.

The folds cut every labelled image of train and val together (an image is its split and
file name: the synthetic set, like the competition's, reuses file names across the two);
they are disjoint, cover every image and do not move with the global seed. Bad settings
are refused before anything is written; a fold's run records its fold and held-out score,
``svhn.runs`` shows the fold and the mean and spread over the folds, and the K fold
checkpoints ensemble in ``svhn.predict``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from torch.utils.data import ConcatDataset

from svhn.analysis import report
from svhn.analysis.runs import collect_runs, fold_summary, format_table
from svhn.analysis.runs import main as runs_main
from svhn.data.datamodule import SVHNDataModule
from svhn.data.folds import assign_folds, labelled_keys
from svhn.data.labels import load_labels
from svhn.errors import SettingError
from svhn.inference import cli as predict_cli
from svhn.train.cli import build_cli
from svhn.train.cli import main as fit_main
from svhn.train.run_summary import read_run_summary, val_is_held_out

FOLDS = 4


def all_labelled(data_dir: Path) -> set[tuple[str, str]]:
    return {(split, s.file_name) for split in ("train", "val")
            for s in load_labels(data_dir / f"mchar_{split}.json")}


def keys_of(dataset) -> set[tuple[str, str]]:
    """(split, file name) of every image of a fold's dataset (one split or several)."""
    parts = dataset.datasets if isinstance(dataset, ConcatDataset) else [dataset]
    keys = [(part.files.name, name) for part in parts for name in part.names]
    assert len(keys) == len(set(keys)), "an image twice in one set"
    return set(keys)


def fold_module(data_dir: Path, cache_dir: Path, fold: int, folds: int = FOLDS,
                **settings) -> SVHNDataModule:
    data = SVHNDataModule(str(data_dir), image_size=(32, 64), num_workers=0, augment="none",
                          cache_dir=str(cache_dir), folds=folds, fold=fold, **settings)
    data.prepare_data()
    data.setup("fit")
    return data


# -- the partition ----------------------------------------------------------------------------
def test_folds_partition_train_and_val_exactly(synthetic_data_dir):
    keys = labelled_keys(synthetic_data_dir)
    expected = all_labelled(synthetic_data_dir)
    assert set(keys) == expected and len(keys) == 160 + 48
    # the two folders reuse names: 000000.png of train and of val are two images
    assert ("train", "000000.png") in expected and ("val", "000000.png") in expected
    folds = assign_folds(keys, FOLDS)
    assert set(folds) == expected and set(folds.values()) == set(range(FOLDS))
    sizes = pd.Series(folds).value_counts()
    assert sizes.max() - sizes.min() <= 1  # dealt round: as even as the count allows
    # the same partition on every call and whatever the global seed
    for seed in (0, 7, 12345):
        L.seed_everything(seed)
        torch.rand(3)
        assert assign_folds(list(reversed(keys)), FOLDS) == folds
    # both splits are spread over the folds (not train in some, val in others)
    assert all({s for (s, _), f in folds.items() if f == k} == {"train", "val"}
               for k in range(FOLDS))


def test_fold_datasets_are_disjoint_and_cover_every_labelled_image(synthetic_data_dir,
                                                                   image_cache_dir):
    expected = all_labelled(synthetic_data_dir)
    held_out = []
    for fold in range(FOLDS):
        L.seed_everything(100 + fold)  # another global seed for every fold
        data = fold_module(synthetic_data_dir, image_cache_dir, fold)
        train, val = keys_of(data.train_set), keys_of(data.val_set)
        assert not train & val and train | val == expected
        assert {s for s, _ in val} == {"train", "val"}  # same-named images kept apart
        assert data.training_images["data_dir"] == len(train)
        held_out.append(val)
    assert set().union(*held_out) == expected
    assert sum(map(len, held_out)) == len(expected)  # each image held out exactly once


def test_val_is_held_out_for_a_fold_whatever_the_splits_say():
    assert val_is_held_out(["train", "val"], "val", fold=2)
    assert not val_is_held_out(["train", "val"], "val")


# -- settings refused up front ----------------------------------------------------------------
@pytest.mark.parametrize("flags,named", [
    (["--data.folds", "1", "--data.fold", "0"], "--data.folds 1"),
    (["--data.fold", "0"], "--data.fold 0: a fold needs --data.folds K"),
    (["--data.folds", "3"], "--data.fold i (0 <= i < 3)"),
    (["--data.folds", "3", "--data.fold", "3"], "choose 0 <= fold < 3"),
    (["--data.folds", "3", "--data.fold", "-1"], "choose 0 <= fold < 3"),
    (["--data.folds", "3", "--data.fold", "0", "--data.train_on", "[train, val]"],
     "train_on and val_on must stay at their defaults"),
    (["--data.folds", "3", "--data.fold", "0", "--data.val_on", "test_a"],
     "train_on and val_on must stay at their defaults"),
    (["--data.folds", "500", "--data.fold", "0"], "only 208 labelled images"),
])
def test_bad_fold_settings_are_refused_before_anything_is_written(
        flags, named, synthetic_data_dir, image_cache_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = fit_main([*tiny_fit_args(synthetic_data_dir, image_cache_dir, runs), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and named in err, err
    assert not runs.exists() or not any(runs.rglob("*")), list(runs.rglob("*"))


def test_the_data_module_refuses_them_at_construction(synthetic_data_dir):
    with pytest.raises(SettingError, match="--data.fold 2: out of range"):
        SVHNDataModule(str(synthetic_data_dir), folds=2, fold=2)


# -- a 2-fold fit, svhn.runs and the fold ensemble --------------------------------------------
def tiny_fit_args(data_dir: Path, cache_dir: Path, runs: Path, *extra: str) -> list[str]:
    plain = runs.parent / "plain.yaml"  # the neutral base, float32 (no quick start)
    plain.parent.mkdir(parents=True, exist_ok=True)
    plain.write_text("trainer:\n  precision: 32-true\n")
    return ["--config", str(plain), "--data.data_dir", str(data_dir),
            "--data.cache_dir", str(cache_dir), "--data.num_workers", "0",
            "--data.image_size", "[32, 64]", "--data.batch_size", "32",
            "--data.augment", "none", "--model.scheduler", "none",
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(runs),
            "--trainer.logger.init_args.name", "kfold", *extra]


@pytest.fixture(scope="module")
def two_folds(synthetic_data_dir, image_cache_dir, tmp_path_factory):
    """Runs ``kfold/version_0`` (fold 0 of 2) and ``version_1`` (fold 1), seeds 1 and 2."""
    runs = tmp_path_factory.mktemp("two_folds") / "runs"
    fits = [build_cli(tiny_fit_args(synthetic_data_dir, image_cache_dir, runs,
                                    "--data.folds", "2", "--data.fold", str(fold),
                                    "--seed_everything", str(fold + 1)))
            for fold in (0, 1)]
    return runs, fits


def test_each_fold_records_its_fold_and_held_out_score(two_folds, synthetic_data_dir):
    _, fits = two_folds
    for fold, cli in enumerate(fits):
        run = Path(cli.trainer.log_dir)
        summary = read_run_summary(run)
        callback = cli.trainer.checkpoint_callback
        assert (summary["folds"], summary["fold"]) == (2, fold)
        assert summary["train_on"] == ["train", "val"] and summary["val_held_out"] is True
        # the held-out fold IS held out: the best checkpoint is the run's result
        assert summary["checkpoint"] == callback.best_model_path
        assert summary["checkpoint_choice"] == "best val/seq_acc"
        assert summary["val_seq_acc"] == pytest.approx(float(callback.best_model_score))
        assert summary["data"]["synthetic"] is True
        assert summary["data"]["data_dir"] == str(synthetic_data_dir.resolve())
        assert len(cli.datamodule.val_set) == 104  # half of 160 + 48


def test_runs_table_shows_the_folds_and_their_mean_and_spread(two_folds, capsys):
    runs, fits = two_folds
    table = collect_runs(runs)
    assert table["fold"].tolist() == ["0/2", "1/2"]
    assert table["train_on"].tolist() == ["train+val"] * 2
    assert table["val_held_out"].tolist() == [True, True]
    assert table["data"].tolist() == ["synthetic", "synthetic"]
    scores = [float(cli.trainer.checkpoint_callback.best_model_score) for cli in fits]
    assert table["best_seq_acc"].tolist() == pytest.approx(scores)
    summary = fold_summary(table).iloc[0]
    assert (summary["name"], summary["folds"], summary["found"], summary["missing"]) == \
        ("kfold", 2, [0, 1], [])
    assert summary["mean"] == pytest.approx(statistics.mean(scores))
    assert summary["std"] == pytest.approx(statistics.stdev(scores))
    line = (f"folds kfold (2 folds): best_val {statistics.mean(scores):.4f} ± "
            f"{statistics.stdev(scores):.4f} over folds 0, 1")
    assert line in format_table(table).splitlines()
    assert runs_main([str(runs)]) == 0
    out = capsys.readouterr().out
    assert line in out.splitlines()
    header = out.splitlines()[0].split()
    assert "fold" in header and "data" in header
    row = next(x for x in out.splitlines() if x.startswith("kfold/version_1"))
    assert " 1/2 " in row and " synthetic " in row
    rows = json.loads(_json_out(runs, capsys))
    assert [r["fold"] for r in rows] == ["0/2", "1/2"]


def _json_out(runs: Path, capsys) -> str:
    assert runs_main([str(runs), "--json"]) == 0
    return capsys.readouterr().out


def test_a_missing_fold_is_named(two_folds):
    runs, _ = two_folds
    table = collect_runs(runs)
    only = table[table["fold"] == "1/2"]
    assert "folds kfold (2 folds): best_val " in format_table(only)
    assert "over folds 1; missing 0" in format_table(only)
    assert "folds " not in format_table(table.assign(fold=None))  # no fold, no line


def test_the_fold_ensemble_reads_test_a_with_every_fold(two_folds, synthetic_data_dir,
                                                        image_cache_dir, tmp_path, capsys):
    _, fits = two_folds
    best = [cli.trainer.checkpoint_callback.best_model_path for cli in fits]
    out = tmp_path / "folds.csv"
    code = predict_cli.main([*best, "--data_dir", str(synthetic_data_dir), "--out", str(out),
                             "--cache_dir", str(image_cache_dir), "--num_workers", "0",
                             "--accelerator", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "Ensemble of 2: per-position probabilities averaged." in printed
    assert len(pd.read_csv(out)) == 40
    assert " is fold " not in printed  # test A is no split the folds were cut from


def test_a_fold_checkpoint_reading_val_says_its_score_is_not_held_out(
        two_folds, synthetic_data_dir, image_cache_dir, tmp_path, capsys):
    _, fits = two_folds
    best = Path(fits[0].trainer.checkpoint_callback.best_model_path)
    code = predict_cli.main([str(best), "--data_dir", str(synthetic_data_dir), "--split", "val",
                             "--out", str(tmp_path / "val.csv"), "--cache_dir",
                             str(image_cache_dir), "--num_workers", "0", "--accelerator", "cpu"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert f"Note: {best.name} is fold 0/2 of train + val: it trained on the other folds, so " \
           "most of split val was trained on and a score on it is not held out (its " \
           "held-out score: best_val in python -m svhn.runs)." in lines
    made = report.write_report(best, tmp_path / "report", data_dir=synthetic_data_dir,
                               cache_dir=image_cache_dir, device="cpu")
    assert f"- **Note**: {best.name} is fold 0/2 of train + val" in made.read_text()
