"""`llama-mini train` (and `python train.py`): train a model on a corpus; the default is Shakespeare.

    llama-mini train                                   # small model, default corpus, minutes on a CPU
    llama-mini train --data my_texts/ --out runs/mine  # your own .txt folder, .txt file or .jsonl
    llama-mini train --preset stories15m --max-steps 5000 --batch-size 64
    llama-mini train --config runs/mine/config.toml --out runs/again   # the same settings again
    llama-mini train --out runs/mine --resume          # continue exactly where a run stopped
    torchrun --nproc_per_node=8 train.py --preset stories110m ...   # data-parallel on 8 GPUs

The flags are made from the settings' declarations (TrainConfig, ModelArgs); this module only parses them,
runs the Trainer and reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from pathlib import Path

from llama_mini.console import ArgumentParser, run_command
from llama_mini.model.args import ModelArgs
from llama_mini.settings import add_flags
from llama_mini.train.build import resolve_settings
from llama_mini.train.config import TrainConfig, read_run_config
from llama_mini.train.run_folder import LOCK_FILE, RunFolder
from llama_mini.train.trainer import Trainer

__all__ = ["build_parser", "main", "train"]


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Train a LLaMA-style model on a corpus (default: the complete works of Shakespeare).",
        epilog="Model flags apply on top of --preset; --config FILE applies on top of both, and the flags "
        "given on top of it. On --resume the checkpoint's settings are the base instead, and flags given "
        "explicitly (e.g. a larger --max-steps) change them.",
    )
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file of settings in [train] and [model] tables, such as a run's OUT/config.toml; "
        "flags given override it",
    )
    add_flags(parser.add_argument_group("training"), TrainConfig)
    add_flags(parser.add_argument_group("model"), ModelArgs)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(build_parser(prog), lambda args: train(vars(args)), argv)


def train(given: dict) -> int:
    """Run the training that the parsed flags `given` ask for; the exit code."""
    given = dict(given)
    resume, config_file = given.pop("resume", False), given.pop("config", None)
    file_train, file_model = read_run_config(config_file) if config_file else ({}, {})
    # The model's command-line settings; vocab_size is not one (--vocab-size is the tokenizer's)
    model_fields = {field.name for field in dataclasses.fields(ModelArgs) if field.metadata.get("flag", True)}
    model_overrides = {**file_model, **{name: value for name, value in given.items() if name in model_fields}}
    train_settings = {
        **file_train,
        **{name: value for name, value in given.items() if name not in model_fields},
    }
    # On --resume the checkpoint's settings are the base, so only --out is needed to find it; the settings
    # given are applied on top of the saved ones (and validated together) by the Trainer.
    config = TrainConfig(out=train_settings.get("out", "out")) if resume else TrainConfig(**train_settings)
    if resume and finished(config, model_overrides, train_settings):
        return 0
    out, existed = Path(config.out), Path(config.out).exists()
    try:
        trainer = Trainer(config, model_overrides, resume=resume, resume_overrides=train_settings)
    except BaseException as error:  # refused or stopped before the first step: leave no empty run folder
        if not existed and os.environ.get("RANK", "0") == "0":  # under torchrun the main process tidies up
            remove_empty_folders(out)
        if not isinstance(error, KeyboardInterrupt):
            raise
        print(
            "interrupted before the first step (while preparing the tokenizer and data): nothing to resume; "
            "run the same command again to start",
            file=sys.stderr,
        )
        return 130
    summary = trainer.run()
    if not trainer.dist.is_main:
        return 0
    if summary.interrupted:
        print(
            f"interrupted at step {summary.step}: saved {summary.checkpoint}; "
            f"continue with: python train.py --out {trainer.config.out} --resume",
            file=sys.stderr,
        )
        return 128 + (trainer.stop_signal or signal.SIGINT)  # the shell's convention: 130 for Ctrl-C
    if summary.sample is not None:
        print(f"\n--- sample ---\n{summary.sample}\n--------------")
    val = f"val loss {summary.val_loss:.4f}, " if summary.val_loss is not None else ""
    if summary.val_bpb is not None:  # (a --dpo run's val loss is its preference loss: no bits per byte)
        val += f"{summary.val_bpb:.3f} bits/byte, "
    print(
        f"done: {summary.step} steps, {summary.tokens:,} tokens in {summary.seconds:.0f} s "
        f"({summary.tokens_per_second:,.0f} tokens/s); {val}best checkpoint {trainer.out / 'best'}"
    )
    return 0


def finished(config: TrainConfig, model_overrides: dict, train_settings: dict) -> bool:
    """Whether the run that --resume would continue has already trained all its steps (then say so)."""
    settings = resolve_settings(config, model_overrides, RunFolder(config.out), True, train_settings)
    step = RunFolder.read_trainer_state(settings.resume_from)["step"]
    if step < settings.config.max_steps:
        return False
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one process says it
        print(
            f"{config.out} is finished: it trained all {step} of its {settings.config.max_steps} steps; to "
            f"train further, resume with a larger --max-steps (python train.py --out {config.out} --resume "
            f"--max-steps {2 * settings.config.max_steps})",
            file=sys.stderr,
        )
    return True


def remove_empty_folders(folder: Path) -> None:
    """Remove `folder` and the folders inside it if they hold no file but this run's lock (what a run
    refused or interrupted before its first step left in a folder it created). What is gone already, or no
    longer empty, is left as it is."""
    try:
        (folder / LOCK_FILE).unlink(missing_ok=True)
        for inner in sorted(folder.rglob("*"), key=lambda path: len(path.parts), reverse=True):
            if inner.is_dir() and not any(inner.iterdir()):
                inner.rmdir()
        if not any(folder.iterdir()):
            folder.rmdir()
    except OSError:  # removed by another process first, or no longer empty: tidying up is best effort
        return
