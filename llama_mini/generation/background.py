"""Building a compiled decode step in the background while decoding goes on eagerly.

    pending = start_build(step, model, example_inputs, folder)   # a child process builds it; None if it can't
    pending.state()                                               # "building", "ready" or "failed"
    pending.load(model)                                           # the step, once ready

Why a process, not a thread. Building the ahead-of-time step (llama_mini.ops.aot_step) is seconds of Python
(torch.export, inductor's code generation) and then the C++ compiler. In a thread of the decoding process it
would hold the interpreter lock the decode loop needs, and it would trace the very model the loop is running.
A child process builds from a model of its own, made from the same `ModelArgs` with uninitialised weights (the
library holds no weights: `aot_step` binds the caller's at run time), at a lower priority than the decoding
process. It outlives a short command: the step lands in the compile cache, and the next run loads it (well
under a second) instead of decoding eagerly again.

The child rebuilds what `Transformer(args)` makes, quantized as the parent's model is (`--quantize int8` or
int4 and its group size: `llama_mini.ops.quantize` applied to the child's random weights gives layers of the
same shapes, which is all the compiled step depends on); a model changed otherwise after it was built (LoRA
layers, say) names a different step (`aot_step.artifact_key`). The child checks that the key it would build
is the one the parent waits for, and otherwise builds nothing and leaves a note, `<key>.unbuildable`, so that
later runs do not try again: those models decode eagerly unless `--compile` builds their step in the process.
`LLAMA_MINI_BACKGROUND_BUILDS=0` turns background builds off (the test suite does, so that its commands
do not leave compilers running). Only one child builds a given step (an exclusive lock on `.<key>.lock` in
the cache folder), and one step is built at a time in a folder (`.building.lock`): a server's steps for
several batch sizes are built in turn.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llama_mini.model import cache as cache_module
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.ops import aot_step
from llama_mini.ops.quantize import Int4Linear, Int8Linear, quantize

__all__ = ["CoreForBuilds", "PendingStep", "build", "start_build"]

_PARENT_OF_PACKAGE = str(Path(__file__).resolve().parents[2])  # the child imports this very llama_mini
# The child's program (not `-m` on this module, which its package has imported already).
_CHILD = "import sys; from llama_mini.generation.background import build; sys.exit(build(sys.argv[1]))"
_RUNNING: dict[str, subprocess.Popen] = {}  # key -> the child this process started for it
UNBUILDABLE_SUFFIX = ".unbuildable"
SWITCH_VARIABLE = "LLAMA_MINI_BACKGROUND_BUILDS"  # "0": never start a child (the tests' setting)


class PendingStep:
    """A compiled step being built in the background for one key, and how to load it once it is there.

    state(): "building", "ready" (the file is in the folder: `load` it) or "failed" (it will not come: the
    child exited without it, or found it cannot build this model). load(model): the step, with the model
    in the state it was built for (its static KV cache in place), or None."""

    def __init__(
        self,
        step: Callable,
        example_inputs: Sequence[torch.Tensor],
        folder: Path,
        key: str,
        child: subprocess.Popen | None,
    ):
        self.step, self.example_inputs, self.folder, self.key = step, example_inputs, folder, key
        self.path = folder / f"{key}{aot_step.ARTIFACT_SUFFIX}"
        self._marker = folder / f"{key}{UNBUILDABLE_SUFFIX}"
        self._child = child

    def state(self) -> str:
        if self.path.is_file():
            return "ready"
        exited = self._child is not None and self._child.poll() is not None
        if exited or self._marker.is_file():
            return "ready" if self.path.is_file() else "failed"  # it may have landed between the looks
        return "building"

    def load(self, model: torch.nn.Module) -> aot_step.CompiledStep | None:
        return aot_step.saved_step(self.step, model, self.example_inputs, self.folder)


class CoreForBuilds:
    """While children build steps, the decoding process runs its torch operations on one thread fewer,
    leaving the child a core: call it before each step, from the thread that decodes; `release()` at the end.

    Without it, on a machine whose every core runs one of torch's threads, each parallel operation waits for
    the thread that shares its core with the compiler: measured on 2 cores (dim 256, 4 layers, batch 1),
    eager decoding fell from 611 to 10-60 tokens/s during a build, against 460-560 on one thread
    (docs/BENCHMARKS.md, "Fast by default"). The thread count is put back as soon as no build is running,
    before any compiled step is looked for (a step is built for a thread count)."""

    POLL_SECONDS = 0.25

    def __init__(self, pending: Sequence[PendingStep | None]):
        self.pending = [step for step in pending if step is not None]
        self.restore_to: int | None = None
        self.next_look = 0.0

    def __call__(self) -> None:
        if not self.pending or time.monotonic() < self.next_look:
            return
        self.next_look = time.monotonic() + self.POLL_SECONDS
        if any(step.state() == "building" for step in self.pending):
            self.take()
        else:
            self.pending = []
            self.release()

    def take(self) -> None:
        """One thread fewer (if there is more than one), until release()."""
        if self.restore_to is None and torch.get_num_threads() > 1:
            self.restore_to = torch.get_num_threads()
            torch.set_num_threads(self.restore_to - 1)

    def release(self) -> None:
        if self.restore_to is not None:
            torch.set_num_threads(self.restore_to)
            self.restore_to = None


def start_build(
    step: Callable, model: Transformer, example_inputs: Sequence[torch.Tensor], folder: str | Path
) -> PendingStep | None:
    """Start building the ahead-of-time step of step(model, *example_inputs) into `folder` in a child process
    (or follow the one this process already started for it), for the model as it is now (its static KV
    cache in place). None where none can be built in the background: a model the child cannot rebuild from
    its args, or one a child already found it could not build."""
    if os.environ.get(SWITCH_VARIABLE, "1") == "0":
        return None
    folder = Path(folder)
    key = aot_step.artifact_key(step, model, example_inputs)
    quantized = _quantization(model)
    if (folder / f"{key}{UNBUILDABLE_SUFFIX}").is_file() or quantized is None or not _rebuildable(model):
        return None
    child = _RUNNING.get(key)
    if child is None or child.poll() is not None:
        folder.mkdir(parents=True, exist_ok=True)
        cache = model.layers[0].attention.cache
        spec = {
            "key": key,
            "folder": str(folder),
            "function": f"{step.__module__}:{step.__qualname__}",
            "args": model.args.to_dict(),
            "dtype": _dtype_name(model.tok_embeddings.weight.dtype),
            "quantize": quantized,
            "cache": [type(cache).__name__, cache.max_batch_size, cache.max_seq_len],
            "inputs": [[list(value.shape), _dtype_name(value.dtype)] for value in example_inputs],
            "threads": torch.get_num_threads(),
        }
        environment = dict(os.environ)
        environment["PYTHONPATH"] = os.pathsep.join(
            [_PARENT_OF_PACKAGE, *filter(None, [environment.get("PYTHONPATH")])]
        )
        with open(folder / f".{key}.log", "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, json.dumps(spec)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=environment,
                start_new_session=True,  # a Ctrl-C in the terminal stops the command, not the build
            )
        _RUNNING[key] = child
    return PendingStep(step, example_inputs, folder, key, child)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rebuildable(model: Transformer) -> bool:
    """True where every module of `model` is one `Transformer(args)` makes (or a KV cache, or a quantized
    linear layer): a quick look that spares a child for models it could not rebuild (the child checks the
    key itself in any case)."""
    plain = Transformer.__module__.rsplit(".", 1)[0]  # llama_mini.model
    return isinstance(model, Transformer) and all(
        type(module).__module__.startswith((plain, "torch.nn")) or type(module) in (Int8Linear, Int4Linear)
        for module in model.modules()
    )


def _quantization(model: torch.nn.Module) -> list | None:
    """[scheme, group size] as `quantize` was called on `model` (["none", 0] if it was not), or None where
    no one call gives its layers (int8 beside int4, or two group sizes)."""
    int8 = any(isinstance(module, Int8Linear) for module in model.modules())
    groups = {module.group_size for module in model.modules() if isinstance(module, Int4Linear)}
    if int8 and groups or len(groups) > 1:
        return None
    if groups:
        return ["int4", groups.pop()]
    return ["int8", 0] if int8 else ["none", 0]


# ---------------------------------------------------------------------------------------------------------
# The child
# ---------------------------------------------------------------------------------------------------------


def build(spec_json: str) -> int:
    """The child's work: rebuild the parent's model shape from the JSON spec and build its step into the
    cache folder; 0 if built (or being built by another child), 3 if this model cannot be rebuilt here (a
    note is left)."""
    spec = json.loads(spec_json)
    folder = Path(spec["folder"])
    with contextlib.suppress(OSError, AttributeError):
        os.nice(10)  # the decoding process comes first
    torch.set_num_threads(spec["threads"])  # part of the step's key; the build itself runs on one core:
    with contextlib.suppress(Exception):  # inductor's parallel compile workers would take the parent's cores
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
    module_name, _, name = spec["function"].partition(":")
    function = getattr(importlib.import_module(module_name), name)
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_dict(spec["args"]))
    model = model.to_empty(device="cpu").to(getattr(torch, spec["dtype"])).eval()
    scheme, group_size = spec.get("quantize", ["none", 0])
    if scheme != "none":  # quantized from random weights: the same layers, shapes and dtypes as the parent's
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(std=0.02)
        quantize(model, scheme, group_size or 128)
    cache_class, batch, length = getattr(cache_module, spec["cache"][0]), *spec["cache"][1:]
    args = model.args
    for layer in model.layers:
        layer.attention.cache = cache_class(
            batch, length, args.n_kv_heads, args.head_dim, dtype=model.tok_embeddings.weight.dtype
        )
    inputs = [torch.zeros(shape, dtype=getattr(torch, dtype)) for shape, dtype in spec["inputs"]]
    if aot_step.artifact_key(function, model, inputs) != spec["key"]:
        (folder / f"{spec['key']}{UNBUILDABLE_SUFFIX}").write_text(
            "this model's decode step differs from one of Transformer(args): not built in the background\n"
        )
        return 3
    try:
        import fcntl
    except ImportError:  # no advisory locks here: children may build at once; the rename keeps each whole
        fcntl = None
    with open(folder / f".{spec['key']}.lock", "w") as mine, open(folder / ".building.lock", "w") as anyone:
        if fcntl is not None:
            try:
                fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return 0  # another child is building this step
            fcntl.flock(anyone, fcntl.LOCK_EX)  # one build at a time in a folder: the cores stay for decoding
        start = time.perf_counter()
        # (loaded, not built again, if another process saved it while this one waited)
        aot_step.compiled_step(function, model, inputs, folder)
        print(f"built {spec['key']} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0
