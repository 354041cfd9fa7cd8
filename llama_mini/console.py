"""What every llama_mini command line shares: mistakes are reported to people as one line, not a traceback.

A usage error (a wrong flag or value) prints `error: ... (see --help)` and exits with code 2, as argparse
does but without the whole usage text; a `LlamaMiniError` raised while working (a missing file, a bad
setting) prints `error: <message>` and returns 2, and so does a write the file system refuses (no space,
no permission: `error: cannot write: <cause>: <path>; <fix>`); Ctrl-C returns 130. Bugs still raise,
with their traceback. Every command's `main(argv)` is `run_command(its parser, its action, argv)`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import typing
from collections.abc import Callable

from llama_mini.errors import LlamaMiniError
from llama_mini.files import file_system_failure

__all__ = ["ArgumentParser", "report_errors", "run_command"]

# seconds a later process of a torchrun launch waits before it exits on a mistake (see report_errors)
LAUNCHED_WORKER_GRACE_S = 3.0


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and exit code 2), not the whole usage, and a
    flag is only ever its whole name.

    argparse accepts any unambiguous prefix of a flag by default (`--log` for `--log-interval`), so adding a
    flag could silently change what an old command line means (`--log tensorboard` would stop meaning
    `--log-interval tensorboard` and fail, or worse, start meaning something else). allow_abbrev=False
    refuses prefixes: a flag means one thing, now and later.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def report_errors(command: Callable[[], int | None]) -> int:
    """Run `command`; its exit code, or 2 after printing a LlamaMiniError as one line on stderr, or 130
    after Ctrl-C."""
    try:
        return command() or 0
    except LlamaMiniError as error:
        if not a_launched_worker_other_than_the_first():
            print(f"error: {error}", file=sys.stderr)
        else:  # the launcher stops every process when one exits: let the first say it before that
            time.sleep(LAUNCHED_WORKER_GRACE_S)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except OSError as error:
        refused = file_system_failure(error)
        if refused is None:
            raise  # not the file system's refusal: a bug, with its traceback
        if not a_launched_worker_other_than_the_first():
            print(f"error: cannot write: {refused}", file=sys.stderr)
        return 2


def a_launched_worker_other_than_the_first() -> bool:
    """True in the processes of a torchrun launch other than the first (global rank 0). They all run the same
    command on the same files, so a mistake is the same mistake in each: only the first says it, once, and
    the others exit with the same code (2) in silence."""
    return "TORCHELASTIC_RUN_ID" in os.environ and os.environ.get("RANK", "0") != "0"


def run_command(
    parser: argparse.ArgumentParser,
    action: Callable[[argparse.Namespace], int | None],
    argv: list[str] | None,
) -> int:
    """Parse `argv` with `parser` and run `action(args)`: the exit code, with the conventions above.

    --help returns 0 and a usage error 2 (argparse has already printed them), instead of exiting, so that
    commands compose: `llama-mini`'s dispatcher and the tests call `main(argv)` and get a code back.
    """
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    return report_errors(lambda: action(args))
