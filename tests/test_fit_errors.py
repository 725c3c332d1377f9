"""Every bad input is stopped up front by ``svhn.fit`` with one ``error:`` line naming the
file or path and the fix, exit code 2, and nothing written or left behind.

The cases are the README's Troubleshooting table. Most run ``svhn.fit.main`` in-process (the
same code as the command, without a new interpreter per case); one runs the real command.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.layout import read_labels, write_labels, write_layout, write_split
from helpers.repository import REPO, changes, repository_state
from helpers.runs import PLAIN_MODEL, run_module

from svhn.console import DataWarning
from svhn.data.datamodule import SVHNDataModule
from svhn.data.images import ImageCache
from svhn.data.labels import clip_boxes_to_images, load_labels
from svhn.data.layout import DataError
from svhn.errors import SettingError, SvhnError, command
from svhn.train.cli import build_cli, main
from svhn.train.resume import ResumeError

# A valid tiny layout: 8 train and 4 val images of 40x20, each digit in an 8x15 box.
TRAIN = {f"{i:06d}.png": [i % 10, 1] for i in range(8)}
VAL = {f"{i:06d}.png": [i % 10] for i in range(4)}


@pytest.fixture
def layout(tmp_path: Path) -> Path:
    """A valid tiny competition layout; each test breaks one thing in it."""
    return write_layout(tmp_path / "mchar", train=TRAIN, val=VAL)


def fit_args(data_dir: Path | str | None, tmp_path: Path, *extra: str) -> list[str]:
    """svhn.fit on ``data_dir`` (None: not named on the command line), 1 epoch, writing
    under ``tmp_path``."""
    data = [] if data_dir is None else ["--data.data_dir", str(data_dir)]
    return [*PLAIN_MODEL, *data,
            "--data.cache_dir", str(tmp_path / "cache"), "--data.num_workers", "0",
            "--data.image_size", "[32, 64]",
            "--data.batch_size", "4", "--trainer.max_epochs", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *extra]


def refused(args: list[str], capsys, watched: Path, *names: str) -> str:
    """Run svhn.fit; assert exit code 2, one ``error:`` line naming each of ``names``, and
    no file added, removed or changed under ``watched`` (the image cache aside: decoded
    images of good files are a valid cache). Returns the error line."""
    before = repository_state(watched)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err[-5:]
    assert "Traceback" not in "\n".join(err)
    for name in names:
        assert str(name) in err[-1], (name, err[-1])
    changed = [c for c in changes(before, repository_state(watched))
               if not c[2:].startswith("cache/") or ".tmp" in c]
    assert not changed, changed
    return err[-1]


# -- the data folder ---------------------------------------------------------------------
def test_a_mistyped_data_dir_stops_and_names_it(layout, tmp_path, capsys):
    typo = tmp_path / "mchra"
    refused(fit_args(typo, tmp_path, "--data.synthetic_fallback", "true"), capsys, tmp_path,
            typo, "not found")
    assert not (tmp_path / "data").exists()  # no synthetic set made instead


def test_a_data_dir_that_is_a_file_stops(layout, tmp_path, capsys):
    refused(fit_args(layout / "mchar_train.json", tmp_path), capsys, tmp_path,
            layout / "mchar_train.json", "is a file")


def test_a_folder_that_is_not_the_layout_lists_what_is_missing(layout, tmp_path, capsys):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "mchar_val.zip").write_bytes(b"zip")
    line = refused(fit_args(other, tmp_path), capsys, tmp_path, other, "mchar_train/",
                   "mchar_train.json", "mchar_val/", "mchar_val.json")
    assert "mchar_val.zip is there: unpack it" in line


def test_the_parent_of_the_layout_gets_a_did_you_mean(layout, tmp_path, capsys):
    refused(fit_args(tmp_path, tmp_path), capsys, tmp_path, "missing mchar_train/",
            f"did you mean --data.data_dir {layout}")


def test_a_data_dir_named_in_a_config_file_gets_no_fallback(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  data_dir: {tmp_path / 'nowhere'}\n"
                      "  synthetic_fallback: true\n")
    refused([*fit_args(None, tmp_path), "--config", str(config)], capsys, tmp_path,
            tmp_path / "nowhere")
    assert not (tmp_path / "data" / "synthetic").exists()


def test_the_fallback_applies_only_when_data_mchar_holds_nothing(tmp_path, capsys):
    # data_dir unset: data/mchar (relative to the working folder) decides.
    (tmp_path / "data" / "mchar").mkdir(parents=True)
    fallback = SVHNDataModule(synthetic_fallback=True, synthetic_size=8, num_workers=0)
    assert fallback.uses_synthetic_fallback and fallback.data_dir == Path("data/synthetic")
    out = capsys.readouterr().out
    assert "=====" in out and "SYNTHETIC" in out and str(Path("data/mchar").resolve()) in out
    # Something of the competition is there (half unpacked): that is the user's data.
    (tmp_path / "data" / "mchar" / "mchar_train.json").write_text("{}")
    started = SVHNDataModule(synthetic_fallback=True, synthetic_size=8, num_workers=0)
    assert not started.uses_synthetic_fallback and started.data_dir == Path("data/mchar")
    with pytest.raises(DataError, match=r"data/mchar: not the competition layout; missing "
                                        r"mchar_train/, mchar_val/, mchar_val.json"):
        started.prepare_data()
    assert not (tmp_path / "data" / "synthetic").exists()


# -- label files -------------------------------------------------------------------------
def test_an_empty_label_file_stops(layout, tmp_path, capsys):
    (layout / "mchar_train.json").write_text("{}")
    refused(fit_args(layout, tmp_path), capsys, tmp_path, layout / "mchar_train.json",
            "no entries", "Re-download")


def test_a_split_whose_every_label_is_too_long_stops(layout, tmp_path, capsys):
    write_split(layout, "val", {f"{i:06d}.png": [1, 2, 3, 4, 5, 6, 7] for i in range(3)},
                size=(100, 20))
    with pytest.warns(DataWarning) as said:  # each left-out image is said before the stop
        refused(fit_args(layout, tmp_path), capsys, tmp_path, layout / "mchar_val.json",
                "every one of its 3 labels is longer than max_len=5", "--data.max_len 7")
    assert any("left out 3 image(s)" in str(w.message) for w in said)


@pytest.mark.parametrize("value", ["12a", None, "NaN", True])
def test_a_non_numeric_box_value_names_file_entry_and_key(layout, tmp_path, capsys, value):
    entries = read_labels(layout / "mchar_train.json")
    entries["000003.png"]["top"][1] = float("nan") if value == "NaN" else value
    write_labels(layout / "mchar_train.json", entries)
    refused(fit_args(layout, tmp_path), capsys, tmp_path, layout / "mchar_train.json",
            "entry '000003.png'", "'top' of digit 2", "not a number")


@pytest.mark.parametrize("key, value", [("width", 0), ("height", -4)])
def test_a_box_without_area_is_refused(layout, tmp_path, capsys, key, value):
    entries = read_labels(layout / "mchar_val.json")
    entries["000002.png"][key] = [value]
    write_labels(layout / "mchar_val.json", entries)
    refused(fit_args(layout, tmp_path), capsys, tmp_path, layout / "mchar_val.json",
            "entry '000002.png'", "not a box", "Fix the entry")


def test_a_box_wholly_outside_its_image_is_refused(layout, tmp_path, capsys):
    entries = read_labels(layout / "mchar_train.json")
    entries["000005.png"]["left"] = [45, 60]  # the images are 40 pixels wide
    write_labels(layout / "mchar_train.json", entries)
    refused(fit_args(layout, tmp_path), capsys, tmp_path, layout / "mchar_train.json",
            "entry '000005.png'", "digit 1", "wholly outside its 40x20 image")


def test_boxes_partly_outside_are_clipped_with_one_warning(layout, tmp_path):
    entries = read_labels(layout / "mchar_train.json")
    entries["000001.png"]["top"] = [-3, 2]
    entries["000004.png"]["width"] = [8, 30]  # 15 + 30 > 40
    write_labels(layout / "mchar_train.json", entries)
    dm = SVHNDataModule(str(layout), cache_dir=str(tmp_path / "cache"), num_workers=0,
                        augment="zoom", box_targets=True, image_size=(32, 64))
    with pytest.warns(UserWarning) as caught:
        dm.prepare_data()
        dm.setup("fit")
    messages = [str(w.message) for w in caught if "partly outside" in str(w.message)]
    assert len(messages) == 1, messages
    assert "2 image(s)" in messages[0] and "000001.png, 000004.png" in messages[0]
    assert str(layout / "mchar_train.json") in messages[0]
    samples = {s.file_name: s for s in dm.dataset("train", "zoom").files.samples}
    assert samples["000001.png"].boxes[0] == (5.0, 0.0, 8.0, 12.0)
    assert samples["000004.png"].boxes[1] == (15.0, 2.0, 25.0, 15.0)
    for i in range(len(dm.train_set)):  # the zoom recipe's crops accept every box
        box = dm.train_set[i]["box"]
        assert (box >= 0).all() and (box <= 1).all() and (box[2:] > box[:2]).all()


def test_boxes_inside_their_images_pass_unchanged(tmp_path):
    samples = load_labels(write_labels(tmp_path / "labels.json", {"a.png": [1, 2],
                                                                   "b.png": [3]}))
    assert clip_boxes_to_images(samples, {"a.png": (40, 20), "b.png": (40, 20)}, "x") == samples


def test_a_label_file_with_a_byte_order_mark_is_read(tmp_path):
    path = write_labels(tmp_path / "labels.json", {"a.png": [7]}, encoding="utf-8-sig")
    assert load_labels(path)[0].digits == (7,)


def test_a_corrupt_image_is_one_line_naming_it(layout, tmp_path, capsys):
    bad = layout / "mchar_val" / "000001.png"
    bad.write_bytes(b"\x89PNG truncated")
    refused(fit_args(layout, tmp_path), capsys, tmp_path, bad, "cannot decode image")


def test_a_listed_but_missing_image_is_one_line(layout, tmp_path, capsys):
    (layout / "mchar_train" / "000006.png").unlink()
    refused(fit_args(layout, tmp_path), capsys, tmp_path, layout / "mchar_train.json",
            "000006.png", "missing")


# -- settings ----------------------------------------------------------------------------
def test_a_model_setting_refused_by_the_model_is_one_line(layout, tmp_path, capsys):
    refused(fit_args(layout, tmp_path, "--model.optimizer", "adamm"), capsys, tmp_path,
            "optimizer 'adamm'", "adamw")


def test_an_unknown_augmentation_is_one_line_before_anything_is_written(layout, tmp_path,
                                                                       capsys):
    refused(fit_args(layout, tmp_path, "--data.augment", "zoomm"), capsys, tmp_path,
            "augment 'zoomm'", "zoom_plain")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_missing_init_from_checkpoint_is_one_line(layout, tmp_path, capsys):
    refused(fit_args(layout, tmp_path, "--model.init_from", str(tmp_path / "x.ckpt")),
            capsys, tmp_path, tmp_path / "x.ckpt", "not found")


def test_bugs_keep_their_traceback_and_own_errors_do_not(capsys):
    def raised(fn) -> BaseException:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - any kind, that is the point
            return err
        raise AssertionError("nothing raised")

    # A user's mistake is a SvhnError; an error from inside numpy, torch or Python is not.
    assert isinstance(raised(lambda: load_labels("/no/such/labels.json")), SvhnError)
    assert isinstance(raised(lambda: SVHNDataModule(str(REPO / "nothing"),
                                                    num_workers=0).prepare_data()), SvhnError)
    for bug in (lambda: np.zeros(-1), lambda: torch.zeros(2) @ torch.zeros(3),
                lambda: {}["key"]):
        assert not isinstance(raised(bug), SvhnError)

    # The one wrapper every command uses: a SvhnError is a line and exit 2, a bug raises.
    def failing(error: Exception):
        @command
        def main(argv=None):
            raise error
        return main

    assert failing(SettingError("--x 0: must be at least 1"))([]) == 2
    assert capsys.readouterr().err == "error: --x 0: must be at least 1\n"
    with pytest.raises(ValueError, match="inside numpy"):
        failing(ValueError("inside numpy"))([])


def test_the_command_exits_2_with_one_line_and_no_traceback(tmp_path):
    # The quick start (no --config) with a mistyped data folder, as a user types it.
    done = run_module(["svhn.fit", "--data.data_dir", "data/mchr"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: data/mchr: data folder "
                                                           "not found")
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no data/synthetic


# -- resuming ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onecycle_run(tmp_path_factory) -> Path:
    """A finished one-cycle run of 1 epoch x 2 batches (its schedule: 2 steps)."""
    root = tmp_path_factory.mktemp("onecycle")
    data = write_layout(root / "mchar", train=TRAIN, val=VAL)
    cli = build_cli(fit_args(data, root, "--model.scheduler", "onecycle"))
    assert cli.trainer.estimated_stepping_batches == 2
    return Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"


def run_dir_of(ckpt: Path) -> Path:
    return ckpt.parents[1]


def resume_args(ckpt: Path, *extra: str) -> list[str]:
    root = ckpt.parents[4]  # <root>/runs/svhn/version_0/checkpoints/last.ckpt
    return [*fit_args(root / "mchar", root, "--model.scheduler", "onecycle", *extra),
            "--ckpt_path", str(ckpt)]


def test_resuming_with_a_longer_schedule_is_refused_and_leaves_nothing(onecycle_run, capsys):
    root = onecycle_run.parents[4]
    refused(resume_args(onecycle_run, "--trainer.max_epochs", "3"), capsys, root,
            onecycle_run, "sized for 2 optimiser steps", "would take 6", "max_epochs 1",
            "--model.init_from")
    assert not list(run_dir_of(onecycle_run).glob("config_resumed_*"))


def test_resuming_with_another_batch_size_is_refused(onecycle_run, capsys):
    refused(resume_args(onecycle_run, "--data.batch_size", "8"), capsys,
            onecycle_run.parents[4], "sized for 2 optimiser steps", "would take 1")


def test_resuming_with_changed_model_settings_names_them(onecycle_run, capsys):
    refused(resume_args(onecycle_run, "--model.lr", "0.01", "--model.backbone", "lenet5"),
            capsys, onecycle_run.parents[4], onecycle_run,
            "model.backbone 'simple_cnn' -> 'lenet5'", "model.lr 0.001 -> 0.01")


def test_resuming_with_the_same_settings_passes_the_checks(onecycle_run, capsys):
    assert main(resume_args(onecycle_run)) == 0  # already finished: nothing more to train
    resumed = run_dir_of(onecycle_run) / "config_resumed_1.yaml"
    assert resumed.is_file()
    resumed.unlink()  # the other resume tests expect none


@pytest.mark.parametrize("what", ["metrics.csv", "config.yaml", "empty", "weights only"])
def test_resuming_from_a_file_that_is_not_a_checkpoint(onecycle_run, tmp_path, capsys, what):
    root = onecycle_run.parents[4]
    if what == "empty":
        path = tmp_path / "empty.ckpt"
        path.write_bytes(b"")
    elif what == "weights only":
        saved = torch.load(onecycle_run, weights_only=False)
        path = tmp_path / "weights.ckpt"
        torch.save({k: saved[k] for k in ("state_dict", "hyper_parameters")}, path)
    else:
        path = run_dir_of(onecycle_run) / what
    expected = "holds weights only" if what == "weights only" else "not a checkpoint"
    refused(resume_args(onecycle_run)[:-1] + [str(path)], capsys, root, path, expected)


def test_resume_last_without_a_run_is_one_line(layout, tmp_path, capsys):
    refused([*fit_args(layout, tmp_path), "--ckpt_path", "last"], capsys, tmp_path,
            "--ckpt_path last", tmp_path / "runs" / "svhn", "train once first")
    with pytest.raises(ResumeError):
        build_cli([*fit_args(layout, tmp_path), "--ckpt_path", "last"])


def test_validating_a_file_that_is_not_a_checkpoint_is_one_line(layout, tmp_path, capsys):
    bogus = tmp_path / "notes.txt"
    bogus.write_text("epoch 3 was the best\n")
    refused(["validate", *fit_args(layout, tmp_path), "--ckpt_path", str(bogus)], capsys,
            tmp_path, bogus, "not a checkpoint")


# -- the image cache ---------------------------------------------------------------------
def test_a_failed_cache_build_leaves_no_temporary(layout, tmp_path):
    (layout / "mchar_train" / "000002.png").write_bytes(b"")
    paths = sorted((layout / "mchar_train").glob("*.png"))
    cache = ImageCache(paths, (8, 16), tmp_path / "c" / "train_8x16.npy")
    with pytest.raises(ValueError, match="000002.png"):
        cache.build()
    assert not (tmp_path / "c").exists()  # no temporary, nor the folder made for it


def test_a_killed_build_s_temporary_is_swept_by_the_next_build(layout, tmp_path):
    paths = sorted((layout / "mchar_train").glob("*.png"))
    folder = tmp_path / "c"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # a finished pid
    stale = [folder / f"train_8x16.tmp{dead}.npy", folder / f"train_8x16.tmp{dead}.json"]
    running = folder / f"train_8x16.tmp{os.getppid()}.npy"  # a live process's build
    other_cache = folder / f"val_8x16.tmp{dead}.npy"
    for path in [*stale, running, other_cache]:
        path.write_bytes(b"partial")
    ImageCache(paths, (8, 16), folder / "train_8x16.npy").build()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["train_8x16.npy", "train_8x16.json", running.name, other_cache.name])


def test_a_cache_build_interrupted_by_the_user_removes_its_temporary(layout, tmp_path,
                                                                    monkeypatch):
    import svhn.data.images

    calls = {"n": 0}
    real = svhn.data.images._read_for_cache

    def interrupt_on_third(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(svhn.data.images, "_read_for_cache", interrupt_on_third)
    paths = sorted((layout / "mchar_train").glob("*.png"))
    with pytest.raises(KeyboardInterrupt):
        ImageCache(paths, (8, 16), tmp_path / "c" / "train_8x16.npy").build()
    assert not (tmp_path / "c").exists()


# -- the guard of the test suite itself --------------------------------------------------
def test_the_repository_guard_sees_added_changed_and_removed_files(tmp_path):
    (tmp_path / "kept.txt").write_text("a")
    (tmp_path / "gone.txt").write_text("b")
    before = repository_state(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (tmp_path / "gone.txt").unlink()
    os.utime(tmp_path / "kept.txt", ns=(1, 1))
    assert changes(before, repository_state(tmp_path)) == [
        "+ checkpoints/", "+ checkpoints/last.ckpt", "- gone.txt", "~ kept.txt"]


def test_fast_dev_run_writes_nothing_into_the_working_folder(layout, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cli = build_cli(fit_args(layout, tmp_path, "--trainer.fast_dev_run", "true"))
    assert cli.trainer.state.finished
    assert list(work.iterdir()) == []  # Lightning alone would write checkpoints/last.ckpt
