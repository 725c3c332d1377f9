"""``svhn.runs`` (the table of runs) and the run record ``svhn.fit`` writes for it, including
the honest final fit: training on the validation split names last.ckpt, never the val-picked
"best"."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
from helpers.runs import PLAIN_MODEL, fake_run
from lightning.pytorch.callbacks import ModelCheckpoint

from svhn.analysis import runs as runs_module
from svhn.analysis.runs import COLUMNS, collect_runs, format_table, main, sort_runs
from svhn.data.datamodule import SVHNDataModule
from svhn.model.training import DigitSequenceModel
from svhn.train.callbacks import RunSummaryWriter
from svhn.train.cli import build_cli
from svhn.train.run_summary import RUN_SUMMARY_FILE, read_run_summary

NOT_HELD_OUT = "NOT a held-out score"


@dataclass(frozen=True)
class Fits:
    runs: Path  # runs/ of the two runs below (read-only for the tests)
    held_out: Path  # run folder: trained on train, 1 epoch then resumed to 2, overlay config
    held_out_best: Path
    held_out_score: float  # the checkpoint callback's best val/seq_acc
    final: Path  # run folder: trained on train+val for 2 epochs, seed 7
    final_output: str  # what that fit printed


def tiny_fit(data_dir: Path, cache_dir: Path, runs: Path, *extra: str):
    return build_cli([
        *PLAIN_MODEL,
        "--data.data_dir", str(data_dir), "--data.cache_dir", str(cache_dir),
        "--data.num_workers", "0", "--data.image_size", "[32, 64]", "--data.batch_size", "32",
        "--data.augment", "none", "--model.scheduler", "none",
        "--trainer.logger.init_args.save_dir", str(runs),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        *extra,
    ])


@pytest.fixture(scope="module")
def fits(synthetic_data_dir, image_cache_dir, tmp_path_factory) -> Fits:
    root = tmp_path_factory.mktemp("run_table")
    runs = root / "runs"
    overlay = root / "tiny.yaml"
    overlay.write_text("trainer:\n  max_epochs: 1\n")
    tiny_fit(synthetic_data_dir, image_cache_dir, runs, "--config", str(overlay))
    resumed = tiny_fit(synthetic_data_dir, image_cache_dir, runs, "--config", str(overlay),
                       "--trainer.max_epochs", "2", "--ckpt_path", "last")
    callback = resumed.trainer.checkpoint_callback

    capture = root / "final_output.txt"
    with capture.open("w") as out, redirect_stdout(out):
        final = tiny_fit(synthetic_data_dir, image_cache_dir, runs, "--trainer.max_epochs", "2",
                         "--data.train_on", "[train, val]", "--seed_everything", "7")
    return Fits(runs=runs, held_out=Path(resumed.trainer.log_dir),
                held_out_best=Path(callback.best_model_path),
                held_out_score=float(callback.best_model_score),
                final=Path(final.trainer.log_dir), final_output=capture.read_text())


def logged_val_scores(run_dir: Path) -> list[float]:
    with (run_dir / "metrics.csv").open(newline="") as handle:
        return [float(r["val/seq_acc"]) for r in csv.DictReader(handle) if r.get("val/seq_acc")]


def run_name(run_dir: Path) -> str:
    """How the table names a run: ``<logger name>/version_N``."""
    return f"{run_dir.parent.name}/{run_dir.name}"


def row_of(table, run_dir: Path) -> dict:
    name = run_name(run_dir)
    rows = table[table["run"] == name].to_dict("records")
    assert len(rows) == 1, f"{name} not listed once in {list(table['run'])}"
    return rows[0]


# -- the table, on real (tiny) fits --------------------------------------------------------
def test_table_lists_each_run_with_the_best_score_of_its_metrics(fits):
    table = collect_runs(fits.runs)
    assert list(table.columns) == COLUMNS and len(table) == 2
    held_out = row_of(table, fits.held_out)
    scores = logged_val_scores(fits.held_out)
    assert len(scores) == 2  # one per epoch across both sessions
    assert held_out["best_seq_acc"] == pytest.approx(max(scores), abs=1e-9)
    assert held_out["best_seq_acc"] == pytest.approx(fits.held_out_score, abs=1e-6)
    assert held_out["last_seq_acc"] == pytest.approx(scores[-1], abs=1e-9)
    assert held_out["checkpoint"] == str(fits.held_out_best)
    assert (held_out["backbone"], held_out["epochs"], held_out["max_epochs"]) == \
        ("simple_cnn", 2, 2)
    assert held_out["recipe"] == "plain.yaml + tiny.yaml"  # the --config chain
    assert held_out["sessions"] == 2 and held_out["status"] == "finished"
    assert held_out["val_held_out"] is True and held_out["train_on"] == "train"
    summary = read_run_summary(fits.held_out)
    recorded = sum(s["seconds"] for s in summary["sessions"])
    assert held_out["time_source"] == "recorded"
    assert held_out["train_seconds"] == pytest.approx(recorded) and recorded > 0
    assert held_out["problems"] == ""


def test_final_fit_on_train_and_val_names_last_ckpt_and_says_val_is_not_held_out(fits):
    out = fits.final_output
    assert out.count(NOT_HELD_OUT) == 2, out  # at the start of the fit and in its summary
    assert out.index(NOT_HELD_OUT) < out.index("val/seq_acc at the last epoch")
    last = fits.final / "checkpoints" / "last.ckpt"
    assert f"Checkpoint (last epoch: validation images were trained on): {last}" in out
    assert f"python -m svhn.predict {last}" in out
    assert "Best val/seq_acc" not in out
    # the val-picked checkpoint exists, so naming last.ckpt was a choice
    assert [p.name for p in last.parent.glob("epoch*.ckpt")]
    summary = read_run_summary(fits.final)
    assert summary["val_held_out"] is False and summary["train_on"] == ["train", "val"]
    assert summary["checkpoint"] == str(last)


def test_table_marks_a_run_that_trained_on_its_validation_split(fits):
    table = collect_runs(fits.runs)
    final = row_of(table, fits.final)
    assert final["val_held_out"] is False and final["train_on"] == "train+val"
    assert final["checkpoint"] == str(fits.final / "checkpoints" / "last.ckpt")
    assert final["seed"] == 7
    text = format_table(table)
    line = next(x for x in text.splitlines() if x.strip().startswith(run_name(fits.final)))
    assert " NO " in line
    assert "held_out NO: the run trained on its validation split" in text
    held_out_line = next(x for x in text.splitlines()
                         if x.strip().startswith(run_name(fits.held_out)))
    assert " yes " in held_out_line


def test_without_a_run_summary_the_time_comes_from_file_times(fits, tmp_path):
    run = tmp_path / "runs" / "default" / "version_0"
    shutil.copytree(fits.held_out, run)
    (run / RUN_SUMMARY_FILE).unlink()
    (run / "config_resumed_1.yaml").unlink()
    start = 1_700_000_000
    os.utime(run / "config.yaml", (start, start))
    for path in [run / "metrics.csv", *(run / "checkpoints").iterdir()]:
        os.utime(path, (start + 50, start + 50))
    os.utime(run / "checkpoints" / "last.ckpt", (start + 123, start + 123))
    row = collect_runs(tmp_path / "runs").iloc[0]
    assert row["train_seconds"] == pytest.approx(123)
    assert row["time_source"] == "files" and row["recipe"] == "not recorded"
    assert row["status"] == "finished"  # 2 of 2 epochs


def test_an_unfinished_session_adds_its_time_so_far(fits, tmp_path):
    run = tmp_path / "runs" / "default" / "version_0"
    shutil.copytree(fits.held_out, run)
    summary = read_run_summary(run)
    summary["sessions"][-1].update(seconds=None, status="started, not finished",
                                   started_unix=1_700_000_000)
    (run / RUN_SUMMARY_FILE).write_text(json.dumps(summary))
    for path in [run / "metrics.csv", *(run / "checkpoints").iterdir()]:
        os.utime(path, (1_700_000_040, 1_700_000_040))
    row = collect_runs(tmp_path / "runs").iloc[0]
    assert row["train_seconds"] == pytest.approx(summary["sessions"][0]["seconds"] + 40)
    assert row["time_source"].startswith("recorded + files")
    assert row["status"] == "started, not finished"


def test_a_summary_that_missed_earlier_sessions_says_so(fits, tmp_path):
    run = tmp_path / "runs" / "default" / "version_0"
    shutil.copytree(fits.held_out, run)
    summary = read_run_summary(run)
    del summary["sessions"][0]  # as if the first session ran before svhn.fit wrote these
    (run / RUN_SUMMARY_FILE).write_text(json.dumps(summary))
    row = collect_runs(tmp_path / "runs").iloc[0]
    assert row["time_source"] == "recorded (1 of 2 sessions)" and row["sessions"] == 2


def test_a_crashed_fit_is_recorded_as_crashed(synthetic_data_dir, image_cache_dir, tmp_path):
    class CrashAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise RuntimeError("boom")

    run = tmp_path / "runs" / "crash" / "version_0"
    data = SVHNDataModule(str(synthetic_data_dir), image_size=(32, 64), batch_size=32,
                          num_workers=0, cache_dir=str(image_cache_dir), augment="none")
    model = DigitSequenceModel(image_size=(32, 64), scheduler="none")
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, limit_train_batches=1,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ModelCheckpoint(run / "checkpoints"),
                                   CrashAfterFirstEpoch(), RunSummaryWriter(["x.yaml"])])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=data)
    session = read_run_summary(run)["sessions"][-1]
    assert session["status"] == "crashed (RuntimeError)" and session["seconds"] > 0
    row = collect_runs(tmp_path / "runs").iloc[0]
    assert row["status"] == "crashed (RuntimeError)" and row["recipe"] == "x.yaml"
    assert "no checkpoint yet" in row["problems"] and "no config.yaml" in row["problems"]


# -- the table, on hand-made run folders ---------------------------------------------------
@pytest.fixture
def fake_runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    fake_run(runs, "alexnet", [0.10, 0.30, 0.20])
    fake_run(runs, "vgg", [0.50, 0.40, 0.45])
    fake_run(runs, "lenet5", [0.05, 0.25], max_epochs=4)
    return runs


def test_best_and_last_scores_and_epochs_from_sparse_metrics(fake_runs):
    table = collect_runs(fake_runs).set_index("run")
    vgg = table.loc["vgg/version_0"]
    assert (vgg["best_seq_acc"], vgg["best_epoch"], vgg["last_seq_acc"], vgg["epochs"]) == \
        (0.50, 0, 0.45, 3)
    assert vgg["checkpoint"].endswith("epoch000-seq_acc0.5000.ckpt")
    lenet = table.loc["lenet5/version_0"]
    assert (lenet["epochs"], lenet["max_epochs"], lenet["status"]) == (2, 4, "unknown")


def test_a_resumed_epoch_counts_once_with_its_last_score(tmp_path):
    run = fake_run(tmp_path / "runs", "vgg", [0.1, 0.2])
    with (run / "metrics.csv").open("a") as handle:  # epoch 1 again after a resume
        handle.write("1,,9,,0.15\n2,,14,,0.3\n")
    row = collect_runs(tmp_path / "runs").iloc[0]
    assert (row["epochs"], row["best_seq_acc"], row["last_seq_acc"]) == (3, 0.3, 0.3)


def test_sort_by_best_score_puts_the_best_first(fake_runs, capsys):
    assert main([str(fake_runs), "--sort", "best_seq_acc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    order = [line.split()[0] for line in lines[1:4]]
    assert order == ["vgg/version_0", "alexnet/version_0", "lenet5/version_0"]
    assert main([str(fake_runs), "--sort", "best", "--reverse"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == order[::-1]
    table = sort_runs(collect_runs(fake_runs), "run")
    assert list(table["run"]) == ["alexnet/version_0", "lenet5/version_0", "vgg/version_0"]


def test_by_score_runs_that_trained_on_val_sort_after_held_out_ones(fake_runs):
    fake_run(fake_runs, "resnet18", [0.97, 0.99], train_on="[train, val]")
    table = sort_runs(collect_runs(fake_runs), "best")
    assert list(table["run"]) == ["vgg/version_0", "alexnet/version_0", "lenet5/version_0",
                                  "resnet18/version_0"]


def test_sort_by_an_unknown_column_is_a_clear_error(fake_runs, capsys):
    assert main([str(fake_runs), "--sort", "accuracy"]) == 2
    assert "--sort accuracy: no such column" in capsys.readouterr().err


def test_json_output_parses_with_every_column(fake_runs, capsys):
    assert main([str(fake_runs), "--json", "--sort", "best"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["run"] for r in rows] == ["vgg/version_0", "alexnet/version_0",
                                        "lenet5/version_0"]
    assert all(list(r) == COLUMNS for r in rows)
    assert rows[0]["best_seq_acc"] == 0.5 and rows[0]["epochs"] == 3
    assert rows[0]["val_held_out"] is True and rows[0]["train_seconds"] >= 0


def test_a_broken_run_folder_is_reported_not_fatal(fake_runs, capsys, monkeypatch):
    broken = fake_runs / "broken" / "version_0"
    broken.mkdir(parents=True)
    (broken / "config.yaml").write_text("model: [unclosed\n")
    (broken / "metrics.csv").write_bytes(b"\x00\xff\x00")
    (fake_runs / "empty" / "version_3").mkdir(parents=True)  # made, then crashed at once
    assert main([str(fake_runs)]) == 0
    captured = capsys.readouterr()
    assert "vgg/version_0" in captured.out and "alexnet/version_0" in captured.out
    assert "svhn.runs: broken/version_0: config.yaml unreadable" in captured.err
    assert "svhn.runs: empty/version_3: no config.yaml; no metrics.csv; no checkpoint yet" \
        in captured.err
    assert "problems" in captured.out.splitlines()[0]

    real_read = runs_module._read_metrics

    def fail_for_alexnet(run_dir, problems):
        if run_dir.parent.name == "alexnet":
            raise KeyError("something nobody foresaw")
        return real_read(run_dir, problems)

    monkeypatch.setattr(runs_module, "_read_metrics", fail_for_alexnet)
    table = collect_runs(fake_runs).set_index("run")
    assert table.loc["alexnet/version_0", "status"] == "unreadable"
    assert "something nobody foresaw" in table.loc["alexnet/version_0", "problems"]
    assert table.loc["vgg/version_0", "best_seq_acc"] == 0.5


def test_a_train_and_val_run_without_a_record_is_still_marked(tmp_path):
    run = fake_run(tmp_path / "runs", "vgg", [0.9, 0.95], train_on="[train, val]")
    row = collect_runs(tmp_path / "runs").to_dict("records")[0]
    assert row["val_held_out"] is False  # from config.yaml alone
    assert row["checkpoint"] == str(run / "checkpoints" / "last.ckpt")


def test_empty_and_missing_runs_folders(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    assert "No runs under" in capsys.readouterr().out
    assert main([str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_name_filter(fake_runs, capsys):
    assert main([str(fake_runs), "--name", "v*", "--json"]) == 0
    assert [r["run"] for r in json.loads(capsys.readouterr().out)] == ["vgg/version_0"]


def test_no_nan_leaks_into_json(tmp_path, capsys):
    (tmp_path / "runs" / "x" / "version_0").mkdir(parents=True)
    assert main([str(tmp_path / "runs"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert row["best_seq_acc"] is None and row["epochs"] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in row.values())


# -- data efficiency: train_subset, the recorded image count, the figure -------------------
def test_train_subset_is_fixed_nested_and_recorded_for_the_table(synthetic_data_dir,
                                                                 image_cache_dir, tmp_path):
    def names(count):
        dm = SVHNDataModule(str(synthetic_data_dir), num_workers=0, train_subset=count,
                            cache_dir=str(image_cache_dir))
        dm.setup("fit")
        return {n for d in dm.train_set.datasets for n in d.names}

    small, large = names(20), names(50)
    assert len(small) == 20 and len(large) == 50 and small < large
    assert names(20) == small  # the same images on every run
    everything = names(None)
    with pytest.raises(ValueError, match=f"only {len(everything)} labelled images"):
        names(len(everything) + 1)
    with pytest.raises(ValueError, match="train_subset must be"):
        SVHNDataModule(str(synthetic_data_dir), train_subset=0)

    tiny_fit(synthetic_data_dir, image_cache_dir, tmp_path / "runs", "--data.train_subset",
             "30", "--trainer.max_epochs", "1", "--data.extra_train",
             f"[{synthetic_data_dir}]")
    summary = read_run_summary(next((tmp_path / "runs").glob("*/version_0")))
    # the extra folder is the same data in another place: counted apart, never cut
    assert summary["train_images"] == {"data_dir": 30, "extra": len(everything), "synthetic": 0}
    assert collect_runs(tmp_path / "runs").iloc[0]["train_images"] == 30


def test_efficiency_figure_plots_each_run_s_score_against_its_images(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name, images, scores in (("r500", 500, [0.2, 0.4]), ("r1000", 1000, [0.3, 0.5]),
                                 ("r2000", 2000, [0.5, 0.6])):
        run = fake_run(runs, name, scores)
        (run / RUN_SUMMARY_FILE).write_text(json.dumps(
            {"configs": [], "train_images": {"data_dir": images, "extra": 4000},
             "sessions": [{"seconds": 10.0, "status": "finished"}]}))
    png = tmp_path / "efficiency.png"
    assert main([str(runs), "--efficiency", str(png)]) == 0
    assert png.stat().st_size > 10_000
    table = collect_runs(runs)
    assert sorted(table["train_images"]) == [500, 1000, 2000]
    from svhn.analysis.plots import data_efficiency

    figure = data_efficiency(table)
    line = figure.axes[0].lines[0]
    assert list(line.get_xdata()) == [500, 1000, 2000]
    assert list(line.get_ydata()) == [0.4, 0.5, 0.6]
    fake_run(tmp_path / "old", "r", [0.1])  # no recorded image count: nothing to plot
    assert main([str(tmp_path / "old"), "--efficiency", str(tmp_path / "x.png")]) == 2
    assert "no run with a recorded number of training images" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_the_table_as_a_result_file_names_the_machine_and_never_overwrites(fits, tmp_path):
    from svhn.precision import machine

    out = tmp_path / "runs.csv"
    assert main([str(fits.runs), "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 2 and set(COLUMNS) <= set(rows[0])
    here = machine("cpu")
    assert all(row["machine"] == f"{here['class']}: {here['name']}" for row in rows)
    before = out.read_text()
    assert main([str(fits.runs), "--csv", str(out)]) == 2  # exists: refused, untouched
    assert out.read_text() == before and not list(tmp_path.glob("*.partial"))
