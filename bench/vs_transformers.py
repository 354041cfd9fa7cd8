"""llama_mini beside transformers' LlamaForCausalLM: the same config and weights, in one process.

    python bench/vs_transformers.py                          # stories15m shape, CPU or GPU
    python bench/vs_transformers.py --preset stories110m --batch-size 16 --json out.json
    python bench/vs_transformers.py --peer-compile           # also transformers' own compiled paths

Measures, for each library, on the same device and dtype:
  - a training step: forward + backward of the next-token loss on a (batch, seq_len) batch;
  - greedy decoding: prefill of a prompt, then new tokens one at a time with each library's KV cache,
    at batch 1 and batch 8 (equal-length prompts, so neither needs padding), as new tokens per second.
llama_mini runs twice: plain (eager, no fast path) and fast (torch.compile of model + loss with the
device's fast paths from llama_mini.ops.fast_paths; decoding compiled with the static-shape cache, CUDA graphs
on a GPU). transformers runs as users run it by default (eager, dynamic cache); with --peer-compile also
compiled (training) and with its static cache compiled (decoding). The tables give each speed as a ratio
of transformers' default (> 1 means faster than transformers).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, time_call, write_json  # noqa: E402
from llama_mini import Transformer, cross_entropy, get_preset  # noqa: E402
from llama_mini.checkpoint import save_pretrained  # noqa: E402
from llama_mini.generation import generate  # noqa: E402
from llama_mini.ops.fast_paths import apply_fast_paths, attention_backend, choose_fast_paths  # noqa: E402


def build_pair(preset: str, device: torch.device, dtype: torch.dtype):
    """Our model with random weights, and transformers' model loaded from our saved copy of them."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ours = Transformer(get_preset(preset))
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, folder)
        theirs = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    return ours.to(device=device, dtype=dtype), theirs.to(device=device, dtype=dtype)


def training_step_seconds(model, loss_of, tokens, device) -> float:
    """Median seconds of forward + backward, where loss_of(x, y) gives the mean next-token loss."""
    model.train()

    def step():
        loss = loss_of(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)

    return time_call(step, device, warmup=3, repeats=5)


def ours_greedy(model, prompts, new_tokens, compile: bool):
    return lambda: generate(model, prompts, new_tokens, temperature=0, compile=compile)


def theirs_greedy(model, prompts, new_tokens, static_cache: bool = False):
    input_ids = torch.tensor(prompts, device=model.device)
    # transformers' fast path: a static cache, with which generate() compiles the forward itself
    options = {"cache_implementation": "static"} if static_cache else {}

    def run():
        with torch.inference_mode():
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                max_length=None,  # the saved generation_config's max_length would otherwise warn
                min_new_tokens=new_tokens,  # both sides produce exactly new_tokens
                eos_token_id=None,
                pad_token_id=0,
                **options,
            )

    return run


def ratio_row(measurement: str, tokens: int, seconds: dict[str, float], baseline: str) -> dict:
    """One table row: tokens/s of each contender and its speed as a ratio of the baseline's."""
    row = {"measurement": measurement}
    for name, value in seconds.items():
        row[name] = f"{tokens / value:,.0f} tok/s ({seconds[baseline] / value:.2f}x)"
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="stories15m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="training-step batch")
    parser.add_argument("--seq-len", type=int, default=256, help="training-step sequence length")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--peer-compile", action="store_true", help="also time transformers compiled")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ours, theirs = build_pair(args.preset, device, dtype)
    vocab = ours.args.vocab_size
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=generator).to(device)
    step_tokens = args.batch_size * args.seq_len
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    # llama_mini's fast paths for this device, with compiling on (on a CPU it is opt-in: see fast_paths).
    paths = choose_fast_paths(device, step_tokens, vocab, dtype=dtype, compile=True)
    ours_fast = Transformer(ours.args).to(device=device, dtype=dtype)
    ours_fast.load_state_dict(ours.state_dict())
    compiled_ours = apply_fast_paths(ours_fast, paths)

    def theirs_loss(model):
        return lambda x, y: cross_entropy(model(input_ids=x).logits, y)

    with autocast:
        train = {
            "transformers": training_step_seconds(theirs, theirs_loss(theirs), tokens, device),
            "llama_mini plain": training_step_seconds(
                ours, lambda x, y: cross_entropy(ours(x), y), tokens, device
            ),
        }
        with attention_backend(paths.attention):
            train["llama_mini fast"] = training_step_seconds(
                ours_fast, lambda x, y: compiled_ours(x, y), tokens, device
            )
        if args.peer_compile:
            train["transformers compiled"] = training_step_seconds(
                theirs, theirs_loss(torch.compile(theirs)), tokens, device
            )
    results = [
        ratio_row(
            f"training step, batch {args.batch_size} x {args.seq_len}", step_tokens, train, "transformers"
        )
    ]

    ours.eval()
    theirs.eval()
    for batch in args.decode_batches:
        prompts = torch.randint(1, vocab, (batch, args.prompt_len), generator=generator).tolist()
        contenders = {
            "transformers": theirs_greedy(theirs, prompts, args.new_tokens),
            "llama_mini plain": ours_greedy(ours, prompts, args.new_tokens, compile=False),
            "llama_mini fast": ours_greedy(ours, prompts, args.new_tokens, compile=True),
        }
        if args.peer_compile:
            contenders["transformers compiled"] = theirs_greedy(
                theirs, prompts, args.new_tokens, static_cache=True
            )
        seconds = {name: time_call(run, device, warmup=2, repeats=3) for name, run in contenders.items()}
        results.append(
            ratio_row(
                f"greedy decode, batch {batch}, {args.prompt_len}+{args.new_tokens} tokens",
                batch * args.new_tokens,
                seconds,
                "transformers",
            )
        )

    info = run_info(device)
    print(
        f"{args.preset}, {dtype}, {info['device']}, torch {info['torch']}, "
        f"commit {info['commit']}, {info['date']}; llama_mini fast: {paths.describe()}"
    )
    print("each: tokens/s (speed as a ratio of transformers' default; same weights, same process)")
    print_table(results)
    write_json(args.json, {**info, "preset": args.preset, "dtype": str(dtype), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
