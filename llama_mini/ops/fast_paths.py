"""The fast paths of training, applied to a built model from outside: each changes how, never what.

Every fast path computes what the plain path computes, only faster or in less memory; a test proves each
one equal to its plain path (GPU-only paths skip without a GPU). Each is a TrainConfig field and a
train.py flag, so any one can be switched off to compare or to work around a problem:

    fast path                          setting (flag)                       plain path
    torch.compile of each block        compile (--no-compile)               eager PyTorch
    AdamW's fused kernel               fused_adamw (--no-fused-adamw)       AdamW's for-each kernels
    SDPA's flash / memory-efficient    attention (--attention math)         the math kernel: softmax(QK^T)V
      / cuDNN attention kernels
    fused SwiGLU activation            swiglu_kernel (--swiglu-kernel eager) F.silu(gate) * value
    chunked linear + cross-entropy     loss_chunk_size (--loss-chunk-size 0) logits, then cross_entropy

The defaults ("auto", or None for the on/off ones) follow what docs/BENCHMARKS.md measured on each kind
of device; `choose_fast_paths` is the one place that turns them into concrete choices, and
`apply_fast_paths` the one place that applies them: it swaps each SwiGLU feed-forward for `FusedSwiGLU`
(same weights, the fused kernel for silu(gate) * value), wraps the model in the training loss
(`NextTokenLoss`, plain or chunked) and compiles each transformer block. The model's own code (model.py,
ffn.py) never changes. Decoding has its own fast path, the compiled static-shape step with CUDA graphs
(generate.py --compile, see llama_mini.generation).
"""

from __future__ import annotations

import contextlib
import functools
import platform
import sysconfig
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from llama_mini.errors import ConfigError
from llama_mini.model.ffn import FeedForward
from llama_mini.model.transformer import TransformerBlock
from llama_mini.ops.aot_step import cpp_compiler_available
from llama_mini.ops.kernels import SWIGLU_KERNELS, best_swiglu_kernel, check_triton_kernel, swiglu
from llama_mini.ops.loss import NextTokenLoss, chunked_loss_pays

# The SDPA kernels a user may pin; "auto" lets PyTorch choose the fastest one that supports the inputs.
ATTENTION_BACKENDS = {
    "auto": None,
    "flash": SDPBackend.FLASH_ATTENTION,  # FlashAttention-2 (CUDA: fp16/bf16; PyTorch's own on a CPU)
    "efficient": SDPBackend.EFFICIENT_ATTENTION,  # memory-efficient attention (xFormers' kernel), CUDA
    "cudnn": SDPBackend.CUDNN_ATTENTION,  # cuDNN's fused attention, recent NVIDIA GPUs
    "math": SDPBackend.MATH,  # the explicit softmax(QK^T / sqrt(D)) V: the plain path
}
# --compile's default on a CPU: on for bf16 autocast (training on a CPU with AMX, runtime.resolve_dtype) in
# runs of at least this many steps. Compiling the blocks costs about 15 s once per model shape and machine
# (then inductor's cache has it; 3-4 s to load it) and saves about a quarter of each bf16 step on such a CPU
# (2 cores, the demo's model: 279 against 381 ms); in float32, where the matrix products weigh more, 13%,
# which a first run would mostly spend compiling (docs/BENCHMARKS.md, "`make demo` in half the time", third
# and fourth tries).
CPU_COMPILE_MIN_STEPS = 300
# tokens per chunk when the chunked loss is chosen: the fastest on a CPU (bench/loss.py, docs/BENCHMARKS.md)
LOSS_CHUNK_SIZE = 1024


@dataclass(frozen=True)
class FastPaths:
    """The concrete choices for one run (no "auto" left): what the Trainer applies and logs."""

    compile: bool
    fused_adamw: bool
    attention: str
    swiglu_kernel: str
    loss_chunk_size: int  # 0 = the plain loss

    def describe(self) -> str:
        """One line for a log: 'compile on, fused AdamW on, attention auto, SwiGLU compiled, loss ...'."""
        on_off = {True: "on", False: "off"}
        loss = f"in chunks of {self.loss_chunk_size} tokens" if self.loss_chunk_size else "plain"
        return (
            f"compile {on_off[self.compile]}, fused AdamW {on_off[self.fused_adamw]}, "
            f"attention {self.attention}, SwiGLU {self.swiglu_kernel}, loss {loss}"
        )


def choose_fast_paths(
    device: torch.device,
    tokens_per_micro_batch: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    compile: bool | None = None,
    fused_adamw: bool | None = None,
    attention: str = "auto",
    swiglu_kernel: str = "auto",
    loss_chunk_size: int | None = None,
    steps: int = 0,
) -> FastPaths:
    """Settle every "auto" (None) setting for `device` and a run of `steps` steps; explicit settings are
    kept as given.

    - compile: on for CUDA. On a CPU, on for bf16 autocast in runs of CPU_COMPILE_MIN_STEPS steps or more
      where `cpu_compile_works`: the first step waits tens of seconds for the compiler, which a shorter run
      would not win back.
    - fused_adamw: on for CUDA, where it is one launch for all parameters instead of several per tensor.
    - attention: PyTorch's own choice, which prefers flash, then memory-efficient, then math.
    - swiglu_kernel: `best_swiglu_kernel(device)`.
    - loss_chunk_size: LOSS_CHUNK_SIZE where `chunked_loss_pays(...)`, except in fp16: the chunked loss
      computes its gradients during the forward pass, before fp16 training's loss scale reaches them, so
      small ones would underflow in fp16's narrow range (bf16 has float32's range and is safe).
    """
    check_attention_backend(attention, device, dtype)
    if swiglu_kernel != "auto" and swiglu_kernel not in SWIGLU_KERNELS:
        raise ConfigError(
            f"unknown --swiglu-kernel {swiglu_kernel!r}; choose auto or one of: {', '.join(SWIGLU_KERNELS)}"
        )
    swiglu_kernel = best_swiglu_kernel(device) if swiglu_kernel == "auto" else swiglu_kernel
    if swiglu_kernel == "triton":
        check_triton_kernel(device)  # refused now, before data and model are prepared
    if loss_chunk_size is None:
        pays = dtype != torch.float16 and chunked_loss_pays(tokens_per_micro_batch, vocab_size)
        loss_chunk_size = LOSS_CHUNK_SIZE if pays else 0
    if compile is None:
        compile = compiles_by_default(device, dtype, steps)
    return FastPaths(
        compile=compile,
        fused_adamw=device.type == "cuda" if fused_adamw is None else fused_adamw,
        attention=attention,
        swiglu_kernel=swiglu_kernel,
        loss_chunk_size=loss_chunk_size,
    )


def compiles_by_default(device: torch.device, dtype: torch.dtype, steps: int) -> bool:
    """--compile's default (choose_fast_paths): always on CUDA; on a CPU for bf16 runs of at least
    CPU_COMPILE_MIN_STEPS steps where `cpu_compile_works`."""
    return device.type == "cuda" or (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and steps >= CPU_COMPILE_MIN_STEPS
        and cpu_compile_works()
    )


def check_cpu_instruction_sets() -> threading.Thread | None:
    """Start, in a background thread, inductor's checks of which vector instruction sets it can compile
    for on this x86 CPU, all at once; returns the thread (None on other machines, or where this torch
    lays its checks out differently).

    Before it writes the first kernel, inductor builds and loads a small test program for each instruction
    set the CPU reports (AVX2, AVX-512, AVX-512 VNNI, AMX: four on this machine), one after the other, each
    a compile of ATen's vector headers: 10-13 s of a cold first step's 20-30 s here. Run together they take
    6-8 s (bench/cpu_compile_start.py), while the run prepares its data and model; inductor then finds
    each answer (it caches them per process, and each build on disk behind a lock, so a check it asks for
    while this one is still running waits for it instead of compiling twice). With a warm compile cache
    they take about a second (loading each test program in a new process)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch._inductor import cpu_vec_isa

        reported = cpu_vec_isa.x86_isa_checker()
        candidates = [
            isa
            for isa in cpu_vec_isa.supported_vec_isa_list
            if all(flag in reported for flag in str(isa).split())
        ]
    except (ImportError, AttributeError):  # a torch whose inductor is laid out otherwise: it checks alone
        return None

    def check_all() -> None:
        try:
            with ThreadPoolExecutor(max(1, len(candidates))) as pool:
                list(pool.map(bool, candidates))  # bool(isa) is inductor's own check, cached per process
        except Exception:  # noqa: BLE001 - only a head start: inductor asks again itself and reports there
            pass

    thread = threading.Thread(target=check_all, name="check-cpu-instruction-sets", daemon=True)
    thread.start()
    return thread


@functools.cache
def cpu_compile_works() -> bool:
    """True where inductor can build CPU code: it finds a C++ compiler, and this Python's C headers, which
    its kernels are compiled against, are installed (Python.h comes with a Python's development package,
    which some systems leave out; inductor then only warns, and the build fails at the first step). Asked
    before a default turns compiling on, so that such a machine trains eagerly instead of failing; an
    explicit --compile is not second-guessed. (Building a small function would test more, but cost 6 s on
    an empty compile cache here, 3% of a `make demo`.)"""
    include = sysconfig.get_path("include")
    return bool(include) and (Path(include) / "Python.h").exists() and cpp_compiler_available()


CPU_ATTENTION_BACKENDS = ("auto", "flash", "math")  # PyTorch's kernels for CPUs (and what MPS runs)


def check_attention_backend(name: str, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """ConfigError for an unknown kernel name, or (given the device and dtype) one that cannot run there,
    which PyTorch would otherwise report only at the first attention call, as a RuntimeError."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown --attention {name!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")
    if device is not None and device.type != "cuda" and name not in CPU_ATTENTION_BACKENDS:
        choices = ", ".join(CPU_ATTENTION_BACKENDS)
        raise ConfigError(f"--attention {name} needs a CUDA GPU; on {device.type} choose {choices}")
    if device is not None and device.type == "cuda" and name == "flash" and dtype == torch.float32:
        raise ConfigError(
            "--attention flash runs in bf16 or fp16 on CUDA: pass --dtype bf16, or --attention auto"
        )


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """A context in which every scaled_dot_product_attention call uses the named kernel ("auto": any).

    A pinned kernel that cannot run the inputs makes PyTorch raise an error rather than fall back
    silently; `check_attention_backend` catches the common cases (a CUDA kernel on a CPU, flash in
    float32) before any work.
    """
    check_attention_backend(name)
    backend = ATTENTION_BACKENDS[name]
    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def apply_fast_paths(
    model: nn.Module, paths: FastPaths, objective: Callable[[nn.Module], nn.Module] | None = None
) -> nn.Module:
    """The module training calls, `loss_module(tokens, targets) -> mean loss`, with `paths` applied.

    SwiGLU feed-forwards get `paths.swiglu_kernel` (in place: `model` keeps its weights and stays the one to
    save and to load state into), the loss is `NextTokenLoss(model, paths.loss_chunk_size)`, compiled with
    each transformer block compiled when `paths.compile`. The optimizer and the attention kernel are chosen
    where they are used: `make_optimizer(..., paths.fused_adamw)`, `attention_backend(...)`.
    """
    use_swiglu_kernel(model, paths.swiglu_kernel)
    if paths.compile:
        compile_blocks(model)
    # objective: another loss around the model (preference tuning's), in place of NextTokenLoss
    return objective(model) if objective is not None else NextTokenLoss(model, paths.loss_chunk_size)


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every TransformerBlock of `model` in place (each keeps its names and weights); returns
    how many.

    Compiling block by block rather than the whole model and loss: the blocks are alike, so the compiled
    code of the first serves the others, and the compiler works on one block's graph instead of all of
    them. Measured on a 2-core CPU (dim 192, 4 layers, bf16 autocast, an empty compile cache): the first
    step took 23 s instead of 39 s (the first evaluation, one thread: 5 s instead of 19 s), for a step 4%
    slower afterwards (279 against 269 ms; docs/BENCHMARKS.md). The embeddings, final norm and loss run
    eagerly: the chunked loss is matrix products and one pass over each chunk of logits.
    """
    blocks = [module for module in model.modules() if isinstance(module, TransformerBlock)]
    for block in blocks:
        block.compile()
    return len(blocks)


class FusedSwiGLU(FeedForward):
    """LLaMA's FeedForward with silu(gate) * value computed by a fused kernel (llama_mini.ops.kernels):
    w2(swiglu(w1 x, w3 x, kernel)), the same values as FeedForward's formula up to rounding, and a backward
    that saves two hidden-sized tensors instead of three. Built from a FeedForward, sharing its weights."""

    kernel = "compiled"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w1(x), self.w3(x), self.kernel))


def _same_weights_as(cls: type[FeedForward], feed_forward: FeedForward) -> FeedForward:
    """A `cls` module holding `feed_forward`'s own w1, w2, w3 (no copy, no new allocation)."""
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    module.hidden_dim = feed_forward.hidden_dim
    module.w1, module.w2, module.w3 = feed_forward.w1, feed_forward.w2, feed_forward.w3
    return module


def use_swiglu_kernel(model: nn.Module, kernel: str) -> int:
    """Compute every SwiGLU feed-forward's activation in `model` with `kernel`; returns how many.

    "eager" leaves (or puts back) LLaMA's `FeedForward`; "compiled" and "triton" swap in `FusedSwiGLU`,
    sharing the weights. Only SwiGLU has fused kernels; the other variants keep their own activations.
    """
    if kernel not in SWIGLU_KERNELS:
        raise ConfigError(f"unknown SwiGLU kernel {kernel!r}; choose one of: {', '.join(SWIGLU_KERNELS)}")
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in (FeedForward, FusedSwiGLU):
                continue
            replacement = _same_weights_as(FeedForward if kernel == "eager" else FusedSwiGLU, child)
            if kernel != "eager":
                replacement.kernel = kernel
            setattr(parent, name, replacement)
            count += 1
    return count
