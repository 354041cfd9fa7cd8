"""Fused kernels for the SwiGLU activation h = silu(a) * b, with a backward that saves less memory.

In LLaMA's feed-forward, w2(silu(w1 x) * w3 x), the activation takes the gate a = w1 x and the value
b = w3 x, both (..., hidden), and gives h = silu(a) * b, (..., hidden), where silu(a) = a * sigmoid(a).

Why it is memory-bound. Per element the forward reads two numbers and writes one, and the backward reads
three (the upstream gradient g, a and b) and writes two, with a handful of arithmetic operations in
between (an exponential, a division, a few multiplications). A GPU does some twenty arithmetic operations
in the time it moves one byte (an H100 SXM: 67 TFLOP/s of float32 arithmetic without tensor cores against
3.35 TB/s of memory), so the time of this activation is the time to move its tensors: the fewer passes
over memory, the faster. Eager PyTorch makes one pass per operation (silu, multiply, and their
backwards), each writing an intermediate tensor; a fused kernel makes one pass each way.

What backward needs, and the memory saving. With s = sigmoid(a) and s' = s (1 - s):

    d silu(a) / da = s + a s (1 - s) = s (1 + a (1 - s))
    d_a = g * b * s * (1 + a * (1 - s))          d_b = g * silu(a) = g * a * s

Eager autograd saves what each of its two operations needs: F.silu saves its input a, and the product
saves both factors, silu(a) and b: three hidden-sized tensors per layer until backward. The fused kernels
save only a and b and recompute s in backward, which costs arithmetic (free here) instead of memory: one
hidden-sized tensor less per layer. At LLaMA-7B's shape (hidden 11008) with 4096 tokens in bf16 that is
86 MiB per layer, 2.7 GiB over 32 layers.

The three kernels (`SWIGLU_KERNELS`), chosen by name in `swiglu`:

    eager     F.silu(a) * b: plain PyTorch, runs anywhere, saves three tensors
    compiled  a torch.autograd.Function whose forward and backward each call one small function compiled
              by torch.compile (inductor fuses each into one kernel); saves two tensors
    triton    the same autograd.Function with hand-written Triton kernels: CUDA tensors, or CPU tensors
              under Triton's interpreter (TRITON_INTERPRET=1 set before this module is imported, which
              is slow and meant for tests); saves two tensors. Inside a model compiled with
              torch.compile it runs outside the graph (a graph break), where "compiled" fuses into it.

The fused kernels work on flattened contiguous tensors (non-contiguous inputs are copied to contiguous
ones first), do their arithmetic in float32 (float64 inputs to "compiled" stay float64) and round the
results once to the input dtype.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from llama_mini.errors import ConfigError

try:  # optional: Triton ships with CUDA builds of PyTorch on Linux, and is absent elsewhere
    import triton
    import triton.language as tl
except ImportError:
    triton = None

SWIGLU_KERNELS = ("eager", "compiled", "triton")

# Elements per Triton program: 4 warps of 32 threads (Triton's default) each handle 8, 16-byte loads in bf16.
TRITON_BLOCK = 1024
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def swiglu(gate: torch.Tensor, value: torch.Tensor, kernel: str = "eager") -> torch.Tensor:
    """h = silu(gate) * value, computed by the named kernel.   (..., hidden), (..., hidden) -> (..., hidden)

    `kernel` is one of `SWIGLU_KERNELS`; all give the same values up to rounding. The fused kernels
    ("compiled", "triton") need gate and value of one shape, dtype and device, copy non-contiguous ones
    to contiguous memory first, and save only those two tensors for backward (eager saves three).
    "triton" raises ConfigError where it cannot run (see `triton_available`).
    """
    if kernel == "eager":
        return F.silu(gate) * value
    if kernel == "compiled":
        _check_gate_matches_value(gate, value)
        return _CompiledSwiGLU.apply(gate, value)
    if kernel == "triton":
        _check_gate_matches_value(gate, value)
        _check_triton_runs(gate)
        return _swiglu_triton(gate, value)
    raise ConfigError(f"unknown SwiGLU kernel {kernel!r}: choose one of {', '.join(SWIGLU_KERNELS)}")


def triton_available() -> bool:
    """Whether the "triton" kernel can run here: triton imports, and CUDA is available or the kernels were
    built for Triton's CPU interpreter (TRITON_INTERPRET=1 before this module was imported)."""
    return triton is not None and (_TRITON_INTERPRETED or torch.cuda.is_available())


def best_swiglu_kernel(device: torch.device) -> str:
    """The kernel to use when the choice is "auto": "compiled" on CUDA, "eager" elsewhere.

    On a CPU the activation is 2% of the feed-forward's time (docs/BENCHMARKS.md) and compiling costs
    seconds, so eager it is; MPS is not measured and gets eager too. On CUDA the fused kernels save one
    hidden-sized tensor per layer; which of "compiled" and "triton" is faster there is not measured yet:
    revisit this choice with `python bench/ffn.py` on a GPU.
    """
    return "compiled" if torch.device(device).type == "cuda" else "eager"


def check_triton_kernel(device: torch.device | str) -> None:
    """ConfigError unless the "triton" kernel can run on `device`, so a caller can refuse it up front."""
    _check_triton_runs(torch.empty(0, device=device))


def _check_gate_matches_value(gate: torch.Tensor, value: torch.Tensor) -> None:
    if gate.shape != value.shape or gate.dtype != value.dtype or gate.device != value.device:
        raise ValueError(
            "the fused SwiGLU kernels need gate and value of one shape, dtype and device, got "
            f"{tuple(gate.shape)} {gate.dtype} on {gate.device} and "
            f"{tuple(value.shape)} {value.dtype} on {value.device}"
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the arithmetic of float32, bf16 and fp16 inputs; float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------
# "compiled": the formulas in PyTorch, each direction compiled into one kernel by torch.compile.
# ---------------------------------------------------------------------------------------------------------


def _swiglu_forward(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """h = a * sigmoid(a) * b."""
    compute = _compute_dtype(gate.dtype)
    a, b = gate.to(compute), value.to(compute)
    return (a * torch.sigmoid(a) * b).to(gate.dtype)


def _swiglu_backward(
    grad_output: torch.Tensor, gate: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """d_a = g * b * s * (1 + a * (1 - s)) and d_b = g * a * s, with s = sigmoid(a) recomputed."""
    compute = _compute_dtype(gate.dtype)
    g, a, b = grad_output.to(compute), gate.to(compute), value.to(compute)
    s = torch.sigmoid(a)
    return (g * b * s * (1 + a * (1 - s))).to(gate.dtype), (g * a * s).to(gate.dtype)


@functools.cache
def _compile(fn):
    # Built on first use, so importing this module compiles nothing. dynamic=True makes the one graph
    # symbolic in the length of its 1-D inputs: a new token count reuses it instead of compiling again.
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _compiled(fn):
    """`fn` compiled, or `fn` itself when torch.compile is already tracing the caller (say, a compiled
    model): then the surrounding graph takes in its operations and inductor fuses them there."""
    return fn if torch.compiler.is_compiling() else _compile(fn)


class _CompiledSwiGLU(torch.autograd.Function):
    """silu(a) * b with one compiled kernel each way, saving a and b only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        # Flattened to 1-D (a view when contiguous, else a contiguous copy): one graph for every shape.
        gate_flat, value_flat = gate.reshape(-1), value.reshape(-1)
        ctx.save_for_backward(gate_flat, value_flat)
        return _compiled(_swiglu_forward)(gate_flat, value_flat).view(gate.shape)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_flat, value_flat = ctx.saved_tensors
        # reshape copies a non-contiguous gradient (the expanded ones of .sum().backward(), say)
        d_gate, d_value = _compiled(_swiglu_backward)(grad_output.reshape(-1), gate_flat, value_flat)
        return d_gate.view(grad_output.shape), d_value.view(grad_output.shape)


# ---------------------------------------------------------------------------------------------------------
# "triton": hand-written kernels. Each program handles TRITON_BLOCK consecutive elements of the flattened
# tensors; the mask switches off the lanes past the end in the last block.
# ---------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _swiglu_forward_kernel(gate_pointer, value_pointer, out_pointer, n_elements, BLOCK: tl.constexpr):
        # int64 offsets: a (tokens, hidden) tensor can pass 2**31 elements
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        a = tl.load(gate_pointer + offsets, mask=mask).to(tl.float32)
        b = tl.load(value_pointer + offsets, mask=mask).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-a))  # sigmoid; exp overflows to inf for a < -88, giving s = 0 exactly
        tl.store(out_pointer + offsets, (a * s * b).to(out_pointer.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(
        grad_pointer,
        gate_pointer,
        value_pointer,
        d_gate_pointer,
        d_value_pointer,
        n_elements,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_elements
        g = tl.load(grad_pointer + offsets, mask=mask).to(tl.float32)
        a = tl.load(gate_pointer + offsets, mask=mask).to(tl.float32)
        b = tl.load(value_pointer + offsets, mask=mask).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-a))
        d_gate = g * b * s * (1.0 + a * (1.0 - s))
        d_value = g * a * s
        tl.store(d_gate_pointer + offsets, d_gate.to(d_gate_pointer.dtype.element_ty), mask=mask)
        tl.store(d_value_pointer + offsets, d_value.to(d_value_pointer.dtype.element_ty), mask=mask)

    # triton.jit read TRITON_INTERPRET just now and gave either a JITFunction, compiled for the GPU, or an
    # interpreted function, which runs on CPU tensors
    _TRITON_INTERPRETED = not isinstance(_swiglu_forward_kernel, triton.runtime.JITFunction)
else:
    _TRITON_INTERPRETED = False


def _check_triton_runs(tensor: torch.Tensor) -> None:
    """ConfigError unless the Triton kernels can run on this tensor's device and dtype."""
    if triton is None:
        raise ConfigError(
            "the 'triton' SwiGLU kernel needs the triton package, which is not installed "
            "(it comes with PyTorch's CUDA builds on Linux): use 'eager' or 'compiled' instead"
        )
    if _TRITON_INTERPRETED and tensor.device.type != "cpu":
        raise ConfigError(
            "Triton's interpreter is on (TRITON_INTERPRET=1), so the 'triton' SwiGLU kernel runs on CPU "
            f"tensors only, not {tensor.device.type} ones: unset TRITON_INTERPRET, "
            "or use 'eager' or 'compiled'"
        )
    if not _TRITON_INTERPRETED and tensor.device.type != "cuda":
        raise ConfigError(
            f"the 'triton' SwiGLU kernel runs on CUDA tensors, not {tensor.device.type} ones: use 'eager' or "
            "'compiled' instead (on a CPU, Triton's interpreter runs it, slowly, for tests, if "
            "TRITON_INTERPRET=1 is set before llama_mini.ops.kernels is imported)"
        )
    if tensor.dtype not in TRITON_DTYPES:
        raise ConfigError(
            f"the 'triton' SwiGLU kernel takes float32, bfloat16 or float16 tensors, not {tensor.dtype}: "
            "use 'eager' or 'compiled' instead"
        )


def _launch_context(device: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _grid(n_elements: int) -> tuple[int]:
    return (triton.cdiv(n_elements, TRITON_BLOCK),)


class _TritonSwiGLU(torch.autograd.Function):
    """silu(a) * b with one Triton kernel each way, saving a and b only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        gate_flat, value_flat = gate.contiguous().view(-1), value.contiguous().view(-1)
        out = torch.empty_like(gate_flat)
        n_elements = out.numel()
        if n_elements > 0:
            with _launch_context(out.device):
                _swiglu_forward_kernel[_grid(n_elements)](
                    gate_flat, value_flat, out, n_elements, BLOCK=TRITON_BLOCK
                )
        ctx.save_for_backward(gate_flat, value_flat)
        return out.view(gate.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate_flat, value_flat = ctx.saved_tensors
        grad_flat = grad_output.contiguous().view(-1).to(gate_flat.dtype)
        # New tensors for the results: a and b may still be referenced elsewhere, so never overwritten.
        d_gate, d_value = torch.empty_like(gate_flat), torch.empty_like(value_flat)
        n_elements = d_gate.numel()
        if n_elements > 0:
            with _launch_context(d_gate.device):
                _swiglu_backward_kernel[_grid(n_elements)](
                    grad_flat, gate_flat, value_flat, d_gate, d_value, n_elements, BLOCK=TRITON_BLOCK
                )
        return d_gate.view(grad_output.shape), d_value.view(grad_output.shape)


def _swiglu_triton(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return _triton_outside_graphs()(gate, value)


@functools.cache
def _triton_outside_graphs():
    """_TritonSwiGLU.apply kept out of torch.compile's graphs (a graph break): it runs as is, the kernels
    launched by Triton directly; inside a compiled model "compiled" fuses into the graph instead. Made at
    the first call, not at import: torch.compiler.disable imports the compiler (about 1.2 s of every
    training run's start on a 2-core CPU, compiling or not)."""
    return torch.compiler.disable(_TritonSwiGLU.apply)
