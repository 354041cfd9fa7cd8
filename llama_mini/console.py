"""What every llama_mini command line shares: mistakes are reported to people as one line, not a traceback.

A usage error (a wrong flag or value) prints `error: ... (see --help)` and exits with code 2, as argparse
does but without the whole usage text; a `LlamaMiniError` raised while working (a missing file, a bad
setting) prints `error: <message>` and returns 2. Bugs still raise, with their traceback.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable

from llama_mini.errors import LlamaMiniError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and exit code 2), not the whole usage."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def report_errors(command: Callable[[], int | None]) -> int:
    """Run `command`; its exit code, or 2 after printing a LlamaMiniError as one line on stderr."""
    try:
        return command() or 0
    except LlamaMiniError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
