"""`llama-mini torchrun ...`: torchrun, with the exits of a single process.

    llama-mini torchrun --nproc_per_node=8 train.py --preset stories110m --data tinystories
    llama-mini torchrun --nproc_per_node=8 -m llama_mini train ...     (installed, no checkout)

It takes torchrun's own flags and runs torch's own launcher (torch.distributed.run: rendezvous, one process
per GPU, multi-node), so a command line moves between the two by its first word. What differs is the end:

- Ctrl-C (or SIGTERM from a scheduler): torchrun passes the signal on, its processes save a checkpoint and
  the main one prints where (train.py's one line), and then torchrun itself raises its own
  `SignalException` with a 25-line traceback and exits 1. Here the launcher waits for its processes as
  torchrun does, adds nothing, and exits the way a single process does: 128 + the signal (130 for Ctrl-C).
- A mistake in the flags (exit code 2 in every process, which already said what is wrong in one line):
  torchrun adds a `ChildFailedError` report; here the exit code is 2 and nothing more is printed. A crash
  (any other code) keeps the processes' tracebacks and ends with one line naming the process and its code.
"""

from __future__ import annotations

import logging
import signal
import sys

from llama_mini.console import ArgumentParser

__all__ = ["main"]

# Exit codes that mean the processes have already reported in one line what happened: a user's mistake
# (2) and an interruption that saved a checkpoint (130 for SIGINT, 143 for SIGTERM).
REPORTED = {2, 128 + signal.SIGINT, 128 + signal.SIGTERM}


def build_parser(prog: str) -> ArgumentParser:
    """torchrun's parser (its flags, in both spellings), with this project's conventions: a mistake is one
    line and a flag is only ever its whole name."""
    from torch.distributed.run import get_args_parser

    return ArgumentParser(
        prog=prog,
        description="torchrun (torch.distributed.run) with the exits of a single process: Ctrl-C exits 130 "
        "after the processes saved, a flag mistake exits 2, without the launcher's tracebacks",
        parents=[get_args_parser()],
        add_help=False,  # the parent's -h/--help is copied
    )


def launch(args) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    # torchrun logs each signal it passes on ("Sending process N closing signal SIGINT") and each failed
    # process ("failed (exitcode: 2) local_rank: 0 ..."): the processes' own lines and the one line below
    # say it, so the agent is quiet here (each of its modules sets its own logger's level: each is set)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except SignalException as stopped:  # raised after every process has stopped (or been killed)
        return 128 + int(stopped.sigval)
    except KeyboardInterrupt:  # Ctrl-C before the processes started (torch loading, the rendezvous)
        return 128 + signal.SIGINT
    except ChildFailedError as failed:
        rank, failure = min(failed.failures.items())
        if failure.exitcode in REPORTED and (rank == 0 or failure.exitcode != 2):
            return failure.exitcode  # the first process said why (the others keep a mistake to themselves)
        if failure.exitcode == 2:  # a mistake only a later process met: it kept the message to itself
            script = args.training_script
            print(f"error: process {rank} refused to start (exit code 2) where process 0 did not; run "
                  f"{script} alone with the same flags to see why", file=sys.stderr)  # fmt: skip
            return 2
        cause = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        print(f"error: process {rank} of {args.training_script} failed ({cause}): see its output above",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def main(argv: list[str] | None = None, prog: str = "llama-mini torchrun") -> int:
    parser = build_parser(prog)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    return launch(args)


if __name__ == "__main__":
    sys.exit(main())
