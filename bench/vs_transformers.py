"""llama_mini beside transformers' LlamaForCausalLM: the same config and weights, in one process.

    python bench/vs_transformers.py                          # stories15m shape, CPU or GPU
    python bench/vs_transformers.py --preset stories110m --batch-size 16 --json out.json

Measures, for each library, on the same device and dtype:
  - a training step: forward + backward of the next-token loss on a (batch, seq_len) batch;
  - greedy decoding: prefill of a prompt, then new tokens one at a time with each library's KV cache,
    at batch 1 and batch 8 (equal-length prompts, so neither needs padding), as new tokens per second.
The last table gives llama_mini's speed as a ratio of transformers' (> 1 means llama_mini is faster).
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
from llama_mini.generation import generate  # noqa: E402


def build_pair(preset: str, device: torch.device, dtype: torch.dtype):
    """Our model with random weights, and transformers' model loaded from our saved copy of them."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    ours = Transformer(get_preset(preset))
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    return ours.to(device=device, dtype=dtype), theirs.to(device=device, dtype=dtype)


def training_step_seconds(model, forward, tokens, device) -> float:
    model.train()

    def step():
        loss = cross_entropy(forward(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        model.zero_grad(set_to_none=True)

    return time_call(step, device, warmup=2, repeats=5)


def ours_greedy(model, prompts, new_tokens):
    return lambda: generate(model, prompts, new_tokens, temperature=0)


def theirs_greedy(model, prompts, new_tokens):
    input_ids = torch.tensor(prompts, device=model.device)

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
            )

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="stories15m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--batch-size", type=int, default=8, help="training-step batch")
    parser.add_argument("--seq-len", type=int, default=256, help="training-step sequence length")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    ours, theirs = build_pair(args.preset, device, dtype)
    vocab = ours.args.vocab_size
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (args.batch_size, args.seq_len + 1), generator=generator).to(device)

    results = []
    train_ours = training_step_seconds(ours, ours, tokens, device)
    train_theirs = training_step_seconds(theirs, lambda x: theirs(input_ids=x).logits, tokens, device)
    step_tokens = args.batch_size * args.seq_len
    results.append(
        {
            "measurement": f"training step, batch {args.batch_size} x {args.seq_len}",
            "llama_mini": f"{step_tokens / train_ours:,.0f} tok/s ({1000 * train_ours:.1f} ms)",
            "transformers": f"{step_tokens / train_theirs:,.0f} tok/s ({1000 * train_theirs:.1f} ms)",
            "ratio": round(train_theirs / train_ours, 2),
        }
    )
    ours.eval()
    theirs.eval()
    for batch in (1, 8):
        prompts = torch.randint(1, vocab, (batch, args.prompt_len), generator=generator).tolist()
        ours_run = ours_greedy(ours, prompts, args.new_tokens)
        theirs_run = theirs_greedy(theirs, prompts, args.new_tokens)
        ours_seconds = time_call(ours_run, device, warmup=1, repeats=3)
        theirs_seconds = time_call(theirs_run, device, warmup=1, repeats=3)
        new = batch * args.new_tokens
        results.append(
            {
                "measurement": f"greedy decode, batch {batch}, {args.prompt_len}+{args.new_tokens} tokens",
                "llama_mini": f"{new / ours_seconds:,.0f} tok/s",
                "transformers": f"{new / theirs_seconds:,.0f} tok/s",
                "ratio": round(theirs_seconds / ours_seconds, 2),
            }
        )

    info = run_info(device)
    print(
        f"{args.preset}, {dtype}, {info['device']}, torch {info['torch']}, "
        f"commit {info['commit']}, {info['date']}"
    )
    print("ratio = llama_mini speed / transformers speed (same weights, same process)")
    print_table(results)
    write_json(args.json, {**info, "preset": args.preset, "dtype": str(dtype), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
