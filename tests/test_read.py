"""``python -m svhn.read``: any photo read as ``svhn.predict`` reads a split's images.

The readers here are untrained: every test compares two ways of reading the same pixels
(or the pixels themselves), which holds whatever the weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from svhn.data.images import read_rgb
from svhn.data.labels import decode_probabilities
from svhn.data.photos import decode_photos, photo_paths
from svhn.data.synthetic import generate_dataset
from svhn.errors import SettingError
from svhn.inference import cli as predict_cli
from svhn.inference import photo_cli
from svhn.inference.predictor import predict_photos, predict_split
from svhn.model.training import DigitSequenceModel

TINY = "resnet10t"
_EXIF_ORIENTATION = 0x0112


def _detector_checkpoint(path: Path, seed: int = 0, **settings) -> Path:
    """An untrained tiny detector that zooms and searches, saved with the data settings
    that make evaluation read 2x sharper images (two resizes, as the real recipe)."""
    torch.manual_seed(seed)
    model = DigitSequenceModel(backbone=TINY, image_size=(32, 64), max_len=2, box_head=True,
                               char_boxes=True, head="detector", zoom_steps=2,
                               zoom_from="digits", zoom_search=True, detect_threshold=0.3,
                               **settings)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"image_size": (32, 64), "max_len": 2,
                                                "cache_scale": 2.0, "eval_scale": 2.0}},
               path)
    return path


@pytest.fixture(scope="module")
def photo_set(tmp_path_factory) -> Path:
    """A generated set whose val images are read both ways (12 of them)."""
    root = tmp_path_factory.mktemp("photos") / "mchar"
    generate_dataset(root, n_train=4, n_val=12, n_test=2, seed=3, max_digits=2)
    return root


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Path:
    return _detector_checkpoint(tmp_path_factory.mktemp("ckpt") / "detector.ckpt")


def _read_json(capsys, *argv: str) -> tuple[int, dict]:
    code = photo_cli.main([*argv, "--json", "--accelerator", "cpu"])
    return code, json.loads(capsys.readouterr().out)


def test_reading_a_split_s_folder_gives_what_predict_writes(photo_set, detector, tmp_path,
                                                            capsys):
    """The same pixels, the same search and vote: every number equal to the CSV's."""
    out = tmp_path / "val.csv"
    assert predict_cli.main([str(detector), "--data_dir", str(photo_set), "--split", "val",
                             "--out", str(out), "--cache_dir", str(tmp_path / "cache"),
                             "--accelerator", "cpu"]) == 0
    written = pd.read_csv(out, dtype=str).set_index("file_name")["file_code"]
    capsys.readouterr()
    code, found = _read_json(capsys, str(detector), str(photo_set / "mchar_val"))
    assert code == 0 and not found["failed"]
    numbers = {Path(r["file"]).name: r["number"] for r in found["readings"]}
    assert numbers == written.to_dict()
    searched = [r["searched"] for r in found["readings"]]
    assert any(searched), "an untrained reader is unsure: the search must have run"


def test_digit_boxes_are_the_winning_chain_s_in_the_photo_s_pixels(photo_set, detector):
    paths = photo_paths([photo_set / "mchar_val"])
    result, photos = predict_photos([detector], paths, accelerator="cpu", progress=False)
    assert result.char_boxes is not None and result.chain_char_boxes is not None
    assert result.chain_char_boxes.shape[:2] == result.chain_probs.shape[:2]
    readings = photo_cli.readings(result, dict(zip(photos.names, photos.sizes.tolist())))
    for reading in readings:
        width, height = reading.size
        assert (width, height) == Image.open(reading.file).size
        boxed = [d for d in reading.digits if d.box is not None]
        for digit in boxed:
            x0, y0, x1, y1 = digit.box
            assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
        assert "".join(d.digit for d in reading.digits) == reading.number


def test_an_ensemble_votes_as_in_predict(photo_set, detector, tmp_path, capsys):
    other = _detector_checkpoint(tmp_path / "other.ckpt", seed=1)
    expected = predict_split([detector, other], photo_set, "val", accelerator="cpu",
                             cache_dir=tmp_path / "cache")
    capsys.readouterr()
    code, found = _read_json(capsys, str(detector), str(other), str(photo_set / "mchar_val"))
    assert code == 0
    assert [r["number"] for r in found["readings"]] == decode_probabilities(expected.probs)


def test_a_bad_file_is_named_and_the_others_are_still_read(photo_set, detector, tmp_path,
                                                           capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("000000.png", "000001.png"):
        (folder / name).write_bytes((photo_set / "mchar_val" / name).read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image: not even tried")
    code = photo_cli.main([str(detector), str(folder), "--accelerator", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.out.strip().splitlines()
    assert [Path(line.split("\t")[0]).name for line in lines] == ["000000.png", "000001.png"]
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2
    assert any("broken.jpg" in line and "cannot decode" in line for line in skipped)
    assert any("empty.png" in line and "empty" in line for line in skipped)


def test_nothing_readable_and_nothing_there_are_refused_by_name(detector, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"garbage")
    assert photo_cli.main([str(detector), str(tmp_path / "bad.png")]) == 2
    assert "none of the 1 image file(s) could be read" in capsys.readouterr().err
    with pytest.raises(SettingError, match="no such file or folder"):
        photo_paths([tmp_path / "missing.jpg"])
    (tmp_path / "docs").mkdir()
    with pytest.raises(SettingError, match="no image files in this folder"):
        photo_paths([tmp_path / "docs"])
    assert photo_cli.main([str(tmp_path / "bad.png")]) == 2
    assert "no checkpoint given" in capsys.readouterr().err


def _scene(width: int, height: int) -> np.ndarray:
    """A photo whose halves differ, so a rotation shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, 90)],
                    axis=2).astype(np.uint8)


def test_a_phone_photo_is_read_upright_as_its_exif_says(tmp_path):
    upright = _scene(120, 80)
    stored = np.rot90(upright, k=1)  # what a phone held sideways writes: 80 wide, 120 high
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(stored).save(tmp_path / "phone.jpg", quality=95, exif=exif)
    Image.fromarray(upright).save(tmp_path / "upright.jpg", quality=95)
    seen = read_rgb(tmp_path / "phone.jpg")
    assert seen.shape == upright.shape
    assert np.abs(seen.astype(int) - upright.astype(int)).mean() < 4
    photos = decode_photos([tmp_path / "phone.jpg", tmp_path / "upright.jpg"], (64, 128),
                           (64, 128), progress=False)
    assert photos.sizes.tolist() == [[120.0, 80.0], [120.0, 80.0]]
    difference = (photos.images[0].int() - photos.images[1].int()).abs().float().mean()
    assert difference < 4


def test_a_large_photo_is_decoded_at_the_reader_s_scale(detector, tmp_path, capsys):
    big = tmp_path / "big.jpg"
    Image.fromarray(_scene(4000, 3000)).save(big, quality=85)  # 12 megapixels
    small = read_rgb(big, at_least=(128, 256))
    assert small.shape[0] < 3000 / 4 and small.shape[0] >= 256  # a DCT scale, not 3000 rows
    assert read_rgb(big).shape == (3000, 4000, 3)  # asked for nothing: the whole image
    code, found = _read_json(capsys, str(detector), str(big))
    assert code == 0 and found["readings"][0]["size"] == [4000.0, 3000.0]


def test_any_kind_of_image_is_read(detector, tmp_path, capsys):
    scene = _scene(96, 48)
    Image.fromarray(scene).save(tmp_path / "a.webp")
    Image.fromarray(scene).convert("L").save(tmp_path / "b.png")
    Image.fromarray(scene).convert("RGBA").save(tmp_path / "c.png")
    Image.fromarray(scene).convert("P").save(tmp_path / "d.gif")
    code, found = _read_json(capsys, str(detector), str(tmp_path))
    assert code == 0 and len(found["readings"]) == 4 and not found["failed"]


def test_drawings_are_written_once_and_replaced_only_when_asked(photo_set, detector,
                                                                tmp_path, capsys):
    image = photo_set / "mchar_val" / "000003.png"
    drawn = tmp_path / "drawn"
    assert photo_cli.main([str(detector), str(image), "--draw", str(drawn),
                           "--accelerator", "cpu"]) == 0
    picture = drawn / "000003_read.png"
    assert max(Image.open(picture).size) >= 480  # a small photo is enlarged to be seen
    before = picture.read_bytes()
    capsys.readouterr()
    assert photo_cli.main([str(detector), str(image), "--draw", str(drawn)]) == 2
    assert "000003_read.png already exists; pass --overwrite" in capsys.readouterr().err
    assert picture.read_bytes() == before
    assert photo_cli.main([str(detector), str(image), "--draw", str(drawn), "--overwrite",
                           "--accelerator", "cpu"]) == 0
    assert sorted(p.name for p in drawn.iterdir()) == ["000003_read.png"]  # no temporaries
    twin = tmp_path / "elsewhere" / "000003.png"
    twin.parent.mkdir()
    twin.write_bytes(image.read_bytes())
    assert photo_cli.main([str(detector), str(image), str(twin), "--draw",
                           str(tmp_path / "new")]) == 2
    assert "would both be drawn as" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


@pytest.mark.real_data
def test_the_real_val_images_read_as_predict_writes_them(detector, tmp_path, capsys):
    """The real photos, of every size, go through svhn.read's decoding to the same numbers
    as through svhn.predict's cache."""
    data_dir = os.environ.get("SVHN_DATA_DIR")
    if not data_dir:
        pytest.skip("set SVHN_DATA_DIR to the competition folder")
    data_dir = Path(data_dir)
    out = tmp_path / "val.csv"
    assert predict_cli.main([str(detector), "--data_dir", str(data_dir), "--split", "val",
                             "--out", str(out), "--cache_dir", str(tmp_path / "cache"),
                             "--accelerator", "cpu", "--no-zoom_search"]) == 0
    written = pd.read_csv(out, dtype=str).set_index("file_name")["file_code"].to_dict()
    capsys.readouterr()
    code, found = _read_json(capsys, str(detector), str(data_dir / "mchar_val"),
                             "--no-zoom_search")
    assert code == 0 and len(found["readings"]) == len(written)
    assert {Path(r["file"]).name: r["number"] for r in found["readings"]} == written
