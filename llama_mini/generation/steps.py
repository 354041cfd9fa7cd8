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
              while a child process builds it (generation/
              background.py), switching to it between two
              positions when it is ready (`_SwitchingRun`)
    False     eager                                              eager

On a CPU the ahead-of-time step is one call into C++ code that inductor generated for the whole step,
its matrix-vector products fused into vectorised loops (docs/BENCHMARKS.md: 6.3x eager for the
stories15m shape on 2 cores, 1.35x llama.cpp); it is a file, so a later process loads it in well under a
second instead of compiling again.
Eager decoding passes the position as an int and attends only to the filled part of the cache, which is
cheaper without a compiled step; decode.py's `eager_step` runs one position with less overhead than the
model's forward (generation/eager.py). With compile=None and no compile cache (the library's default)
nothing is built: only generate.py and `serve`, which keep a compile cache, build in the background.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llama_mini.generation import background
from llama_mini.model.cache import KVCache, StaticKVCache
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
        "none = a step already in --compile-cache if there is one, else eager while one is built there in "
        "the background (switched to when ready)",
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
    model: Transformer,
    step: StepFunction,
    options: DecodeOptions,
    batch: int,
    length: int,
    eager: Callable[[Transformer], RunStep | None] | None = None,
) -> Iterator[RunStep]:
    """`step` as a request of `batch` rows and `length` positions runs it (the table in the module
    docstring), with the model's KV cache ready for it (and removed afterwards if the model had none).

    Yields run(tokens (B, 1), position: int) -> (logits (B, V), greedy ids (B,)). On a CPU, compile=True
    falls back to torch.compile where the ahead-of-time step cannot be built (`_ahead_of_time_step`);
    compile=None with a compile cache and no step saved there decodes eagerly while one is built in the
    background, and switches to it when it is ready (`_SwitchingRun`).
    Under CUDA graphs the results live in the graph's output buffers, which the next replay overwrites:
    read them (copy the rows you keep) before the next call. `eager(model)`, where given and not None, runs
    the eager steps instead of `step` (the same numbers with less overhead: generation/eager.py).
    """
    device = model.tok_embeddings.weight.device
    wanted = options.compile or (options.compile is None and options.compile_cache is not None)
    compiled, pending = None, None
    if device.type == "cpu" and wanted and aot_step.aot_compile_available():
        # The step is named after the model's tensors, KV cache included: give it the cache it would run
        # with (the caller's, seen as a static one, if it is large enough), then look for (or build) it.
        _recast_caches(model, static=True)
        made_cache = ensure_cache(model, batch, length, static=True)
        compiled = _ahead_of_time_step(model, step, options, batch)
        if compiled is None and not options.compile:  # none saved: eager, building one in the background
            pending = _build_in_background(model, step, options, batch)
            _recast_caches(model, static=False)  # the same buffers, which the built step takes over
    else:
        made_cache = ensure_cache(model, batch, length, static=bool(options.compile))
    try:
        with contextlib.ExitStack() as stack:
            if compiled is not None:
                run = stack.enter_context(compiled.bound_to(model))  # run returns [logits, ids]
                yield _with_static_inputs(run, device)
            elif options.compile:
                cuda_graphs = options.cuda_graphs and device.type == "cuda"
                yield _with_static_inputs(
                    _torch_compiled_step(model, step, cuda_graphs, device.type == "cpu"), device
                )
            else:
                eager_run = (eager and eager(model)) or functools.partial(step, model)
                yield eager_run if pending is None else _SwitchingRun(model, eager_run, pending, stack)
    finally:
        if made_cache:
            model.clear_cache()


class _SwitchingRun:
    """Eager steps until the step being built in the background (`pending`) is ready, then that step, from
    the next position on: run(tokens (B, 1), position) as `step_for` yields it.

    The switch is between two positions. The eager steps run on KVCaches over the very buffers the compiled
    step was built for (`_recast_caches`), so it reads the keys and values they wrote: nothing is copied or
    recomputed, and each position's logits are those of either step (equal within float rounding). Whether
    the step is ready is asked every POLL_SECONDS (a file's existence), not at every token.
    """

    POLL_SECONDS = 0.25

    def __init__(self, model: Transformer, eager: RunStep, pending, stack: contextlib.ExitStack):
        self.model, self.eager, self.pending, self.stack = model, eager, pending, stack
        self.device = model.tok_embeddings.weight.device
        self.compiled: RunStep | None = None
        self.next_poll = time.monotonic()
        self.switched_at: int | None = None  # the first position the compiled step ran (for tests)
        self.core = background.CoreForBuilds([])  # a core for the build while it runs (`_try_switch`)
        stack.callback(self.core.release)

    def __call__(self, tokens: torch.Tensor, position: int) -> Sequence[torch.Tensor]:
        if self.compiled is None and self.pending is not None and time.monotonic() >= self.next_poll:
            self.next_poll = time.monotonic() + self.POLL_SECONDS
            self._try_switch(position)
        if self.compiled is not None:
            return self.compiled(tokens, position)
        return self.eager(tokens, position)

    def _try_switch(self, position: int) -> None:
        state = self.pending.state()
        if state == "building":
            self.core.take()  # the build has a core of its own meanwhile
            return
        pending, self.pending = self.pending, None
        self.core.release()  # the thread count the step was built for, before it is looked for
        if state != "ready":
            return
        _recast_caches(self.model, static=True)
        try:
            compiled = pending.load(self.model)
        except Exception as error:  # noqa: BLE001 - a step that cannot be loaded: eager decoding goes on
            warnings.warn(
                f"could not load the decode step built in the background ({error})",
                RuntimeWarning,
                stacklevel=3,
            )
            compiled = None
        if compiled is None:
            _recast_caches(self.model, static=False)
            return
        run = self.stack.enter_context(compiled.bound_to(self.model))
        self.compiled = _with_static_inputs(run, self.device)
        self.switched_at = position


def _recast_caches(model: Transformer, static: bool) -> None:
    """Make each layer's KV cache a StaticKVCache (static) or a KVCache over the same buffers: the same keys
    and values, read by the compiled step (the whole buffer under a mask) or by eager steps (the filled
    prefix). A model without caches, or with ones of that kind already, is left as it is."""
    wanted = StaticKVCache if static else KVCache
    for layer in model.layers:
        cache = layer.attention.cache
        if cache is None or type(cache) is wanted or type(cache) not in (KVCache, StaticKVCache):
            continue
        recast = wanted.__new__(wanted)
        nn.Module.__init__(recast)
        recast.register_buffer("k_cache", cache.k_cache, persistent=False)
        recast.register_buffer("v_cache", cache.v_cache, persistent=False)
        layer.attention.cache = recast


def _build_in_background(model: Transformer, step: StepFunction, options: DecodeOptions, batch: int):
    """A `start_background_build` of the model's step (its static caches in place), announced on stderr;
    None, with a warning, where one cannot be started."""
    example_inputs = (torch.zeros((batch, 1), dtype=torch.long), torch.tensor(0))
    try:
        pending = start_background_build(step, model, example_inputs, options.compile_cache)
    except Exception as error:  # noqa: BLE001 - no background build (no fork, a read-only cache): eager works
        warnings.warn(
            f"could not build the decode step in the background ({error})", RuntimeWarning, stacklevel=4
        )
        return None
    if pending is not None and not _ANNOUNCED.get(pending.key):
        _ANNOUNCED[pending.key] = True
        print(
            "compiling the decode step for this model shape in the background; decoding eagerly until it "
            f"is ready (it is kept in {options.compile_cache} for later runs)",
            file=sys.stderr,
        )
    return pending


# How the default (compile=None with a compile cache) starts a background build; tests put a stand-in here.
start_background_build = background.start_build
_ANNOUNCED: dict[str, bool] = {}


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
