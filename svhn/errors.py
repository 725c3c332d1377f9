"""One error family, and the one wrapper that turns it into a sentence for the user.

Every error this project raises for something a user gave it (a file, a folder, a
setting) derives from ``SvhnError``; a command decorated with ``command`` prints such an
error as one ``error: ...`` line and exits 2. Anything else keeps its traceback: that is a
bug of ours, not a mistake of the user's.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

from svhn.console import quiet_libraries

__all__ = ["MissingInputError", "OutputExistsError", "SettingError", "StoppedBySignal",
           "SvhnError", "at_least", "command", "stop_on_sigterm"]


class SvhnError(Exception):
    """A user's input that this project refuses, with a message that names it and the fix."""


class SettingError(SvhnError, ValueError):
    """A setting (flag or config value) outside what it may be."""


class MissingInputError(SvhnError, FileNotFoundError):
    """A file or folder the command needs is not there."""


class OutputExistsError(SvhnError, FileExistsError):
    """An output would overwrite something that is already there."""


class StoppedBySignal(SystemExit):
    """A long command told to stop (SIGTERM from a scheduler, ``timeout`` or a notebook's stop
    button) that stopped before writing its result; exits 128 + the signal's number, as a
    process killed by it would, so a scheduler sees it did not finish."""

    def __init__(self, signum: int, what: str) -> None:
        super().__init__(128 + signum)
        self.signum, self.what = signum, what


@contextlib.contextmanager
def stop_on_sigterm(what: str) -> Iterator[None]:
    """While the block runs, SIGTERM raises ``StoppedBySignal(what)`` wherever the command
    is (reading a checkpoint, building a cache, predicting), so its ``finally`` clauses
    remove what it half made; Lightning, which notes SIGTERM inside its loops, keeps this
    handler beside its own. Outside the main thread, or without POSIX signals: nothing."""
    if threading.current_thread() is not threading.main_thread() \
            or not hasattr(signal, "SIGTERM"):
        yield
        return

    def stop(signum, frame) -> None:
        raise StoppedBySignal(signum, what)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


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
            except StoppedBySignal as stop:
                print(f"stopped by signal {stop.signum}: {stop.what}", file=sys.stderr,
                      flush=True)
                return int(stop.code)
            except BrokenPipeError:
                sys.stderr.close()  # nothing more can be printed; not an error
                return 0

    return run
