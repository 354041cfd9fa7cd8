"""The SwiGLU activation and the whole feed-forward: forward/backward time and peak memory, by kernel.

    python bench/ffn.py                                     # dim 4096 (LLaMA-7B's FFN), 4096 tokens
    python bench/ffn.py --dim 2048 --tokens 8192 --json ffn.json

The activation alone, silu(gate) * value on two (tokens, hidden) tensors, does almost no arithmetic: it
reads two tensors and writes one (forward), and reads three and writes two (backward), so it is bound by
memory bandwidth, and on a GPU the table gives its speed as a share of the copy bandwidth measured in the
same run. Eager PyTorch runs it as several kernels (silu, multiply, and their backwards) with intermediate
tensors; torch.compile of the plain function, and the kernels of llama_mini.ops.kernels ("compiled", and
"triton" where Triton runs), make one pass each way, and the latter save two hidden-sized tensors for
backward instead of three (the peak-memory column on a GPU). The whole FeedForward adds three matmuls,
which dominate. Speedups are against the eager row of the same group (activation, FeedForward).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.decode import copy_bandwidth  # noqa: E402
from bench.timing import print_table, run_info, time_call, write_json  # noqa: E402
from llama_mini.model.ffn import FeedForward, llama_hidden_dim  # noqa: E402
from llama_mini.ops.kernels import swiglu, triton_available  # noqa: E402


def swiglu_activation(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * value


def swiglu_kernel(kernel: str):
    """The activation computed by one of llama_mini.ops.kernels' SwiGLU kernels."""
    return lambda gate, value: swiglu(gate, value, kernel)


def feed_forward_with_kernel(ffn: FeedForward, kernel: str):
    """ffn's forward, w2(silu(w1 x) * w3 x), with the activation computed by the named kernel."""
    return lambda x: ffn.w2(swiglu(ffn.w1(x), ffn.w3(x), kernel))


def keep_freed_memory_in_the_heap() -> None:
    """Stop glibc's malloc from giving freed memory back to the OS after every call (CPU runs only).

    By default malloc trims the heap once 2x its last freed large block is free at the top, so each
    call of the activation can fault its tensors' pages back in, and the time doubles or quadruples
    depending on the heap's layout (measured here: eager forward 2.1 or 9.5 ms from run to run). Blocks
    up to 32 MiB (mallopt's largest mmap threshold) then come from the heap, which keeps them.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to do
        return
    trim_threshold, mmap_threshold = -1, -3  # M_TRIM_THRESHOLD, M_MMAP_THRESHOLD from malloc.h
    libc.mallopt(trim_threshold, 2**31 - 1)
    libc.mallopt(mmap_threshold, 32 * 2**20)


def measure(name, fn, inputs, device, bytes_moved=None, bandwidth=None) -> dict:
    """Forward and forward + backward time of fn(*inputs), and on a GPU the peak memory of both.

    Backward starts from a random gradient of the output's shape, as it would from the layer above (not
    from .sum(), whose gradient is a broadcast scalar). `bytes_moved` is (forward, backward) bytes at the
    least: with `bandwidth` it gives each direction's share of the copy bandwidth.
    """
    with torch.no_grad():
        grad_output = torch.randn_like(fn(*inputs))

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        fn(*inputs).backward(grad_output)
        for tensor in inputs:
            tensor.grad = None

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    forward_seconds = time_call(forward, device, warmup=3, repeats=10)
    both_seconds = time_call(forward_backward, device, warmup=3, repeats=10)
    backward_seconds = both_seconds - forward_seconds
    row = {"what": name, "forward ms": 1000 * forward_seconds, "backward ms": 1000 * backward_seconds}
    if device.type == "cuda":
        row["peak extra MiB"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
        # every row has every column (print_table needs them): blank where there is nothing to compare
        row["forward % of bandwidth"] = row["backward % of bandwidth"] = ""
        if bytes_moved and bandwidth:
            forward_bytes, backward_bytes = bytes_moved
            row["forward % of bandwidth"] = 100 * forward_bytes / forward_seconds / bandwidth
            row["backward % of bandwidth"] = 100 * backward_bytes / backward_seconds / bandwidth
    return row


def with_speedups(rows: list[dict], baseline: dict) -> list[dict]:
    """`rows` with columns for how many times faster than `baseline` each is, forward and backward."""

    def ratio(base: float, value: float) -> float:
        # nan where a backward was too short to time (forward + backward minus forward <= 0)
        return base / value if base > 0 and value > 0 else float("nan")

    return [
        {
            "what": row["what"],
            "forward ms": row["forward ms"],
            "backward ms": row["backward ms"],
            "forward speedup": ratio(baseline["forward ms"], row["forward ms"]),
            "backward speedup": ratio(baseline["backward ms"], row["backward ms"]),
            **{key: value for key, value in row.items() if key not in ("what", "forward ms", "backward ms")},
        }
        for row in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--multiple-of", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096, help="batch x sequence length")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":  # keep a CPU run to seconds
        args.dim, args.tokens = min(args.dim, 1024), min(args.tokens, 1024)
        keep_freed_memory_in_the_heap()
    torch.manual_seed(0)
    ffn = FeedForward(args.dim, llama_hidden_dim(args.dim, args.multiple_of)).to(device=device, dtype=dtype)
    hidden = ffn.hidden_dim
    gate = torch.randn(args.tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    value = torch.randn(args.tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    bandwidth = copy_bandwidth(device)
    element = torch.finfo(dtype).bits // 8
    tensor_bytes = args.tokens * hidden * element
    # forward reads gate and value and writes the product; backward reads the gradient, gate and value
    # and writes both gradients
    activation_bytes = (3 * tensor_bytes, 5 * tensor_bytes)
    kernels = ["compiled"]
    if device.type == "cuda" and triton_available():  # Triton's CPU interpreter is for tests, not timing
        kernels.append("triton")

    def activation_row(name, fn):
        return measure(f"SwiGLU activation, {name}", fn, (gate, value), device, activation_bytes, bandwidth)

    activation_rows = [
        activation_row("eager", swiglu_activation),
        activation_row("torch.compile of silu(a) * b", torch.compile(swiglu_activation)),
        *(activation_row(f"kernel '{kernel}'", swiglu_kernel(kernel)) for kernel in kernels),
    ]
    ffn_rows = [
        measure("FeedForward, eager", ffn, (x,), device),
        measure("FeedForward, compiled", torch.compile(ffn), (x,), device),
        *(
            measure(
                f"FeedForward, eager, kernel '{kernel}'", feed_forward_with_kernel(ffn, kernel), (x,), device
            )
            for kernel in kernels
        ),
    ]
    rows = with_speedups(activation_rows, activation_rows[0]) + with_speedups(ffn_rows, ffn_rows[0])
    info = run_info(device)
    print(
        f"dim {args.dim}, hidden {hidden}, {args.tokens} tokens, {dtype}, {info['device']}, "
        f"torch {info['torch']}, commit {info['commit']}, {info['date']}"
    )
    print_table(rows)
    write_json(args.json, {**info, "dim": args.dim, "hidden": hidden, "tokens": args.tokens, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
