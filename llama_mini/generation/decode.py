"""Text generation: sampling helpers, a KV-cached decode loop over ragged batches, and streaming text.

The pieces, from the bottom up:

    apply_repetition_penalty, apply_temperature,     pure functions over next-token logits (B, V)
    top_k_filter, top_p_filter, sample_next          -> token ids (B,)
    iter_new_tokens(model, prompts, ...)             the decode loop; yields (row, token_id) as they come
    generate(model, prompts, ...)                    the same, collected: one list of new ids per prompt
    stream(model, tokenizer, prompt, ...)            one prompt; yields text pieces as they come
    fit_to_context(prompts, max_new_tokens, ...)     the command line's policy for prompts that do not fit

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

Compiling. The decode step always feeds a (B, 1) token tensor. `compile=True` wraps that step in
`torch.compile` (mode "reduce-overhead", i.e. CUDA graphs, on CUDA unless `cuda_graphs=False`; the
default mode elsewhere) and passes the position as a 0-d tensor, so attention reads the whole
preallocated KV cache (sized to the request, see `_ensure_cache`) under a position mask
(`KVCache.update_static`): every step has the same shapes, and one recorded graph replays for every token.
Eager decoding passes the position as an int and attends only to the filled part of the cache, which is
cheaper without a graph.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from llama_mini.errors import LlamaMiniError
from llama_mini.model import Transformer

if TYPE_CHECKING:  # only for annotations: generation works with any object that has the Tokenizer methods
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "GenerationError",
    "GenerationStats",
    "apply_repetition_penalty",
    "apply_temperature",
    "decode_continuation",
    "fit_to_context",
    "generate",
    "iter_new_tokens",
    "row_seed",
    "sample_next",
    "stream",
    "top_k_filter",
    "top_p_filter",
]


class GenerationError(LlamaMiniError, ValueError):
    """A generation request is invalid: an empty or too-long prompt, a token id outside the vocabulary,
    or a sampling setting out of range."""


# ---------------------------------------------------------------------------------------------------------
# Sampling: pure functions over next-token logits (B, V)
# ---------------------------------------------------------------------------------------------------------


def apply_repetition_penalty(
    logits: torch.Tensor, previous_ids: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Make tokens already in the context less likely (CTRL, Keskar et al. 2019): (B, V) -> (B, V).

    For every id in row b of `previous_ids` (B, T): logit / penalty if the logit is positive, logit * penalty
    if negative, so penalty > 1 always lowers it (dividing a negative logit would raise it). Each id counts
    once however often it occurred. penalty = 1 changes nothing. The same rule as transformers'
    `RepetitionPenaltyLogitsProcessor`.
    """
    scores = logits.gather(-1, previous_ids)  # (B, T): the logits of the ids seen so far
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, previous_ids, scores)  # a repeated id writes the same value twice


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature, (B, V) -> (B, V), for temperature > 0.

    softmax(logits / t) sharpens the distribution for t < 1 (t -> 0 tends to argmax) and flattens it for
    t > 1. Temperature 0 is not a division: `sample_next` takes the argmax instead.
    """
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row and set the rest to -inf: (B, V) -> (B, V).

    Ties: every logit equal to the k-th largest is kept, so a row may keep more than k tokens. Cutting
    ties to exactly k would keep whichever tied tokens `torch.topk` happens to list first, an order it does
    not specify and which may differ between devices; keeping them all is the same everywhere (and is what
    transformers' `TopKLogitsWarper` does). k >= V keeps everything.
    """
    if k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the most likely tokens whose mass reaches p, (B, V).

    Sort each row's probabilities in descending order and keep the shortest prefix whose sum is >= p:
    a token is kept when the mass strictly ahead of it is still < p, so the token that crosses p is kept,
    and so is the most likely token, always. The rest are set to -inf. As in `top_k_filter`, every token
    tied with the least likely kept one is kept too, so the result does not depend on the sort's order
    among equal logits. p >= 1 keeps everything.
    """
    if p >= 1.0:
        return logits
    sorted_logits = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_ahead = probs.cumsum(dim=-1) - probs  # (B, V): mass of the tokens before each one in the order
    kept = (mass_ahead < p).sum(dim=-1, keepdim=True)  # (B, 1), >= 1 since the first token's mass_ahead is 0
    smallest_kept = sorted_logits.gather(-1, kept - 1)  # (B, 1)
    return logits.masked_fill(logits < smallest_kept, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Choose the next token of each row: logits (B, V) -> token ids (B,) int64.

    temperature 0 is greedy: the argmax (the lowest id among equal maxima, as `torch.argmax` returns),
    and top_k, top_p and generator are ignored. Otherwise: divide by temperature, filter by top_k, then by
    top_p (the order transformers uses), and draw from the softmax. `generator` is None (torch's global
    generator), one generator for the whole batch, or one per row: row b then draws from generator[b]
    alone, so its draw does not depend on the other rows.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)  # (B, V); filtered tokens have probability 0
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if len(generator) != probs.shape[0]:
        raise GenerationError(
            f"got {len(generator)} generators for {probs.shape[0]} rows: pass one generator per row"
        )
    draws = [torch.multinomial(row, 1, generator=gen) for row, gen in zip(probs, generator, strict=True)]
    return torch.cat(draws)


def row_seed(seed: int, row: int) -> int:
    """The seed of row `row`'s generator when a batch is sampled with `seed`: a hash of (seed, row).

    numpy's SeedSequence mixes the pair, so nearby seeds and rows give unrelated streams (seed + row would
    make seed 1 row 0 the same as seed 0 row 1).
    """
    return int(np.random.SeedSequence([seed, row]).generate_state(1, dtype=np.uint64)[0]) >> 1


# ---------------------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------------------


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


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    repetition_penalty: float | None = None,
    compile: bool = False,
    cuda_graphs: bool = True,
    stats: GenerationStats | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids; lengths may differ) by up to max_new_tokens tokens.

    Returns one list of new token ids per prompt, in order. A row stops at eos_id (which is not included
    in its list) or after max_new_tokens. The arguments are those of `iter_new_tokens`.
    """
    new_ids: list[list[int]] = [[] for _ in prompts]
    for row, token_id in iter_new_tokens(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        seed=seed,
        repetition_penalty=repetition_penalty,
        compile=compile,
        cuda_graphs=cuda_graphs,
        stats=stats,
    ):
        new_ids[row].append(token_id)
    return new_ids


def iter_new_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    repetition_penalty: float | None = None,
    compile: bool = False,
    cuda_graphs: bool = True,
    stats: GenerationStats | None = None,
) -> Iterator[tuple[int, int]]:
    """Generate for a ragged batch of prompts; yield (row, token_id) for each new token as it is chosen.

    prompts: B lists of token ids, each non-empty (start them with the tokenizer's bos_id, as in
        training), with len(prompt) + max_new_tokens <= model.args.max_seq_len.
    temperature: 0 is greedy; top_k (>= 1) and top_p (in (0, 1]) filter before sampling, None = off.
    eos_id: a row stops when it samples this id, which is not yielded; None (or a negative id, which
        sentencepiece uses for "no such piece") never stops early.
    seed: an int seeds row i's generator with row_seed(seed, i); a list gives each row's seed as is;
        None draws the seeds from torch's global generator (so `torch.manual_seed` makes runs repeatable).
    repetition_penalty: CTRL's penalty (> 0; 1 or None = off) on every id in a row's prompt and output.
    compile: run the decode step through torch.compile (see the module docstring).
    cuda_graphs: when compiling on CUDA, replay the step as a CUDA graph (False: compiled kernels only).
    stats: a GenerationStats to fill with token counts and timings.

    Uses the model's KV cache if it has one for at least B rows (and leaves it in place), otherwise sets one
    up and removes it afterwards. The model runs in eval mode and under torch.inference_mode; its training
    flag is restored afterwards. Invalid arguments raise GenerationError here, before the first token.
    """
    prompts = [[int(token_id) for token_id in prompt] for prompt in prompts]
    _check_request(model, prompts, max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    # Greedy needs no generators, and must not draw seeds from torch's global generator (which would
    # change what the caller's next torch.randn returns); a given seed is still checked.
    seeds = _row_seeds(seed, len(prompts)) if temperature > 0 or seed is not None else None
    if eos_id is not None and eos_id < 0:
        eos_id = None
    if repetition_penalty == 1.0:
        repetition_penalty = None
    if not prompts or max_new_tokens == 0:
        return iter(())
    return _decode(
        model,
        prompts,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
        seeds=seeds,
        repetition_penalty=repetition_penalty,
        compile=compile,
        cuda_graphs=cuda_graphs,
        stats=stats,
    )


@torch.inference_mode()
def _decode(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    seeds: list[int] | None,
    repetition_penalty: float | None,
    compile: bool,
    cuda_graphs: bool,
    stats: GenerationStats | None,
) -> Iterator[tuple[int, int]]:
    """The loop of `iter_new_tokens`, for validated arguments (see the module docstring for the scheme)."""
    device = model.tok_embeddings.weight.device
    batch = len(prompts)
    lengths = [len(prompt) for prompt in prompts]
    shortest = min(lengths)
    total_len = max(lengths) + max_new_tokens  # the last row to finish writes position total_len - 1
    tokens = torch.zeros((batch, total_len), dtype=torch.long, device=device)  # 0 where nothing is yet
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    generators = None
    if temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    use_cuda_graphs = compile and cuda_graphs and device.type == "cuda"
    decode_step = _compiled_decode_step(use_cuda_graphs) if compile else _decode_step
    produced = [0] * batch
    finished = [False] * batch
    stats = stats if stats is not None else GenerationStats()

    made_cache = _ensure_cache(model, batch, total_len)
    was_training = model.training
    model.eval()
    try:
        start = _clock(device)
        logits = next_token_logits(model, tokens[:, :shortest], 0)  # (B, V): scores for position `shortest`
        now = _clock(device)
        stats.prefill_tokens += batch * shortest
        stats.prefill_seconds += now - start
        start = now

        for position in range(shortest, total_len):
            # Rows past their prompt and not yet finished sample this position; the others keep the
            # token already in the buffer (their prompt's, or a placeholder after they stopped).
            sampling_rows = [row for row in range(batch) if not finished[row] and position >= lengths[row]]
            emitted = []
            if sampling_rows:
                index = torch.tensor(sampling_rows, device=device)
                row_logits = logits[index].float()  # (R, V); sampling arithmetic in float32 under bf16
                if repetition_penalty is not None:
                    row_logits = apply_repetition_penalty(
                        row_logits, tokens[index, :position], repetition_penalty
                    )
                row_generators = None if generators is None else [generators[row] for row in sampling_rows]
                chosen = sample_next(row_logits, temperature, top_k, top_p, row_generators)  # (R,)
                tokens[index, position] = chosen
                for row, token_id in zip(sampling_rows, chosen.tolist(), strict=True):
                    if token_id == eos_id:
                        finished[row] = True
                        continue
                    produced[row] += 1
                    finished[row] = produced[row] == max_new_tokens
                    emitted.append((row, token_id))

            if emitted:  # hand the tokens over with the clock stopped: the caller's time is not ours
                stats.decode_seconds += _clock(device) - start
                stats.new_tokens += len(emitted)
                yield from emitted
                start = _clock(device)
            if all(finished) or position == total_len - 1:
                break
            if use_cuda_graphs:
                # Tell the CUDA-graph runner a new step begins, so it may reuse the last step's outputs.
                torch.compiler.cudagraph_mark_step_begin()
            # Compiled, the position goes in as a tensor: every step then has the same shapes and one
            # CUDA graph serves them all (see Attention._keys_values_and_mask).
            step_position = torch.tensor(position, device=device) if compile else position
            logits = decode_step(model, tokens[:, position : position + 1], step_position)
            stats.decode_steps += 1
            stats.decode_tokens += batch
        stats.decode_seconds += _clock(device) - start
    finally:
        model.train(was_training)
        if made_cache:
            model.clear_cache()


def next_token_logits(
    model: Transformer, tokens: torch.Tensor, start_pos: int | torch.Tensor
) -> torch.Tensor:
    """Feed tokens (B, T) at start_pos.. and score the position after the last: logits (B, V).

    Only the last position goes through the output layer: a prompt's other positions would cost a
    (B, T, V) tensor, the largest of a long prompt with a large vocabulary, for nothing.

    On a CPU the product is written weight @ h^T rather than nn.Linear's h @ weight^T: the same numbers,
    but for the few rows of a decode step MKL picks a much faster kernel for it (docs/BENCHMARKS.md:
    7.9 vs 2.8 ms for stories15m's 288 x 32000 output at batch 8, 1.36x faster decoding).
    """
    h = model.hidden_states(tokens, start_pos)[:, -1]  # (B, dim)
    if h.device.type == "cpu":
        return (model.output.weight @ h.T).T
    return model.output(h)


def _decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int | torch.Tensor) -> torch.Tensor:
    """One decode step: tokens (B, 1) at position start_pos -> next-token logits (B, V).

    Under CUDA graphs the result lives in the graph's output buffer, which the next replay overwrites:
    the loop reads it (copying the rows it samples) before it calls the next step.
    """
    return next_token_logits(model, tokens, start_pos)


@functools.cache
def _compiled_decode_step(cuda_graphs: bool) -> Callable[[Transformer, torch.Tensor, int], torch.Tensor]:
    """`_decode_step` through torch.compile, built once (the model is an argument, so the compiled code
    is shared by every model with the same shapes, and no model is kept alive here). Mode
    "reduce-overhead" records and replays CUDA graphs."""
    return torch.compile(_decode_step, mode="reduce-overhead" if cuda_graphs else None)


CACHE_LENGTH_MULTIPLE = 256  # KV caches are made a multiple of this long, so similar requests share one


def _ensure_cache(model: Transformer, batch: int, length: int) -> bool:
    """Give the model a KV cache for `batch` rows of `length` positions unless it has one large enough.

    True if the model had none, so the caller removes it afterwards; a cache too small is replaced by a
    larger one, and kept. The length is rounded up to a multiple of CACHE_LENGTH_MULTIPLE (at most the
    model's context): the compiled step attends over the whole cache, so a cache sized to the request
    reads far less than one of the full context, and rounding lets requests of similar lengths reuse the
    compiled code and the buffers.
    """
    cache = model.layers[0].attention.cache
    if cache is not None:
        rows, cached_length = cache.k_cache.shape[0], cache.k_cache.shape[2]
        if rows >= batch and cached_length >= length:
            return False
        batch, length = max(batch, rows), max(length, cached_length)
    # Any stale keys and values in a reused cache are harmless: position t is written before any query
    # at t or later reads it, and the causal mask keeps queries from reading beyond their own position.
    length = -(-length // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
    model.setup_cache(batch, max_seq_len=length)
    return cache is None


def _clock(device: torch.device) -> float:
    """time.perf_counter() after the device has finished its queued work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


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


def _check_request(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float | None,
) -> None:
    """Raise GenerationError for the first invalid argument, naming it and the allowed values."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise GenerationError(f"top_k must be an integer >= 1, or None to turn it off; got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], or None to turn it off; got {top_p!r}")
    if repetition_penalty is not None and not repetition_penalty > 0:
        raise GenerationError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty!r}")
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


# ---------------------------------------------------------------------------------------------------------
# Text: streaming and fitting prompts to the context
# ---------------------------------------------------------------------------------------------------------


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    repetition_penalty: float | None = None,
    compile: bool = False,
    cuda_graphs: bool = True,
    stats: GenerationStats | None = None,
) -> Iterator[str]:
    """Continue one prompt and yield its text piece by piece as tokens are generated.

    prompt: text (encoded with bos first) or token ids (used as they are). eos_id defaults to the
    tokenizer's. The other arguments are those of `iter_new_tokens` for a batch of one.

    Pieces come from the tokenizer's StreamDecoder, so a character spelled by several byte tokens appears
    whole, once its last byte arrives. The decoder is first fed the prompt, so the first new piece keeps its
    leading space (decoding new ids on their own would drop it, as at the start of a text): the pieces
    join to `decode_continuation(tokenizer, prompt_ids, new_ids)`, the text that follows the prompt.
    """
    prompt_ids = tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
    tokens = iter_new_tokens(
        model,
        [prompt_ids],
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=tokenizer.eos_id if eos_id is None else eos_id,
        seed=seed,
        repetition_penalty=repetition_penalty,
        compile=compile,
        cuda_graphs=cuda_graphs,
        stats=stats,
    )
    return _stream_text(tokenizer, prompt_ids, tokens)


def _stream_text(
    tokenizer: Tokenizer, prompt_ids: list[int], tokens: Iterator[tuple[int, int]]
) -> Iterator[str]:
    decoder = tokenizer.stream_decoder()
    for token_id in prompt_ids:
        decoder.push(token_id)  # the prompt's text is the caller's; this only positions the decoder
    for _, token_id in tokens:
        piece = decoder.push(token_id)
        if piece:
            yield piece
    piece = decoder.flush()
    if piece:
        yield piece


def decode_continuation(tokenizer: Tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text that new_ids add after prompt_ids: decode(prompt + new) minus decode(prompt).

    Unlike decode(new_ids), this keeps the space that sentencepiece drops from a text's first piece.
    """
    prompt_text = tokenizer.decode(list(prompt_ids))
    full_text = tokenizer.decode(list(prompt_ids) + list(new_ids))
    if full_text.startswith(prompt_text):
        return full_text[len(prompt_text) :]
    return tokenizer.decode(list(new_ids))  # the prompt ended inside a character: no clean boundary


def fit_to_context(
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    context: int,
    truncate: bool = False,
    bos_id: int | None = None,
) -> tuple[list[list[int]], int, list[str]]:
    """The command line's policy for prompts and max_new_tokens that do not fit a context of `context`.

    1. max_new_tokens > context - 1 is cut to context - 1 (a prompt takes at least one position).
    2. A prompt with len + max_new_tokens > context:
       with truncate, keeps its last tokens, as many as leave room for max_new_tokens (bos_id, if the
       prompt starts with it, stays first: the model saw it at position 0 in training);
       without truncate, a prompt that leaves no room for even one new token raises GenerationError.
    3. max_new_tokens is cut to what the longest prompt leaves; a warning says so if 1 or 3 cut it.
    Returns (prompts, max_new_tokens, warnings): one line per change, for the caller to show. Prompts are
    numbered from 1 in the messages, as a user counts --prompt flags.
    """
    notes = []
    requested = max_new_tokens
    max_new_tokens = min(max_new_tokens, context - 1)
    fitted = []
    for number, prompt in enumerate(prompts, start=1):
        prompt = list(prompt)
        if len(prompt) + max_new_tokens > context:
            if truncate:
                room = context - max_new_tokens  # >= 1 after step 1
                keep_bos = bos_id is not None and prompt[0] == bos_id and room > 1
                tail = prompt[len(prompt) - (room - keep_bos) :]
                notes.append(
                    f"prompt {number} has {len(prompt)} tokens: kept its last {len(tail)}"
                    f"{' after BOS' if keep_bos else ''} to leave room for {max_new_tokens} new tokens "
                    f"in the context of {context}"
                )
                prompt = [bos_id, *tail] if keep_bos else tail
            elif len(prompt) >= context:
                raise GenerationError(
                    f"prompt {number} has {len(prompt)} tokens (with BOS) but the model's context is "
                    f"{context} positions, which must hold the prompt and at least one new token: shorten "
                    f"it or pass --truncate to keep its last tokens"
                )
        fitted.append(prompt)
    longest = max((len(prompt) for prompt in fitted), default=0)
    max_new_tokens = min(max_new_tokens, context - longest)
    if max_new_tokens < requested:
        notes.append(
            f"--max-new-tokens {requested} does not fit the model's context of {context} after a prompt of "
            f"{longest} tokens: capped to {max_new_tokens}"
        )
    return fitted, max_new_tokens, notes
