"""The output layer and its loss: plain logits + cross-entropy vs chunked linear_cross_entropy.

    python bench/loss.py                # CUDA: 8192 tokens, dim 768, vocab 32000; CPU: 2048, 288, 32000
    python bench/loss.py --tokens 16384 --vocab 128256 --chunk-sizes 2048 4096 --json loss.json

Times forward + backward of loss = cross_entropy(hidden W^T) for hidden (tokens, dim) and W (vocab, dim),
both requiring grad, and measures its peak memory. Variants:

    plain              F.linear, then F.cross_entropy in float32 (the model's cross_entropy)
    plain, compiled    the same under torch.compile
    chunked C          llama_mini.ops.loss.linear_cross_entropy with chunk_size C
    chunked, compiled  linear_cross_entropy under torch.compile, at the largest chunk size

On a GPU the step runs under bf16 autocast with float32 weights, as training does; on a CPU in float32.
Each variant runs in a fresh subprocess of this script, so that what one variant leaves in the allocator
cannot hide or inflate another's memory. Peak memory is the growth over one forward + backward after the
warm-up calls (and compilation): on CUDA torch.cuda.max_memory_allocated minus the memory allocated
before; on a CPU the growth of the peak resident set size (VmHWM in /proc/self/status, reset through
/proc/self/clear_refs; Linux only). Freed memory that the allocator keeps resident and hands out again does
not show as growth, one more reason for a fresh process per variant. "logits MiB" is the float32 logits
one step holds at a time (tokens or chunk x vocab x 4 bytes); the plain path holds about three of those at
its peak (logits, log-softmax, their gradient).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, time_call, write_json  # noqa: E402
from llama_mini.ops.loss import linear_cross_entropy  # noqa: E402

# (tokens, dim, vocab) when not given: a GPT-2-small-sized output layer on CUDA, about a minute on a CPU
DEFAULT_SIZES = {"cuda": (8192, 768, 32000), "cpu": (2048, 288, 32000)}
DEFAULT_CHUNK_SIZES = {"cuda": [1024, 4096], "cpu": [256, 1024]}


def plain_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def variants(chunk_sizes: list[int]) -> dict[str, tuple[int | None, bool]]:
    """Variant name -> (chunk size or None for the plain path, compiled)."""
    table = {"plain": (None, False), "plain, compiled": (None, True)}
    table.update({f"chunked {chunk}": (chunk, False) for chunk in chunk_sizes})
    table["chunked, compiled"] = (max(chunk_sizes), True)
    return table


def resident_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Time and peak memory of one variant, in this process."""
    chunk_size, compiled = variants(args.chunk_sizes)[args.variant]
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(args.vocab, args.dim, device=device)).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    if chunk_size is None:
        loss_fn = plain_loss
    else:

        def loss_fn(hidden, weight, targets):
            return linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)

    if compiled:
        loss_fn = torch.compile(loss_fn)
    losses = []

    def forward_backward():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(hidden, weight, targets)
        loss.backward()
        hidden.grad = weight.grad = None
        losses.append(loss.detach())  # read after timing: .item() here would wait for the GPU

    repeats = 5 if device.type == "cuda" else 3
    seconds = time_call(forward_backward, device, warmup=2, repeats=repeats)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        forward_backward()
        torch.cuda.synchronize(device)
        peak_bytes = torch.cuda.max_memory_allocated(device) - baseline
    else:
        baseline = resident_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        forward_backward()
        peak_bytes = (resident_kib("VmHWM") - baseline) * 1024
    logits_rows = args.tokens if chunk_size is None else min(chunk_size, args.tokens)
    return {
        "variant": args.variant,
        "forward+backward ms": 1000 * seconds,
        "tokens/s": args.tokens / seconds,
        "logits MiB": logits_rows * args.vocab * 4 / 2**20,
        "peak extra MiB": peak_bytes / 2**20,
        "loss": losses[-1].item(),
    }


def run_in_subprocess(args: argparse.Namespace, variant: str) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--device", args.device]
    command += ["--tokens", str(args.tokens), "--dim", str(args.dim), "--vocab", str(args.vocab)]
    command += ["--chunk-sizes", *map(str, args.chunk_sizes)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"variant {variant!r} failed (exit code {result.returncode})")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=None, help="batch x sequence length")
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one variant, in a subprocess
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    tokens, dim, vocab = DEFAULT_SIZES["cuda" if device.type == "cuda" else "cpu"]
    args.tokens, args.dim, args.vocab = args.tokens or tokens, args.dim or dim, args.vocab or vocab
    args.chunk_sizes = args.chunk_sizes or DEFAULT_CHUNK_SIZES["cuda" if device.type == "cuda" else "cpu"]
    if args.variant is not None:
        print(json.dumps(measure(args, device)))
        return 0

    rows = []
    for variant in variants(args.chunk_sizes):
        rows.append(run_in_subprocess(args, variant))
        print(f"{variant}: {rows[-1]['forward+backward ms']:.0f} ms", file=sys.stderr)
    info = run_info(device)
    precision = "bf16 autocast" if device.type == "cuda" else "float32"
    print(
        f"{args.tokens} tokens, dim {args.dim}, vocab {args.vocab}, {precision}, {info['device']}, "
        f"torch {info['torch']}, commit {info['commit']}, {info['date']}"
    )
    print_table(rows)
    payload = {**info, "tokens": args.tokens, "dim": args.dim, "vocab": args.vocab, "results": rows}
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
