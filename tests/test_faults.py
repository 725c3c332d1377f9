"""Faults and messy input that once did silent harm or ended in a traceback (issue #28):
each ends in one ``error:`` line naming the file or setting, exit 2, nothing left behind;
or, where the input is fine but unusual, it is read as it really is.

The troubleshooting table in docs/troubleshooting.md lists every case and what it says.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers.layout import entry, write_labels, write_layout
from helpers.repository import REPO
from helpers.runs import PLAIN_MODEL, run_predict
from PIL import Image

import svhn.data.images as images
from svhn.analysis import report
from svhn.data.images import CacheSpaceError, ImageCache, ImageReadError, read_rgb
from svhn.data.labels import LabelFileError, load_labels
from svhn.data.layout import list_split, split_images
from svhn.inference.submission import build_submission, write_submission
from svhn.train import cli as fit_cli
from svhn.train.loggers import ResumableCSVLogger


def small_layout(root: Path) -> Path:
    """Eight training and four validation images of one or two digits."""
    return write_layout(root, train={f"{i:06d}.png": [i % 10, 1] for i in range(8)},
                        val={f"{i:06d}.png": [i % 10] for i in range(4)})


def fit_flags(data: Path, *extra: str) -> list[str]:
    return [*PLAIN_MODEL, "--data.data_dir", str(data), "--data.num_workers", "0",
            "--data.batch_size", "4", "--data.image_size", "[32, 64]",
            "--trainer.max_epochs", "1", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            *extra]


def refused(argv: list[str], capsys, *names: str, may_make: tuple[str, ...] = ()) -> str:
    """svhn.fit refuses: exit 2, one ``error:`` line naming each of ``names``, no runs/ or
    cache left in the working folder (the tests run in their own tmp_path), but for the
    entries ``may_make``."""
    before = sorted(p.name for p in Path.cwd().iterdir())
    assert fit_cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    for name in names:
        assert name in err[-1], (name, err[-1])
    assert "Traceback" not in "\n".join(err)
    made = sorted(p.name for p in Path.cwd().iterdir() if p.name not in may_make)
    assert made == before  # nothing made
    return err[-1]


# -- two runs never share a folder ----------------------------------------------------------
def test_two_fits_started_together_get_their_own_run_folders(tmp_path):
    data = small_layout(tmp_path / "mchar")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    command = [sys.executable, "-m", "svhn.fit", *fit_flags(data),
               "--trainer.logger.init_args.name", "seed", "--data.cache_dir",
               str(tmp_path / "cache")]
    runs = [subprocess.Popen([*command, "--seed_everything", str(seed)], cwd=tmp_path,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for seed in (1, 2)]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
    folders = sorted((tmp_path / "runs" / "seed").iterdir())
    assert [f.name for f in folders] == ["version_0", "version_1"]
    seeds = set()
    for folder in folders:
        assert sorted(p.name for p in folder.glob("config*.yaml")) == ["config.yaml"]  # no
        # second run labelled as a resume
        assert (folder / "checkpoints" / "last.ckpt").is_file()
        seeds.add((folder / "config.yaml").read_text().split("seed_everything: ")[1][0])
        summary = json.loads((folder / "run_summary.json").read_text())
        assert len(summary["sessions"]) == 1
    assert seeds == {"1", "2"}


def test_a_run_folder_taken_meanwhile_is_not_shared(tmp_path, monkeypatch):
    # Both loggers listed the folder before either made version_0: the one that loses the
    # exclusive create takes the next number.
    first, second = (ResumableCSVLogger(tmp_path, name="run") for _ in range(2))
    monkeypatch.setattr("lightning.pytorch.loggers.CSVLogger._get_next_version",
                        lambda self: 0)
    assert first.version == 0
    assert second.version == 1
    assert first.claimed_dir == tmp_path / "run" / "version_0"
    assert second.claimed_dir == tmp_path / "run" / "version_1"
    assert ResumableCSVLogger(tmp_path, name="run", version=0).version == 0  # a resume


# -- a full disk is a sentence --------------------------------------------------------------
def test_a_cache_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    data = small_layout(tmp_path / "mchar")
    paths = split_images(data, "train")
    cache_dir = tmp_path / "cache" / "here"
    cache = ImageCache(paths, (64, 128), cache_dir / "train.npy")
    monkeypatch.setattr(images.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    with pytest.raises(CacheSpaceError) as caught:
        cache.build()
    message = str(caught.value)
    assert str(cache_dir) in message and f"{cache.nbytes() + (1 << 20):,} bytes" in message
    assert "--data.cache_dir" in message
    assert not (tmp_path / "cache").exists()  # not even the folder


def test_a_disk_that_fills_while_the_cache_is_written_is_a_sentence(tmp_path, monkeypatch):
    data = small_layout(tmp_path / "mchar")
    cache = ImageCache(split_images(data, "train"), (64, 128), tmp_path / "cache" / "t.npy")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(images.os, "posix_fallocate", full, raising=False)
    with pytest.raises(CacheSpaceError, match="no room for the image cache"):
        cache.build()
    assert not (tmp_path / "cache").exists()  # the temporary file is gone, and the folder


def test_fit_says_the_cache_does_not_fit(tmp_path, capsys, monkeypatch):
    data = small_layout(tmp_path / "mchar")
    monkeypatch.setattr(images.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    refused(fit_flags(data, "--data.cache_dir", str(tmp_path / "c")), capsys,
            str(tmp_path / "c"), "bytes needed", "--data.cache_dir")


# -- every image is read as it is -----------------------------------------------------------
GREY16 = (np.arange(6 * 5, dtype=np.uint16).reshape(6, 5) * 2000 + 7)


def test_a_16_bit_grey_png_is_read_as_its_pixels(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(GREY16).save(path)  # a 16-bit PNG (Pillow opens it as I;16 or I)
    with Image.open(path) as img:
        assert img.mode in ("I;16", "I")
    rgb = read_rgb(path)
    expected = (GREY16 >> 8).astype(np.uint8)
    assert rgb.dtype == np.uint8 and rgb.shape == (6, 5, 3)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)
    assert len(np.unique(rgb)) > 10  # not clipped to white


def test_a_16_bit_colour_png_is_read_as_its_pixels(tmp_path):
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(4, 7, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), rgb16[..., ::-1])  # OpenCV writes BGR, 16 bits a channel
    np.testing.assert_array_equal(read_rgb(path), (rgb16 >> 8).astype(np.uint8))


RGB = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 250]],
                [[10, 20, 30], [0, 0, 0], [128, 128, 128], [200, 100, 50]]], dtype=np.uint8)
GREY = np.round(RGB @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)  # ITU-R 601-2


@pytest.mark.parametrize(("mode", "expected"), [
    ("RGB", RGB),
    ("RGBA", RGB),  # the alpha channel is dropped, the colour kept
    ("L", np.repeat(GREY[..., None], 3, axis=2)),
    ("LA", np.repeat(GREY[..., None], 3, axis=2)),
    ("1", np.repeat(np.where(GREY >= 128, 255, 0).astype(np.uint8)[..., None], 3, axis=2)),
])
def test_each_8_bit_mode_is_read_as_its_pixels(tmp_path, mode, expected):
    image = Image.fromarray(RGB)
    if mode == "RGBA":
        image = Image.fromarray(np.dstack([RGB, np.full(RGB.shape[:2], 40, np.uint8)]))
    elif mode != "RGB":
        image = image.convert(mode, dither=Image.Dither.NONE) if mode == "1" else \
            image.convert(mode)
    path = tmp_path / f"{mode}.png"
    image.save(path)
    tolerance = 1 if mode in ("L", "LA") else 0  # Pillow rounds the grey weights its way
    assert np.abs(read_rgb(path).astype(int) - expected.astype(int)).max() <= tolerance


def test_a_palette_image_is_read_as_its_colours(tmp_path):
    palette = Image.fromarray(RGB).quantize(colors=8, method=Image.Quantize.MEDIANCUT)
    path = tmp_path / "p.png"
    palette.save(path)
    colours = np.array(palette.getpalette()[:24], dtype=np.uint8).reshape(8, 3)
    np.testing.assert_array_equal(read_rgb(path), colours[np.asarray(palette)])


def test_an_image_over_the_decompression_bomb_limit_is_named(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (40, 20)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 800 pixels: over twice the limit
    with pytest.raises(ImageReadError, match="huge.png: too many pixels"):
        read_rgb(path)


# -- a killed predict leaves nothing forever -------------------------------------------------
def test_a_killed_writers_temporary_csv_is_swept_and_a_live_ones_kept(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = int(done.stdout)  # that process has exited: nobody writes its file any more
    out = tmp_path / "submit.csv"
    stale = tmp_path / f".submit.csv.tmp{dead}"
    live = tmp_path / f".submit.csv.tmp{os.getppid()}"  # our parent runs: keep its file
    stale.write_text("file_name,file_code\n000000.png,1\n")
    live.write_text("partial")
    write_submission(build_submission(["a.png"], ["7"]), out)
    assert not stale.exists() and live.exists()
    assert out.read_text() == "file_name,file_code\na.png,7\n"


# -- a sentence, not a traceback ------------------------------------------------------------
@pytest.mark.parametrize(("flags", "names"), [
    (["--data.batch_size", "0"], ["data.batch_size 0", "at least 1"]),
    (["--trainer.max_epochs", "-1", "--model.scheduler", "onecycle"],
     ["trainer.max_epochs -1", "onecycle", "--model.scheduler none"]),
    (["--trainer.max_epochs", "-5"], ["trainer.max_epochs -5", "at least 1"]),
    (["--model.lr", "-1"], ["model.lr -1", "at least 0"]),
    (["--data.num_workers", "-1"], ["data.num_workers -1", "at least 0"]),
    (["--data.image_size", "[0, 0]"], ["data.image_size [0, 0]", "at least 8"]),
    (["--model.label_smoothing", "1.5"], ["model.label_smoothing 1.5", "[0, 1)"]),
])
def test_a_setting_out_of_range_is_named_before_any_folder(tmp_path, capsys, flags, names):
    refused(fit_flags(small_layout(tmp_path / "mchar"), *flags), capsys, *names)


def test_a_cache_dir_that_is_a_file_is_named(tmp_path, capsys):
    afile = tmp_path / "cache.txt"
    afile.write_text("not a folder")
    refused(fit_flags(small_layout(tmp_path / "mchar"), "--data.cache_dir", str(afile)),
            capsys, f"data.cache_dir {afile}", "is a file")


def test_a_train_subset_beyond_the_split_leaves_no_run_folder(tmp_path, capsys):
    refused(fit_flags(small_layout(tmp_path / "mchar"), "--data.train_subset", "50",
                      "--data.cache_dir", str(tmp_path / "cache")),
            capsys, "train_subset 50", "only 8",
            may_make=("cache",))  # the split's decoded images: kept, the next run reuses them
    assert not (tmp_path / "runs").exists()


def test_an_unreadable_test_image_in_predict_is_named(trained_checkpoint, tmp_path, capsys):
    data = tmp_path / "mchar"
    shutil.copytree(trained_checkpoint.data_dir, data)
    broken = sorted((data / "mchar_test_a").iterdir())[3]
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "submit.csv"
    assert run_predict(trained_checkpoint, out=out, split="test_a", data_dir=data) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {broken}: cannot decode image")
    assert not out.exists() and not list(tmp_path.glob(".submit.csv*"))


def test_report_out_at_an_existing_file_is_named_and_left_alone(tmp_path, capsys):
    out = tmp_path / "report.md"
    out.write_text("mine")
    assert report.main(["--ckpt_path", str(tmp_path / "x.ckpt"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out {out}: is a file; the report is a folder of figures and report.md. "
        "Name a folder (made if missing).")
    assert out.read_text() == "mine"


def test_a_label_file_in_utf16_is_read_as_it_is(tmp_path):
    labels = {"000000.png": [1, 9], "000001.png": [3]}
    plain = write_labels(tmp_path / "utf8.json", labels)
    for encoding in ("utf-16", "utf-16-le", "utf-16-be"):
        path = tmp_path / f"{encoding}.json"
        text = plain.read_text()
        # What PowerShell's > writes: UTF-16 with a byte-order mark.
        bom = {"utf-16": "", "utf-16-le": "\ufeff", "utf-16-be": "\ufeff"}[encoding]
        path.write_bytes((bom + text).encode(encoding))
        assert load_labels(path) == load_labels(plain)


def test_a_label_file_in_another_encoding_is_named_with_the_fix(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"é.png": {"label": [1]}}'.encode("latin-1"))
    with pytest.raises(LabelFileError, match=r"latin1.json: not UTF-8 text .*Save the label "
                                             r"file as UTF-8 JSON"):
        load_labels(path)


def test_a_digit_written_as_a_string_is_named_as_one(tmp_path):
    path = write_labels(tmp_path / "labels.json", {"000000.png": entry([2], label=["2"])})
    with pytest.raises(LabelFileError, match=r"digit '2' is a string; the competition writes "
                                             r"digits as whole numbers"):
        load_labels(path)


def test_entries_named_like_images_that_are_not_are_skipped_with_a_word(tmp_path):
    data = small_layout(tmp_path / "mchar")
    (data / "mchar_train" / "folder.png").mkdir()
    (data / "mchar_train" / "._000001.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    with pytest.warns(UserWarning, match=r"2 entries named like images are not images"):
        files = list_split(data, "train")
    assert [p.name for p in files.image_paths] == [f"{i:06d}.png" for i in range(8)]
