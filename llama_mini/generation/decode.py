"""Decoding: a KV-cached decode loop over ragged batches.

The pieces, top down (how a token is sampled is sampling.py's, which compiled step runs is steps.py's, text
is streaming.py's):

    generate(model, prompts, ...)                    the new tokens of each prompt, collected in lists
    iter_new_tokens(model, prompts, ...)             the decode loop; yields (row, token_id) as they come
    RaggedBatch(prompts, max_new_tokens, ...)        a request's rows: token buffer, prompt ends, stopped rows
    decode_step(model, tokens, start_pos)            one forward pass over a batch: the prefill, or one step
    choose_next(logits, greedy_ids, rows, ...)       the next token of the rows that sample a position
    next_token_logits(model, tokens, start_pos)      the logits of the position after the last

A server's scheduler can drive the last three itself: its own batch, decode_step (or steps.step_for's
compiled step) once per position, choose_next for the rows that sample.

Ragged batches. `Transformer.forward(tokens, start_pos)` takes one start position for the whole batch and
masks causally, with no padding mask, so prompts of different lengths cannot simply be right-padded (the
padding would be read) or left-padded (positions would shift). We use Meta's exact scheme instead: the
prompts sit left-aligned in a (B, total_len) buffer; one forward pass prefills the positions every prompt
has (0 .. shortest-1); then one position at a time for all rows together. At each position a row whose
prompt still has a token there is fed that token (its prompt is teacher-forced through the decode steps)
and only the other rows sample:

    position   0    1    2    3    4    5
    row 0      p    p    p    p    s    s       (prompt of 4: samples from position 4)
    row 1      p    p    s    s    s    s       (prompt of 2: samples from position 2)
               <prefill>  <- one decode step per position ->

Each row therefore sees exactly the tokens it would see alone, and its tokens equal those of generating
it alone (greedy: the same up to float rounding of batched matmuls, which does not change an argmax
short of an exact near-tie). The cost: a long prompt next to a short one is fed one token per step.

Randomness. Every row draws from its own `torch.Generator`, seeded with `row_seed(seed, row)`, and draws
only when it samples (not while its prompt is teacher-forced, not after it stopped). So with the same
seed, model, device and dtype, row i's sample depends on its prompt and i alone: not on the other rows,
their lengths or the batch size. Pass a list of seeds to choose each row's seed yourself (e.g. to split a
batch in two and get the same samples).

Settings. Each function takes how to sample, a `SamplingConfig` (`sampling=`), and how to run the decode
step, a `DecodeOptions` (`options=`, steps.py), or the fields of either as keywords (`temperature=0.8,
top_p=0.9, eos_id=2, seed=1, compile=True, ...`), or both: keywords change the configs.

The decode step (`decode_step`) returns the next-token logits and each row's argmax, so greedy decoding
chooses inside the step and reads back B integers; steps.py runs it eagerly or compiled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llama_mini.generation.eager import eager_logits
from llama_mini.generation.sampling import (
    GenerationError,
    SamplingConfig,
    apply_repetition_penalty,
    row_seed,
    sample_next,
)
from llama_mini.generation.steps import DecodeOptions, RunStep, step_for
from llama_mini.model.transformer import Transformer
from llama_mini.runtime import clock

__all__ = [
    "GenerationStats",
    "RaggedBatch",
    "check_request",
    "choose_next",
    "decode_step",
    "eager_step",
    "generate",
    "greedy_ids",
    "iter_new_tokens",
    "next_token_logits",
    "resolve_settings",
    "sample_rows",
]


@dataclass
class GenerationStats:
    """Timings of one `iter_new_tokens` call, filled in as it runs (pass one in as `stats=`).

    Token counts are positions fed through the model, every row counted: prefill_tokens = B x the shortest
    prompt; decode_tokens = B x decode_steps (teacher-forced prompt tokens and finished rows included,
    since the model computes them all). new_tokens counts the tokens returned. Seconds exclude the time
    the caller spends between tokens (printing, say). On a GPU the device is synchronised before each clock
    reading, so the times are the device's.
    """

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    new_tokens: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def summary(self) -> str:
        """One line: prefill and decode tokens/s."""
        return (
            f"prefill: {self.prefill_tokens} tokens in {self.prefill_seconds:.3f} s "
            f"({self.prefill_tokens_per_second:.1f} tokens/s); "
            f"decode: {self.decode_tokens} tokens in {self.decode_seconds:.3f} s "
            f"({self.decode_tokens_per_second:.1f} tokens/s); {self.new_tokens} new tokens"
        )


# ---------------------------------------------------------------------------------------------------------
# A request: generate and iter_new_tokens
# ---------------------------------------------------------------------------------------------------------


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    options: DecodeOptions | None = None,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids; lengths may differ) by up to max_new_tokens tokens.

    Returns one list of new token ids per prompt, in order. A row stops at an eos id (which is not
    included in its list) or after max_new_tokens. The arguments are those of `iter_new_tokens`.
    """
    new_ids: list[list[int]] = [[] for _ in prompts]
    tokens = iter_new_tokens(
        model, prompts, max_new_tokens, sampling, options=options, stats=stats, **settings
    )
    for row, token_id in tokens:
        new_ids[row].append(token_id)
    return new_ids


def iter_new_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    options: DecodeOptions | None = None,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> Iterator[tuple[int, int]]:
    """Generate for a ragged batch of prompts; yield (row, token_id) for each new token as it is chosen.

    prompts: B lists of token ids, each non-empty (start them with the tokenizer's bos_id, as in
        training), with len(prompt) + max_new_tokens <= model.args.max_seq_len.
    sampling, options, settings: a SamplingConfig, a DecodeOptions, and/or their fields as keywords
        (temperature, top_k, top_p, repetition_penalty, eos_id, seed; compile, compile_cache, cuda_graphs).
        seed: an int seeds row i's generator with row_seed(seed, i); a list gives each row's seed as is;
        None draws the seeds from torch's global generator (so `torch.manual_seed` makes runs repeatable).
    stats: a GenerationStats to fill with token counts and timings.

    Uses the model's KV cache if it has one (replaced by a large enough one of the kind the step needs, if
    it is not that already, and kept: steps.ensure_cache), otherwise sets one up and removes it afterwards.
    The model runs in eval mode and under torch.inference_mode; its training flag is restored afterwards.
    Invalid arguments raise GenerationError here, before the first token.
    """
    sampling, options = resolve_settings(sampling, options, settings)
    prompts = [[int(token_id) for token_id in prompt] for prompt in prompts]
    check_request(model, prompts, max_new_tokens)
    # Greedy needs no generators, and must not draw seeds from torch's global generator (which would
    # change what the caller's next torch.randn returns); a given seed is still checked.
    use_seeds = sampling.temperature > 0 or sampling.seed is not None
    seeds = _row_seeds(sampling.seed, len(prompts)) if use_seeds else None
    if not prompts or max_new_tokens == 0:
        return iter(())
    return _decode(model, prompts, max_new_tokens, sampling, options, seeds, stats)


_SAMPLING_FIELDS = frozenset(field.name for field in dataclasses.fields(SamplingConfig))


def resolve_settings(
    sampling: SamplingConfig | None, options: DecodeOptions | None, settings: dict[str, Any]
) -> tuple[SamplingConfig, DecodeOptions]:
    """`sampling` and `options` (their defaults where None) with the keyword `settings` applied, each to the
    config that declares it; a name neither declares is a TypeError, as for any function's keywords."""
    how_to_sample = {name: value for name, value in settings.items() if name in _SAMPLING_FIELDS}
    how_to_run = {name: value for name, value in settings.items() if name not in _SAMPLING_FIELDS}
    return (
        (sampling or SamplingConfig()).replace(**how_to_sample),
        (options or DecodeOptions()).replace(**how_to_run),
    )


def check_request(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Raise GenerationError for the first invalid prompt or length, naming it and the allowed values
    (the sampling settings check themselves: SamplingConfig)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    vocab_size, context = model.args.vocab_size, model.args.max_seq_len
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise GenerationError(
                f"prompts[{index}] is empty: start every prompt with the tokenizer's bos_id, "
                f"which alone asks for unconditional text"
            )
        bad = [token_id for token_id in prompt if not 0 <= token_id < vocab_size]
        if bad:
            raise GenerationError(
                f"prompts[{index}] has token id {bad[0]}, outside the vocabulary 0..{vocab_size - 1}: "
                f"encode prompts with the tokenizer the model was trained with"
            )
        if len(prompt) + max_new_tokens > context:
            raise GenerationError(
                f"prompts[{index}] has {len(prompt)} tokens and max_new_tokens is {max_new_tokens}: "
                f"{len(prompt) + max_new_tokens} positions do not fit the model's context of {context}; "
                f"shorten the prompt or lower max_new_tokens (fit_to_context does either)"
            )


def _row_seeds(seed: int | Sequence[int] | None, batch: int) -> list[int]:
    """One seed per row (see `iter_new_tokens`); GenerationError for a bad seed or a wrong count."""
    if seed is None:
        # Drawn from torch's global generator, so torch.manual_seed(...) before a call makes it repeatable.
        return torch.randint(0, 2**62, (batch,)).tolist()
    if _is_integer(seed) and 0 <= seed < 2**63:
        return [row_seed(int(seed), row) for row in range(batch)]
    if isinstance(seed, Sequence) and all(_is_integer(value) and 0 <= value < 2**63 for value in seed):
        if len(seed) != batch:
            raise GenerationError(
                f"got {len(seed)} seeds for {batch} prompts: pass one seed per prompt or one int"
            )
        return [int(value) for value in seed]
    raise GenerationError(f"seed must be an integer in [0, 2**63) or a list of them, got {seed!r}")


def _is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


class RaggedBatch:
    """The rows of one request: the token buffer, where each row's prompt ends, and which rows have stopped.

    tokens (B, total_len): the prompts left-aligned, 0 where nothing is yet; each position is filled as the
    loop reaches it. total_len = the longest prompt + max_new_tokens: the last row to finish writes position
    total_len - 1. A row stops at one of stop_ids (not handed out) or after max_new_tokens tokens.
    """

    def __init__(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop_ids: frozenset[int],
        device: torch.device,
    ):
        self.size = len(prompts)
        self.lengths = [len(prompt) for prompt in prompts]
        self.shortest = min(self.lengths)
        self.total_len = max(self.lengths) + max_new_tokens
        self.tokens = torch.zeros((self.size, self.total_len), dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            self.tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.max_new_tokens = max_new_tokens
        self.stop_ids = stop_ids
        self.produced = [0] * self.size
        self.finished = [False] * self.size

    def sampling_rows(self, position: int) -> list[int]:
        """The rows that choose their token at `position`: past their prompt and not finished. The others
        keep the token already in the buffer (their prompt's, or a placeholder after they stopped)."""
        return [row for row in range(self.size) if not self.finished[row] and position >= self.lengths[row]]

    def accept(self, rows: list[int], token_ids: list[int]) -> list[tuple[int, int]]:
        """Count the ids just chosen for `rows` (already in the buffer) and stop the rows that are done;
        returns the (row, token_id) pairs to hand out: every id but a stop id."""
        emitted = []
        for row, token_id in zip(rows, token_ids, strict=True):
            if token_id in self.stop_ids:
                self.finished[row] = True
                continue
            self.produced[row] += 1
            self.finished[row] = self.produced[row] == self.max_new_tokens
            emitted.append((row, token_id))
        return emitted

    @property
    def done(self) -> bool:
        return all(self.finished)


@torch.inference_mode()
def _decode(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig,
    options: DecodeOptions,
    seeds: list[int] | None,
    stats: GenerationStats | None,
) -> Iterator[tuple[int, int]]:
    """The loop of `iter_new_tokens`, for validated arguments: the model in eval mode with its decode step
    (steps.step_for) for as long as the caller reads tokens."""
    device = model.tok_embeddings.weight.device
    batch = RaggedBatch(prompts, max_new_tokens, sampling.stop_ids, device)
    generators = None
    if sampling.temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    stats = stats if stats is not None else GenerationStats()
    was_training = model.training
    model.eval()
    try:
        with step_for(model, decode_step, options, batch.size, batch.total_len, eager_step) as run_step:
            yield from _positions(model, run_step, batch, sampling, generators, stats)
    finally:
        model.train(was_training)


def _positions(
    model: Transformer,
    run_step: RunStep,
    batch: RaggedBatch,
    sampling: SamplingConfig,
    generators: list[torch.Generator] | None,
    stats: GenerationStats,
) -> Iterator[tuple[int, int]]:
    """Prefill, then one position at a time: the rows that sample choose their token, the new tokens are
    handed out, and one decode step scores the next position (the scheme in the module docstring)."""
    device = batch.tokens.device
    start = clock(device)
    logits, ids = decode_step(model, batch.tokens[:, : batch.shortest], 0)  # scores for `shortest`
    now = clock(device)
    stats.prefill_tokens += batch.size * batch.shortest
    stats.prefill_seconds += now - start
    start = now
    for position in range(batch.shortest, batch.total_len):
        rows = batch.sampling_rows(position)
        emitted = []
        if rows:
            chosen = choose_next(logits, ids, rows, batch.tokens, position, sampling, generators)
            emitted = batch.accept(rows, chosen)
        if emitted:  # hand the tokens over with the clock stopped: the caller's time is not ours
            stats.decode_seconds += clock(device) - start
            stats.new_tokens += len(emitted)
            yield from emitted
            start = clock(device)
        if batch.done or position == batch.total_len - 1:
            break
        logits, ids = run_step(batch.tokens[:, position : position + 1], position)
        stats.decode_steps += 1
        stats.decode_tokens += batch.size
    stats.decode_seconds += clock(device) - start


# ---------------------------------------------------------------------------------------------------------
# One position: the model's step, and the choice of the next token
# ---------------------------------------------------------------------------------------------------------


def decode_step(
    model: Transformer, tokens: torch.Tensor, start_pos: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: tokens (B, T) at position start_pos.. -> next-token logits (B, V) and each row's
    greedy choice (B,), -1 for a row whose logits are not finite. The prefill feeds the prompts (T of
    them); a decode step feeds one position (T = 1). Compiled (steps.py), this whole function is one call.
    """
    logits = next_token_logits(model, tokens, start_pos)
    return logits, greedy_ids(logits)


def eager_step(model: Transformer) -> RunStep | None:
    """`decode_step` for eager decoding with less per-token overhead: run(tokens (B, 1), position) ->
    (logits (B, V), greedy ids (B,)), through generation/eager.py's one-position forward where it covers
    the call, else `decode_step`; None where it does not cover the model (steps.step_for then runs
    decode_step itself)."""
    logits_of = eager_logits(model)
    if logits_of is None:
        return None

    def run(tokens: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = logits_of(tokens, position)
        if logits is None:
            return decode_step(model, tokens, position)
        return logits, greedy_ids(logits)

    return run


def next_token_logits(
    model: Transformer, tokens: torch.Tensor, start_pos: int | torch.Tensor
) -> torch.Tensor:
    """Feed tokens (B, T) at start_pos.. and score the position after the last: logits (B, V).

    Only the last position goes through the output layer: a prompt's other positions would cost a
    (B, T, V) tensor, the largest of a long prompt with a large vocabulary, for nothing.

    On a CPU the product is written weight @ h^T rather than nn.Linear's h @ weight^T: the same numbers,
    but for the few rows of a decode step MKL picks a much faster kernel for it (docs/BENCHMARKS.md:
    7.9 vs 2.8 ms for stories15m's 288 x 32000 output at batch 8; equal at batch 1).
    """
    h = model.hidden_states(tokens, start_pos)[:, -1]  # (B, dim)
    if h.device.type == "cpu":
        return (model.output.weight @ h.T).T
    return model.output(h)


def greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the lowest id among equal maxima), or -1 where the row is not all finite:
    logits (B, V) -> (B,) int64."""
    return torch.where(torch.isfinite(logits).all(dim=-1), logits.argmax(dim=-1), -1)


def choose_next(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    rows: list[int],
    tokens: torch.Tensor,
    position: int,
    sampling: SamplingConfig,
    generators: list[torch.Generator] | None,
) -> list[int]:
    """Choose the token of each of `rows` at `position`, write it to tokens[rows, position], return the ids.

    logits (B, V) and greedy (B,): decode_step's output for `position`, for the whole batch; tokens
    (B, total_len): the text so far (which the repetition penalty reads); generators: one per row of the
    batch, or None (greedy). Reads the step's results before the next step overwrites them (under CUDA
    graphs they live in the graph's output buffers). GenerationError if a row's logits are not finite.
    """
    greedy_list = greedy.tolist()  # one read of the step's results; -1: logits not finite
    if any(greedy_list[row] < 0 for row in rows):
        raise GenerationError(
            f"the model's logits at position {position} are not finite (NaN or inf): its weights are "
            "broken, or they overflow in this dtype; try --dtype fp32, or an earlier checkpoint"
        )
    if sampling.temperature == 0 and _penalty(sampling) is None:
        # Greedy without a penalty takes the step's own argmax: the logits never leave the step.
        if len(rows) == len(greedy_list):
            tokens[:, position] = greedy
        else:
            tokens[rows, position] = greedy[rows]
        return [greedy_list[row] for row in rows]
    return sample_rows(logits, rows, tokens, position, sampling, generators)


def sample_rows(
    logits: torch.Tensor,
    rows: list[int],
    tokens: torch.Tensor,
    position: int,
    sampling: SamplingConfig,
    generators: list[torch.Generator] | None,
) -> list[int]:
    """Sample the token of each of `rows` at `position` from its logits (with the repetition penalty over
    its text so far), each row from its own generator; write them to tokens[rows, position]."""
    index = torch.tensor(rows, device=tokens.device)
    # (R, V) in float32: a bf16 logit has 8 significant bits, too few to divide by a penalty or
    # temperature and take a softmax over V tokens without visible rounding.
    row_logits = logits[index].float()
    penalty = _penalty(sampling)
    if penalty is not None:
        row_logits = apply_repetition_penalty(row_logits, tokens[index, :position], penalty)
    row_generators = None if generators is None else [generators[row] for row in rows]
    chosen = sample_next(row_logits, sampling.temperature, sampling.top_k, sampling.top_p, row_generators)
    tokens[index, position] = chosen
    return chosen.tolist()


def _penalty(sampling: SamplingConfig) -> float | None:
    """The repetition penalty to apply, or None where it changes nothing (None or 1)."""
    return None if sampling.repetition_penalty in (None, 1.0) else sampling.repetition_penalty
