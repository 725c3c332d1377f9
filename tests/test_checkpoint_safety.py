"""A checkpoint never runs code (issue #27), and a checkpoint is opened once.

A checkpoint is a pickle, and unpickling can call anything. Every path that opens one
(``svhn.predict``, ``svhn.report``, ``svhn.fit --ckpt_path`` to resume, ``svhn.fit validate
--ckpt_path``, ``svhn.fit --model.init_from``) must refuse a planted one, with one ``error:``
line naming the file and the type, exit code 2, and the planted code not run. The plant
writes a marker file when unpickled; each test asserts the marker is not there.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.checkpoints import write_format_1_checkpoint
from helpers.runs import PLAIN_MODEL

from svhn.analysis import report
from svhn.checkpoint_format import CheckpointError, read_checkpoint
from svhn.inference import cli as predict_cli
from svhn.inference import predictor
from svhn.inference.checkpoints import load_reader
from svhn.inference.submission import read_submission
from svhn.model.training import DigitSequenceModel
from svhn.train import cli as fit_cli

FORMATS = ("zip", "legacy")  # torch.save's format, and the older one (no static scan)


class RunsCode:
    """Unpickled, it writes ``marker``: a stand-in for whatever a planted pickle would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('this ran')",)


def save(raw: dict, path: Path, fmt: str = "zip") -> Path:
    torch.save(raw, path, _use_new_zipfile_serialization=fmt == "zip")
    return path


def plant(source: Path, path: Path, marker: Path, fmt: str = "zip") -> Path:
    """A copy of the checkpoint ``source`` that runs code when unpickled in full."""
    raw = torch.load(source, map_location="cpu", weights_only=True)
    raw["hyper_parameters"]["note"] = RunsCode(marker)
    return save(raw, path, fmt)


@pytest.fixture(params=FORMATS)
def planted(request, trained_checkpoint, tmp_path) -> tuple[Path, Path]:
    """(planted checkpoint, its marker): a training checkpoint (it could be resumed) that
    writes the marker when opened with weights_only=False."""
    marker = tmp_path / "MARKER"
    return plant(trained_checkpoint.last, tmp_path / "planted.ckpt", marker,
                 request.param), marker


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, object]]:
    """Every torch.load from here on: (the file, its weights_only argument)."""
    calls, real = [], torch.load

    def spy(f, *args, **kwargs):
        name = f if isinstance(f, (str, Path)) else getattr(f, "path", None) or f.name
        calls.append((str(name), kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def fit_args(trained, runs: Path, *extra: str) -> list[str]:
    """svhn.fit with the settings ``trained_checkpoint`` was trained with (so it resumes)."""
    return [*PLAIN_MODEL, "--model.scheduler", "none", "--data.augment", "none",
            "--data.data_dir", str(trained.data_dir), "--data.cache_dir", str(trained.cache_dir),
            "--data.num_workers", "0", "--data.batch_size", "32",
            "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false",
            "--trainer.logger.init_args.save_dir", str(runs), *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err[-5:]
    return errors[0]


def assert_refused(line: str, path: Path, marker: Path) -> None:
    assert f"error: {path}: refused, it holds builtins.exec" in line, line
    assert "could run code" in line
    assert not marker.exists(), "the planted code ran"


# ------------------------------------------------------------------------ the plant itself


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_plant_runs_code_when_opened_in_full(trained_checkpoint, tmp_path, fmt):
    """Without weights_only the planted checkpoint does run its code: the tests below that
    find no marker mean something."""
    marker = tmp_path / "MARKER"
    path = plant(trained_checkpoint.last, tmp_path / "planted.ckpt", marker, fmt)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.read_text() == "this ran"


# ------------------------------------------------------------------------ each entry point


def test_predict_refuses_a_planted_checkpoint(planted, trained_checkpoint, tmp_path, capsys):
    path, marker = planted
    out = tmp_path / "out.csv"
    code = predict_cli.main([str(path), "--data_dir", str(trained_checkpoint.data_dir),
                             "--split", "val", "--out", str(out), "--accelerator", "cpu",
                             "--num_workers", "0"])
    assert code == 2
    assert_refused(error_line(capsys), path, marker)
    assert not out.exists()


def test_report_refuses_a_planted_checkpoint(planted, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SVHN_DATA_DIR", raising=False)  # the data folder from the checkpoint
    path, marker = planted
    code = report.main(["--ckpt_path", str(path), "--out", str(tmp_path / "report"),
                        "--device", "cpu"])
    assert code == 2
    assert_refused(error_line(capsys), path, marker)
    assert not (tmp_path / "report").exists()


@pytest.mark.parametrize("how", ["resume", "validate", "test", "init_from"])
def test_fit_refuses_a_planted_checkpoint(how, planted, trained_checkpoint, tmp_path, capsys):
    path, marker = planted
    runs = tmp_path / "runs"
    args = {"resume": ["--ckpt_path", str(path), "--trainer.max_epochs", "4"],
            "validate": ["--ckpt_path", str(path)], "test": ["--ckpt_path", str(path)],
            "init_from": ["--model.init_from", str(path), "--trainer.max_epochs", "1"]}[how]
    subcommand = [how] if how in ("validate", "test") else []
    assert fit_cli.main([*subcommand, *fit_args(trained_checkpoint, runs), *args]) == 2
    assert_refused(error_line(capsys), path, marker)
    assert not runs.exists()


def test_lightning_itself_opens_a_resumed_checkpoint_weights_only(trained_checkpoint,
                                                                   tmp_path, monkeypatch):
    """Past svhn's own check (bypassed here), Lightning's resume opens the file with
    weights_only=True too, even where the environment turns torch's default off."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER"
    path = plant(trained_checkpoint.last, tmp_path / "planted.ckpt", marker)
    monkeypatch.setattr(fit_cli, "checkpoint_to_resume",
                        lambda _, for_resume: read_checkpoint(trained_checkpoint.last))
    with pytest.raises(pickle.UnpicklingError, match="builtins.exec|GLOBAL exec"):
        fit_cli.build_cli([*fit_args(trained_checkpoint, tmp_path / "runs"),
                           "--ckpt_path", str(path), "--trainer.max_epochs", "4"])
    assert not marker.exists(), "the planted code ran"


def test_every_load_of_a_resume_and_a_validate_is_weights_only(trained_checkpoint, tmp_path,
                                                              loads, capsys):
    """svhn's own reads and Lightning's (the CLI's settings, the Trainer's restore) alike."""
    resumed = tmp_path / "resume.ckpt"  # outside the run: a new run folder under tmp_path
    shutil.copy(trained_checkpoint.last, resumed)
    cli = fit_cli.build_cli([*fit_args(trained_checkpoint, tmp_path / "runs"),
                             "--ckpt_path", str(resumed), "--trainer.max_epochs", "4"])
    assert cli.trainer.current_epoch == 4  # it did resume (from epoch 3)
    assert len([c for c in loads if Path(c[0]).name == resumed.name]) >= 2  # svhn's, Lightning's
    validate = ["validate", *fit_args(trained_checkpoint, tmp_path / "runs_v"),
                "--ckpt_path", str(trained_checkpoint.best)]
    fit_cli.build_cli(validate)
    assert len([c for c in loads if Path(c[0]).name == trained_checkpoint.best.name]) >= 3
    assert loads and all(weights_only is True for _, weights_only in loads), loads
    capsys.readouterr()
    assert fit_cli.main([*validate, "--weights_only", "false"]) == 2
    assert "error: --weights_only false: svhn.fit opens checkpoints with weights_only=True" \
        in error_line(capsys)


# ------------------------------------------------------------------------ what is allowed


def test_todays_checkpoints_load_weights_only_and_predict(trained_checkpoint, tmp_path,
                                                         loads):
    out = tmp_path / "val.csv"
    assert predict_cli.main([str(trained_checkpoint.best), "--data_dir",
                             str(trained_checkpoint.data_dir), "--split", "val", "--out",
                             str(out), "--cache_dir", str(trained_checkpoint.cache_dir),
                             "--accelerator", "cpu", "--num_workers", "0"]) == 0
    assert len(read_submission(out)) == 48
    assert loads == [(str(trained_checkpoint.best), True)]  # opened once, weights only
    assert torch.serialization.get_unsafe_globals_in_checkpoint(trained_checkpoint.last) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_1_checkpoints_load_weights_only(tmp_path, fmt, loads):
    path = tmp_path / "legacy.ckpt"
    write_format_1_checkpoint(path, "legacy_zoom")
    save(torch.load(path, weights_only=True), path, fmt)
    reader = load_reader(path)
    assert reader.zoom_steps == 2 and loads[-1] == (str(path), True)


def test_allowed_types_load_and_anything_else_is_refused_by_name(tmp_path):
    base = tmp_path / "base.ckpt"
    write_format_1_checkpoint(base, "legacy_plain")
    raw = torch.load(base, weights_only=True)
    raw["datamodule_hyper_parameters"]["data_dir"] = Path("/data/mchar")  # allow-listed
    raw["hyper_parameters"]["extra"] = collections.OrderedDict(a=1)  # torch's own list
    contents = read_checkpoint(save(raw, tmp_path / "allowed.ckpt"))
    assert contents.data["data_dir"] == Path("/data/mchar")
    assert contents.model["extra"] == {"a": 1}
    for fmt in FORMATS:
        raw["hyper_parameters"]["extra"] = argparse.Namespace(lr=0.1)
        path = save(raw, tmp_path / f"namespace_{fmt}.ckpt", fmt)
        with pytest.raises(CheckpointError) as refused:
            read_checkpoint(path)
        assert str(refused.value) == (
            f"{path}: refused, it holds argparse.Namespace, not a tensor or plain value as "
            "in the checkpoints of svhn.fit, and opening it could run code; nothing of it "
            "was loaded.")


def test_an_instantiator_or_class_in_the_settings_is_refused_unless_lightnings(tmp_path):
    base = tmp_path / "base.ckpt"
    write_format_1_checkpoint(base, "legacy_plain")
    raw = torch.load(base, weights_only=True)
    raw["hyper_parameters"]["_instantiator"] = "lightning.pytorch.cli.instantiate_module"
    contents = read_checkpoint(save(raw, tmp_path / "cli.ckpt"))
    assert "_instantiator" not in contents.model  # never handed on
    for key, value, says in (("_instantiator", "os.system", "instantiator 'os.system'"),
                             ("_class_path", "subprocess.Popen", "class 'subprocess.Popen'")):
        bad = {**raw, "hyper_parameters": {**raw["hyper_parameters"], key: value}}
        path = save(bad, tmp_path / f"{key}.ckpt")
        with pytest.raises(CheckpointError, match=f"{path}: refused, its hyper_parameters "
                                                  f"name the {says}"):
            read_checkpoint(path)


def test_settings_are_saved_as_plain_values(tmp_path):
    model = DigitSequenceModel(backbone="simple_cnn", image_size=(32, 64))
    checkpoint = {"state_dict": {}, "hyper_parameters": {"lr": np.float64(0.5), "size": (32,)},
                  "datamodule_hyper_parameters": {"data_dir": Path("/data/mchar"),
                                                  "extra_train": [Path("/x")]}}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"] == {"lr": 0.5, "size": (32,)}
    assert type(checkpoint["hyper_parameters"]["lr"]) is float
    assert checkpoint["datamodule_hyper_parameters"] == {"data_dir": "/data/mchar",
                                                         "extra_train": ["/x"]}
    path = save(checkpoint, tmp_path / "plain.ckpt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []


# ------------------------------------------------------------------------ opened once


def test_predict_split_and_report_open_each_checkpoint_once(trained_checkpoint, tmp_path,
                                                            loads, monkeypatch):
    monkeypatch.delenv("SVHN_DATA_DIR", raising=False)
    second = tmp_path / "second.ckpt"
    shutil.copy(trained_checkpoint.best, second)
    predictor.predict_split([trained_checkpoint.best, second], trained_checkpoint.data_dir,
                            "val", cache_dir=trained_checkpoint.cache_dir, accelerator="cpu",
                            num_workers=0, batch_size=32)
    assert sorted(loads) == sorted([(str(trained_checkpoint.best), True), (str(second), True)])
    loads.clear()
    report.write_report(trained_checkpoint.best, tmp_path / "report",
                        cache_dir=trained_checkpoint.cache_dir, device="cpu")
    assert loads == [(str(trained_checkpoint.best.resolve()), True)]
    assert (tmp_path / "report" / "report.md").is_file()
