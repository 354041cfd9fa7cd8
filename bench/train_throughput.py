"""Training throughput: tokens/s, MFU and peak memory of full optimizer steps, for each set of fast paths.

    python bench/train_throughput.py                                   # stories15m, seq 256: plain, default
    python bench/train_throughput.py --preset stories110m --seq-len 1024 --batch-size 16 \\
        --variants plain compiled default compiled+chunked-loss compiled+swiglu-triton

One step = forward, backward (bf16 autocast on a GPU, fp32 on a CPU) and an AdamW update: the work of
llama_mini.train, built from the same pieces (llama_mini.ops.fast_paths). MFU = tokens/s x (6N + 12 x
n_layers x dim x seq_len) / peak FLOP/s, with the peak from llama_mini.runtime.PEAK_BF16_FLOPS (or
--peak-tflops). The variants:

    plain       no fast path: eager, the plain loss, eager SwiGLU, AdamW's for-each kernels
    default     what train.py chooses on this device (every setting "auto")
    compiled    torch.compile of model + loss, everything else plain
    compiled+chunked-loss, compiled+swiglu-compiled, compiled+swiglu-triton, eager+chunked-loss,
    eager+swiglu-compiled, eager+swiglu-triton, ...: compile on or off plus one fast path
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, time_call, write_json  # noqa: E402
from llama_mini import ModelArgs, Transformer, get_preset, training_flops_per_token  # noqa: E402
from llama_mini.ops.fast_paths import (  # noqa: E402
    LOSS_CHUNK_SIZE,
    FastPaths,
    apply_fast_paths,
    attention_backend,
    choose_fast_paths,
)
from llama_mini.runtime import autocast, peak_flops  # noqa: E402
from llama_mini.train import TrainConfig, make_optimizer  # noqa: E402


def variant_fast_paths(
    name: str, device: torch.device, dtype: torch.dtype, tokens: int, vocab_size: int
) -> FastPaths:
    """The FastPaths a variant name stands for (see the module docstring)."""
    if name == "default":
        return choose_fast_paths(device, tokens, vocab_size, dtype=dtype)
    base, _, extra = name.partition("+")
    if base not in ("plain", "eager", "compiled") or (base == "plain" and extra):
        raise SystemExit(f"unknown variant {name!r}: plain, default, or eager/compiled[+fast path]")
    settings = dict(
        compile=base == "compiled",
        fused_adamw=False,
        attention="auto",
        swiglu_kernel="eager",
        loss_chunk_size=0,
    )
    if extra == "chunked-loss":
        settings["loss_chunk_size"] = LOSS_CHUNK_SIZE
    elif extra.startswith("swiglu-"):
        settings["swiglu_kernel"] = extra.removeprefix("swiglu-")
    elif extra == "fused-adamw":
        settings["fused_adamw"] = True
    elif extra.startswith("attention-"):
        settings["attention"] = extra.removeprefix("attention-")
    elif extra:
        raise SystemExit(f"unknown fast path {extra!r} in variant {name!r}")
    return FastPaths(**settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", nargs="+", default=["stories15m"], help="preset names, or 'default' (train.py's model)"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=None, help="override the preset's vocabulary")
    parser.add_argument("--dim", type=int, default=None, help="override the preset's width")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", nargs="+", default=["plain", "default"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = peak_flops(device, args.peak_tflops)
    tokens_per_step = args.batch_size * args.seq_len
    rows = []
    for preset in args.preset:
        overrides = {"max_seq_len": args.seq_len}
        if args.vocab_size:
            overrides["vocab_size"] = args.vocab_size
        if args.dim:
            overrides["dim"] = args.dim
        model_args = ModelArgs(**overrides) if preset == "default" else get_preset(preset, **overrides)
        for variant in args.variants:
            paths = variant_fast_paths(variant, device, dtype, tokens_per_step, model_args.vocab_size)
            torch.manual_seed(0)
            model = Transformer(model_args).to(device)
            forward = apply_fast_paths(model, paths)
            optimizer = make_optimizer(model, TrainConfig(max_steps=10, eval_interval=10), paths.fused_adamw)
            tokens = torch.randint(
                0, model_args.vocab_size, (args.batch_size, args.seq_len + 1), device=device
            )

            def step(forward=forward, optimizer=optimizer, tokens=tokens, paths=paths):
                with autocast(device, dtype), attention_backend(paths.attention):
                    loss = forward(tokens[:, :-1], tokens[:, 1:])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = time_call(step, device, warmup=3, repeats=args.steps)
            tokens_per_second = tokens_per_step / seconds
            row = {
                "preset": preset,
                "variant": variant,
                "params (M)": sum(p.numel() for p in model.parameters()) / 1e6,
                "tok/s": tokens_per_second,
                "ms/step": 1000 * seconds,
            }
            if peak:
                flops = training_flops_per_token(model_args, args.seq_len)
                row["MFU %"] = 100 * tokens_per_second * flops / peak
            if device.type == "cuda":
                row["peak GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            row["fast paths"] = ", ".join(f"{key}={value}" for key, value in vars(paths).items())
            rows.append(row)
            del model, optimizer, forward
            if device.type == "cuda":
                torch.cuda.empty_cache()
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
