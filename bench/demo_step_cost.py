"""The cost of one `make demo` training step under other settings, timed in turn in one process.

    python bench/demo_step_cost.py              # fp32 / bf16 autocast, vocab 4096 / 2048, context 128
    python bench/demo_step_cost.py --rounds 8 --threads 2
    python bench/demo_step_cost.py --variants demo=dtype:fp32 bf16=dtype:bf16 compiled=dtype:bf16,compile:1

Each variant is a full training step as train.py takes it (forward, chunked loss, backward, AdamW) on the
demo's model (dim 192, 4 layers, SwiGLU) with train.py's fast paths for the CPU. The variants are timed
round-robin, two steps each per round, so a shared machine's load hits them alike; each reports its
median seconds per step, the ratio to the first variant (by default `make demo`'s step before issue 28:
fp32, 4 heads of 48, vocab 4096, 16 x 256 tokens) and the time of its first step (with compile: mostly
compiling, from an empty cache when TORCHINDUCTOR_CACHE_DIR names an empty folder). A variant is
NAME=KEY:VALUE,...: dtype (fp32 or bf16), vocab, seq, batch, optimizer (adamw or muon, as train.py
--optimizer), tie (1: tied embeddings), attention (train.py's --attention: auto, flash or math), compile
(0; 1: train.py's --compile, each block compiled; whole: the model and its loss compiled as one, as
--compile did before issue 28), chunk (--loss-chunk-size; none = the default), and any other ModelArgs
number (dim, n_layers, n_heads (the default 3; 4 before issue 28), multiple_of). Compiled variants of
different shapes belong in separate commands: in one process the second shape recompiles the blocks with
dynamic shapes.

    python bench/demo_step_cost.py --threads 1 --variants adamw=seq:128,batch:8 \
        muon=seq:128,batch:8,optimizer:muon   # a Muon step against an AdamW one (bench/optimizer_sweep.py)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llama_mini import ModelArgs, Transformer  # noqa: E402
from llama_mini.console import ArgumentParser  # noqa: E402
from llama_mini.ops.fast_paths import apply_fast_paths, attention_backend, choose_fast_paths  # noqa: E402
from llama_mini.runtime import autocast  # noqa: E402
from llama_mini.train import TrainConfig, make_optimizer  # noqa: E402

DEFAULT_VARIANTS = [  # the second try's table (docs/BENCHMARKS.md), on the model of that day: 4 heads of 48
    "demo=dtype:fp32,n_heads:4",
    "bf16=dtype:bf16,n_heads:4",
    "vocab2048=vocab:2048,n_heads:4",
    "vocab2048-bf16=vocab:2048,dtype:bf16,n_heads:4",
    "ctx128-batch32=seq:128,batch:32,n_heads:4",
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_step(spec: str):
    """A function doing one training step of the variant `spec`, and its tokens per step."""
    fields = dict(item.split(":", 1) for item in spec.split(",") if item)
    dtype = DTYPES[fields.pop("dtype", "fp32")]
    seq, batch = int(fields.pop("seq", 256)), int(fields.pop("batch", 16))
    vocab = int(fields.pop("vocab", 4096))
    optimizer_name, tie = fields.pop("optimizer", "adamw"), fields.pop("tie", "0") == "1"
    attention, compile = fields.pop("attention", "auto"), fields.pop("compile", "0")
    chunk = int(fields.pop("chunk")) if "chunk" in fields else None
    model_args = ModelArgs(
        max_seq_len=seq, vocab_size=vocab, tie_embeddings=tie, **{k: int(v) for k, v in fields.items()}
    )
    device = torch.device("cpu")
    paths = choose_fast_paths(
        device,
        batch * seq,
        vocab,
        dtype=dtype,
        compile=compile == "1",
        attention=attention,
        loss_chunk_size=chunk,
    )
    torch.manual_seed(0)
    model = Transformer(model_args)
    forward = apply_fast_paths(model, paths)
    if compile == "whole":
        forward = torch.compile(forward)
    optimizer = make_optimizer(
        model, TrainConfig(max_steps=10, eval_interval=10, optimizer=optimizer_name), paths.fused_adamw
    )
    tokens = torch.randint(0, vocab, (batch, seq + 1))

    def step() -> None:
        with autocast(device, dtype), attention_backend(paths.attention):
            loss = forward(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, batch * seq


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, metavar="NAME=KEY:VALUE,...")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of two timed steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (none = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {}
    for item in args.variants:
        name, spec = item.split("=", 1)
        step, tokens = make_step(spec)
        started = time.perf_counter()
        step()  # warm-up: allocations, oneDNN's kernel choice, compiling
        first = time.perf_counter() - started
        step()
        variants[name] = (step, tokens, [], first)
    for _ in range(args.rounds):
        for step, _tokens, times, _first in variants.values():
            started = time.perf_counter()
            step(), step()
            times.append((time.perf_counter() - started) / 2)
    base = statistics.median(next(iter(variants.values()))[2])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print("| variant | first step s | ms/step | tokens/s | time / first |")
    print("|---|--:|--:|--:|--:|")
    for name, (_step, tokens, times, first) in variants.items():
        median = statistics.median(times)
        print(
            f"| {name} | {first:.1f} | {1000 * median:.0f} | {tokens / median:,.0f} | {median / base:.3f} |"
        )


if __name__ == "__main__":
    main()
