"""Where the time of a CPU training step goes, and the matrix-vector quirk behind generation's output product.

    python bench/profile_cpu.py train            # stories15m step (batch 8 x 256), fast paths, torch.profiler
    python bench/profile_cpu.py train --plain    # the same without compile or the chunked loss
    python bench/profile_cpu.py matvec           # F.linear(x, W) against (W @ x^T)^T for W 32000 x 288

`train` profiles a few forward + backward steps after warm-up and sorts the operators into matrix
multiplications, attention and everything else (elementwise, norms, the loss), with the rate the matrix
multiplications reach (their FLOPs, counted by the profiler, over their time) beside a large square fp32
matmul on the same machine: how close the step is to what the cores can multiply.

`matvec` times the output layer's product for 1 and 8 rows both ways: nn.Linear's h @ W^T and the same
product written W @ h^T, which generation uses on a CPU (llama_mini.generation, `next_token_logits`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, time_call, write_json  # noqa: E402
from llama_mini import Transformer, get_preset  # noqa: E402
from llama_mini.ops.fast_paths import apply_fast_paths, choose_fast_paths  # noqa: E402

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn")
ATTENTION_OPS = ("scaled_dot_product", "attention")


def kind_of(name: str) -> str:
    if any(op in name for op in ATTENTION_OPS):
        return "attention"
    if name.startswith(MATMUL_OPS):
        return "matmul"
    return "other"


def square_matmul_gflops(size: int = 2048) -> float:
    """What the cores can multiply: GFLOP/s of one (size x size) @ (size x size) fp32 product."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = time_call(lambda: a @ b, torch.device("cpu"), warmup=2, repeats=5)
    return 2 * size**3 / seconds / 1e9


def profile_training(preset: str, batch: int, seq_len: int, plain: bool, steps: int) -> list[dict]:
    torch.manual_seed(0)
    args = get_preset(preset, max_seq_len=seq_len)
    model = Transformer(args)
    device = torch.device("cpu")
    paths = choose_fast_paths(
        device,
        tokens_per_micro_batch=batch * seq_len,
        vocab_size=args.vocab_size,
        dtype=torch.float32,
        compile=not plain,
        loss_chunk_size=0 if plain else None,
    )
    loss_module = apply_fast_paths(model, paths)
    tokens = torch.randint(0, args.vocab_size, (batch, seq_len + 1))

    def step():
        loss_module(tokens[:, :-1], tokens[:, 1:]).backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: compilation, allocator
        step()
    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as profiler:
        for _ in range(steps):
            step()
    # self times of every operator, nested ones included, add up to the time spent in operators
    all_self = sum(event.self_cpu_time_total for event in profiler.key_averages())
    totals = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    matmul_flops = 0
    for event in profiler.key_averages():
        kind = kind_of(event.key)
        totals[kind] += event.self_cpu_time_total
        if kind == "matmul":
            matmul_flops += event.flops or 0
    reference = square_matmul_gflops()
    matmul_seconds = totals["matmul"] / 1e6
    rows = [
        {
            "part": kind,
            "share of operator time": f"{100 * value / all_self:.0f}%",
            "ms per step": f"{value / 1e3 / steps:.1f}",
        }
        for kind, value in totals.items()
    ]
    rows.append(
        {
            "part": "matmul rate",
            "share of operator time": f"{matmul_flops / matmul_seconds / 1e9:.0f} GFLOP/s"
            if matmul_seconds
            else "-",
            "ms per step": f"square 2048 fp32 matmul: {reference:.0f} GFLOP/s",
        }
    )
    return rows


def matvec_rows(vocab: int, dim: int) -> list[dict]:
    torch.manual_seed(0)
    weight = torch.randn(vocab, dim)
    device = torch.device("cpu")
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, dim)
        linear = time_call(lambda x=x: F.linear(x, weight), device, warmup=3, repeats=15)
        transposed = time_call(lambda x=x: (weight @ x.T).T, device, warmup=3, repeats=15)
        rows.append(
            {
                "rows": batch,
                "F.linear(x, W) ms": f"{linear * 1e3:.2f}",
                "(W @ x^T)^T ms": f"{transposed * 1e3:.2f}",
                "ratio": f"{linear / transposed:.2f}x",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["train", "matvec"])
    parser.add_argument("--preset", default="stories15m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="profiled steps (train)")
    parser.add_argument("--plain", action="store_true", help="train: no compile, no chunked loss")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.what == "train":
        rows = profile_training(args.preset, args.batch_size, args.seq_len, args.plain, args.steps)
        title = f"{args.preset} training step, batch {args.batch_size} x {args.seq_len}, fp32, " + (
            "plain" if args.plain else "fast paths"
        )
    else:
        args_model = get_preset(args.preset)
        rows = matvec_rows(args_model.vocab_size, args_model.dim)
        title = f"output product, W {args_model.vocab_size} x {args_model.dim}, fp32"
    print(title)
    print_table(rows)
    info = run_info(torch.device("cpu"))
    print(info)
    if args.json:
        write_json(args.json, {"title": title, "results": rows, **info})
    return 0


if __name__ == "__main__":
    sys.exit(main())
