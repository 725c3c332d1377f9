"""Tests for prediction (svhn.predict): round trip to the score, ensembles, TTA, DDP, outputs.

The round trips can fail: on the easy set each model first shows it learned something
(0 < score < 1), so "predict scores what training logged" compares real numbers, not 0
with 0. Issue 15 planted bugs in predict that the suite let through; the tests written for
them name the bug they catch. All go through the command lines (svhn.predict, svhn.score).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers.runs import last_logged, run_module, run_predict

from svhn.data.labels import BLANK, decode_probabilities, encode_label, load_labels
from svhn.inference import cli as predict_cli
from svhn.inference import scoring
from svhn.inference.predictor import predict_split
from svhn.inference.scoring import score_file
from svhn.inference.submission import SAMPLE_SUBMISSION, is_digit_code, read_submission

BOX_LOSS_BETA = 0.05  # the box loss the model logs: smooth L1 with this beta


def plain_probabilities(trained, checkpoint: Path, split: str = "val"):
    result = predict_split([checkpoint], trained.data_dir, split, cache_dir=trained.cache_dir,
                           accelerator="cpu", num_workers=0, batch_size=32)
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


# ------------------------------------------------- round trips that can fail (the easy set)


def score_cli(submission: Path, labels: Path, capsys) -> dict:
    """``python -m svhn.score --json``: the report a user reads."""
    capsys.readouterr()
    assert scoring.main(["--submission", str(submission), "--labels", str(labels), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def mean_cross_entropy(saved, labels: Path) -> float:
    """The model's loss from saved probabilities: mean -log p(target) over every position."""
    by_name = {s.file_name: s.digits for s in load_labels(labels)}
    probs = torch.from_numpy(saved["probs"]).double()
    targets = torch.tensor([encode_label(by_name[name], probs.shape[1])
                            for name in saved["file_names"].tolist()])
    return F.nll_loss(probs.log().flatten(0, 1), targets.flatten()).item()


def union_boxes(labels: Path, file_names, image_size=(128, 64)) -> torch.Tensor:
    """Each image's box around all digits, normalised like the model's box targets."""
    by_name = {s.file_name: s for s in load_labels(labels)}
    width, height = image_size
    boxes = [by_name[name].union_box() for name in file_names]
    return torch.tensor(boxes, dtype=torch.float32) / torch.tensor([width, height] * 2)


def test_predicted_csv_scores_what_training_logged(easy_run, tmp_path, capsys):
    # Catches predict feeding the model anything other than what validation fed it (image
    # size, scale, normalisation, order, decoding). The score can hide small changes, so
    # the saved probabilities must also give the logged val/loss (the mean cross-entropy).
    assert 0 < easy_run.best_score < 1
    out = tmp_path / "val.csv"
    assert run_predict(easy_run, out=out, extra=("--save_probs",)) == 0
    report = score_cli(out, easy_run.data_dir / "mchar_val.json", capsys)
    assert report["n_missing"] == report["n_extra"] == report["n_invalid"] == 0
    # Logged in float32; one image is 1/81.
    assert report["seq_acc"] == pytest.approx(easy_run.best_score, abs=1e-6)
    epoch = torch.load(easy_run.best, map_location="cpu", weights_only=False)["epoch"]
    metrics = pd.read_csv(easy_run.metrics).dropna(subset=["val/loss"])
    logged_loss = float(metrics.loc[metrics["epoch"] == epoch, "val/loss"].iloc[0])
    saved = np.load(out.with_suffix(".npz"))
    assert mean_cross_entropy(saved, easy_run.data_dir / "mchar_val.json") == pytest.approx(
        logged_loss, rel=1e-6)


def test_zoom_prediction_reads_at_the_checkpoint_s_eval_scale(easy_zoom_run, tmp_path, capsys):
    # Planted bug: predict building its data module with eval_scale 1, so a zoom model
    # crops its second read from half-resolution images. Whole-string accuracy can come
    # out the same by chance (changed readings cancel), so the box the zoom read ends on
    # is compared too: its loss against the true boxes must be the logged val/box_loss.
    run = easy_zoom_run
    logged_acc = last_logged(run.metrics, "val/seq_acc")
    logged_box_loss = last_logged(run.metrics, "val/box_loss")
    assert 0 < logged_acc < 1
    out = tmp_path / "zoom_val.csv"
    assert run_predict(run, run.last, out=out, extra=("--save_probs",)) == 0
    report = score_cli(out, run.data_dir / "mchar_val.json", capsys)
    assert report["seq_acc"] == pytest.approx(logged_acc, abs=1e-6)
    saved = np.load(out.with_suffix(".npz"))
    truth = union_boxes(run.data_dir / "mchar_val.json", saved["file_names"].tolist())
    box_loss = F.smooth_l1_loss(torch.from_numpy(saved["boxes"]), truth, beta=BOX_LOSS_BETA)
    assert box_loss.item() == pytest.approx(logged_box_loss, abs=1e-5)


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
    fp32 = np.load(predict_cli.probs_path_for(val_prediction))["probs"]
    bf16 = np.load(predict_cli.probs_path_for(out))["probs"]
    difference = np.abs(bf16 - fp32).max()
    assert 0 < difference < 0.05  # bf16 really ran, and rounding moved little


def test_tta_averages_other_views_than_the_plain_prediction(easy_run, tmp_path):
    # Planted bug: --tta silently predicting the plain view only.
    plain, tta = tmp_path / "plain.csv", tmp_path / "tta.csv"
    assert run_predict(easy_run, out=plain, extra=("--save_probs",)) == 0
    assert run_predict(easy_run, out=tta, extra=("--save_probs", "--tta")) == 0
    plain_saved, tta_saved = np.load(plain.with_suffix(".npz")), np.load(tta.with_suffix(".npz"))
    assert plain_saved["views"].tolist() == ["identity"]
    views = tta_saved["views"].tolist()
    assert len(views) > 1 and len(set(views)) == len(views) and "identity" in views
    assert tta_saved["file_names"].tolist() == plain_saved["file_names"].tolist()
    difference = np.abs(tta_saved["probs"] - plain_saved["probs"]).max()
    assert difference > 1e-3, "--tta gave the plain prediction's probabilities"
    np.testing.assert_allclose(tta_saved["probs"].sum(axis=-1), 1.0, atol=1e-5)
    # The CSV is the TTA reading, not the plain one.
    codes = read_submission(tta)["file_code"].tolist()
    assert codes == decode_probabilities(torch.from_numpy(tta_saved["probs"]))


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


# --------------------------------------------------------------------- DDP, workers


def test_ddp_on_two_cpu_processes_equals_one_process(trained_checkpoint, val_prediction,
                                                     tmp_path):
    out = tmp_path / "ddp.csv"
    done = run_module(["svhn.predict", str(trained_checkpoint.best),
                       "--data_dir", str(trained_checkpoint.data_dir), "--split", "val",
                       "--out", str(out), "--cache_dir", str(trained_checkpoint.cache_dir),
                       "--num_workers", "0", "--batch_size", "8", "--save_probs",
                       "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"],
                      cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Wrote ") == 1  # rank 0 alone writes
    assert out.read_text() == val_prediction.read_text()
    np.testing.assert_allclose(np.load(out.with_suffix(".npz"))["probs"],
                               np.load(val_prediction.with_suffix(".npz"))["probs"], atol=1e-6)


def test_prediction_with_workers_writes_the_same_csv(easy_run, tmp_path):
    plain, workers = tmp_path / "plain.csv", tmp_path / "workers.csv"
    assert run_predict(easy_run, out=plain) == 0
    assert run_predict(easy_run, out=workers, extra=("--num_workers", "2")) == 0
    assert workers.read_text() == plain.read_text()


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
    assert predict_cli.default_output_path([Path("r/best.ckpt")], "test_a") == Path(
        "submit/best_test_a.csv")
    assert predict_cli.default_output_path(["r/a.ckpt", "b.ckpt", "c.ckpt"], "val",
                                           tta=True) == Path("submit/a+2more_val_tta.csv")


def test_all_blank_rows_are_counted():
    probs = torch.full((3, 4, 11), 0.01)
    probs[:, :, BLANK] = 0.9
    probs[1, 0, 3] = 0.95
    assert predict_cli.count_all_blank(probs) == 2
    assert decode_probabilities(probs)[1] == "3"


# ------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_real_test_a_matches_the_sample_submission(trained_checkpoint, tmp_path, capsys):
    data_dir = os.environ.get("SVHN_DATA_DIR")
    if not data_dir:
        pytest.skip("set SVHN_DATA_DIR to the competition folder")
    data_dir = Path(data_dir)
    out = tmp_path / "real_test_a.csv"
    argv = [str(trained_checkpoint.best), "--data_dir", str(data_dir), "--split", "test_a",
            "--out", str(out), "--cache_dir", str(tmp_path / "cache"), "--num_workers", "0",
            "--accelerator", "cpu"]
    assert predict_cli.main(argv) == 0
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

    monkeypatch.setattr(predict_cli, "predict_split", no_prediction)
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

    monkeypatch.setattr(predict_cli.np, "savez", broken_savez)
    out = tmp_path / "out" / "pair.csv"
    with pytest.raises(OSError, match="disk full"):
        run_predict(trained_checkpoint, out=out, extra=("--save_probs",))
    assert not out.exists() and not predict_cli.probs_path_for(out).exists()
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
    auto = np.load(predict_cli.probs_path_for(out))["probs"]
    np.testing.assert_array_equal(auto, np.load(predict_cli.probs_path_for(forced))["probs"])
