"""What every llama_mini command line shares: mistakes are reported to people as one line, not a traceback;
progress is a bar on a terminal and plain lines anywhere else.

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
from typing import Any

from llama_mini.errors import LlamaMiniError
from llama_mini.files import file_system_failure

__all__ = [
    "PLAIN_PROGRESS_INTERVAL_S",
    "ArgumentParser",
    "PlainProgress",
    "duration",
    "progress_bar",
    "report_errors",
    "run_command",
    "stderr_is_terminal",
]

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


# ---------------------------------------------------------------------------------------------------------
# Progress: a bar for people at a terminal, plain lines for files, SLURM and CI
# ---------------------------------------------------------------------------------------------------------

PLAIN_PROGRESS_INTERVAL_S = 30.0  # seconds between the plain lines of a long piece of work


def stderr_is_terminal() -> bool:
    """Whether standard error is a terminal, where a bar redrawn in place reads well. Anywhere else (a file,
    a pipe, SLURM's log, CI) each redraw would stay in the log as a fragment ending in a carriage return."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def duration(seconds: float) -> str:
    """Seconds as H:MM:SS (`0:04:05`; days count in hours)."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _size(count: float, unit: str) -> str:
    if unit != "B":
        return f"{count:,.0f} {unit}"
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if count >= scale:
            return f"{count / scale:.1f} {name}"
    return f"{count:.0f} B"


class PlainProgress:
    """The part of tqdm's interface that llama_mini's long commands use (`update`, `n`, `close`, `leave`),
    printing one plain line to stderr at most every `interval` seconds: how far, how fast, the time spent and
    the time left when the total is known; and when the work took long enough to print any, a last line
    when it ends."""

    def __init__(self, total: float | None, description: str, unit: str = "B", interval: float | None = None):
        self.total, self.description, self.unit = total, description, unit
        self.interval = PLAIN_PROGRESS_INTERVAL_S if interval is None else interval
        self.n, self.leave, self.printed = 0, True, False
        self.started = self.last_line = time.perf_counter()

    def update(self, count: float = 1) -> None:
        self.n += count
        now = time.perf_counter()
        if now - self.last_line >= self.interval:
            self.last_line = now
            self._print(now)

    def _print(self, now: float, finished: bool = False) -> None:
        elapsed = now - self.started
        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = _size(self.n, self.unit)
        if self.total and not finished:
            done += f" of {_size(self.total, self.unit)} ({self.n / self.total:.0%})"
        parts = [f"{self.description}: {done}", f"{_size(rate, self.unit)}/s", f"elapsed {duration(elapsed)}"]
        if self.total and not finished and rate > 0:
            parts.append(f"remaining {duration(max(0.0, self.total - self.n) / rate)}")
        print(" | ".join(parts), file=sys.stderr, flush=True)
        self.printed = True

    def close(self) -> None:
        if self.printed and self.leave:
            self._print(time.perf_counter(), finished=True)
        self.printed = False


def progress_bar(total: float | None, description: str, unit: str = "B", enabled: bool = True) -> Any:
    """A tqdm bar on a terminal, `PlainProgress` lines anywhere else, or (not `enabled`) a bar that shows
    nothing. Bytes (unit "B") are shown in KiB, MiB and GiB."""
    from tqdm.auto import tqdm

    if enabled and not stderr_is_terminal():
        return PlainProgress(total, description, unit)
    scaled = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    return tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, disable=not enabled, **scaled)
