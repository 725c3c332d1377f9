"""Where the project reads and writes by default: one place, one rule.

The rule: every default folder is relative to the working folder the command runs in (as
Lightning's own ``lightning_logs/`` is), never to where the package is installed. Run the
commands from the repository root, as the README does, and data, cache, runs and
submissions land beside the code; run them elsewhere and they land there. The notebooks
change to the repository root first. An installed wheel follows the same rule: nothing is
written next to the installed package.

Only the recipes are found through the package, because they ship with it: the top-level
``configs/`` of a checkout (run from it, or ``pip install -e .``), which a wheel or sdist
carries as ``svhn/configs/`` (pyproject.toml maps the one folder to the package
``svhn.configs``). ``recipe`` resolves a recipe named as ``NAME.yaml`` or
``configs/NAME.yaml`` to the shipped one when no such file is in the working folder.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BENCH_SYNTHETIC_DIR", "CACHE_DIR", "CONFIGS_DIR", "DATA_DIR", "QUICKSTART_CONFIG",
           "recipe", "RUNS_DIR", "SUBMIT_DIR", "SYNTHETIC_DIR", "synthetic_extra_dir",
           "SYNTHETIC_SMALL_DIR"]

DATA_DIR = Path("data/mchar")  # the competition layout (data/README.md)
SYNTHETIC_DIR = Path("data/synthetic")  # the quick start's generated set, made once
SYNTHETIC_SMALL_DIR = Path("data/synthetic_small")  # svhn.report's last resort
BENCH_SYNTHETIC_DIR = Path("data/bench_synthetic")  # svhn.bench's set without --data_dir
CACHE_DIR = Path("data/cache")  # decoded images, one sub-folder per dataset
RUNS_DIR = Path("runs")  # runs/<name>/version_N/, written by svhn.fit
SUBMIT_DIR = Path("submit")  # submission CSVs written by svhn.predict


def synthetic_extra_dir(count: int) -> Path:
    """Where ``--data.synthetic_extra N`` generates its N images, once."""
    return Path(f"data/synthetic_extra_{count}")


def _configs_dir() -> Path:
    """svhn/configs/ where installed from a wheel, else the checkout's configs/."""
    package = Path(__file__).resolve().parent
    shipped = package / "configs"
    return shipped if shipped.is_dir() else package.parent / "configs"


CONFIGS_DIR = _configs_dir()
QUICKSTART_CONFIG = CONFIGS_DIR / "default.yaml"  # what `python -m svhn.fit` trains alone


def recipe(name: str) -> str:
    """``name`` as given when it is a file (relative to the working folder) or not a plain
    ``NAME.yaml`` / ``configs/NAME.yaml``; else the shipped recipe of that name, if any."""
    path = Path(name)
    if path.exists() or path.suffix not in (".yaml", ".yml") \
            or path.parent not in (Path("."), Path("configs")):
        return name
    shipped = CONFIGS_DIR / path.name
    return str(shipped) if shipped.is_file() else name
