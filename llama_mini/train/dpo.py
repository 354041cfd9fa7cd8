"""Preference tuning (--dpo): what a run does differently when it learns from pairs of answers.

data        the pairs, prepared and split once (llama_mini.data.preferences)
reference   log ref(y | x) of every answer of both splits, computed once, before the first step, by the
            model the run starts from, and kept in OUT/reference/ for every later step and a resumed
            run: training then holds one model. With LoRA the reference is the same network with its
            adapters switched off (llama_mini.ops.lora.adapters_disabled), so a resumed LoRA run whose
            reference files are gone computes them again; a full-weight run cannot (its starting
            weights are overwritten) and says so.
batches     pairs drawn uniformly, a pure function of (seed, step) as every batch is; each process
            takes its share, so a run sees the same pairs on any number of processes and on resume
the loss    llama_mini.ops.preference: DPO or IPO over the policy's and the reference's log-probs,
            with the metrics logged beside it (loss, reward_accuracy, reward_margin, chosen_reward,
            rejected_reward; val_ ones at each evaluation over the first validation pairs)
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llama_mini.data.preferences import PreferenceSplit
from llama_mini.errors import DataError
from llama_mini.files import atomic_file
from llama_mini.ops.lora import adapters_disabled
from llama_mini.ops.preference import PREFERENCE_METRICS, PreferenceLoss
from llama_mini.runtime import Distributed, autocast
from llama_mini.train.config import TrainConfig

__all__ = [
    "REFERENCE_FOLDER",
    "accumulate_preference_gradients",
    "evaluation_pairs",
    "pair_batches",
    "preference_objective",
    "reference_log_probs",
]

REFERENCE_FOLDER = "reference"  # in the run folder: the reference model's log-probs of both splits


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def preference_objective(config: TrainConfig) -> Callable[[nn.Module], nn.Module] | None:
    """The loss module's maker for a --dpo run (PreferenceLoss with its beta and kind), else None."""
    if not config.dpo:
        return None
    return functools.partial(PreferenceLoss, beta=config.dpo_beta, kind=config.dpo_loss)


def _batch_seed(seed: int, index: int) -> int:
    digest = hashlib.sha256(f"llama_mini preference batch {int(seed)} {int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _tensors(
    data: PreferenceSplit, indices: np.ndarray, reference: np.ndarray, seq_len: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = data.rows(indices, seq_len)
    ref = torch.from_numpy(np.concatenate([reference[indices, 0], reference[indices, 1]]))
    return x.to(device), y.to(device), ref.to(device)


def pair_batches(
    data: PreferenceSplit,
    reference: np.ndarray,
    step: int,
    config: TrainConfig,
    seq_len: int,
    dist: Distributed,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The grad_accum micro-batches of `step` for this process: (x, y (2b, T), reference log-probs (2b,)),
    b = batch_size / processes pairs drawn uniformly with replacement from a generator seeded by (seed, step,
    micro-step); every process draws the same batch_size and keeps its slice."""
    if dist.is_main:
        data.report(seq_len, _log)
    per_process = config.batch_size // dist.world_size
    for micro_step in range(config.grad_accum):
        index = step * config.grad_accum + micro_step
        generator = torch.Generator().manual_seed(_batch_seed(config.seed, index))
        drawn = torch.randint(len(data), (config.batch_size,), generator=generator).numpy()
        mine = drawn[dist.rank * per_process : (dist.rank + 1) * per_process]
        yield _tensors(data, mine, reference, seq_len, device)


def evaluation_pairs(count: int, batch_size: int, eval_steps: int) -> list[np.ndarray]:
    """The validation batches: the first pairs in order, at most eval_steps batches, the last one filled up
    from the start again so that every batch is whole (and every process runs the same number)."""
    batches = min(eval_steps, -(-count // batch_size))
    order = np.arange(batches * batch_size) % count
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(batches)]


def accumulate_preference_gradients(
    loss_module: nn.Module,
    micro_batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    grad_accum: int,
    device: torch.device,
    dtype: torch.dtype,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """Forward and backward over the micro-batches, as trainer.accumulate_gradients does for the next-token
    loss; returns the mean of each of PREFERENCE_METRICS over them."""
    total = None
    ddp = isinstance(loss_module, DistributedDataParallel)
    for micro_step, (x, y, reference) in enumerate(micro_batches):
        last = micro_step == grad_accum - 1
        with nullcontext() if last or not ddp else loss_module.no_sync():
            with autocast(device, dtype):
                values = loss_module(x, y, reference)
            loss = values[0] / grad_accum
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = values.detach() if total is None else total + values.detach()
    return dict(zip(PREFERENCE_METRICS, (total / grad_accum).tolist(), strict=True))


@torch.no_grad()
def evaluate_preferences(
    loss_module: nn.Module,
    data: PreferenceSplit,
    reference: np.ndarray,
    config: TrainConfig,
    seq_len: int,
    dist: Distributed,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """val_loss, val_reward_accuracy, ... : the means over the validation batches (evaluation_pairs)."""
    loss_module.eval()
    per_process = config.batch_size // dist.world_size
    total = None
    batches = evaluation_pairs(len(data), config.batch_size, config.eval_steps)
    for batch in batches:
        mine = batch[dist.rank * per_process : (dist.rank + 1) * per_process]
        with autocast(device, dtype):
            values = loss_module(*_tensors(data, mine, reference, seq_len, device)).float()
        total = values if total is None else total + values
    means = (total / len(batches)).tolist()
    named = zip(PREFERENCE_METRICS, means, strict=True)
    return {f"val_{name}": dist.mean(value, device) for name, value in named}


def _stored_reference(
    folder: Path, splits: dict[str, PreferenceSplit], expected: dict, resuming: bool
) -> dict[str, np.ndarray] | None:
    """The log-probabilities recorded in `folder` for these pairs (any, when resuming), or None."""
    try:
        recorded = json.loads((folder / "reference.json").read_text(encoding="utf-8"))
        if recorded != expected and not resuming:
            return None
        stored = {}
        for split, data in splits.items():
            values = np.load(folder / f"{split}.npy", allow_pickle=False)
            if values.shape != (len(data), 2):
                return None
            stored[split] = values
        return stored
    except (OSError, ValueError):
        return None


def _reference_key(data: PreferenceSplit, seq_len: int, source: str) -> dict:
    return {"pairs": int(len(data)), "tokens": int(len(data.tokens)), "seq_len": seq_len, "model": source}


@torch.no_grad()
def reference_log_probs(
    out: Path,
    splits: dict[str, PreferenceSplit],
    model: nn.Module,
    loss_module: nn.Module,
    *,
    seq_len: int,
    batch_size: int,
    source: str,
    lora: bool,
    resuming: bool,
    dist: Distributed,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, np.ndarray]:
    """Each split's (pairs, 2) float32 log ref(chosen | prompt), log ref(rejected | prompt): read from
    OUT/reference/ when recorded there for these pairs, this context and this starting model (`source`), else
    computed by `model` (adapters off with LoRA) through its `loss_module` (PreferenceLoss, possibly
    compiled or sharded) and written there by the main process. Every process computes every pair, so all
    run the same forward passes."""
    folder = out / REFERENCE_FOLDER
    expected = {split: _reference_key(data, seq_len, source) for split, data in splits.items()}
    stored = _stored_reference(folder, splits, expected, resuming)
    # Every process takes the same path: one that read the folder after the main process wrote it (this
    # call's own writing, on a slow process) would otherwise skip the forward passes and the barrier.
    if not dist.any(stored is None, device):
        return stored
    if resuming and not lora:
        raise DataError(
            f"{folder} lacks the reference log-probabilities this run started with, and the weights they "
            f"came from are trained over: start the run again into a new --out"
        )
    if dist.is_main:
        pairs = sum(map(len, splits.values()))
        _log(f"dpo: computing the reference model's log-probabilities of {pairs:,} pairs")
    was_training = loss_module.training
    loss_module.eval()
    results = {}
    with adapters_disabled(model):
        for split, data in splits.items():
            values = np.zeros((len(data), 2), dtype=np.float32)
            for start in range(0, len(data), batch_size):
                indices = np.arange(start, min(start + batch_size, len(data)))
                x, y = data.rows(indices, seq_len)
                with autocast(device, dtype):
                    summed = loss_module(x.to(device), y.to(device))
                chosen, rejected = summed.float().cpu().numpy().reshape(2, -1)
                values[indices, 0], values[indices, 1] = chosen, rejected
            results[split] = values
    loss_module.train(was_training)
    if dist.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "reference.json").unlink(missing_ok=True)
        for split, values in results.items():
            buffer = io.BytesIO()
            np.save(buffer, values)
            with atomic_file(folder / f"{split}.npy") as file:
                file.write(buffer.getvalue())
        with atomic_file(folder / "reference.json") as file:
            file.write(json.dumps(expected, indent=1).encode("utf-8"))
    dist.barrier()
    return results
