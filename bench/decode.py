"""Generation speed: prefill and decode tokens/s, and on a GPU the share of the memory-bandwidth bound.

    python bench/decode.py                                    # stories15m at batch 1 and 8, CPU or GPU
    python bench/decode.py --preset stories110m llama3.2-1b --compile both --json decode.json
    python bench/decode.py --preset llama3.2-1b --quantize none int8 int4 --compile both   # on a GPU

At batch size B each decode step reads every weight once (and the KV cache of the positions so far) to
produce B tokens, so when memory bandwidth is the limit:  tokens/s <= B * bandwidth / bytes read per step.
The bandwidth is measured here, as a large device-to-device copy on a GPU (bytes read + written per
second) and as a large read on a CPU, so the bound is one this device can actually reach. Weights have
random values: speed does not depend on them. "compiled" is generation's compile=True: on CUDA torch.compile
with CUDA graphs, on a CPU the step compiled ahead of time (llama_mini.ops.aot_step), built during warm-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, time_call, write_json  # noqa: E402
from llama_mini import Transformer, get_preset  # noqa: E402
from llama_mini.generation import GenerationStats, generate  # noqa: E402
from llama_mini.ops.quantize import Int4Linear, Int8Linear, quantize  # noqa: E402

QUANTIZED = (Int8Linear, Int4Linear)


def copy_bandwidth(device: torch.device, megabytes: int = 1024) -> float | None:
    """Bytes per second of a device-to-device copy (read + write counted), or None on a CPU."""
    if device.type != "cuda":
        return None
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = time_call(lambda: target.copy_(source), device, warmup=3, repeats=10)
    return 2 * source.numel() / seconds


def read_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Bytes per second that summing a large float32 tensor reads: the bound's bandwidth on a CPU, where
    decoding reads weights and writes almost nothing (on a GPU the copy bandwidth above is used)."""
    source = torch.randn(megabytes * 2**20 // 4, device=device)
    seconds = time_call(source.sum, device, warmup=2, repeats=7)
    return 4 * source.numel() / seconds


def bytes_per_decode_step(model: Transformer, batch: int, context: int, dtype: torch.dtype) -> int:
    """Weights read once per step, in the bytes they are stored in (a quantized layer's int8 or packed
    int4 values and its scales; the embedding table only B rows, unless tied to the output matrix), plus
    the keys and values of `context` positions for each of the batch's rows, in `dtype`."""
    args = model.args
    stored = [*model.parameters(), *(buffer for module in model.modules() if isinstance(module, QUANTIZED)
                                     for buffer in module.buffers(recurse=False))]  # fmt: skip
    weights = sum(tensor.numel() * tensor.element_size() for tensor in stored)
    if not args.tie_embeddings:  # a lookup of B rows, not a read of the table
        table = model.tok_embeddings.weight
        weights -= table.numel() * table.element_size()
    kv_cache = 2 * args.n_layers * args.n_kv_heads * args.head_dim * context * batch
    return weights + kv_cache * (torch.finfo(dtype).bits // 8)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", nargs="+", default=["stories15m"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off")
    parser.add_argument(
        "--quantize", nargs="+", choices=["none", "int8", "int4"], default=["none"],
        help="weights as stored: the model's dtype (none), or generate.py --quantize's int8 / int4",
    )  # fmt: skip
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else read_bandwidth(device)
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    rows = []
    for preset, scheme in ((preset, scheme) for preset in args.preset for scheme in args.quantize):
        torch.manual_seed(0)
        # Keep the context at prompt + new tokens: a 128K-position cache would not fit batch 8.
        model_args = get_preset(preset, max_seq_len=args.prompt_len + args.new_tokens)
        model = quantize(Transformer(model_args).to(device=device, dtype=dtype).eval(), scheme)
        for compiled in modes:
            for batch in args.batch_sizes:
                prompts = torch.randint(1, model_args.vocab_size, (batch, args.prompt_len)).tolist()
                stats = GenerationStats()

                def run(model=model, stats=stats, prompts=prompts, compiled=compiled):
                    stats.__init__()  # keep the last call's numbers
                    generate(model, prompts, args.new_tokens, temperature=0, compile=compiled, stats=stats)

                time_call(run, device, warmup=2, repeats=3)
                row = {
                    "preset": preset,
                    "weights": dtype_name if scheme == "none" else scheme,
                    "mode": "compiled" if compiled else "eager",
                    "batch": batch,
                    "prefill tok/s": stats.prefill_tokens_per_second,
                    "decode tok/s": stats.decode_tokens_per_second,
                }
                if bandwidth:
                    average_context = args.prompt_len + args.new_tokens // 2
                    step_bytes = bytes_per_decode_step(model, batch, average_context, dtype)
                    bound = batch * bandwidth / step_bytes
                    row["bound tok/s"] = bound
                    row["% of bound"] = 100 * stats.decode_tokens_per_second / bound
                rows.append(row)
        del model
    info = run_info(device)
    print(f"{dtype}, {info['device']}, torch {info['torch']}, commit {info['commit']}, {info['date']}")
    kind = "copy (read + write)" if device.type == "cuda" else "read (sum of 512 MB)"
    print(f"measured {kind} bandwidth: {bandwidth / 1e9:,.1f} GB/s")
    print_table(rows)
    write_json(args.json, {**info, "dtype": str(dtype), "bandwidth": bandwidth, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
