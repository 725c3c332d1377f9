"""The floors (docs/architecture.md): imports run down, never up or across.

The contracts live in pyproject.toml ([tool.importlinter]); `lint-imports` checks them in CI.
These tests run the same check, and make sure no module of the package escapes it.
"""

from __future__ import annotations

import subprocess
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from helpers.repository import REPO


def _floors() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    floors = next(c for c in config["contracts"] if c["type"] == "layers"
                  and not c.get("containers"))
    return [name.strip() for layer in floors["layers"]
            for name in layer.replace("|", ":").split(":")]


def test_the_import_contracts_hold():
    # In a process of its own: import-linter reconfigures logging in the process it runs in.
    check = ("import sys; from importlinter.cli import lint_imports; "
             f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, "
             "no_cache=True))")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_module_of_the_package_stands_on_a_floor():
    # A new top-level module or package outside the layers would be checked by nothing.
    names = {path.stem for path in (REPO / "svhn").glob("*.py") if path.stem != "__init__"}
    names |= {path.parent.name for path in (REPO / "svhn").glob("*/__init__.py")}
    on_floors = {name.removeprefix("svhn.") for name in _floors()}
    assert names - on_floors == set()
