"""`llama-mini ablate` / `python -m llama_mini.ablate`: flags made from the settings' declarations."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
from typing import Any

from llama_mini.console import ArgumentParser, run_command
from llama_mini.model.args import ModelArgs
from llama_mini.settings import add_flags
from llama_mini.study.ablate.config import MODEL_DEFAULTS, MODEL_SETTINGS, TRAIN_SETTINGS, AblationConfig
from llama_mini.study.ablate.runner import run_ablation
from llama_mini.train.config import TrainConfig

__all__ = ["main"]


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = AblationConfig()
    parser = ArgumentParser(
        prog=prog or "python -m llama_mini.ablate",
        description="Train the same model with each feed-forward variant over several seeds and compare "
        "validation losses with Shazeer (2020), Table 1.",
    )
    add_flags(parser, AblationConfig)
    training = parser.add_argument_group("training (every run)")
    add_flags(training, TrainConfig, only=TRAIN_SETTINGS, defaults=defaults.train)
    # The model's defaults as declared: ModelArgs resolves n_kv_heads None to n_heads when it is built, and
    # the help shows None, which follows --n-heads.
    declared = {field.name: field.default for field in dataclasses.fields(ModelArgs)}
    model_defaults = types.SimpleNamespace(**{**declared, **MODEL_DEFAULTS})
    add_flags(
        parser.add_argument_group("model (every run)"),
        ModelArgs,
        only=MODEL_SETTINGS,
        defaults=model_defaults,
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(_parser(prog), lambda options: _ablate(vars(options)), argv)


def _ablate(options: dict[str, Any]) -> int:
    started = time.perf_counter()
    try:
        outcome = run_ablation(
            AblationConfig.from_settings(**options), log=lambda line: print(line, flush=True)
        )
    except KeyboardInterrupt:  # between runs (a run itself stops cleanly and returns)
        print("interrupted; run the same command again to go on", file=sys.stderr)
        return 130
    if outcome["table"] is None:
        print("interrupted before any run finished; run the same command again to go on", file=sys.stderr)
        return 130
    print()
    print(outcome["table"].read_text(), end="")
    print(f"\ntable: {outcome['table']}")
    print(f"plot:  {outcome['plot']}" if outcome["plot"] else "plot:  not written (no matplotlib)")
    if outcome["curves"]:
        print(f"training curves: {outcome['curves']}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 130 if outcome["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
