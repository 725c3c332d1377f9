"""``python -m svhn.export``: the reader as ONNX, read by onnxruntime as PyTorch reads it.

The readers are tiny and untrained: every test compares the ONNX model with the reader it
came from (its own ``forward``) on the same pixels, which holds whatever the weights. A
reading whose two likeliest classes are nearly tied may flip on float rounding; the
comparisons leave only those out, and count that few are."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.repository import REPO
from PIL import Image

from svhn.analysis import bench
from svhn.analysis.onnx_bench import measure_onnx
from svhn.data.labels import BLANK, decode_probabilities
from svhn.data.photos import decode_photos, photo_paths
from svhn.data.synthetic import render_number, sample_digits
from svhn.inference import export
from svhn.inference.checkpoints import load_reader
from svhn.model.training import DigitSequenceModel
from svhn.model.vote import chain_confidence

EXAMPLE = REPO / "examples" / "read_with_onnxruntime.py"
TINY_DETECTOR = "resnet10t"  # a timm ResNet: the detector reads its feature maps
ZOOMING = {"backbone": "simple_cnn", "feature_grid": (2, 4), "box_head": True,
           "char_boxes": True, "zoom_steps": 2, "zoom_from": "digits", "zoom_search": True}
DETECTOR = {"backbone": TINY_DETECTOR, "box_head": True, "char_boxes": True,
            "head": "detector", "zoom_steps": 1, "zoom_from": "digits",
            "detect_threshold": 0.3}
NEAR_TIE = 1e-3  # a top-2 margin below this may flip on rounding
# Exporting the detector takes half a minute: its tests are slow ones (-m slow; CI runs them).
DETECTOR_EXPORT = pytest.param("detector", marks=pytest.mark.slow)


def _checkpoint(path: Path, settings: dict, cache_scale: float = 2.0,
                eval_scale: float = 2.0, seed: int = 0) -> Path:
    """A tiny reader's checkpoint with the data settings that size its evaluation images.
    A detector's class scores are spread out, so it finds digits and zooms on them."""
    torch.manual_seed(seed)
    model = DigitSequenceModel(image_size=(32, 64), max_len=2, **settings)
    if model.reader.detector is not None:
        torch.nn.init.normal_(model.reader.detector.classes.weight, std=0.5)
        torch.nn.init.zeros_(model.reader.detector.classes.bias)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"image_size": (32, 64), "max_len": 2,
                                                "cache_scale": cache_scale,
                                                "eval_scale": eval_scale}}, path)
    return path


@dataclass
class Exported:
    checkpoint: Path
    model: Path
    printed: str

    @property
    def sidecar(self) -> dict:
        return json.loads(export.sidecar_path(self.model).read_text())


def _export(checkpoint: Path, out: Path, *flags: str) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = export.main([str(checkpoint), "--out", str(out), *flags])
    return code, printed.getvalue()


def _exported(folder: Path, settings: dict, **scales: float) -> Exported:
    checkpoint = _checkpoint(folder / "reader.ckpt", settings, **scales)
    code, printed = _export(checkpoint, folder / "reader.onnx")
    assert code == 0, printed
    return Exported(checkpoint, folder / "reader.onnx", printed)


@pytest.fixture(scope="module")
def zooming(tmp_path_factory) -> Exported:
    """A zooming reader (parallel heads, digit boxes, 2 crop reads) whose evaluation images
    are resized twice (cached at 2x, fed at 1.5x)."""
    return _exported(tmp_path_factory.mktemp("zooming"), ZOOMING, eval_scale=1.5)


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> Exported:
    """A zooming digit detector fed at 2x, as configs/real_cpu.yaml's."""
    return _exported(tmp_path_factory.mktemp("detector"), DETECTOR)


@pytest.fixture(scope="module")
def photos_folder(tmp_path_factory) -> Path:
    """Generated house numbers as a person has them: PNGs, a JPEG, one turned by EXIF."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(5)
    for index in range(7):
        image, _ = render_number(sample_digits(rng, max_digits=2), rng)
        image.save(folder / f"photo_{index}.png")
    image, _ = render_number([4, 2], rng)
    image.save(folder / "photo_jpeg.jpg", quality=90)
    image, _ = render_number([7], rng)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter
    image.rotate(90, expand=True).save(folder / "photo_exif.jpg", exif=exif)
    return folder


def _photos(exported: Exported, folder: Path):
    sizes = exported.sidecar["preprocessing"]
    return decode_photos(photo_paths([folder]), tuple(sizes["cache_size"]),
                         tuple(sizes["input_size"]), progress=False)


def _assert_reads_alike(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]):
    """Equal strings and close outputs, but where a near tie may flip (few such)."""
    top = expected["probs"].topk(2, dim=-1).values
    sure = (top[..., 0] - top[..., 1]).amin(-1) > NEAR_TIE
    assert sure.float().mean() >= 0.75, "too many near ties for the comparison to mean much"
    assert decode_probabilities(found["probs"][sure]) == \
        decode_probabilities(expected["probs"][sure])
    assert set(found) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(found[name][sure], value[sure], atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("name", ["zooming", DETECTOR_EXPORT])
def test_the_export_reads_as_the_reader_at_any_batch(name, request, photos_folder):
    """The whole zoom chain (and the detector's decoding) is in the graph: batches of 1 and
    3 read as the reader's own forward reads them."""
    exported: Exported = request.getfixturevalue(name)
    reader = load_reader(exported.checkpoint, zoom_search=False)
    images = _photos(exported, photos_folder).images
    session = export.onnx_session(exported.model)
    for batch in (images[:1], images[1:4]):
        _assert_reads_alike(export.read_with_torch(reader, batch),
                            export.read_with_onnx(session, batch))
    everything = export.read_with_torch(reader, images)
    _assert_reads_alike(everything, export.read_with_onnx(session, images, batch_size=4))
    if name == "detector":  # it found digits, so decoding and zooming were exercised
        assert (everything["probs"].argmax(-1) != BLANK).any()
    assert "Check on 16 generated house numbers" in exported.printed


def test_the_sidecar_says_how_to_feed_and_decode(zooming):
    side = zooming.sidecar
    assert side["preprocessing"]["cache_size"] == [64, 128]  # 2x of 32x64
    assert side["preprocessing"]["input_size"] == [48, 96]  # 1.5x
    assert side["input"] == {"name": "images", "dtype": "uint8", "layout": "NCHW",
                             "channels": "RGB", "shape": ["N", 3, 48, 96], "height": 48,
                             "width": 96}
    assert side["max_len"] == 2 and side["blank"] == BLANK and side["opset"] >= 17
    session = export.onnx_session(zooming.model)
    assert list(side["outputs"]) == [o.name for o in session.get_outputs()] == \
        ["probs", "box", "char_boxes"]
    assert side["outputs"]["probs"]["shape"] == ["N", 2, 11]
    assert side["included"]["zoom_steps"] == 2 and not side["included"]["detector_decoding"]
    assert any("zoom search" in line for line in side["left_out"])
    assert Path(side["checkpoint"]) == zooming.checkpoint.resolve()
    assert side["check"]["images"] == side["check"]["strings_agree"] == 16
    assert "Not in the model: the zoom search" in zooming.printed


@pytest.mark.slow
def test_the_detector_s_sidecar_says_its_decoding_is_in_the_graph(detector):
    side = detector.sidecar
    assert side["included"]["head"] == "detector" and side["included"]["detector_decoding"]
    assert side["preprocessing"]["cache_size"] == side["preprocessing"]["input_size"] == \
        [64, 128]


def _example(model: Path, *inputs: Path) -> list[list[str]]:
    """The example script in a process where torch and svhn cannot be imported."""
    code = ("import runpy, sys; sys.modules.update(torch=None, svhn=None); "
            f"sys.argv = [{str(EXAMPLE)!r}, *sys.argv[1:]]; "
            f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code, str(model), *map(str, inputs)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [line.split("\t") for line in done.stdout.splitlines()]


@pytest.mark.parametrize("name", ["zooming", DETECTOR_EXPORT])
def test_the_example_reads_photos_without_torch_as_the_reader_does(name, request,
                                                                   photos_folder):
    """Its own preprocessing (two resizes for the zooming reader, one for the detector) and
    decoding give the reader's numbers and confidences."""
    exported: Exported = request.getfixturevalue(name)
    rows = _example(exported.model, photos_folder)
    photos = _photos(exported, photos_folder)
    probs = export.read_with_torch(load_reader(exported.checkpoint, zoom_search=False),
                                   photos.images)["probs"]
    assert [row[0] for row in rows] == photos.names
    assert [row[1] for row in rows] == decode_probabilities(probs)
    confidence = chain_confidence(probs).tolist()
    assert [float(row[2]) for row in rows] == pytest.approx(confidence, abs=2e-4)


def test_an_export_is_replaced_only_with_overwrite(zooming, tmp_path):
    out = tmp_path / "reader.onnx"
    out.write_bytes(zooming.model.read_bytes())
    export.sidecar_path(out).write_text("{}")
    plain = _checkpoint(tmp_path / "plain.ckpt", {"backbone": "simple_cnn"})
    code, _ = _export(plain, out)
    assert code == 2
    assert out.read_bytes() == zooming.model.read_bytes()
    assert export.sidecar_path(out).read_text() == "{}"
    code, printed = _export(plain, out, "--overwrite")
    assert code == 0, printed
    assert out.read_bytes() != zooming.model.read_bytes()
    assert export.sidecar_path(out).read_text() != "{}"
    assert [o.name for o in export.onnx_session(out).get_outputs()] == ["probs"]


def test_the_existing_output_is_named_with_the_fix(zooming, tmp_path, capsys):
    out = tmp_path / "reader.onnx"
    export.sidecar_path(out).write_text("{}")
    assert export.main([str(zooming.checkpoint), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "reader.json" in error and "--overwrite" in error
    assert not out.exists()


@pytest.fixture
def quick_export(zooming, monkeypatch):
    """The zooming reader's export without exporting again (the fixture's model)."""
    names = [o.name for o in export.onnx_session(zooming.model).get_outputs()]
    monkeypatch.setattr(export, "export_onnx",
                        lambda *args, **kwargs: (zooming.model.read_bytes(), names))
    return zooming


def test_a_failed_export_leaves_no_file(quick_export, tmp_path, monkeypatch):
    """The sidecar fails while both files are being written: neither is left, nor any
    temporary file."""
    monkeypatch.setattr(export, "_sidecar", lambda *args: {"not JSON": object()})
    with pytest.raises(TypeError):
        _export(quick_export.checkpoint, tmp_path / "out" / "reader.onnx")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _onnx_that_flips_one(monkeypatch):
    """onnxruntime's answers with the first image's reading changed."""
    read = export.read_with_onnx

    def flipped(*args, **kwargs):
        found = read(*args, **kwargs)
        found["probs"][0] = found["probs"][0].roll(1, dims=-1)
        return found

    monkeypatch.setattr(export, "read_with_onnx", flipped)


def test_a_differing_reading_is_named_and_strict_writes_nothing(quick_export, photos_folder,
                                                                tmp_path, monkeypatch):
    _onnx_that_flips_one(monkeypatch)
    out = tmp_path / "reader.onnx"
    code, printed = _export(quick_export.checkpoint, out, "--check", str(photos_folder),
                            "--strict")
    assert code == 1 and not out.exists() and not export.sidecar_path(out).exists()
    assert "8 of 9 readings agree (1 differ)" in printed
    assert "photo_0.png: PyTorch" in printed and "top-2 margin" in printed
    code, printed = _export(quick_export.checkpoint, out, "--check", str(photos_folder))
    assert code == 0 and "8 of 9 readings agree (1 differ)" in printed
    check = json.loads(export.sidecar_path(out).read_text())["check"]
    assert check["strings_agree"] == 8 and check["differ"][0][0] == "photo_0.png"


def test_a_check_path_that_is_not_there_stops_before_the_export(zooming, tmp_path, capsys):
    out = tmp_path / "reader.onnx"
    code = export.main([str(zooming.checkpoint), "--out", str(out), "--check",
                        str(tmp_path / "missing")])
    assert code == 2 and "missing: no such file or folder" in capsys.readouterr().err
    assert not out.exists()


def test_without_onnxruntime_the_error_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime fails
    assert export.main(["any.ckpt", "--out", str(tmp_path / "r.onnx")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and 'pip install "svhn[export]"' in error
    assert "onnxruntime" in error and len(error.strip().splitlines()) == 1
    assert bench.main(["--onnx", "any.ckpt"]) == 2
    assert 'pip install "svhn[export]"' in capsys.readouterr().err


def test_the_bench_times_both_readers_and_says_they_agree(zooming, monkeypatch):
    monkeypatch.setattr("svhn.analysis.onnx_bench.GENERATED_IMAGES", 8)
    monkeypatch.setattr("svhn.analysis.onnx_bench.export_onnx",
                        lambda *args, **kwargs: (zooming.model.read_bytes(), []))
    report = measure_onnx(zooming.checkpoint, repeats=1, batch_size=4)
    assert report["images"] == 8 and report["strings_agree"] == 8
    assert report["torch"]["images_per_s"] > 0 and report["onnxruntime"]["images_per_s"] > 0
    assert report["speedup"] == pytest.approx(report["torch"]["seconds"]
                                              / report["onnxruntime"]["seconds"])


@pytest.mark.slow
def test_the_full_zoom_search_exports_too(tmp_path, photos_folder):
    """``--search``: every image's 29 chains and the vote, as svhn.predict --full_search."""
    checkpoint = _checkpoint(tmp_path / "reader.ckpt", ZOOMING)
    code, printed = _export(checkpoint, tmp_path / "search.onnx", "--search")
    assert code == 0, printed
    reader = load_reader(checkpoint, zoom_search=True, search_gate=1.0)
    images = decode_photos(photo_paths([photos_folder]), (64, 128), (64, 128),
                           progress=False).images
    _assert_reads_alike(export.read_with_torch(reader, images, search=True),
                        export.read_with_onnx(export.onnx_session(tmp_path / "search.onnx"),
                                              images))
