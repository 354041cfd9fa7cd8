"""Decoding: a KV-cached decode loop over ragged batches, and streaming text.

The pieces, from the bottom up (the sampling itself is in sampling.py):

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

Settings. Each function takes a `SamplingConfig` (`sampling=`), or its fields as keywords
(`temperature=0.8, top_p=0.9, eos_id=2, seed=1, compile=True, ...`), or both: keywords change the config.

Compiling. The decode step (`_decode_step`) feeds a (B, 1) token tensor and returns the next-token logits
and each row's argmax, so greedy decoding chooses inside the step and reads back B integers. A compiled
step gets the position as a 0-d tensor, so attention reads the whole preallocated KV cache (a
`StaticKVCache`, sized to the request, see `_ensure_cache`) under a position mask: every step has the same
shapes, and one compiled step serves every token. Which step runs (`_decode_step_for`):

    compile   CPU                                               GPU (or MPS)
    True      ahead of time (llama_mini.ops.aot_step): loaded    torch.compile, "reduce-overhead" (CUDA
              from the compile cache, or built and saved there   graphs) on CUDA unless cuda_graphs=False
    None      the saved ahead-of-time step if the compile        eager
              cache holds one for this model shape, else eager
    False     eager                                              eager

On a CPU the ahead-of-time step is one call into C++ code that inductor generated for the whole step,
its matrix-vector products fused into vectorised loops (docs/BENCHMARKS.md: 6.3x eager for the
stories15m shape on 2 cores, 1.35x llama.cpp); it is a file, so a later process loads it in well under a
second instead of compiling again.
Eager decoding passes the position as an int and attends only to the filled part of the cache, which is
cheaper without a compiled step.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llama_mini.generation.sampling import (
    GenerationError,
    SamplingConfig,
    apply_repetition_penalty,
    row_seed,
    sample_next,
)
from llama_mini.model.cache import StaticKVCache
from llama_mini.model.transformer import Transformer
from llama_mini.ops import aot_step
from llama_mini.runtime import clock

if TYPE_CHECKING:  # only for annotations: generation works with any object that has the Tokenizer methods
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "GenerationStats",
    "decode_continuation",
    "fit_to_context",
    "generate",
    "iter_new_tokens",
    "next_token_logits",
    "stream",
]


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
    sampling: SamplingConfig | None = None,
    *,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids; lengths may differ) by up to max_new_tokens tokens.

    Returns one list of new token ids per prompt, in order. A row stops at an eos id (which is not
    included in its list) or after max_new_tokens. The arguments are those of `iter_new_tokens`.
    """
    new_ids: list[list[int]] = [[] for _ in prompts]
    for row, token_id in iter_new_tokens(model, prompts, max_new_tokens, sampling, stats=stats, **settings):
        new_ids[row].append(token_id)
    return new_ids


def iter_new_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> Iterator[tuple[int, int]]:
    """Generate for a ragged batch of prompts; yield (row, token_id) for each new token as it is chosen.

    prompts: B lists of token ids, each non-empty (start them with the tokenizer's bos_id, as in
        training), with len(prompt) + max_new_tokens <= model.args.max_seq_len.
    sampling, settings: a SamplingConfig and/or its fields as keywords (temperature, top_k, top_p,
        repetition_penalty, eos_id, seed, compile, compile_cache, cuda_graphs; see SamplingConfig). seed:
        an int seeds row i's generator with row_seed(seed, i); a list gives each row's seed as is; None
        draws the seeds from torch's global generator (so `torch.manual_seed` makes runs repeatable).
    stats: a GenerationStats to fill with token counts and timings.

    Uses the model's KV cache if it has one (replaced by a large enough one of the kind the step needs, if
    it is not that already, and kept: `_ensure_cache`), otherwise sets one up and removes it afterwards.
    The model runs in eval mode and under torch.inference_mode; its training flag is restored afterwards.
    Invalid arguments raise GenerationError here, before the first token.
    """
    sampling = (sampling or SamplingConfig()).replace(**settings)
    prompts = [[int(token_id) for token_id in prompt] for prompt in prompts]
    _check_request(model, prompts, max_new_tokens)
    # Greedy needs no generators, and must not draw seeds from torch's global generator (which would
    # change what the caller's next torch.randn returns); a given seed is still checked.
    use_seeds = sampling.temperature > 0 or sampling.seed is not None
    seeds = _row_seeds(sampling.seed, len(prompts)) if use_seeds else None
    if not prompts or max_new_tokens == 0:
        return iter(())
    return _decode(model, prompts, max_new_tokens, sampling, seeds, stats)


@torch.inference_mode()
def _decode(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingConfig,
    seeds: list[int] | None,
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
    temperature = sampling.temperature
    penalty = None if sampling.repetition_penalty in (None, 1.0) else sampling.repetition_penalty
    # Greedy without a penalty takes the step's own argmax: the logits never leave the step.
    greedy = temperature == 0 and penalty is None
    stop_ids = sampling.stop_ids
    generators = None
    if temperature > 0:
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    produced = [0] * batch
    finished = [False] * batch
    stats = stats if stats is not None else GenerationStats()

    was_training = model.training
    model.eval()
    try:
        with _decode_step_for(model, sampling, batch, total_len) as (decode_step, static):
            start = clock(device)
            logits = next_token_logits(model, tokens[:, :shortest], 0)  # (B, V): scores for `shortest`
            ids = _greedy_ids(logits)
            now = clock(device)
            stats.prefill_tokens += batch * shortest
            stats.prefill_seconds += now - start
            start = now

            for position in range(shortest, total_len):
                # Rows past their prompt and not yet finished sample this position; the others keep the
                # token already in the buffer (their prompt's, or a placeholder after they stopped).
                sampling_rows = [
                    row for row in range(batch) if not finished[row] and position >= lengths[row]
                ]
                emitted = []
                if sampling_rows:
                    greedy_ids = ids.tolist()  # one read of the step's results; -1: logits not finite
                    if any(greedy_ids[row] < 0 for row in sampling_rows):
                        raise GenerationError(
                            f"the model's logits at position {position} are not finite (NaN or inf): its "
                            "weights are broken, or they overflow in this dtype; try --dtype fp32, or an "
                            "earlier checkpoint"
                        )
                    if greedy:
                        chosen_ids = [greedy_ids[row] for row in sampling_rows]
                        if len(sampling_rows) == batch:
                            tokens[:, position] = ids
                        else:
                            tokens[sampling_rows, position] = ids[sampling_rows]
                    else:
                        index = torch.tensor(sampling_rows, device=device)
                        # (R, V) in float32: a bf16 logit has 8 significant bits, too few to divide by a
                        # penalty or temperature and take a softmax over V tokens without visible rounding.
                        row_logits = logits[index].float()
                        if penalty is not None:
                            row_logits = apply_repetition_penalty(
                                row_logits, tokens[index, :position], penalty
                            )
                        row_generators = (
                            None if generators is None else [generators[row] for row in sampling_rows]
                        )
                        chosen = sample_next(
                            row_logits, temperature, sampling.top_k, sampling.top_p, row_generators
                        )
                        tokens[index, position] = chosen
                        chosen_ids = chosen.tolist()
                    for row, token_id in zip(sampling_rows, chosen_ids, strict=True):
                        if token_id in stop_ids:
                            finished[row] = True
                            continue
                        produced[row] += 1
                        finished[row] = produced[row] == max_new_tokens
                        emitted.append((row, token_id))

                if emitted:  # hand the tokens over with the clock stopped: the caller's time is not ours
                    stats.decode_seconds += clock(device) - start
                    stats.new_tokens += len(emitted)
                    yield from emitted
                    start = clock(device)
                if all(finished) or position == total_len - 1:
                    break
                # Static shapes (a compiled step): the position goes in as a tensor and the tokens as a
                # contiguous (B, 1) tensor, so every step has the same inputs (see llama_mini/model/cache.py).
                step_tokens = tokens[:, position : position + 1]
                if static:
                    logits, ids = decode_step(step_tokens.contiguous(), torch.tensor(position, device=device))
                else:
                    logits, ids = decode_step(step_tokens, position)
                stats.decode_steps += 1
                stats.decode_tokens += batch
            stats.decode_seconds += clock(device) - start
    finally:
        model.train(was_training)


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


def _greedy_ids(logits: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the lowest id among equal maxima), or -1 where the row is not all finite:
    logits (B, V) -> (B,) int64."""
    return torch.where(torch.isfinite(logits).all(dim=-1), logits.argmax(dim=-1), -1)


def _decode_step(
    model: Transformer, tokens: torch.Tensor, start_pos: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step: tokens (B, 1) at position start_pos -> next-token logits (B, V) and each row's
    greedy choice (B,), -1 for a row whose logits are not finite. Compiled, this whole function is one call.

    Under CUDA graphs the results live in the graph's output buffers, which the next replay overwrites:
    the loop reads them (copying the rows it samples) before it calls the next step.
    """
    logits = next_token_logits(model, tokens, start_pos)
    return logits, _greedy_ids(logits)


@functools.cache
def _compiled_decode_step(
    cuda_graphs: bool, cpu: bool = False
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`_decode_step` through torch.compile, built once (the model is an argument, so the compiled code
    is shared by every model with the same shapes, and no model is kept alive here). Mode
    "reduce-overhead" records and replays CUDA graphs. On a CPU (where the ahead-of-time step comes first,
    see `_decode_step_for`) matrix-vector products become fused reductions (llama_mini.ops.aot_step)."""
    if cpu:
        return torch.compile(_decode_step, options={"post_grad_custom_pre_pass": aot_step.matvec_pass()})
    return torch.compile(_decode_step, mode="reduce-overhead" if cuda_graphs else None)


@contextlib.contextmanager
def _decode_step_for(
    model: Transformer, sampling: SamplingConfig, batch: int, length: int
) -> Iterator[tuple[Callable[..., Sequence[torch.Tensor]], bool]]:
    """The decode step a request of `batch` rows and `length` positions runs (the table in the module
    docstring), with the model's KV cache ready for it (and removed afterwards if the model had none).
    Yields (step, static): step(tokens (B, 1), position) -> (logits (B, V), greedy ids (B,)); static: the
    step wants the position as a 0-d tensor and reads the whole StaticKVCache. On a CPU, compile=True falls
    back to torch.compile where the ahead-of-time step cannot be built (`_ahead_of_time_step`)."""
    device = model.tok_embeddings.weight.device
    wanted = sampling.compile or (sampling.compile is None and sampling.compile_cache is not None)
    compiled = None
    if device.type == "cpu" and wanted and aot_step.aot_compile_available():
        # The step is named after the model's tensors, KV cache included: give it the cache it would run
        # with, then look for (or build) the step.
        previous = [layer.attention.cache for layer in model.layers]
        made_cache = _ensure_cache(model, batch, length, static=True)
        compiled = _ahead_of_time_step(model, sampling, batch)
        if compiled is None and not sampling.compile:  # none saved: eager, with the caller's cache as it was
            for layer, cache in zip(model.layers, previous, strict=True):
                layer.attention.cache = cache
            made_cache = _ensure_cache(model, batch, length, static=False)
    else:
        made_cache = _ensure_cache(model, batch, length, static=bool(sampling.compile))
    try:
        if compiled is not None:
            with compiled.bound_to(model) as run:  # run returns [logits, ids], which the loop unpacks
                yield run, True
        elif sampling.compile:
            cuda_graphs = sampling.cuda_graphs and device.type == "cuda"
            yield _torch_compiled_step(model, cuda_graphs, device.type == "cpu"), True
        else:
            yield functools.partial(_decode_step, model), False
    finally:
        if made_cache:
            model.clear_cache()


def _torch_compiled_step(
    model: Transformer, cuda_graphs: bool, cpu: bool
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`_compiled_decode_step` for `model`; under CUDA graphs each call first tells the graph runner that a
    new step begins, so it may reuse the last step's outputs (which the loop has read by then)."""
    compiled = _compiled_decode_step(cuda_graphs, cpu)

    def step(tokens: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, tokens, position)

    return step


def _ahead_of_time_step(
    model: Transformer, sampling: SamplingConfig, batch: int
) -> aot_step.CompiledStep | None:
    """The AOTInductor decode step for this model, batch and KV cache: with compile=True the saved one or a
    new one; with compile=None the saved one only. None if there is none (compile=None), or, with a
    warning, if it cannot be built or loaded: the caller falls back to torch.compile (compile=True) or
    eager (compile=None)."""
    example_inputs = (torch.zeros((batch, 1), dtype=torch.long), torch.tensor(0))
    find = aot_step.compiled_step if sampling.compile else aot_step.saved_step
    try:
        return find(_decode_step, model, example_inputs, sampling.compile_cache)
    except Exception as error:  # noqa: BLE001 - any failure of export, the C++ build or loading: a slower path works
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fallback = "torch.compile" if sampling.compile else "eager decoding"
        warnings.warn(
            f"could not use a decode step compiled ahead of time ({reason}); using {fallback} instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


CACHE_LENGTH_MULTIPLE = 256  # KV caches are made a multiple of this long, so similar requests share one


def _ensure_cache(model: Transformer, batch: int, length: int, static: bool = False) -> bool:
    """Give the model a KV cache for `batch` rows of `length` positions unless it has one large enough, of
    the right kind (a StaticKVCache when `static`, for the compiled step; a KVCache otherwise).

    True if the model had none, so the caller removes it afterwards; a cache too small or of the other kind
    is replaced, and kept. The length is rounded up to a multiple of CACHE_LENGTH_MULTIPLE (at most the
    model's context): the compiled step attends over the whole cache, so a cache sized to the request
    reads far less than one of the full context, and rounding lets requests of similar lengths reuse the
    compiled code and the buffers.
    """
    cache = model.layers[0].attention.cache
    if cache is not None:
        same_kind = isinstance(cache, StaticKVCache) == static
        if same_kind and cache.max_batch_size >= batch and cache.max_seq_len >= length:
            return False
        batch, length = max(batch, cache.max_batch_size), max(length, cache.max_seq_len)
    # Any stale keys and values in a reused cache are harmless: position t is written before any query
    # at t or later reads it, and the causal mask keeps queries from reading beyond their own position.
    length = -(-length // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
    model.setup_cache(batch, max_seq_len=length, static=static)
    return cache is None


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


def _check_request(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# Text: streaming and fitting prompts to the context
# ---------------------------------------------------------------------------------------------------------


def stream(
    model: Transformer,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    *,
    stats: GenerationStats | None = None,
    **settings: Any,
) -> Iterator[str]:
    """Continue one prompt and yield its text piece by piece as tokens are generated.

    prompt: text (encoded with bos first) or token ids (used as they are). The eos id(s) default to the
    tokenizer's. The other arguments are those of `iter_new_tokens` for a batch of one.

    Pieces come from the tokenizer's StreamDecoder, so a character spelled by several byte tokens appears
    whole, once its last byte arrives. The decoder is first fed the prompt, so the first new piece keeps its
    leading space (decoding new ids on their own would drop it, as at the start of a text): the pieces
    join to `decode_continuation(tokenizer, prompt_ids, new_ids)`, the text that follows the prompt.
    """
    sampling = (sampling or SamplingConfig()).replace(**settings)
    if sampling.eos_id is None:
        sampling = sampling.replace(eos_id=getattr(tokenizer, "eos_ids", None) or tokenizer.eos_id)
    prompt_ids = tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
    tokens = iter_new_tokens(model, [prompt_ids], max_new_tokens, sampling, stats=stats)
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
