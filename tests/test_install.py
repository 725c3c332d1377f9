"""Installs that work anywhere: the recipes ship inside the package (pyproject.toml maps the
top-level configs/ to svhn.configs), a recipe can be named by its file name, an installed
wheel trains the quick start from any folder and writes there, and wandb is an optional
extra whose absence is one error line."""

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers.repository import REPO
from setuptools import find_packages

from svhn.train.cli import build_cli, main


def test_the_package_list_holds_every_subpackage_and_the_recipes():
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_packages(str(REPO), include=["svhn", "svhn.*"])
    assert sorted(setuptools["packages"]) == sorted([*found, "svhn.configs"])
    assert setuptools["package-dir"] == {"svhn.configs": "configs"}


def _print_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as done:
        build_cli([*args, "--print_config"])
    assert done.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


def test_a_recipe_named_by_file_name_is_the_shipped_one(capsys, tmp_path):
    assert _print_config(capsys, "--config", "resnet18.yaml")["model"]["backbone"] == \
        "resnet18"
    zoom = _print_config(capsys, "--config", "resnet18.yaml", "--config=configs/zoom.yaml")
    assert zoom["model"]["box_head"] is True and zoom["model"]["backbone"] == "resnet18"
    # A file of that name in the working folder is the one read.
    (tmp_path / "resnet18.yaml").write_text("model:\n  backbone: resnet34\n")
    assert _print_config(capsys, "--config", "resnet18.yaml")["model"]["backbone"] == \
        "resnet34"


def test_wandb_config_without_wandb_is_one_error_line_before_anything_is_made(
        monkeypatch, capsys, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb"
                        else real_find_spec(name, *a))
    monkeypatch.setattr("lightning.pytorch.loggers.wandb._WANDB_AVAILABLE", False)  # Lightning's
    monkeypatch.setenv("WANDB_MODE", "disabled")  # were wandb started after all: no network
    # Printing the settings needs no logger; training does.
    assert "WandbLogger" in str(_print_config(capsys, "--config", "wandb.yaml"))
    assert main(["--config", "wandb.yaml", "--data.synthetic_fallback", "true",
                 "--data.synthetic_size", "64", "--trainer.max_epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: trainer.logger lightning.pytorch.loggers.WandbLogger "
                          "(configs/wandb.yaml) logs to Weights & Biases, but wandb is not "
                          'installed: pip install "wandb>=0.17"'), err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no runs/, data/ or wandb/ folder


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                            timeout=900, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-3000:])
    return result


@pytest.mark.slow
def test_an_installed_wheel_trains_the_quick_start_in_any_folder(tmp_path):
    """sdist from a copy of the sources, wheel from the sdist, installed into a fresh venv
    that borrows this environment's dependencies (a .pth line, no downloads), then a tiny
    quick-start fit from an empty folder."""
    started = time.monotonic()
    source = tmp_path / "source"
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name if source.exists() else _mkdir(source) / name)
    for name in ("svhn", "configs"):
        shutil.copytree(REPO / name, source / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    sdist = _run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                  "print(build_meta.build_sdist(sys.argv[1]))", dist], cwd=source)
    sdist = dist / sdist.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        assert any(n.endswith("/configs/default.yaml") for n in archive.getnames())
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-q", sdist, "-w", dist], cwd=tmp_path)
    wheel = next(dist.glob("svhn-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "svhn/configs/default.yaml" in names and "svhn/train/cli.py" in names
    assert not [n for n in names if n.startswith("configs/")]  # no top-level folder

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
                     ).stdout.strip())
    borrowed = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "borrowed_dependencies.pth").write_text("\n".join(sorted(borrowed)) + "\n")
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
          "--target", site, wheel])

    work = _mkdir(tmp_path / "work")  # empty, far from the sources and from the venv
    installed = _files(venv)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([python, "-c", "import svhn.paths as p; print(p.__file__); "
                  "print(p.QUICKSTART_CONFIG)"], cwd=work, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site / "svhn") for p in where), where
    named = _run([python, "-m", "svhn.fit", "--config", "resnet18.yaml", "--print_config"],
                 cwd=work, env=env)
    assert "backbone: resnet18" in named.stdout
    fit = _run([python, "-m", "svhn.fit", "--data.synthetic_size", "64",
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                "--data.num_workers", "0", "--trainer.enable_progress_bar", "false"],
               cwd=work, env=env)
    config = yaml.safe_load((work / "runs/default/version_0/config.yaml").read_text())
    assert config["model"]["backbone"] == "vgg" and config["model"]["zoom_steps"] == 2
    assert (work / "runs/default/version_0/checkpoints/last.ckpt").is_file()
    assert (work / "data/synthetic/mchar_train.json").is_file()
    assert "SYNTHETIC" in fit.stdout
    assert _files(venv) == installed  # nothing written next to the installed package
    print(f"wheel build, install and fit: {time.monotonic() - started:.0f} s")


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if "__pycache__" not in p.parts}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_importing_the_project_asks_no_server_for_albumentations_updates():
    # On an offline GPU machine the check waited and printed a warning in every command.
    code = """
import urllib.request
asked = []
def offline(self, url, *args, **kwargs):
    asked.append(getattr(url, "full_url", url))
    raise OSError("offline")
urllib.request.OpenerDirector.open = offline
import svhn.data.transforms
assert not asked, asked
"""
    env = {key: value for key, value in os.environ.items()
           if key != "NO_ALBUMENTATIONS_UPDATE"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
