"""Training throughput: tokens/s, MFU and peak memory of full optimizer steps, eager and compiled.

    python bench/train_throughput.py                                   # stories15m, seq 256
    python bench/train_throughput.py --preset stories110m --seq-len 1024 --batch-size 16 --compile both

One step = forward, backward (bf16 autocast on a GPU, fp32 on a CPU) and a fused AdamW update, the same
work as llama_mini.training. MFU = tokens/s * (6N + 12 * n_layers * dim * seq_len) / peak FLOP/s, with the
peak from llama_mini.training.PEAK_BF16_FLOPS (or --peak-tflops).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, time_call, write_json  # noqa: E402
from llama_mini import ModelArgs, Transformer, cross_entropy, get_preset, training_flops_per_token  # noqa: E402
from llama_mini.training import TrainConfig, autocast, make_optimizer, peak_flops  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", nargs="+", default=["stories15m"], help="preset names, or 'default' (train.py's model)"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary")
    parser.add_argument("--dim", type=int, default=None, help="override the preset's width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = peak_flops(device, args.peak_tflops)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for preset in args.preset:
        overrides = {"max_seq_len": args.seq_len}
        if args.vocab_size:
            overrides["vocab_size"] = args.vocab_size
        if args.dim:
            overrides["dim"] = args.dim
        model_args = ModelArgs(**overrides) if preset == "default" else get_preset(preset, **overrides)
        for compiled in modes:
            torch.manual_seed(0)
            model = Transformer(model_args).to(device)
            optimizer = make_optimizer(model, TrainConfig(max_steps=10, eval_interval=10), device)
            forward = torch.compile(model) if compiled else model
            vocab = model.args.vocab_size
            tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), device=device)

            def step(forward=forward, optimizer=optimizer, tokens=tokens):
                with autocast(device, dtype):
                    loss = cross_entropy(forward(tokens[:, :-1]), tokens[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = time_call(step, device, warmup=3, repeats=args.steps)
            tokens_per_second = args.batch_size * args.seq_len / seconds
            row = {
                "preset": preset,
                "mode": "compiled" if compiled else "eager",
                "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
                "tok/s": tokens_per_second,
                "ms/step": 1000 * seconds,
            }
            if peak:
                flops = training_flops_per_token(model, args.seq_len)
                row["MFU %"] = 100 * tokens_per_second * flops / peak
            if device.type == "cuda":
                row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            rows.append(row)
            del model, optimizer, forward
    info = run_info(device)
    print(
        f"batch {args.batch_size} x seq {args.seq_len}, {dtype}, {info['device']}, torch {info['torch']}, "
        f"commit {info['commit']}, {info['date']}"
    )
    print_table(rows)
    write_json(args.json, {**info, "seq_len": args.seq_len, "batch_size": args.batch_size, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
