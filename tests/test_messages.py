"""Messages a user can trust (issue #27, part 5): no library chatter from svhn.predict and
svhn.report; a checkpoint says what it was trained on when it reads other data; svhn.runs
has a ``data`` column; svhn.report labels which data its curves and its score are on.

"Competition data" here is a copy of the tiny synthetic set without its test-A labels
(which only a generated set has): what a folder of the real competition looks like.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import svhn
from svhn.analysis import plots, report
from svhn.analysis.runs import collect_runs, format_table
from svhn.checkpoint_format import CheckpointContents, read_checkpoint
from svhn.data.layout import SYNTHETIC_TEST_LABELS
from svhn.inference import cli as predict_cli
from svhn.inference.provenance import data_notice
from svhn.train.cli import build_cli

REPO = Path(svhn.__file__).resolve().parents[1]
NOISE = ("Tip:", "litlogger", "litmodels", "LeafSpec", "_pytree")


@pytest.fixture(scope="module")
def synthetic_run(synthetic_data_dir, image_cache_dir, tmp_path_factory) -> Path:
    """The run folder of a few steps of the plain model on the synthetic set."""
    root = tmp_path_factory.mktemp("messages")
    plain = root / "plain.yaml"
    plain.write_text("trainer:\n  precision: 32-true\n")
    cli = build_cli([
        "--config", str(plain), "--data.data_dir", str(synthetic_data_dir),
        "--data.cache_dir", str(image_cache_dir), "--data.num_workers", "0",
        "--data.image_size", "[32, 64]", "--data.batch_size", "32", "--data.augment", "none",
        "--model.scheduler", "none", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.logger.init_args.name", "tiny"])
    return Path(cli.trainer.log_dir)


@pytest.fixture(scope="module")
def competition_copy(synthetic_data_dir, tmp_path_factory) -> Path:
    """The synthetic set's files as a competition folder (``mchar``, no test-A labels)."""
    copy = tmp_path_factory.mktemp("competition") / "mchar"
    shutil.copytree(synthetic_data_dir, copy)
    (copy / SYNTHETIC_TEST_LABELS).unlink()
    return copy


def last_of(run: Path) -> Path:
    return run / "checkpoints" / "last.ckpt"


# -- no library chatter ----------------------------------------------------------------------
def run_command(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m ARGS`` as a user runs it: Python's own warning filters, nothing hidden."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=env)


def test_predict_and_report_print_no_tip_and_no_pytree_warning(synthetic_run,
                                                               synthetic_data_dir,
                                                               image_cache_dir, tmp_path):
    checkpoint = str(last_of(synthetic_run))
    common = ["--data_dir", str(synthetic_data_dir), "--cache_dir", str(image_cache_dir)]
    predict = run_command(["svhn.predict", checkpoint, *common, "--split", "val", "--out",
                           str(tmp_path / "val.csv"), "--num_workers", "0",
                           "--accelerator", "cpu"], tmp_path)
    made = run_command(["svhn.report", "--ckpt_path", checkpoint, *common, "--out",
                        str(tmp_path / "report"), "--device", "cpu"], tmp_path)
    for result, done in ((predict, "Wrote "), (made, "wrote ")):
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-3000:]
        assert done in result.stdout
        for noise in NOISE:
            assert noise not in output, f"{result.args[2]} printed {noise!r}:\n{output}"


# -- what a checkpoint was trained on --------------------------------------------------------
def test_checkpoint_records_the_data_it_was_trained_on(synthetic_run, synthetic_data_dir):
    saved = torch.load(last_of(synthetic_run), map_location="cpu", weights_only=True)
    expected = {"data_dir": str(synthetic_data_dir.resolve()), "synthetic": True,
                "fallback": False, "extra_train": []}
    assert saved["SVHNDataModule"]["trained_on"] == expected
    assert read_checkpoint(last_of(synthetic_run)).trained_on == expected


def predict_lines(checkpoint: Path, data_dir: Path, cache_dir: Path, out: Path,
                  capsys) -> list[str]:
    code = predict_cli.main([str(checkpoint), "--data_dir", str(data_dir), "--out", str(out),
                             "--cache_dir", str(cache_dir), "--num_workers", "0",
                             "--accelerator", "cpu"])
    assert code == 0
    return capsys.readouterr().out.splitlines()


def test_a_synthetic_checkpoint_reading_competition_data_says_so_once(
        synthetic_run, synthetic_data_dir, competition_copy, tmp_path, capsys):
    lines = predict_lines(last_of(synthetic_run), competition_copy, tmp_path / "cache",
                          tmp_path / "a.csv", capsys)
    notes = [line for line in lines if line.startswith("Note: ")]
    assert notes == [f"Note: last.ckpt was trained on SYNTHETIC house numbers "
                     f"({synthetic_data_dir.resolve()}), not on {competition_copy.resolve()} "
                     "that it reads now."]
    assert any(line.startswith("Wrote ") for line in lines)  # a notice, not an error


def test_no_notice_when_it_reads_the_data_it_was_trained_on(synthetic_run, synthetic_data_dir,
                                                            image_cache_dir, tmp_path, capsys):
    lines = predict_lines(last_of(synthetic_run), synthetic_data_dir, image_cache_dir,
                          tmp_path / "b.csv", capsys)
    assert not [line for line in lines if line.startswith("Note: ")]


def test_an_older_checkpoint_outside_its_run_is_read_from_its_data_settings(
        synthetic_run, synthetic_data_dir, competition_copy, tmp_path, capsys):
    raw = torch.load(last_of(synthetic_run), map_location="cpu", weights_only=True)
    del raw["SVHNDataModule"]  # as written before the record existed
    older = tmp_path / "older.ckpt"
    torch.save(raw, older)
    lines = predict_lines(older, competition_copy, tmp_path / "cache", tmp_path / "c.csv",
                          capsys)
    assert f"Note: older.ckpt was trained on SYNTHETIC house numbers " \
           f"({synthetic_data_dir.resolve()}), not on {competition_copy.resolve()} that it " \
           "reads now." in lines


def contents(trained_on: dict | None = None, **data) -> CheckpointContents:
    return CheckpointContents(path=Path("model.ckpt"), model={}, data=data, state_dict={},
                              trained_on=trained_on or {})


def test_the_notice_names_the_quick_start_fallback_and_claims_nothing_unknown(
        synthetic_data_dir, competition_copy, tmp_path):
    fallback = contents({"data_dir": str(tmp_path / "data" / "synthetic"), "synthetic": True,
                         "fallback": True})
    assert data_notice(fallback, competition_copy) == (
        f"Note: model.ckpt was trained on SYNTHETIC house numbers (the quick start's "
        f"fallback set, {tmp_path / 'data' / 'synthetic'}), not on "
        f"{competition_copy.resolve()} that it reads now.")
    real = contents({"data_dir": str(competition_copy), "synthetic": False})
    assert data_notice(real, synthetic_data_dir) == (
        f"Note: model.ckpt was trained on {competition_copy}, not on the synthetic set "
        f"{synthetic_data_dir.resolve()} that it reads now.")
    assert data_notice(real, competition_copy) is None
    # the quick start's settings alone (data_dir null, fallback on) do not say which it was
    assert data_notice(contents(data_dir=None, synthetic_fallback=True), tmp_path) is None


# -- svhn.runs: the data column --------------------------------------------------------------
def test_runs_table_says_which_data_each_run_trained_on(synthetic_run, competition_copy,
                                                        tmp_path):
    runs = tmp_path / "runs"
    for name in ("synthetic", "recorded", "configured", "quickstart"):
        shutil.copytree(synthetic_run, runs / name / "version_0")

    def edit(name: str, summary_data, config_data: dict) -> None:
        run = runs / name / "version_0"
        summary = json.loads((run / "run_summary.json").read_text())
        if summary_data is None:
            del summary["data"]
        else:
            summary["data"] = summary_data
        (run / "run_summary.json").write_text(json.dumps(summary))
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"].update(config_data)
        (run / "config.yaml").write_text(yaml.safe_dump(config))

    edit("recorded", {"data_dir": str(competition_copy), "synthetic": False}, {})
    edit("configured", None, {"data_dir": str(competition_copy)})  # before the record
    edit("quickstart", None, {"data_dir": None, "synthetic_fallback": True})
    table = collect_runs(runs).set_index("run")
    assert table.loc["synthetic/version_0", "data"] == "synthetic"
    assert table.loc["recorded/version_0", "data"] == "mchar"
    assert table.loc["configured/version_0", "data"] == "mchar"
    assert pd.isna(table.loc["quickstart/version_0", "data"])  # not recorded: not claimed
    text = format_table(collect_runs(runs), wide=True)
    assert text.splitlines()[0].split()[3] == "data"
    line = next(x for x in text.splitlines() if x.strip().startswith("synthetic/version_0"))
    assert line.split()[3] == "synthetic"
    assert "data: synthetic (a generated set) or the data folder's name" in text


# -- svhn.report: which data the curves and the score are on ---------------------------------
def test_report_labels_the_curves_and_the_score_with_their_data(
        synthetic_run, synthetic_data_dir, competition_copy, tmp_path, monkeypatch):
    drawn = {}
    save = plots.save

    def keep(figure, path, *args, **kwargs):
        drawn[Path(path).stem] = figure
        return save(figure, path, *args, **kwargs)

    monkeypatch.setattr(plots, "save", keep)
    trained = f"SYNTHETIC house numbers ({synthetic_data_dir.resolve()})"
    made = report.write_report(last_of(synthetic_run), tmp_path / "report",
                               data_dir=competition_copy, cache_dir=tmp_path / "cache",
                               device="cpu")
    text = made.read_text()
    assert f"- Scored on: `{competition_copy.resolve()}`, split `val` (competition data)" \
        in text
    assert f"- Trained on: {trained}; the training curves are of its train and val split" \
        in text
    assert "- **Note**: the training curves' val scores are on synthetic data, this " \
           "report's score on competition data" in text
    assert f"### Training curves (trained and validated on {trained})" in text
    curves = drawn["curves"]
    assert f"trained and validated on {trained}" in curves._suptitle.get_text()
    legends = [t.get_text() for ax in curves.axes if ax.get_legend()
               for t in ax.get_legend().get_texts()]
    assert "val/seq_acc (synthetic val)" in legends
    assert "train/seq_acc (synthetic train)" in legends
    title = drawn["accuracy_by_length"].axes[0].get_title()
    assert f"on competition val ({competition_copy.resolve()})" in title


def test_report_on_the_data_it_trained_on_has_no_warning(synthetic_run, synthetic_data_dir,
                                                         image_cache_dir, tmp_path):
    made = report.write_report(last_of(synthetic_run), tmp_path / "report",
                               data_dir=synthetic_data_dir, cache_dir=image_cache_dir,
                               device="cpu")
    text = made.read_text()
    assert "(synthetic data)" in text and "**Note**" not in text
