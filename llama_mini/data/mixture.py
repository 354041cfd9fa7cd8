"""Weighted mixtures of corpora: `--data fineweb/:0.7 --data code.jsonl:0.2 --data shakespeare:0.1`.

    sources = parse_mixture(["fineweb/:0.7", "code.jsonl:0.2", "shakespeare:0.1"])  # names, specs, weights
    x, y = get_mixture_batch(splits, weights, B, T, step, seed)     # rows drawn in proportion to weights

Each source is prepared on its own, as a single --data corpus is (its own shards, its own validation
split). A training batch's rows are numbered one after another over the whole run (row n = step * rows per
step + i), and row n comes from the source whose share of [0, 1) holds

    u_n = frac(u_0 + n * (sqrt(5) - 1) / 2)          u_0 from a hash of the seed

the golden-ratio Weyl sequence: its points fill [0, 1) so evenly that after N rows every source has
received within a few rows of N * weight (the discrepancy of this sequence grows like log N; Kuipers and
Niederreiter, "Uniform Distribution of Sequences", 1974, chapter 1, theorem 3.4), where drawing each row at
random would be off by about sqrt(N * weight). The source of every row is therefore a pure function of
(seed, row), and the windows a source gives are get_batch's random windows of that source, a pure function
of (seed, name, step): a resumed run, or one over N processes, sees exactly the rows of one unbroken
process, with no position to save.

A source's "epoch" is how many times over its training split the run has drawn: rows * max_seq_len tokens
over the split's tokens (the windows are random, so a source never runs out; it is drawn from again).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llama_mini.data.batches import get_batch
from llama_mini.data.shards import TokenSplit
from llama_mini.errors import ConfigError

__all__ = [
    "MixedSplits",
    "MixtureSource",
    "get_mixture_batch",
    "parse_mixture",
    "rows_per_source",
    "source_name",
    "source_of_rows",
]

GOLDEN = (math.sqrt(5) - 1) / 2  # the irrational step of the Weyl sequence, the one that spreads best


@dataclass(frozen=True)
class MixtureSource:
    name: str  # a short label, unique in the mixture: its metric is val_bpb/NAME
    spec: str  # the corpus, as --data names it (llama_mini.data.sources)
    weight: float  # normalised: the weights of a mixture add up to 1


@dataclass(frozen=True)
class MixedSplits:
    """One split (train or val) of every source of a mixture, in the mixture's order."""

    sources: list[MixtureSource]
    splits: list[TokenSplit]
    chat = None  # mixtures are of text (TrainConfig refuses --chat with several sources)

    @property
    def weights(self) -> list[float]:
        return [source.weight for source in self.sources]


def source_name(spec: str) -> str:
    """A short name for a corpus: a file's or folder's stem, a Hugging Face dataset's name."""
    base = spec.split(":", 1)[1] if spec.startswith("hf:") else Path(spec.rstrip("/")).stem or spec
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "corpus"


def _split_weight(entry: str) -> tuple[str, float | None]:
    """SOURCE[:WEIGHT] -> (SOURCE, WEIGHT or None). A tail that is not a number belongs to the source
    (hf:NAME:CONFIG), unless the part before it is a file or folder that exists, when it is a bad weight."""
    head, colon, tail = entry.rpartition(":")
    if not colon or not head:
        return entry, None
    try:
        weight = float(tail)
    except ValueError:
        if Path(head).exists() and not Path(entry).exists():
            raise ConfigError(
                f"--data {entry}: the weight {tail!r} is not a number; write SOURCE:WEIGHT, e.g. {head}:0.5"
            ) from None
        return entry, None
    if not (math.isfinite(weight) and weight > 0):
        raise ConfigError(f"--data {entry}: a weight must be a positive number, got {tail}")
    return head, weight


def parse_mixture(entries: list[str] | str) -> list[MixtureSource]:
    """The sources of --data (one or more SOURCE[:WEIGHT]), their weights normalised to add up to 1; a
    source given without a weight weighs 1. Two sources with one name are refused."""
    entries = [entries] if isinstance(entries, str) else list(entries)
    if not entries:
        raise ConfigError("--data needs at least one corpus")
    parsed = [_split_weight(entry) for entry in entries]
    total = sum(1.0 if weight is None else weight for _, weight in parsed)
    sources, seen = [], {}
    for (spec, weight), entry in zip(parsed, entries, strict=True):
        name = source_name(spec)
        if name in seen:
            raise ConfigError(
                f"--data {seen[name]} and --data {entry} are both named {name!r} (their metric is "
                f"val_bpb/{name}): give one of them a copy or link under another name"
            )
        seen[name] = entry
        sources.append(MixtureSource(name, spec, (1.0 if weight is None else weight) / total))
    return sources


def _hash(*parts: object) -> int:
    digest = hashlib.sha256(" ".join(map(str, ("llama_mini mixture", *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def source_of_rows(weights: list[float], seed: int, first_row: int, count: int) -> np.ndarray:
    """The source (an index into `weights`) of rows first_row .. first_row + count - 1 of a run."""
    start = _hash(seed, "start") / 2**63  # u_0 in [0, 1)
    rows = np.arange(first_row, first_row + count, dtype=np.float64)  # exact below 2**53 rows
    points = np.mod(start + rows * GOLDEN, 1.0)
    bounds = np.cumsum(weights)[:-1]  # the last source's share runs to 1, whatever the rounding
    return np.searchsorted(bounds, points, side="right")


def rows_per_source(weights: list[float], seed: int, rows: int, chunk: int = 1 << 22) -> np.ndarray:
    """How many of a run's first `rows` rows each source gave (counted in chunks of `chunk` rows)."""
    counts = np.zeros(len(weights), dtype=np.int64)
    for first in range(0, rows, chunk):
        picks = source_of_rows(weights, seed, first, min(chunk, rows - first))
        counts += np.bincount(picks, minlength=len(weights))
    return counts


def get_mixture_batch(
    splits: list[TokenSplit],
    sources: list[MixtureSource],
    batch_size: int,
    seq_len: int,
    step: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y (batch_size, seq_len) of this process's rows of batch `step` of a mixture: rows step * R ..
    step * R + R - 1 of the run (R = batch_size * world_size, every process's rows), each from the source
    `source_of_rows` picks, as a window of that source's split (get_batch, seeded by (seed, name, step)).

    Every process works out the whole batch's sources and windows and keeps its slice, rank * batch_size
    onward, as get_batch does: one process and N see the same rows."""
    total = batch_size * world_size
    picks = source_of_rows([source.weight for source in sources], seed, step * total, total)
    x = torch.empty((total, seq_len), dtype=torch.int64)
    y = torch.empty((total, seq_len), dtype=torch.int64)
    for index, (split, source) in enumerate(zip(splits, sources, strict=True)):
        rows = np.flatnonzero(picks == index)
        if len(rows) == 0:
            continue
        source_seed = _hash(seed, source.name)
        x[rows], y[rows] = get_batch(split, len(rows), seq_len, step=step, seed=source_seed)
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    x, y = x[mine].contiguous(), y[mine].contiguous()
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)
