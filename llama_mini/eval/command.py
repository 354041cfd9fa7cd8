"""`llama-mini eval CHECKPOINT`: how good a checkpoint is, as bits per byte of a corpus or benchmark scores.

    llama-mini eval out/demo                                     # a run folder: its own validation split
    llama-mini eval out/demo --data tinystories --output bpb.json      # any corpus train.py --data reads
    llama-mini eval out/demo --data notes.jsonl --text-field body --context 256 --stride 64
    llama-mini eval out/demo --tasks hellaswag,arc_easy --num-fewshot 0 --batch-size 16 --output scores.json
    llama-mini eval out/demo --tasks my_task --include-path my_tasks/ --limit 100

CHECKPOINT is anything generate.py takes: a run folder (its best/), a checkpoint folder, a Hugging Face or
Meta Llama folder, with its tokenizer inside (or --tokenizer).

--data SOURCE scores every token of every document in windows that slide by --stride tokens
(llama_mini.eval.corpus) and prints documents, tokens, bytes, nats per token, perplexity and bits per byte.
--split train / val keeps the documents of that split as training made it (--val-fraction, --split-seed);
for a run folder without --data, the run's own corpus and settings are read from its config.toml and its
validation split is scored.

--tasks NAMES runs lm-evaluation-harness's `simple_evaluate` with llama_mini's model class
(llama_mini.eval.harness; install the [eval] extra) and prints the harness's table; --output writes the
harness's results dictionary, and for a run folder a copy goes beside the checkpoint
(RUN/lm_eval_best.json).

Mistakes (an unknown task, a missing include path, a checkpoint without a tokenizer, an empty corpus,
--limit 0) are one line on stderr and exit code 2; the harness's own log messages are kept to errors.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llama_mini.checkpoint import describe_resolution, resolve_checkpoint
from llama_mini.console import ArgumentParser, run_command
from llama_mini.errors import ConfigError
from llama_mini.eval import INSTALL_EVAL
from llama_mini.eval.corpus import bits_per_byte, split_of
from llama_mini.eval.loading import load_model_and_tokenizer
from llama_mini.files import atomic_write
from llama_mini.ops.quantize import QuantizeSettings
from llama_mini.runtime import RuntimeSettings, resolve_device, resolve_dtype
from llama_mini.settings import add_flags, setting
from llama_mini.train.run_folder import RUN_CONFIG

__all__ = ["EvalConfig", "build_parser", "main", "run"]

# The settings of a corpus that train.py declares (TrainConfig): the same flags here.
CORPUS_FLAGS = ("text_field", "data_split", "val_fraction", "split_seed")


@dataclass(frozen=True)
class EvalConfig:
    """The settings of `llama-mini eval` (flags are made from these declarations)."""

    data: str | None = setting(
        None,
        "corpus to score in bits per byte: anything train.py --data takes (a run folder's default: its "
        "own corpus)",
    )
    split: Literal["auto", "all", "train", "val"] = setting(
        "auto",
        "which documents of the corpus: all, or the train / val split as training makes it; auto = val "
        "for a run folder's own corpus, else all",
    )
    context: int | None = setting(None, "tokens a window reads (none = the model's context)")
    stride: int | None = setting(
        None, "new tokens scored by each window after the first (none = context / 2)"
    )
    tasks: str | None = setting(
        None, "lm-evaluation-harness tasks, comma-separated: hellaswag,arc_easy,mmlu,... (needs [eval])"
    )
    num_fewshot: int | None = setting(None, "examples before each question (none = each task's own)")
    limit: float | None = setting(
        None, "at most this many examples of each task (below 1: that fraction of each); for quick checks"
    )
    include_path: str | None = setting(None, "a folder of your own task YAML files, read with the harness's")
    apply_chat_template: bool = setting(False, "render each prompt with the checkpoint's chat template")
    batch_size: int = setting(8, "windows or requests per forward pass")
    tokenizer: str | None = setting(None, "tokenizer.model or tokenizer.json (none = the checkpoint's)")
    output: str | None = setting(None, "write the numbers to this JSON file")

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.limit is not None and not self.limit > 0:
            problems.append(
                f"--limit must be a number of examples > 0 (or a fraction below 1), got {self.limit:g}"
            )
        if self.num_fewshot is not None and self.num_fewshot < 0:
            problems.append(f"--num-fewshot must be 0 or more, got {self.num_fewshot}")
        if self.data is not None and self.tasks is not None:
            problems.append("pass --data (bits per byte of a corpus) or --tasks (benchmarks), one at a time")
        if self.tasks is None:
            for name in ("num_fewshot", "limit", "include_path"):
                if getattr(self, name) is not None:
                    problems.append(f"--{name.replace('_', '-')} is a setting of --tasks: pass --tasks too")
            if self.apply_chat_template:
                problems.append("--apply-chat-template is a setting of --tasks: pass --tasks too")
        if self.tasks is not None and self.split != "auto":
            problems.append("--split chooses documents of --data: drop it with --tasks")
        if problems:
            raise ConfigError(problems[0])


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Bits per byte of a checkpoint on any corpus, or benchmark scores with "
        "lm-evaluation-harness.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a run folder (its best/), a checkpoint folder, or a Hugging Face or Meta Llama folder",
    )
    corpus = parser.add_argument_group("bits per byte of a corpus")
    add_flags(corpus, EvalConfig, only=("data", "split", "context", "stride"))
    from llama_mini.train.config import TrainConfig

    add_flags(corpus, TrainConfig, only=CORPUS_FLAGS)
    harness = parser.add_argument_group("benchmarks (lm-evaluation-harness)")
    add_flags(
        harness, EvalConfig, only=("tasks", "num_fewshot", "limit", "include_path", "apply_chat_template")
    )
    both = parser.add_argument_group("both")
    add_flags(both, EvalConfig, only=("batch_size", "tokenizer", "output"))
    add_flags(both, RuntimeSettings)
    add_flags(both, QuantizeSettings)
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(build_parser(prog), run, argv)


def run(args: argparse.Namespace) -> int:
    given = vars(args)
    config = EvalConfig(**{f.name: given[f.name] for f in dataclasses.fields(EvalConfig) if f.name in given})
    runtime = RuntimeSettings(**{name: given[name] for name in ("device", "dtype") if name in given})
    device = resolve_device(runtime.device)
    dtype = resolve_dtype(runtime.dtype, device)
    quantization = QuantizeSettings(
        **{name: given[name] for name in ("quantize", "group_size") if name in given}
    )
    checkpoint = Path(args.checkpoint)
    resolve_checkpoint(checkpoint)  # a missing or unreadable folder is an error before anything else
    if config.tasks is not None:
        return evaluate_tasks(config, checkpoint, device, dtype, quantization)
    return score_corpus(config, given, checkpoint, device, dtype, quantization)


# ----------------------------------------------------------------------------------------- bits per byte


def corpus_settings(config: EvalConfig, given: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    """data, split and the corpus flags: the flags given, then a run folder's config.toml (its corpus, its
    split's fraction and seed), then train.py's defaults."""
    from llama_mini.train.config import TrainConfig, read_run_config

    defaults = {"data": None, **{name: getattr(TrainConfig(), name) for name in CORPUS_FLAGS}}
    if describe_resolution(checkpoint) is not None and (checkpoint / RUN_CONFIG).is_file():
        train, _ = read_run_config(checkpoint / RUN_CONFIG)
        defaults.update({name: train[name] for name in ("data", *CORPUS_FLAGS) if name in train})
        if config.data is None and isinstance(defaults["data"], list):
            raise ConfigError(
                f"{checkpoint} was trained on a mixture ({', '.join(defaults['data'])}): pass --data SOURCE "
                "to score one of its corpora"
            )
    elif config.data is None:
        raise ConfigError(
            f"{checkpoint} is not a run folder, so it has no corpus of its own: pass --data SOURCE "
            f"(bits per byte) or --tasks NAMES (benchmarks)"
        )
    split = config.split
    if split == "auto":
        split = "val" if config.data is None else "all"  # a run's own corpus: the text it did not train on
    settings = {name: given.get(name, defaults[name]) for name in CORPUS_FLAGS}
    return {"data": config.data or str(defaults["data"]), "split": split, **settings}


def score_corpus(
    config: EvalConfig,
    given: dict[str, Any],
    checkpoint: Path,
    device,
    dtype,
    quantization: QuantizeSettings | None = None,
) -> int:
    from llama_mini.data.sources import open_source

    settings = corpus_settings(config, given, checkpoint)
    source = open_source(
        settings["data"], text_field=settings["text_field"], data_split=settings["data_split"], chat=False
    )
    note = describe_resolution(checkpoint)
    if note:
        print(note, file=sys.stderr)
    model, tokenizer = load_model_and_tokenizer(checkpoint, config.tokenizer, device, dtype, quantization)
    documents = source.documents()
    if settings["split"] != "all":
        documents = split_of(documents, settings["split"], settings["val_fraction"], settings["split_seed"])
    context = model.args.max_seq_len if config.context is None else config.context
    stride = max(1, context // 2) if config.stride is None else config.stride
    score = bits_per_byte(
        model,
        tokenizer,
        documents,
        context=context,
        stride=stride,
        batch_size=config.batch_size,
        device=device,
        progress=True,  # a bar on a terminal, a plain line every half minute in a log
        total_bytes=source.size if settings["split"] == "all" else None,
    )
    which = "" if settings["split"] == "all" else f", {settings['split']} split"
    print(
        f"{resolve_checkpoint(checkpoint)} on {settings['data']}{which} (context {context}, stride {stride})"
    )
    rows = [
        ("documents", f"{score.documents:,}"),
        ("tokens", f"{score.tokens:,}"),
        ("bytes", f"{score.bytes:,}"),
        ("nats per token", f"{score.nats_per_token:.4f}"),
        ("perplexity", f"{score.perplexity:.3f}"),
        ("bits per byte", f"{score.bits_per_byte:.4f}"),
    ]
    for name, value in rows:
        print(f"  {name:<16}{value:>16}")
    if config.output:
        record = {
            **score.as_dict(),
            "checkpoint": str(resolve_checkpoint(checkpoint)),
            "data": settings["data"],
            "split": settings["split"],
            "context": context,
            "stride": stride,
        }
        write_json(config.output, record)
    return 0


# ----------------------------------------------------------------------------------------- benchmarks


@contextlib.contextmanager
def quiet_harness() -> Iterator[None]:
    """Keep the harness's (and its libraries') info and warning messages out of our output: errors only."""
    names = ("lm_eval", "lm-eval", "datasets", "evaluate", "transformers", "absl")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def evaluate_tasks(
    config: EvalConfig, checkpoint: Path, device, dtype, quantization: QuantizeSettings | None = None
) -> int:
    names = [name.strip() for name in (config.tasks or "").split(",") if name.strip()]
    if not names:
        raise ConfigError("--tasks names no task: pass names separated by commas, e.g. hellaswag,arc_easy")
    if config.include_path is not None and not Path(config.include_path).is_dir():
        raise ConfigError(
            f"--include-path {config.include_path} is not a folder: pass the folder that holds your task "
            f"YAML files"
        )
    with quiet_harness():
        try:
            from lm_eval import simple_evaluate
            from lm_eval.tasks import TaskManager
            from lm_eval.utils import make_table

            from llama_mini.eval.harness import LlamaMiniLM
        except ImportError as error:
            raise ConfigError(
                f"--tasks runs lm-evaluation-harness, which could not be imported ({error}): {INSTALL_EVAL}"
            ) from None
        manager = TaskManager(include_path=config.include_path)
        known = set(manager.all_tasks)
        unknown = [name for name in names if name not in known]
        if unknown:
            where = f" or in --include-path {config.include_path}" if config.include_path else ""
            raise ConfigError(
                f"unknown task {unknown[0]!r}: not among lm-evaluation-harness's tasks{where}; `lm-eval ls "
                f"tasks` lists them, and --include-path DIR adds a folder of your own task YAML files"
            )
        note = describe_resolution(checkpoint)
        if note:
            print(note, file=sys.stderr)
        model, tokenizer = load_model_and_tokenizer(checkpoint, config.tokenizer, device, dtype, quantization)
        lm = LlamaMiniLM(model=model, tokenizer=tokenizer, batch_size=config.batch_size)
        limit = config.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        results = simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=config.num_fewshot,
            limit=limit,
            task_manager=manager,
            apply_chat_template=config.apply_chat_template,
            log_samples=False,
            bootstrap_iters=100_000,
        )
    if results is None:  # another rank's share under torch.distributed: nothing to report here
        return 0
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    from lm_eval.utils import handle_non_serializable

    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    resolved = resolve_checkpoint(checkpoint)
    targets = [Path(config.output)] if config.output else []
    if resolved != checkpoint:  # a run folder: a copy beside the checkpoint
        targets.append(checkpoint / f"lm_eval_{resolved.name}.json")
    for target in targets:
        write_text(target, text)
    return 0


def write_json(path: str | Path, record: dict[str, Any]) -> None:
    write_text(path, json.dumps(record, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically and say so on stderr."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--output {path} is a folder: pass a file name such as {path / 'eval.json'}")
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
    print(f"wrote {path}", file=sys.stderr)
