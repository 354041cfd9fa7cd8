"""Which decode step runs, and the KV cache it runs with.

    DecodeOptions                                    how to run: compile, compile_cache, cuda_graphs
    step_for(model, step, options, batch, length)    the step a request runs, with the KV cache ready for it
    ensure_cache(model, batch, length, static)       a KV cache of the right kind, large enough for a request

A decode step is a function step(model, tokens (B, T), start_pos) -> (next-token logits (B, V), each row's
greedy id (B,)): generation/decode.py's `decode_step`, which returns each row's argmax too, so greedy
decoding chooses inside the step and reads back B integers. This module runs it eagerly or compiled; it
knows no requests, no sampling and no tokens beyond the (B, 1) tensor it is fed.

Compiling. A compiled step gets the position as a 0-d tensor, so attention reads the whole preallocated
KV cache (a `StaticKVCache`, sized to the request, see `ensure_cache`) under a position mask: every step
has the same shapes, and one compiled step serves every token. Which step runs (`step_for`):

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
import dataclasses
import functools
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from llama_mini.model.cache import StaticKVCache
from llama_mini.model.rounding import round_up
from llama_mini.model.transformer import Transformer
from llama_mini.ops import aot_step
from llama_mini.settings import setting

__all__ = ["CACHE_LENGTH_MULTIPLE", "DecodeOptions", "RunStep", "StepFunction", "ensure_cache", "step_for"]

# step(model, tokens (B, T), start_pos) -> (logits (B, V), greedy ids (B,))
StepFunction = Callable[[Transformer, torch.Tensor, "int | torch.Tensor"], tuple[torch.Tensor, torch.Tensor]]
# run(tokens (B, 1), position) -> (logits (B, V), greedy ids (B,)): a step bound to its model
RunStep = Callable[[torch.Tensor, int], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class DecodeOptions:
    """How the decode step runs (the table in the module docstring); not what it computes: the tokens are
    the same whichever step runs, up to float rounding.
    `generate`, `iter_new_tokens` and `stream` take one (`options=`) or its fields as keywords;
    generate.py's runtime flags are made from these declarations."""

    compile: bool | None = setting(
        None,
        "compile the decode step with static shapes: on a CPU ahead of time, saved in --compile-cache for "
        "later runs (the first run for a model shape waits for the compiler), elsewhere with torch.compile; "
        "none = a step already in --compile-cache if there is one, else eager",
    )
    compile_cache: str | None = setting(
        None, "folder where compiled CPU decode steps are kept between runs (none = not kept)"
    )
    cuda_graphs: bool = setting(True, "with compile on CUDA, replay each decode step as one CUDA graph")

    def replace(self, **changes) -> DecodeOptions:
        """A copy with `changes`; an unknown name is a TypeError, as for any function's keywords."""
        return dataclasses.replace(self, **changes)


@contextlib.contextmanager
def step_for(
    model: Transformer, step: StepFunction, options: DecodeOptions, batch: int, length: int
) -> Iterator[RunStep]:
    """`step` as a request of `batch` rows and `length` positions runs it (the table in the module
    docstring), with the model's KV cache ready for it (and removed afterwards if the model had none).

    Yields run(tokens (B, 1), position: int) -> (logits (B, V), greedy ids (B,)). On a CPU, compile=True
    falls back to torch.compile where the ahead-of-time step cannot be built (`_ahead_of_time_step`).
    Under CUDA graphs the results live in the graph's output buffers, which the next replay overwrites:
    read them (copy the rows you keep) before the next call.
    """
    device = model.tok_embeddings.weight.device
    wanted = options.compile or (options.compile is None and options.compile_cache is not None)
    compiled = None
    if device.type == "cpu" and wanted and aot_step.aot_compile_available():
        # The step is named after the model's tensors, KV cache included: give it the cache it would run
        # with, then look for (or build) the step.
        previous = [layer.attention.cache for layer in model.layers]
        made_cache = ensure_cache(model, batch, length, static=True)
        compiled = _ahead_of_time_step(model, step, options, batch)
        if compiled is None and not options.compile:  # none saved: eager, with the caller's cache as it was
            for layer, cache in zip(model.layers, previous, strict=True):
                layer.attention.cache = cache
            made_cache = ensure_cache(model, batch, length, static=False)
    else:
        made_cache = ensure_cache(model, batch, length, static=bool(options.compile))
    try:
        if compiled is not None:
            with compiled.bound_to(model) as run:  # run returns [logits, ids]
                yield _with_static_inputs(run, device)
        elif options.compile:
            cuda_graphs = options.cuda_graphs and device.type == "cuda"
            yield _with_static_inputs(
                _torch_compiled_step(model, step, cuda_graphs, device.type == "cpu"), device
            )
        else:
            yield functools.partial(step, model)
    finally:
        if made_cache:
            model.clear_cache()


def _with_static_inputs(
    run: Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]], device
) -> RunStep:
    """A compiled step's inputs have static shapes: the tokens a contiguous (B, 1) tensor and the position
    a 0-d tensor, so every step has the same inputs (see llama_mini/model/cache.py)."""

    def run_at(tokens: torch.Tensor, position: int) -> Sequence[torch.Tensor]:
        return run(tokens.contiguous(), torch.tensor(position, device=device))

    return run_at


@functools.cache
def _compiled_step(
    step: StepFunction, cuda_graphs: bool, cpu: bool = False
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """`step` through torch.compile, built once (the model is an argument, so the compiled code is shared
    by every model with the same shapes, and no model is kept alive here). Mode "reduce-overhead" records
    and replays CUDA graphs. On a CPU (where the ahead-of-time step comes first, see `step_for`)
    matrix-vector products become fused reductions (llama_mini.ops.aot_step)."""
    if cpu:
        return torch.compile(step, options={"post_grad_custom_pre_pass": aot_step.matvec_pass()})
    return torch.compile(step, mode="reduce-overhead" if cuda_graphs else None)


def _torch_compiled_step(
    model: Transformer, step: StepFunction, cuda_graphs: bool, cpu: bool
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """`_compiled_step` for `model`; under CUDA graphs each call first tells the graph runner that a new
    step begins, so it may reuse the last step's outputs (which the loop has read by then)."""
    compiled = _compiled_step(step, cuda_graphs, cpu)

    def run(tokens: torch.Tensor, position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return compiled(model, tokens, position)

    return run


def _ahead_of_time_step(
    model: Transformer, step: StepFunction, options: DecodeOptions, batch: int
) -> aot_step.CompiledStep | None:
    """The AOTInductor build of `step` for this model, batch and KV cache: with compile=True the saved one
    or a new one; with compile=None the saved one only. None if there is none (compile=None), or, with a
    warning, if it cannot be built or loaded: the caller falls back to torch.compile (compile=True) or
    eager (compile=None)."""
    example_inputs = (torch.zeros((batch, 1), dtype=torch.long), torch.tensor(0))
    try:
        if not options.compile:
            return aot_step.saved_step(step, model, example_inputs, options.compile_cache)
        announce = functools.partial(_say_building, options.compile_cache is not None)
        return aot_step.compiled_step(step, model, example_inputs, options.compile_cache, announce)
    except Exception as error:  # noqa: BLE001 - any failure of export, the C++ build or loading: a slower path works
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fallback = "torch.compile" if options.compile else "eager decoding"
        warnings.warn(
            f"could not use a decode step compiled ahead of time ({reason}); using {fallback} instead",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _say_building(kept: bool, path: Path) -> None:
    """A compiled step is being built: one line on stderr, so the wait is not silent (how long it takes:
    docs/BENCHMARKS.md, "The one-shot command")."""
    where = f"saved as {path}; later runs load it" if kept else "kept in this process only (no compile cache)"
    print(f"compiling the decode step for this model shape ahead of time, once: {where}", file=sys.stderr)


CACHE_LENGTH_MULTIPLE = 256  # KV caches are made a multiple of this long, so similar requests share one


def ensure_cache(model: Transformer, batch: int, length: int, static: bool = False) -> bool:
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
    length = round_up(length, CACHE_LENGTH_MULTIPLE)
    model.setup_cache(batch, max_seq_len=length, static=static)
    return cache is None
