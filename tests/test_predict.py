"""Tests for prediction (svhn.predict): round trip to the score, ensembles, TTA, DDP, outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from svhn import predict
from svhn.inference import predict_split
from svhn.labels import BLANK, decode_probabilities
from svhn.score import score_file
from svhn.submission import SAMPLE_SUBMISSION, is_digit_code, read_submission

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_predict(trained, *checkpoints: Path, out: Path, split: str = "val",
                data_dir: Path | None = None, extra: tuple[str, ...] = ()) -> int:
    """svhn.predict's CLI in this process, on the tiny synthetic set, CPU, no workers."""
    argv = [*map(str, checkpoints or [trained.best]),
            "--data_dir", str(data_dir or trained.data_dir), "--split", split,
            "--out", str(out), "--cache_dir", str(trained.cache_dir), "--num_workers", "0",
            "--accelerator", "cpu", "--batch_size", "16", *extra]
    return predict.main(argv)


def plain_probabilities(trained, checkpoint: Path, split: str = "val"):
    result = predict_split([checkpoint], trained.data_dir, split, cache_dir=trained.cache_dir,
                           accelerator="cpu", num_workers=0, batch_size=16)
    return result.file_names, result.probs


@pytest.fixture(scope="module")
def val_prediction(trained_checkpoint, tmp_path_factory) -> Path:
    """The best checkpoint's val CSV (with probabilities), shared by several tests."""
    out = tmp_path_factory.mktemp("predict") / "best_val.csv"
    assert run_predict(trained_checkpoint, out=out, extra=("--save_probs",)) == 0
    return out


# ------------------------------------------------------------------------ round trip


def test_score_of_written_csv_equals_logged_val_seq_acc(trained_checkpoint, val_prediction):
    report = score_file(val_prediction, trained_checkpoint.data_dir / "mchar_val.json")
    assert report.n_missing == report.n_extra == report.n_invalid == 0
    assert report.seq_acc == pytest.approx(trained_checkpoint.val_seq_acc, abs=1e-6)


def test_csv_codes_decode_the_saved_probabilities(val_prediction):
    frame = read_submission(val_prediction)
    saved = np.load(val_prediction.with_suffix(".npz"))
    assert saved["file_names"].tolist() == frame["file_name"].tolist()
    assert saved["probs"].shape == (len(frame), 5, 11)
    assert decode_probabilities(torch.from_numpy(saved["probs"])) == frame["file_code"].tolist()
    assert str(saved["split"]) == "val" and saved["views"].tolist() == ["identity"]


def test_predict_prints_rows_and_score(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "deep" / "folder" / "val.csv"  # parent folders are created
    assert run_predict(trained_checkpoint, out=out) == 0
    printed = capsys.readouterr().out
    assert f"Wrote {out} (48 rows)." in printed
    assert "score (whole-string accuracy):" in printed
    assert [p.name for p in out.parent.iterdir()] == ["val.csv"]  # no temp file left


# ---------------------------------------------------------------------- ensemble, TTA


def test_ensemble_averages_probabilities(trained_checkpoint, tmp_path):
    best, last = trained_checkpoint.best, trained_checkpoint.last
    out = tmp_path / "ensemble.csv"
    assert run_predict(trained_checkpoint, best, last, out=out, extra=("--save_probs",)) == 0
    names_best, probs_best = plain_probabilities(trained_checkpoint, best)
    names_last, probs_last = plain_probabilities(trained_checkpoint, last)
    saved = np.load(out.with_suffix(".npz"))
    assert saved["file_names"].tolist() == names_best == names_last
    expected = ((probs_best + probs_last) / 2).numpy()
    np.testing.assert_allclose(saved["probs"], expected, atol=1e-6)
    frame = read_submission(out)
    assert frame["file_name"].tolist() == names_best
    assert all(map(is_digit_code, frame["file_code"]))
    assert saved["checkpoints"].tolist() == [str(best), str(last)]


def test_tta_keeps_the_submission_format(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "tta.csv"
    assert run_predict(trained_checkpoint, out=out, split="test_a", extra=("--tta",)) == 0
    assert "Matches mchar_sample_submit_A.csv" in capsys.readouterr().out
    frame = read_submission(out)
    sample = read_submission(trained_checkpoint.data_dir / SAMPLE_SUBMISSION)
    assert frame["file_name"].tolist() == sample["file_name"].tolist()
    assert all(map(is_digit_code, frame["file_code"]))


def test_bf16_channels_last_prediction_is_close_to_float32(trained_checkpoint, val_prediction,
                                                           tmp_path):
    out = tmp_path / "bf16.csv"
    assert run_predict(trained_checkpoint, out=out,
                       extra=("--precision", "bf16-mixed", "--channels_last", "--save_probs")) == 0
    assert read_submission(out)["file_name"].tolist() == \
        read_submission(val_prediction)["file_name"].tolist()
    fp32 = np.load(predict.probs_path_for(val_prediction))["probs"]
    bf16 = np.load(predict.probs_path_for(out))["probs"]
    difference = np.abs(bf16 - fp32).max()
    assert 0 < difference < 0.05  # bf16 really ran, and rounding moved little


# ---------------------------------------------------------------------------- DDP


def test_ddp_on_two_cpu_processes_equals_one_process(trained_checkpoint, val_prediction,
                                                     tmp_path):
    out = tmp_path / "ddp.csv"
    command = [sys.executable, "-m", "svhn.predict", str(trained_checkpoint.best),
               "--data_dir", str(trained_checkpoint.data_dir), "--split", "val",
               "--out", str(out), "--cache_dir", str(trained_checkpoint.cache_dir),
               "--num_workers", "0", "--batch_size", "8", "--save_probs",
               "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Wrote ") == 1  # rank 0 alone writes
    assert out.read_text() == val_prediction.read_text()
    np.testing.assert_allclose(np.load(out.with_suffix(".npz"))["probs"],
                               np.load(val_prediction.with_suffix(".npz"))["probs"], atol=1e-6)


# ------------------------------------------------------------------ outputs and errors


def test_existing_output_is_kept_without_overwrite(trained_checkpoint, tmp_path, capsys):
    out = tmp_path / "taken.csv"
    out.write_text("old contents\n")
    assert run_predict(trained_checkpoint, out=out) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "pass --overwrite" in err
    assert out.read_text() == "old contents\n"
    assert run_predict(trained_checkpoint, out=out, extra=("--overwrite",)) == 0
    assert read_submission(out).shape == (48, 2)


def test_sample_submission_differences_are_warnings(trained_checkpoint, tmp_path, capsys):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "mchar_test_a").symlink_to(trained_checkpoint.data_dir / "mchar_test_a")
    sample = read_submission(trained_checkpoint.data_dir / SAMPLE_SUBMISSION)
    sample.iloc[::-1].iloc[1:].to_csv(data_dir / SAMPLE_SUBMISSION, index=False)
    out = tmp_path / "test.csv"
    assert run_predict(trained_checkpoint, out=out, split="test_a", data_dir=data_dir) == 0
    err = capsys.readouterr().err
    assert "WARNING: the submission differs from" in err
    assert "1 file name(s) are not in the sample" in err
    assert len(read_submission(out)) == len(sample)


def test_missing_data_is_a_clear_error(trained_checkpoint, tmp_path, capsys):
    missing = tmp_path / "no_data_here"
    assert run_predict(trained_checkpoint, out=tmp_path / "x.csv", data_dir=missing) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--data_dir" in err
    assert not (tmp_path / "x.csv").exists()


def test_missing_checkpoint_is_a_clear_error(trained_checkpoint, tmp_path, capsys):
    ghost = tmp_path / "ghost.ckpt"
    assert run_predict(trained_checkpoint, ghost, out=tmp_path / "x.csv") == 2
    assert f"{ghost}: checkpoint not found" in capsys.readouterr().err


def test_default_output_path_names_the_checkpoints():
    assert predict.default_output_path([Path("r/best.ckpt")], "test_a") == Path(
        "submit/best_test_a.csv")
    assert predict.default_output_path(["r/a.ckpt", "b.ckpt", "c.ckpt"], "val", tta=True) == Path(
        "submit/a+2more_val_tta.csv")


def test_all_blank_rows_are_counted():
    probs = torch.full((3, 4, 11), 0.01)
    probs[:, :, BLANK] = 0.9
    probs[1, 0, 3] = 0.95
    assert predict.count_all_blank(probs) == 2
    assert decode_probabilities(probs)[1] == "3"


# ------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_real_test_a_matches_the_sample_submission(trained_checkpoint, tmp_path, capsys):
    data_dir = os.environ.get("SVHN_DATA_DIR")
    if not data_dir:
        pytest.skip("set SVHN_DATA_DIR to the competition folder (e.g. /work/shared/data/mchar)")
    data_dir = Path(data_dir)
    out = tmp_path / "real_test_a.csv"
    argv = [str(trained_checkpoint.best), "--data_dir", str(data_dir), "--split", "test_a",
            "--out", str(out), "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0",
            "--accelerator", "cpu"]
    assert predict.main(argv) == 0
    frame = read_submission(out)
    sample = read_submission(data_dir / SAMPLE_SUBMISSION)
    assert frame["file_name"].tolist() == sample["file_name"].tolist()
    assert all(map(is_digit_code, frame["file_code"]))
    assert "Matches mchar_sample_submit_A.csv" in capsys.readouterr().out


def test_an_output_that_cannot_be_written_stops_before_any_prediction(trained_checkpoint,
                                                                      tmp_path, capsys,
                                                                      monkeypatch):
    def no_prediction(*args, **kwargs):
        raise AssertionError("prediction ran before the output path was checked")

    monkeypatch.setattr(predict, "predict_split", no_prediction)
    folder = tmp_path / "a_folder.csv"
    folder.mkdir()
    assert run_predict(trained_checkpoint, out=folder) == 2
    assert f"{folder} is a folder" in capsys.readouterr().err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    assert run_predict(trained_checkpoint, out=a_file / "x.csv") == 2
    assert f"{a_file / 'x.csv'}: cannot write there" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder.csv", "notes.txt"]


def test_csv_and_probabilities_are_written_all_or_none(trained_checkpoint, tmp_path,
                                                       monkeypatch, capsys):
    def broken_savez(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(predict.np, "savez", broken_savez)
    out = tmp_path / "out" / "pair.csv"
    with pytest.raises(OSError, match="disk full"):
        run_predict(trained_checkpoint, out=out, extra=("--save_probs",))
    assert not out.exists() and not predict.probs_path_for(out).exists()
    assert list(out.parent.iterdir()) == []  # no temporary file left behind


def test_a_checkpoint_predicts_in_the_precision_it_was_validated_in(trained_checkpoint,
                                                                     tmp_path, capsys):
    raw = torch.load(trained_checkpoint.best, weights_only=False)
    raw["trainer_precision"] = "bf16-mixed"
    bf16_trained = tmp_path / "bf16_trained.ckpt"
    torch.save(raw, bf16_trained)
    out = tmp_path / "auto.csv"
    assert run_predict(trained_checkpoint, bf16_trained, out=out, extra=("--save_probs",)) == 0
    assert "in bf16-mixed (as validated)" in capsys.readouterr().out
    forced = tmp_path / "forced.csv"
    assert run_predict(trained_checkpoint, bf16_trained, out=forced,
                       extra=("--save_probs", "--precision", "bf16-mixed")) == 0
    auto = np.load(predict.probs_path_for(out))["probs"]
    np.testing.assert_array_equal(auto, np.load(predict.probs_path_for(forced))["probs"])
