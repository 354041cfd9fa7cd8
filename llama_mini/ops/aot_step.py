"""Ahead-of-time compiled steps: a function of a model, compiled once to machine code, kept on disk, and run
with the model's own tensors. Generation's CPU decode step is built with it (llama_mini.generation.steps).

    step = compiled_step(function, model, example_inputs, folder)   # built, or loaded from `folder`
    with step.bound_to(model) as run:                                 # the model's tensors, by reference
        outputs = run(*inputs)                                        # function(model, *inputs), compiled

Why. At batch 1 a decode step of a small model is a few hundred small operations, and on a CPU eager PyTorch
spends a large share of each step dispatching them from Python rather than computing them (docs/
BENCHMARKS.md, "Decoding on a CPU beside transformers and llama.cpp": `bench/decode_cpu.py --profile`).
torch.compile fuses the small operators but still runs a Python wrapper and checks its guards at every
call.
AOTInductor (torch.export, then inductor's C++ code generation) compiles the whole step, wrapper included,
into one shared library: a call is one C++ function. It is also a file, so a later process loads it
instead of compiling again (load and build times: docs/BENCHMARKS.md, "The one-shot command").

Matrix-vector products as reductions. Inductor leaves a matrix product to the BLAS library (MKL), which
runs the (1, K) x (K, N) products of a decode step well below the speed the cache allows, each as its own
call. `rewrite_matvecs` rewrites every product with at most MATVEC_MAX_ROWS rows (or columns) as the
multiply-and-sum it is, out[m, n] = sum_k x[m, k] w[n, k]; inductor then generates vectorised dot-product
loops of its own and fuses them with the elementwise work around them (RMSNorm, RoPE, SwiGLU, the residual
adds): everything between two attention calls becomes one C++ function (the stories260k shape's step is 6
such functions and 5 attention calls, no BLAS call). The sums are the same numbers added in another order:
equal within float rounding.

The weights are not in the library. It is built with `package_constants_in_so=False`, so one file serves
every checkpoint of the same shape; `bound_to(model)` hands it the model's parameters and buffers (the KV
cache included, which the step writes) by reference, with no copy (the decode loop binds once per request).

Inductor may make tensors of its own while lowering (torch's CPU int4 kernel, for one, gets its group size
as a new constant), which a library built without its constants cannot bind. A library that names a
tensor the model lacks is refused when built or loaded, with an `UnsupportedStep` error, which generation
answers by falling back (llama_mini.generation.steps), rather than failing when it is bound.

The file's name is a hash of everything the generated code depends on (`artifact_key`): torch's version,
the CPU's vector instructions and the thread count, the model's structure and its tensors' shapes and
dtypes, the inputs' shapes, and the source of the function and of every module class it runs. Change any
of them and a new file is built; nothing stale is ever loaded.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "MATVEC_MAX_ROWS",
    "CompiledStep",
    "UnsupportedStep",
    "aot_compile_available",
    "artifact_key",
    "compiled_step",
    "cpp_compiler_available",
    "default_cache_folder",
    "matvec_pass",
    "rewrite_matvecs",
    "saved_step",
]

# Products with at most this many rows (or columns) become reductions: the products of decode steps up to
# batch 8. Larger ones (a prefill's) stay with MKL, whose blocked kernels suit them.
MATVEC_MAX_ROWS = 8
ARTIFACT_SUFFIX = ".pt2"
MINIMUM_TORCH = (2, 8)  # AOTInductor packages whose constants a caller binds by reference
_LOADED: dict[str, CompiledStep] = {}  # artifact key -> its loaded library, once per process
_SCRATCH: tempfile.TemporaryDirectory | None = None  # steps built without a cache folder (_scratch_folder)


def default_cache_folder() -> Path:
    """Where the command line keeps compiled steps: $XDG_CACHE_HOME/llama_mini/compiled, else
    ~/.cache/llama_mini/compiled."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama_mini" / "compiled"


def aot_compile_available() -> bool:
    """True where this torch builds AOTInductor packages and binds their weights by reference (2.8 and
    later; measured with 2.13). Checked without touching `torch.export`, whose first use imports the
    compiler stack: a second that a one-shot command would wait for."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    return version >= MINIMUM_TORCH and hasattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader")


@functools.cache
def cpp_compiler_available() -> bool:
    """True where inductor finds the C++ compiler it builds CPU code with (g++ or clang++, or $CXX):
    without one neither an ahead-of-time step nor torch.compile can be built on a CPU. Imports inductor
    (about a second), so it is asked only where a step is about to be built, or by the tests."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - inductor raises its own error types for a missing compiler
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# The graph rewrite: matrix-vector products as reductions
# ---------------------------------------------------------------------------------------------------------


def rewrite_matvecs(graph: torch.fx.Graph, max_rows: int = MATVEC_MAX_ROWS) -> int:
    """Replace every `aten.mm(a, b)` of `graph` whose result has at most `max_rows` rows or columns with
    sum_k a[:, k, None] * b[None, k, :], which inductor fuses into its own loops; returns how many.

    (M, K) x (K, N): the product is broadcast to (M, K, N) only in the graph's description; inductor
    computes each output as a dot product and never stores it. Low-precision inputs are summed in float32
    and rounded once, as a matrix product does.
    """
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.mm.default:
            continue
        result = node.meta.get("val")
        if result is None or not all(isinstance(size, int) for size in result.shape):
            continue  # symbolic sizes: leave it to the BLAS library
        if min(result.shape) > max_rows:
            continue
        with graph.inserting_before(node):
            total = _sum_of_products(graph, *node.args, result.dtype)
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        count += 1
    return count


def _sum_of_products(graph: torch.fx.Graph, a: torch.fx.Node, b: torch.fx.Node, dtype: torch.dtype):
    """New nodes computing sum_k a[:, k, None] * b[None, k, :] in (at least) float32, rounded to dtype."""
    aten, convert = torch.ops.aten, torch.ops.prims.convert_element_type.default
    wide = torch.promote_types(dtype, torch.float32)
    new_nodes = []

    def add(target, *args) -> torch.fx.Node:
        new_nodes.append(graph.call_function(target, args))
        _set_fake_value(new_nodes[-1])
        return new_nodes[-1]

    if wide != dtype:  # products and sum in float32, one rounding at the end
        a, b = add(convert, a, wide), add(convert, b, wide)
    column = add(aten.unsqueeze.default, a, 2)  # (M, K, 1)
    row = add(aten.unsqueeze.default, b, 0)  # (1, K, N)
    total = add(aten.sum.dim_IntList, add(aten.mul.Tensor, column, row), [1])  # (M, N)
    return add(convert, total, dtype) if wide != dtype else total


def _set_fake_value(node: torch.fx.Node) -> None:
    """Fill node.meta["val"], which later graph passes read: the node run on its inputs' fake values."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda arg: arg.meta["val"])
    node.meta["val"] = node.target(*args, **kwargs)


@functools.cache
def matvec_pass():
    """`rewrite_matvecs` as an inductor custom pass. Its uuid is this file's hash, so inductor's caches see
    a change to the rewrite. (Built on first use: importing torch._inductor takes a second.)"""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class MatVecsAsReductions(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            rewrite_matvecs(graph)

        def uuid(self) -> str:
            return _file_hash(__file__)

    return MatVecsAsReductions()


# ---------------------------------------------------------------------------------------------------------
# The compiled step
# ---------------------------------------------------------------------------------------------------------


class _Step(nn.Module):
    """function(model, *inputs) as a module, so that torch.export sees the model's tensors as its own
    (named model.<name>, the names the library is later bound by)."""

    def __init__(self, function: Callable, model: nn.Module):
        super().__init__()
        self.function = function
        self.model = model

    def forward(self, *inputs: torch.Tensor):
        return self.function(self.model, *inputs)


class UnsupportedStep(RuntimeError):
    """This model's step cannot be compiled ahead of time (or a library names tensors it lacks)."""


class CompiledStep:
    """A loaded AOTInductor library of function(model, *inputs). It runs while bound to a model:

    with step.bound_to(model) as run:
        outputs = run(*inputs)      # function(model, *inputs) as a list of tensors
    """

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.loader = _load_package(path)
        self.names = list(self.loader.get_constant_fqns())  # model.<parameter or buffer name>
        self._binding: dict[str, torch.Tensor] | None = None  # the tensors the library now points at

    def tensors_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors this library reads and writes, taken from `model` by name."""
        tensors = {f"model.{name}": value for name, value in model.named_parameters(remove_duplicate=False)}
        tensors.update(
            {f"model.{name}": value for name, value in model.named_buffers(remove_duplicate=False)}
        )
        return {name: tensors[name] for name in self.names if name in tensors}

    def check_binds(self, binding: dict[str, torch.Tensor]) -> None:
        """UnsupportedStep if the library reads tensors `binding` lacks: constants inductor made for itself
        (module docstring), which a library built without its constants cannot run with."""
        missing = [name for name in self.names if name not in binding]
        if missing:
            raise UnsupportedStep(f"the compiled step needs tensors the model does not have: {missing[:3]}")

    @contextlib.contextmanager
    def bound_to(self, model: nn.Module) -> Iterator[Callable[..., list[torch.Tensor]]]:
        """A block in which `run(*inputs)` computes with `model`'s tensors, by reference: no copy, and the
        step's writes to its KV cache land in the model. The tensors are taken when the block starts (bind
        again after replacing them). Blocks may interleave (two generators decoding in turn): a run whose
        model is not the one bound last binds its own again first (about 0.2 ms)."""
        binding = self.tensors_of(model)
        self.check_binds(binding)

        def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
            if self._binding is not binding:
                # (tensors, into the active set, check every one is given, by reference: the caller keeps
                # them alive, which `binding` does while the block lasts)
                self.loader.load_constants(binding, False, True, True)
                self._binding = binding
            return self.loader.boxed_run(list(inputs))

        try:
            yield run
        finally:
            if self._binding is binding:
                self._binding = None  # let the model go; the next block binds its own tensors first


def _load_package(path: Path):
    """The C++ loader of a .pt2 package. torch._C._aoti's class is what torch._inductor.package.load_package
    wraps; calling it directly spares the one-shot command importing torch._inductor (about a second)."""
    try:
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    except (AttributeError, TypeError):  # another torch's signature: the public loader
        from torch._inductor.package import load_package

        return load_package(str(path)).loader


def artifact_key(function: Callable, model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> str:
    """A hash of everything the compiled code of function(model, *example_inputs) depends on."""
    sources = {inspect.getsourcefile(function), __file__}
    sources |= {inspect.getsourcefile(type(module)) for module in model.modules()}
    tensors = [
        (name, tuple(value.shape), str(value.dtype), value.device.type)
        for name, value in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    ]
    described = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "function": f"{function.__module__}.{function.__qualname__}",
        "sources": sorted(_file_hash(path) for path in sources if path),
        "modules": [
            (name, type(module).__qualname__, module.extra_repr()) for name, module in model.named_modules()
        ],
        "args": repr(getattr(model, "args", None)),
        "tensors": tensors,
        "inputs": [(tuple(value.shape), str(value.dtype), value.device.type) for value in example_inputs],
        "matvec_max_rows": MATVEC_MAX_ROWS,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


@functools.cache
def _file_hash(path: str) -> str:
    """A source file's sha256, read once per process (so `artifact_key` costs well under a millisecond; an
    edit made while the process runs is seen by the next process)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def saved_step(
    function: Callable, model: nn.Module, example_inputs: Sequence[torch.Tensor], folder: str | Path | None
) -> CompiledStep | None:
    """The compiled step for these arguments if `folder` holds it (loaded once per process), else None.
    Never compiles."""
    step = _saved_step(artifact_key(function, model, example_inputs), folder)
    if step is not None:
        step.check_binds(step.tensors_of(model))
    return step


def _saved_step(key: str, folder: str | Path | None) -> CompiledStep | None:
    """`saved_step` for a key already computed."""
    path = Path(folder) / f"{key}{ARTIFACT_SUFFIX}" if folder is not None else None
    if path is None or not path.is_file():
        return None
    if key not in _LOADED:
        _LOADED[key] = CompiledStep(path, key)
    return _LOADED[key]


def compiled_step(
    function: Callable,
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    folder: str | Path | None,
    before_building: Callable[[Path], object] | None = None,
) -> CompiledStep:
    """The compiled step of function(model, *inputs) for inputs shaped as `example_inputs`: the one this
    process already has, else the one saved in `folder`, else one built now (export, then AOTInductor: 10-15 s
    on two cores) and saved there (folder None: kept in this process only).

    `function` must be a module-level function of (model, *tensors) returning tensors, and the model in eval
    mode; the example inputs' values do not matter, only their shapes and dtypes. `before_building(path)`
    is called before a build starts, so a command can say why it is waiting.
    """
    key = artifact_key(function, model, example_inputs)
    target = Path(folder) / f"{key}{ARTIFACT_SUFFIX}" if folder is not None else None
    step = _LOADED.get(key)
    if step is not None and target is not None and not target.is_file():
        # Built or loaded earlier in this process from elsewhere (a scratch folder, another cache folder):
        # save it here too, so that a later process finds it. If that file is gone, build again.
        if not step.path.is_file():
            step = None
        else:
            _copy_atomically(step.path, target)
            _describe(target, function, model, example_inputs)
    step = step or _saved_step(key, folder)
    if step is not None:
        step.check_binds(step.tensors_of(model))
        return step
    path = target if target is not None else _scratch_folder() / f"{key}{ARTIFACT_SUFFIX}"
    if before_building is not None:
        before_building(path)
    _build(function, model, example_inputs, path)
    step = CompiledStep(path, key)
    try:
        step.check_binds(step.tensors_of(model))
    except UnsupportedStep:
        path.unlink()  # never loaded again
        raise
    _LOADED[key] = step
    return step


def _scratch_folder() -> Path:
    """Where steps built without a cache folder are kept, until this process exits (then removed)."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = tempfile.TemporaryDirectory(prefix="llama_mini_compiled_")
    return Path(_SCRATCH.name)


def _copy_atomically(source: Path, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".copying-") as scratch:
        staged = Path(scratch) / path.name
        shutil.copyfile(source, staged)
        os.replace(staged, path)


def _build(function: Callable, model: nn.Module, example_inputs: Sequence[torch.Tensor], path: Path) -> None:
    """Export function(model, *example_inputs) and compile it into the package `path`, written atomically
    (built in a temporary folder beside it, then renamed), so a reader never sees half a file."""
    from torch._inductor import aoti_compile_and_package

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".building-") as scratch:
        staged = Path(scratch) / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's own deprecations, raised inside export
            exported = torch.export.export(_Step(function, model), tuple(example_inputs), strict=False)
            aoti_compile_and_package(
                exported,
                package_path=str(staged),
                inductor_configs={
                    "aot_inductor.package_constants_in_so": False,  # weights are bound at run time
                    "post_grad_custom_pre_pass": matvec_pass(),
                },
            )
        os.replace(staged, path)
    _describe(path, function, model, example_inputs)


def _describe(
    path: Path, function: Callable, model: nn.Module, example_inputs: Sequence[torch.Tensor]
) -> None:
    """A small JSON file beside the package that says, for a person, what it was built for."""
    note = {
        "function": f"{function.__module__}.{function.__qualname__}",
        "model": repr(getattr(model, "args", type(model).__name__)),
        "inputs": [list(value.shape) for value in example_inputs],
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }
    with contextlib.suppress(OSError):
        path.with_suffix(".json").write_text(json.dumps(note, indent=2) + "\n")
