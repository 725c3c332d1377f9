"""What a preempted, parallel or hurried user meets: nothing lost, nothing silently wrong.

Each test is one fault of docs/troubleshooting.md ("Preempted, parallel, hurried"): a start
from weights that loads nothing, a prediction told to stop, two predictions writing one
file, a resume of another seed's run, a damaged or silently replaced image cache, and input
that would be taken for something else (a label key twice, a YAML error, an abbreviated
flag).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.layout import entry, write_labels, write_layout
from helpers.repository import REPO
from helpers.runs import PLAIN_MODEL
from PIL import Image

from svhn.checkpoint_format import CheckpointError, read_checkpoint
from svhn.data.images import ImageCache
from svhn.data.labels import LabelFileError, load_labels
from svhn.data.layout import split_images
from svhn.errors import OutputExistsError
from svhn.inference import cli as predict_cli
from svhn.inference.checkpoints import load_reader
from svhn.model.training import DigitSequenceModel
from svhn.tempfiles import write_all_or_none
from svhn.train import cli as fit_cli
from svhn.train.resume import ResumeError, find_last_checkpoint


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _predict_command(checkpoint: Path, data: Path, out: Path, cache: Path, *extra: str
                     ) -> list[str]:
    return [sys.executable, "-m", "svhn.predict", str(checkpoint), "--data_dir", str(data),
            "--split", "test_a", "--out", str(out), "--cache_dir", str(cache),
            "--num_workers", "0", "--accelerator", "cpu", *extra]


def _many_test_images(root: Path, count: int) -> Path:
    return write_layout(root, test_a=[f"{i:06d}.png" for i in range(count)])


def _saved_with(checkpoint: Path, out: Path, change) -> Path:
    """A copy of ``checkpoint`` whose reader weights went through ``change(name, tensor)``."""
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    raw["state_dict"] = {key: change(key, value) for key, value in raw["state_dict"].items()}
    torch.save(raw, out)
    return out


def _model_settings(checkpoint: Path) -> dict:
    """The settings the checkpoint's model was built with (its own start excepted)."""
    return {key: value for key, value in read_checkpoint(checkpoint).model.items()
            if key != "init_from"}


# -- a start from weights says how much it loaded, and refuses to load nothing --------------
def _other_width(key: str, value: torch.Tensor) -> torch.Tensor:
    """Another network that keeps every name: each tensor with a shape gets another."""
    if key.startswith("reader.backbone.") and value.dim() > 0:
        return torch.zeros((value.shape[0] + 1, *value.shape[1:]), dtype=value.dtype)
    return value


def test_init_from_a_checkpoint_of_another_width_is_refused(trained_checkpoint, tmp_path):
    other = _saved_with(trained_checkpoint.last, tmp_path / "other.ckpt", _other_width)
    with pytest.raises(CheckpointError) as caught:  # 0-d step counters still match
        DigitSequenceModel(**_model_settings(trained_checkpoint.last), init_from=str(other))
    message = str(caught.value)
    assert "only 0 of" in message and "backbone weights" in message
    assert "first difference: backbone." in message and "in the file" in message


def test_init_from_says_how_much_it_loaded(trained_checkpoint, caplog):
    settings = _model_settings(trained_checkpoint.last)
    with caplog.at_level("INFO"):
        DigitSequenceModel(**settings, init_from=str(trained_checkpoint.last))
    assert "100.0% of the reader's weights loaded" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):  # other heads: the backbone loads, the heads start fresh
        DigitSequenceModel(**{**settings, "max_len": settings["max_len"] + 1},
                           init_from=str(trained_checkpoint.last))
    assert "the rest start fresh (first difference: heads." in caplog.text


def test_a_wrong_shape_names_the_tensor_and_both_shapes(trained_checkpoint, tmp_path):
    def wider_head(key: str, value: torch.Tensor) -> torch.Tensor:
        return torch.zeros(12, *value.shape[1:]) if key == "reader.heads.heads.0.weight" \
            else value

    changed = _saved_with(trained_checkpoint.last, tmp_path / "changed.ckpt", wider_head)
    with pytest.raises(CheckpointError) as caught:
        load_reader(changed)
    assert "heads.heads.0.weight: (12," in str(caught.value)
    assert "in the file, (11," in str(caught.value)


# -- a prediction told to stop stops, and writes nothing ------------------------------------
def test_predict_stops_on_sigterm_and_writes_nothing(trained_checkpoint, tmp_path):
    data = _many_test_images(tmp_path / "mchar", 3000)
    out = tmp_path / "submit" / "stopped.csv"
    run = subprocess.Popen(  # batches of one, three views: a loop of several seconds
        _predict_command(trained_checkpoint.last, data, out, tmp_path / "cache",
                         "--batch_size", "1", "--tta"),
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "Reading test_a" not in seen:  # printed just before the cache and the loop
        chunk = run.stdout.read(16)
        assert chunk, f"predict ended before reading: {seen[-2000:]}"
        seen += chunk
    time.sleep(4)  # the cache is built (about a second); the loop runs
    assert run.poll() is None, "the prediction ended before the signal: make it longer"
    started = time.monotonic()
    run.send_signal(signal.SIGTERM)
    out_text, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, (seen + out_text + err)[-2000:]
    assert time.monotonic() - started < 30
    assert "stopped by signal 15: prediction stopped; nothing was written." in err
    assert not out.exists()
    assert not list(tmp_path.rglob(".*tmp*")) and not list(tmp_path.rglob("*.tmp*"))


# -- two predictions writing one file: one wins, the other says so --------------------------
def test_two_predicts_writing_one_out_never_both_succeed(trained_checkpoint, tmp_path):
    data = _many_test_images(tmp_path / "mchar", 200)
    out = tmp_path / "one.csv"
    runs = [subprocess.Popen(
        _predict_command(trained_checkpoint.last, data, out, tmp_path / f"cache{k}"),
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert str(out) in loser and ("another process" in loser or "already exists" in loser)
    assert len(out.read_text().splitlines()) == 201  # one whole file: header + 200 rows
    assert not list(tmp_path.glob(".one.csv.tmp*"))


def test_a_file_written_meanwhile_is_kept(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "a.npz"
    second.write_text("theirs")  # another process wrote it after our check

    def write(text: str):
        return lambda target: Path(target).write_text(text)

    with pytest.raises(OutputExistsError, match="written by another process"):
        write_all_or_none({first: write("ours"), second: write("ours")}, overwrite=False)
    assert second.read_text() == "theirs"
    assert not first.exists()  # all or none: what this call placed is taken back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz"]
    write_all_or_none({second: write("ours")}, overwrite=True)
    assert second.read_text() == "ours"


def test_default_outputs_of_two_runs_last_checkpoints_differ():
    one = predict_cli.default_output_path(["runs/a/version_0/checkpoints/last.ckpt"], "test_a")
    two = predict_cli.default_output_path(["runs/b/version_3/checkpoints/last.ckpt"], "test_a")
    assert one == Path("submit/a_version_0_last_test_a.csv")
    assert two == Path("submit/b_version_3_last_test_a.csv")


# -- --ckpt_path last resumes the run of the seed asked for ---------------------------------
def _fake_run(root: Path, version: int, seed: int, age: float) -> Path:
    folder = root / f"version_{version}"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text(f"seed_everything: {seed}\n")
    last = folder / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    os.utime(last, (time.time() - age, time.time() - age))
    return last


def test_ckpt_path_last_finds_the_run_of_the_seed(tmp_path):
    seed1 = _fake_run(tmp_path / "seed", 0, seed=1, age=100)
    seed2 = _fake_run(tmp_path / "seed", 1, seed=2, age=10)  # newer
    assert find_last_checkpoint(tmp_path, "seed", 1) == seed1
    assert find_last_checkpoint(tmp_path, "seed", 2) == seed2
    assert find_last_checkpoint(tmp_path, "seed") == seed2  # no seed given: the newest
    with pytest.raises(ResumeError, match=r"no run .* has seed_everything 3 \(found: "
                                          r"version_1 \(seed 2\), version_0 \(seed 1\)\)"):
        find_last_checkpoint(tmp_path, "seed", 3)


def test_resuming_seed_one_continues_its_own_run(tmp_path, capsys):
    data = write_layout(tmp_path / "mchar", train={f"{i:06d}.png": [i % 10] for i in range(8)},
                        val={f"{i:06d}.png": [i % 10] for i in range(4)})
    flags = [*PLAIN_MODEL, "--data.data_dir", str(data), "--data.num_workers", "0",
             "--data.batch_size", "4", "--data.image_size", "[32, 64]",
             "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false", "--trainer.logger.init_args.name",
             "seeds", "--data.cache_dir", str(tmp_path / "cache")]
    for seed in ("1", "2"):
        assert fit_cli.main([*flags, "--trainer.max_epochs", "1", "--seed_everything", seed]) == 0
    assert fit_cli.main([*flags, "--trainer.max_epochs", "1", "--seed_everything", "1",
                         "--ckpt_path", "last"]) == 0
    assert "Resuming version_0 of seeds" in capsys.readouterr().out
    runs = tmp_path / "runs" / "seeds"
    assert (runs / "version_0" / "config_resumed_1.yaml").is_file()
    assert not list((runs / "version_1").glob("config_resumed_*"))


# -- a damaged or silently replaced cache is rebuilt ----------------------------------------
def _cache(tmp_path: Path, count: int = 6) -> tuple[ImageCache, list[Path]]:
    data = write_layout(tmp_path / "mchar", test_a=[f"{i:06d}.png" for i in range(count)])
    paths = split_images(data, "test_a")
    cache = ImageCache(paths, (16, 32), tmp_path / "cache" / "test_a_16x32.npy")
    cache.build()
    assert cache.is_fresh()
    return cache, paths


@pytest.mark.parametrize("damage", ["manifest not json", "manifest a list", "array cut short",
                                    "array empty", "array of another shape"])
def test_a_damaged_cache_is_rebuilt(tmp_path, damage):
    cache, _ = _cache(tmp_path)
    expected = np.load(cache.cache_file).copy()
    if damage == "manifest not json":
        cache.manifest_file.write_text('{"version": 2, "si')
    elif damage == "manifest a list":
        cache.manifest_file.write_text("[]")
    elif damage == "array cut short":
        with cache.cache_file.open("r+b") as handle:
            handle.truncate(cache.cache_file.stat().st_size - 100)
    elif damage == "array empty":
        cache.cache_file.write_bytes(b"")
    else:
        np.save(cache.cache_file, np.zeros((6, 16, 31, 3), dtype=np.uint8))
    fresh = ImageCache(cache.paths, cache.size, cache.cache_file)
    assert not fresh.is_fresh()
    fresh.build()
    assert fresh.is_fresh()
    np.testing.assert_array_equal(fresh.array, expected)


def test_an_image_replaced_with_size_and_mtime_kept_is_read_anew(tmp_path):
    def stored_png(path: Path, colour: tuple[int, int, int]) -> None:
        # Uncompressed: the file's size depends on the picture's size only.
        Image.new("RGB", (40, 20), colour).save(path, compress_level=0)

    data = write_layout(tmp_path / "mchar", test_a=[f"{i:06d}.png" for i in range(3)])
    paths = split_images(data, "test_a")
    for path in paths:
        stored_png(path, (0, 100, 50))
    cache = ImageCache(paths, (16, 32), tmp_path / "cache" / "test_a_16x32.npy")
    cache.build()
    before = paths[2].stat()
    stored_png(tmp_path / "new.png", (200, 10, 10))
    # what cp -p and rsync -a do: a new file in its place, the old modification time kept
    os.replace(tmp_path / "new.png", paths[2])
    os.utime(paths[2], ns=(before.st_atime_ns, before.st_mtime_ns))
    now = paths[2].stat()
    assert (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    fresh = ImageCache(paths, cache.size, cache.cache_file)
    assert not fresh.is_fresh()
    fresh.build()
    assert tuple(fresh.array[2, 8, 16]) == (200, 10, 10)


def test_a_failed_cache_build_leaves_no_folder(tmp_path):
    data = write_layout(tmp_path / "mchar", test_a=["000000.png", "000001.png"])
    png = data / "mchar_test_a" / "000001.png"
    png.write_bytes(png.read_bytes()[:40])  # a truncated PNG
    cache = ImageCache(split_images(data, "test_a"), (16, 32),
                       tmp_path / "cache" / "deep" / "test_a_16x32.npy")
    with pytest.raises(Exception, match="000001.png"):
        cache.build()
    assert not (tmp_path / "cache").exists()


# -- input taken for something else ----------------------------------------------------------
def test_an_image_labelled_twice_is_refused_with_both_entries(tmp_path):
    one, two = json.dumps(entry([1])), json.dumps(entry([7]))
    path = tmp_path / "labels.json"
    path.write_text(f'{{"000000.png": {one}, "000001.png": {one}, "000000.png": {two}}}')
    with pytest.raises(LabelFileError) as caught:
        load_labels(path)
    message = str(caught.value)
    assert str(path) in message and "'000000.png' appears twice" in message
    assert '"label": [1]' in message and '"label": [7]' in message


def test_the_original_svhn_ten_for_zero_is_named_with_the_fix(tmp_path):
    path = write_labels(tmp_path / "labels.json", {"000000.png": [1, 10]})
    with pytest.raises(LabelFileError, match="map 10 to 0"):
        load_labels(path)


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    recipe = tmp_path / "my.yaml"
    recipe.write_text("trainer:\n  max_epochs: 3\n model:\n  lr: 0.1\n")
    assert fit_cli.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --config {recipe}:3:"), err
    assert not (tmp_path / "runs").exists()


def test_an_abbreviated_flag_is_an_error_not_a_guess(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:  # the parser's exit, as for any unknown flag
        fit_cli.main([*PLAIN_MODEL, "--trainer.max_epoch", "5"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--trainer.max_epoch" in err and "usage:" not in err
    assert not (tmp_path / "runs").exists()


def test_a_class_path_that_is_no_callback_is_a_short_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        fit_cli.main([*PLAIN_MODEL, "--trainer.callbacks+=svhn.data.layout.DataError"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "usage:" not in "\n".join(err)
    assert len(err) <= 12, err
    assert not (tmp_path / "runs").exists()
