"""One way to report a user's mistake on the command line: `PROG: error: MESSAGE`, one line, exit status 2.

Every entry point (`app.py`, each `training/` script) parses its flags with `ArgumentParser` and wraps its
`main` in `command`: a bad flag, or a file that is missing or not what it should be (any `UsageError`,
such as a malformed manifest, data file or feature cache), ends the run with one line that names the flag
or file, the way argparse itself reports a bad flag, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar


class UsageError(ValueError):
    """A mistake in what a command was given (a flag's value, a file); the message names the flag or file."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors raised as `UsageError` so that `command` reports them like every other."""

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


R = TypeVar("R")


def command(main: Callable[[list[str] | None], R]) -> Callable[[list[str] | None], R]:
    """Wrap an entry point's `main(argv)`: a `UsageError` becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> R:
        try:
            return main(argv)
        except UsageError as error:
            message = " ".join(str(error).split())  # one line, whatever the message held
            print(f"{program_name(main)}: error: {message}", file=sys.stderr)
            raise SystemExit(2) from None

    return run


def program_name(function: Callable) -> str:
    """How the entry point is run: `python -m training.stage1_align`, or `app.py` for a script."""
    spec = getattr(sys.modules.get(function.__module__), "__spec__", None)
    if spec is None or spec.name == "__main__":
        return sys.argv[0].rsplit("/", 1)[-1] or "python"
    return f"python -m {spec.name}"
