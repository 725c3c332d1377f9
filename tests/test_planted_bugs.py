"""Round trips that can fail: each model first shows it learned something (0 < score < 1),
so "predict scores what training logged" compares real numbers, not 0 with 0.

Issue 15 planted these bugs and the suite let them through; each test here names the bug
it catches. Everything goes through the command lines (svhn.fit, svhn.predict, svhn.score).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from svhn import predict, score
from svhn.labels import decode_probabilities, encode_label, load_labels
from svhn.submission import read_submission

BOX_LOSS_BETA = 0.05  # the box loss the model logs: smooth L1 with this beta


def run_predict(run, *checkpoints: Path, out: Path, split: str = "val",
                extra: tuple[str, ...] = ()) -> int:
    """``python -m svhn.predict`` in this process, CPU, no workers, on the easy set."""
    return predict.main([*map(str, checkpoints or (run.best,)), "--data_dir", str(run.data_dir),
                         "--split", split, "--out", str(out), "--cache_dir", str(run.cache_dir),
                         "--num_workers", "0", "--accelerator", "cpu", "--batch_size", "32",
                         *extra])


def score_cli(submission: Path, labels: Path, capsys) -> dict:
    """``python -m svhn.score --json``: the report a user reads."""
    capsys.readouterr()
    assert score.main(["--submission", str(submission), "--labels", str(labels), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def last_logged(metrics: Path, key: str) -> float:
    return float(pd.read_csv(metrics)[key].dropna().iloc[-1])


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


def mean_cross_entropy(saved, labels: Path) -> float:
    """The model's loss from saved probabilities: mean -log p(target) over every position."""
    by_name = {s.file_name: s.digits for s in load_labels(labels)}
    probs = torch.from_numpy(saved["probs"]).double()
    targets = torch.tensor([encode_label(by_name[name], probs.shape[1])
                            for name in saved["file_names"].tolist()])
    return F.nll_loss(probs.log().flatten(0, 1), targets.flatten()).item()


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
