"""The SwiGLU activation and the whole feed-forward: forward/backward time and peak memory, eager vs compiled.

    python bench/ffn.py                                     # dim 4096 (LLaMA-7B's FFN), 4096 tokens
    python bench/ffn.py --dim 2048 --tokens 8192 --json ffn.json

The activation alone, silu(gate) * value on two (tokens, hidden) tensors, does almost no arithmetic: it
reads two tensors and writes one (forward), so it is bound by memory bandwidth, and on a GPU the table
gives its speed as a share of the copy bandwidth measured in the same run. Eager PyTorch runs it as three
kernels (silu, multiply, and their backward) with intermediate tensors; a compiled or fused kernel does one
pass. The whole FeedForward adds three matmuls, which dominate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.decode import copy_bandwidth  # noqa: E402
from bench.timing import print_table, run_info, time_call, write_json  # noqa: E402
from llama_mini.ffn import FeedForward  # noqa: E402


def swiglu_activation(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * value


def measure(name, fn, inputs, device, bytes_moved=None, bandwidth=None) -> dict:
    """Forward and forward + backward time of fn(*inputs), and the peak memory of forward + backward."""

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        fn(*inputs).sum().backward()
        for tensor in inputs:
            tensor.grad = None

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    forward_seconds = time_call(forward, device, warmup=3, repeats=10)
    both_seconds = time_call(forward_backward, device, warmup=3, repeats=10)
    row = {
        "what": name,
        "forward ms": 1000 * forward_seconds,
        "backward ms": 1000 * (both_seconds - forward_seconds),
    }
    if device.type == "cuda":
        row["peak extra MiB"] = (torch.cuda.max_memory_allocated(device) - baseline) / 2**20
        if bytes_moved and bandwidth:
            row["forward % of bandwidth"] = 100 * bytes_moved / forward_seconds / bandwidth
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    torch.manual_seed(0)
    ffn = FeedForward(args.dim, 4 * args.dim, args.multiple_of).to(device=device, dtype=dtype)
    hidden = ffn.hidden_dim
    gate = torch.randn(args.tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    value = torch.randn(args.tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    bandwidth = copy_bandwidth(device)
    element = torch.finfo(dtype).bits // 8
    activation_bytes = 3 * args.tokens * hidden * element  # read gate and value, write the product

    rows = [
        measure(
            "SwiGLU activation, eager", swiglu_activation, (gate, value), device, activation_bytes, bandwidth
        ),
        measure(
            "SwiGLU activation, compiled",
            torch.compile(swiglu_activation),
            (gate, value),
            device,
            activation_bytes,
            bandwidth,
        ),
        measure("FeedForward, eager", ffn, (x,), device),
        measure("FeedForward, compiled", torch.compile(ffn), (x,), device),
    ]
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
