"""One error family, and the one wrapper that turns it into a sentence for the user.

Every error this project raises for something a user gave it (a file, a folder, a
setting) derives from ``SvhnError``; a command decorated with ``command`` prints such an
error as one ``error: ...`` line and exits 2. Anything else keeps its traceback: that is a
bug of ours, not a mistake of the user's.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

from svhn.console import quiet_libraries

__all__ = ["MissingInputError", "OutputExistsError", "SettingError", "SvhnError", "at_least",
           "command"]


class SvhnError(Exception):
    """A user's input that this project refuses, with a message that names it and the fix."""


class SettingError(SvhnError, ValueError):
    """A setting (flag or config value) outside what it may be."""


class MissingInputError(SvhnError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class OutputExistsError(SvhnError, FileExistsError):
    """An output would overwrite something that is already there."""


def at_least(setting: str, value: float | None, low: float, why: str = "") -> None:
    """SettingError naming ``setting`` when ``value`` is below ``low`` (None passes: unset)."""
    if value is not None and value < low:
        raise SettingError(f"{setting} {value!r}: must be at least {low}{why}.")


Main = Callable[[Sequence[str] | None], int | None]


def command(main: Main) -> Callable[[Sequence[str] | None], int]:
    """Wrap a command's ``main(argv)``: libraries' harmless chatter hidden, a ``SvhnError``
    printed as ``error: ...`` with exit code 2, a closed pipe (``| head``) ends quietly."""

    @functools.wraps(main)
    def run(argv: Sequence[str] | None = None) -> int:
        with quiet_libraries():
            try:
                return main(argv) or 0
            except SvhnError as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                return 2
            except BrokenPipeError:
                sys.stderr.close()  # nothing more can be printed; not an error
                return 0

    return run
