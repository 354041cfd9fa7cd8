"""Evaluation beyond the run's own validation split: held-out corpora (--eval-data) and harness tasks
(--eval-tasks), at every evaluation of a run.

    corpora = read_held_out(config, tokenizer, budget)   # once: the first documents of each source
    score_held_out(model, tokenizer, corpora, ...)         # {"val_bpb/NAME": bits per byte, ...}
    run_harness_tasks(model, tokenizer, tasks, limit)      # {"eval/TASK/METRIC": value, ...} or None

A held-out corpus is scored as `llama-mini eval` scores any corpus (llama_mini.eval.corpus): every token of
its documents once, in windows of the model's context sliding by half of it. Each corpus keeps only its
first documents, up to the tokens one evaluation of the run's own split reads, so an evaluation costs about
as much per corpus as the split's own and never reads a large corpus whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llama_mini.data.mixture import source_name
from llama_mini.data.sources import open_source
from llama_mini.errors import DataError
from llama_mini.eval.corpus import bits_per_byte
from llama_mini.model.transformer import Transformer
from llama_mini.tokenizer import Tokenizer
from llama_mini.train.config import TrainConfig

__all__ = ["HeldOutCorpus", "read_held_out", "run_harness_tasks", "score_held_out"]


@dataclass(frozen=True)
class HeldOutCorpus:
    name: str  # what its metric is called: val_bpb/NAME
    documents: tuple[str, ...]


def corpus_name(spec: str, taken: set[str]) -> str:
    """A short name for a --data source: a file's or folder's stem, a dataset's name; unique in `taken`."""
    name = source_name(spec)
    unique, count = name, 2
    while unique in taken:
        unique, count = f"{name}_{count}", count + 1
    return unique


def read_held_out(config: TrainConfig, tokenizer: Tokenizer, budget_tokens: int) -> list[HeldOutCorpus]:
    """The documents each --eval-data source contributes: its first ones, up to `budget_tokens` tokens."""
    corpora: list[HeldOutCorpus] = []
    # a mixture's sources report val_bpb/NAME too: a held-out corpus takes another name
    mixture = {source.name for source in config.sources} if len(config.sources) > 1 else set()
    for spec in config.eval_data:
        source = open_source(spec, text_field=config.text_field, data_split=config.data_split, chat=False)
        documents, tokens = [], 0
        for text in source.documents():
            if not text:
                continue
            documents.append(text)
            tokens += len(tokenizer.encode(text)) + 2  # with bos and eos, as scored
            if tokens >= budget_tokens:
                break
        if not documents:
            raise DataError(f"--eval-data {spec} holds no text: pass a corpus with at least one document")
        name = corpus_name(spec, mixture | {corpus.name for corpus in corpora})
        corpora.append(HeldOutCorpus(name, tuple(documents)))
    return corpora


def score_held_out(
    model: Transformer,
    tokenizer: Tokenizer,
    corpora: list[HeldOutCorpus],
    batch_size: int,
    device: torch.device,
) -> dict[str, float]:
    """Bits per byte of `model` on each corpus, as {"val_bpb/NAME": value}."""
    context = model.args.max_seq_len
    return {
        f"val_bpb/{corpus.name}": bits_per_byte(
            model, tokenizer, corpus.documents, context, max(1, context // 2), batch_size, device
        ).bits_per_byte
        for corpus in corpora
    }


def run_harness_tasks(
    model: Transformer, tokenizer: Tokenizer, tasks: str, limit: int | None, batch_size: int
) -> dict[str, float] | None:
    """lm-evaluation-harness's `simple_evaluate` of `tasks` on the model as it is, as
    {"eval/TASK/METRIC": value} (numbers only); None when lm-eval is not installed."""
    try:
        from lm_eval import simple_evaluate

        from llama_mini.eval.harness import LlamaMiniLM
    except ImportError:
        return None
    names = [name.strip() for name in tasks.split(",") if name.strip()]
    lm = LlamaMiniLM(model=model, tokenizer=tokenizer, batch_size=batch_size)
    results: dict[str, Any] = simple_evaluate(
        model=lm, tasks=names, limit=limit, log_samples=False, bootstrap_iters=0, verbosity="ERROR"
    )
    return {
        f"eval/{task}/{metric.removesuffix(',none')}": float(value)
        for task, metrics in results["results"].items()
        for metric, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in metric
    }
