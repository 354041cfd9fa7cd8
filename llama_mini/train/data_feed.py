"""What a run reads: its tokenizer, its prepared token shards, and the batches of every step.

The main process trains the tokenizer (unless one is given) on a bounded sample of the training split and
tokenizes the corpus into shards with --data-workers processes; the others wait at a barrier and then
read them. Prepared data are reused without reading the corpus again when nothing they were made from
changed (llama_mini.data.prepare). Batches are a pure function of (seed, step, micro-step): a resumed run
and a run over N processes see exactly the data of one uninterrupted process (llama_mini.data.get_batch).

Chat fine-tuning (--chat, or a .jsonl whose records hold "messages"): the conversations are rendered with
the run's tokenizer's chat template. A tokenizer without one gets DEFAULT_CHAT_TEMPLATE, written into the
run folder's tokenizer_config.json before the data are prepared, so every checkpoint's tokenizer carries
the template the model was fine-tuned on and `generate.py --chat` prompts it the same way. The batches
then hold IGNORE_INDEX targets off the assistant tokens, which the loss skips; no other part of training
changes. How many conversations the context truncates is reported once per split, at its first batch.

A mixture (--data repeated, SOURCE:WEIGHT; llama_mini.data.mixture) prepares each source as one corpus is
prepared, into a folder of its own named for it (OUT/data/NAME, or NAME inside the shared --data-dir's
tokenizer folder); a tokenizer trained for the run learns from every source, each giving its weight's
share of --tokenizer-sample-mb. One corpus is prepared where it always was.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from llama_mini.data import TokenSplit, get_batch, open_source, prepare_data, tokenizer_sample
from llama_mini.data.mixture import MixedSplits, get_mixture_batch
from llama_mini.data.preferences import PreferenceSplit, prepare_preferences
from llama_mini.files import waiting_lock
from llama_mini.runtime import Distributed
from llama_mini.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer, find_tokenizer_file, train_tokenizer
from llama_mini.train.config import TrainConfig
from llama_mini.train.run_folder import list_step_checkpoints

__all__ = [
    "RUN_TOKENIZER",
    "batches",
    "is_chat_run",
    "prepare_shards",
    "prepare_tokenizer",
    "shared_data_folder",
    "shared_preference_folder",
]

RUN_TOKENIZER = "tokenizer.model"  # a tokenizer trained for the run, in the run folder


def _log(line: str) -> None:
    """Preparation's progress lines go to stderr, beside the progress bars, leaving stdout to results."""
    print(line, file=sys.stderr, flush=True)


def is_chat_run(config: TrainConfig) -> bool:
    """Whether the run fine-tunes on conversations: --chat, or (by default) a .jsonl corpus whose first
    record has "messages" (llama_mini.data.sources). Looks at one line of the corpus at most."""
    if config.chat is not None:
        return config.chat
    if len(config.sources) > 1:
        return False
    return open_source(config.sources[0].spec, config.text_field, config.data_split).chat


def prepare_tokenizer(config: TrainConfig, out: Path, dist: Distributed, resuming: bool) -> Tokenizer:
    """The run's tokenizer, whose files the run folder keeps: its own when resuming, --tokenizer if given
    (a tokenizer.model, a tokenizer.json or a folder with one), else one trained on the first
    --tokenizer-sample-mb of the corpus's training split. For chat data, a tokenizer without a chat
    template gets DEFAULT_CHAT_TEMPLATE in the run folder's files (see the module docstring)."""
    if resuming and find_tokenizer_file(out) is not None:
        return Tokenizer(out)
    # Preference pairs may be conversations: a tokenizer without a template gets the default, as for chat.
    chat = (config.dpo or is_chat_run(config)) if dist.is_main else False
    if config.tokenizer is not None:
        source = Tokenizer(config.tokenizer)  # validates the file before anything is written
        if dist.is_main:
            if chat and source.chat_template is None:
                source.chat_template = DEFAULT_CHAT_TEMPLATE
            # Converts to tokenizer.json first: a tokenizer that checkpoints could not carry exactly is
            # refused now, not at the first checkpoint.
            source.save_pretrained(out)
        dist.barrier()
        return Tokenizer(out)
    if dist.is_main:
        sample = []
        for source in config.sources:  # one corpus: all of the sample; a mixture: each its weight's share
            sample += tokenizer_sample(
                source.spec,
                round(config.tokenizer_sample_mb * 1e6 * source.weight),
                config.val_fraction,
                config.split_seed,
                text_field=config.text_field,
                data_split=config.data_split,
                progress=True,
                log=_log,
                chat=config.chat if len(config.sources) == 1 else False,
            )
        trained = train_tokenizer(sample, out / RUN_TOKENIZER, config.vocab_size)
        if chat:
            # tokenizer_config.json beside the tokenizer.model, with the template (and tokenizer.json).
            trained.chat_template = DEFAULT_CHAT_TEMPLATE
            trained.save_pretrained(out)
    dist.barrier()
    return Tokenizer(out / RUN_TOKENIZER)


def prepare_shards(
    config: TrainConfig, out: Path, tokenizer: Tokenizer, dist: Distributed
) -> tuple[TokenSplit, TokenSplit] | tuple[MixedSplits, MixedSplits]:
    """The training and validation splits, tokenized by the main process unless already prepared with the
    same corpus, split and tokenizer.

    A run folder holding checkpoints is being resumed (the Trainer refuses to start a new run over them),
    and a resumed run keeps its data even if the corpus has changed since: its batches stay exactly those
    of an unbroken run."""
    data_dir = shared_data_folder(Path(config.data_dir), tokenizer) if config.data_dir else out / "data"
    if config.dpo and config.data_dir:
        data_dir = shared_preference_folder(data_dir, config)
    # A shared --data-dir is prepared by one run at a time: another one preparing it is waited for.
    lock = data_dir.parent / f".{data_dir.name}.lock"
    waiting = functools.partial(_log, f"data: waiting for another run that is preparing {data_dir}")
    with waiting_lock(lock, waiting) if dist.is_main else contextlib.nullcontext():
        if dist.is_main:
            if config.dpo:
                resuming = bool(list_step_checkpoints(out))
                prepare_preferences(config.data, data_dir, tokenizer, config.val_fraction, config.split_seed,
                                    resuming=resuming, data_split=config.data_split, log=_log)  # fmt: skip
            else:
                _prepare(config, data_dir, tokenizer, out)
    dist.barrier()
    if config.dpo:
        return PreferenceSplit(data_dir, "train"), PreferenceSplit(data_dir, "val")
    if len(config.sources) == 1:
        return TokenSplit(data_dir, "train"), TokenSplit(data_dir, "val")
    folders = [data_dir / source.name for source in config.sources]
    return tuple(  # type: ignore[return-value]
        MixedSplits(config.sources, [TokenSplit(folder, split) for folder in folders])
        for split in ("train", "val")
    )


def _prepare(config: TrainConfig, data_dir: Path, tokenizer: Tokenizer, out: Path) -> None:
    if len(config.sources) == 1:
        _prepare_source(config, config.sources[0].spec, data_dir, tokenizer, out, config.chat)
        return
    for source in config.sources:
        _prepare_source(config, source.spec, data_dir / source.name, tokenizer, out, False)


def _prepare_source(
    config: TrainConfig, spec: str, data_dir: Path, tokenizer: Tokenizer, out: Path, chat: bool | None
) -> None:
    prepare_data(
        spec,
        data_dir,
        tokenizer,
        config.val_fraction,
        config.split_seed,
        text_field=config.text_field,
        data_split=config.data_split,
        workers=config.data_workers,
        resuming=bool(list_step_checkpoints(out)),
        progress=True,
        log=_log,
        chat=chat,
        verify=config.verify_data,
    )


def shared_data_folder(data_dir: Path, tokenizer: Tokenizer) -> Path:
    """Where a run's shards go in a --data-dir that runs share: one subfolder per tokenizer
    (`tokenizer-` and the start of its sha256), so that a run with another tokenizer never re-tokenizes
    over the shards another run is reading. (OUT/data belongs to one run, which has one tokenizer.)"""
    return data_dir / f"tokenizer-{tokenizer.sha256[:12]}"


def shared_preference_folder(tokenizer_folder: Path, config: TrainConfig) -> Path:
    """Where --dpo's prepared pairs go in a shared --data-dir: within the tokenizer's folder, one
    subfolder per preference set and split settings, so runs on different preference files never
    prepare over each other's pairs, and a resumed run finds its own."""
    spec = config.data if config.data.startswith("hf:") else str(Path(config.data).expanduser().resolve())
    key = json.dumps([spec, config.data_split, config.val_fraction, config.split_seed])
    return tokenizer_folder / f"preferences-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def batches(
    data: TokenSplit | MixedSplits,
    step: int,
    count: int,
    stream: int,
    config: TrainConfig,
    seq_len: int,
    dist: Distributed,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`count` micro-batches (x, y) of this process's rows for `step`; `stream` separates training (0) from
    validation (1) draws, so the two never reuse each other's random windows. For chat data, the first
    batches of each split report (main process) how many conversations the context truncates.

    A mixture's training batches number their rows over the run: micro-batch `step * count + micro_step`
    holds rows from (step * count + micro_step) * batch_size on (llama_mini.data.mixture)."""
    if data.chat is not None and dist.is_main:
        data.chat.report(seq_len, _log)
    per_process = config.batch_size // dist.world_size
    if isinstance(data, MixedSplits):
        for micro_step in range(count):
            yield get_mixture_batch(
                data.splits,
                data.sources,
                per_process,
                seq_len,
                step=step * count + micro_step,
                seed=config.seed,
                rank=dist.rank,
                world_size=dist.world_size,
                device=device,
            )
        return
    for micro_step in range(count):
        index = (step * count + micro_step) * 2 + stream  # a distinct, reproducible draw for each
        yield get_batch(
            data,
            per_process,
            seq_len,
            step=index,
            seed=config.seed,
            rank=dist.rank,
            world_size=dist.world_size,
            device=device,
        )
