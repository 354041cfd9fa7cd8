"""Training batches: random windows of a split's tokens, a pure function of (seed, step).

    get_batch(split, B, T, step, seed)  -> x, y (B, T)    y is x shifted left by one

The window starts are one index over the whole split (all its shards read as one sequence), so the number
and size of the shards never changes what a run sees.

Chat data (a split with a ChatIndex, llama_mini.data.shards) differ in two ways:

    where a row starts   at the start of a conversation, drawn uniformly from those with an assistant
                         token within the row (ChatIndex.row_starts), never in the middle of one, where
                         a reply would be trained without the question it answers
    the targets          y = the next token where it is an assistant token (mask True), else IGNORE_INDEX,
                         so the loss is the mean over the assistant tokens alone

A row runs on from its conversation into the ones after it until it is full: the packing of Llama 2's
supervised fine-tuning (Touvron et al. 2023, section 3.1, "we concatenate all the prompts and answers
from the training set"), which spends no compute on padding. A later conversation in a row attends to
the earlier ones, as documents do in pretraining; each begins with the template's own start (bos in
LLaMA's templates), and its own beginning is always in the row, since it starts after the row's start.
A conversation longer than the row is truncated to it: its tokens past seq_len + 1 are in no row
(ChatIndex.describe counts them). Positions past the split's end (a row from one of its last
conversations) are filled with token 0 and target IGNORE_INDEX: the model sees them after all real
positions, which causal attention keeps from looking at them.

Both kinds draw from the same torch.Generator seeded by (seed, step) and slice the same way under data
parallelism, so a chat batch is a pure function of (seed, step) too: exact resume and one process versus
N hold for chat data as for text.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from llama_mini.data.shards import ChatIndex, TokenSplit
from llama_mini.errors import ConfigError, DataError
from llama_mini.ops.loss import IGNORE_INDEX

__all__ = ["get_batch"]


def get_batch(
    data: TokenSplit,
    batch_size: int,
    seq_len: int,
    step: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows from `data`: inputs x and targets y, both (batch_size, seq_len) int64.

    Each row is a window of seq_len + 1 consecutive tokens starting anywhere in the split:
        x = window[:-1],  y = window[1:]      (the target at each position is the next token)
    For chat data a window starts at a conversation's start, and y is IGNORE_INDEX wherever the next
    token is not an assistant token (see the module docstring).

    The batch is a pure function of the arguments: the window starts come from a torch.Generator seeded by
    a hash of (seed, step), so resuming at step s sees exactly the batches an unbroken run would, with no
    sampler state to save. Under data parallelism every rank draws the same world_size * batch_size starts
    and keeps its own slice, rank * batch_size onward: the ranks' windows differ, and together they are the
    batch one process with batch_size * world_size would draw, so a run sees the same data on any number of
    GPUs. On CUDA the tensors go through pinned memory so the copy to the GPU can overlap compute.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0 .. world_size - 1 = {world_size - 1}, got {rank!r}")
    window = seq_len + 1
    generator = torch.Generator().manual_seed(_batch_seed(seed, step))
    rows = slice(rank * batch_size, (rank + 1) * batch_size)
    if data.chat is not None:
        x, y = _conversation_rows(data, data.chat, window, world_size * batch_size, rows, generator)
    else:
        x, y = _text_windows(data, window, world_size * batch_size, rows, generator)
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _text_windows(
    data: TokenSplit, window: int, count: int, rows: slice, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of `rows` of `count` windows starting anywhere in a split of text."""
    if len(data) < window:
        raise DataError(
            f"the {data.meta.split} split in {data.folder} holds {len(data)} tokens, fewer than one window "
            f"of max_seq_len + 1 = {window}: lower --max-seq-len or add data"
        )
    # Starts in [0, len - window], so every window ends inside the split.
    starts = torch.randint(len(data) - window + 1, (count,), generator=generator)
    windows = data.windows(starts[rows].numpy(), window)
    x = torch.from_numpy(windows[:, :-1].astype(np.int64))  # astype copies into contiguous int64
    y = torch.from_numpy(windows[:, 1:].astype(np.int64))
    return x, y


def _conversation_rows(
    data: TokenSplit, chat: ChatIndex, window: int, count: int, rows: slice, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y of `rows` of `count` rows of chat data, each from a conversation's start, with IGNORE_INDEX
    targets where the next token is not an assistant token."""
    candidates = chat.row_starts(window - 1)
    if len(candidates) == 0:
        raise DataError(
            f"no conversation of the {data.meta.split} split in {data.folder} has an assistant token within "
            f"its first max_seq_len + 1 = {window} tokens, so there is nothing to train on: raise "
            f"--max-seq-len or add conversations with assistant replies"
        )
    picks = torch.randint(len(candidates), (count,), generator=generator)
    starts = candidates[picks[rows].numpy()]
    windows = data.windows(starts, window, fill=0).astype(np.int64)
    trained = chat.mask_windows(starts, window)[:, 1:]  # is the target at each position an assistant token
    x = torch.from_numpy(windows[:, :-1].copy())
    y = torch.from_numpy(np.where(trained, windows[:, 1:], IGNORE_INDEX))
    return x, y


def _batch_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step). Hashing, rather than e.g. seed + step, keeps the seeds of
    nearby runs and steps unrelated: with seed + step, run 1's step 0 would repeat run 0's step 1."""
    digest = hashlib.sha256(f"llama_mini batch {int(seed)} {int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
