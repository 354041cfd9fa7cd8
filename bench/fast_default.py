"""Fast by default (issue 27, part 4): the eager decode step beside transformers, and what a first call costs
with the default (eager while the compiled step builds in the background), eager, and --compile.

    python bench/fast_default.py --part eager         # tokens/s: ours eager (new step, model forward), HF
    python bench/fast_default.py --part first-call    # first token and total seconds per arm and length

--part eager: one process, one model (dim 256, 4 layers, 8 heads, vocab 4096, random weights) and
transformers' LlamaForCausalLM loaded from our saved copy; greedy decoding at batch 1 of --new-tokens tokens
after an 8-token prompt; the three arms interleaved, --repeats times, medians reported, as a ratio of
transformers' eager generate (> 1: faster).

--part first-call: each arm in a fresh process (as a one-shot command runs), the time from the call to its
first new token and to its last, with the step's compile cache empty (cold) or holding the step (warm):
    eager           compile=False
    default, cold   compile=None, an empty compile cache: eager, with the step built in a child process
                    (the script then waits for the child, and reports when the step landed)
    default, warm   compile=None, the cache the cold run filled: the saved step is loaded
    compile, cold   compile=True, an empty compile cache: the step is built before the first token (at the
                    first length only: the build takes as long at every length)
    compile, warm   compile=True, the cache holding the step
The KV cache is set up for 1,280 positions in every arm (the longest request's), so every arm and length
runs the same compiled step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.vs_transformers import theirs_greedy  # noqa: E402
from llama_mini import Transformer  # noqa: E402
from llama_mini.checkpoint import save_pretrained  # noqa: E402
from llama_mini.generation import decode as decode_module  # noqa: E402
from llama_mini.generation import generate, iter_new_tokens  # noqa: E402
from llama_mini.model.args import ModelArgs  # noqa: E402

SHAPE = dict(dim=256, n_layers=4, n_heads=8, vocab_size=4096, max_seq_len=2048)
PROMPT = [[1, 5, 9, 200, 31, 7, 8, 9]]
CACHE_POSITIONS = 1280


def model_of_shape() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(**SHAPE)).eval()


def eager_part(new_tokens: int, repeats: int) -> dict:
    from transformers import LlamaForCausalLM

    ours = model_of_shape()
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, folder)
        theirs = LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    model_forward = decode_module.eager_step

    def ours_eager():
        generate(ours, PROMPT, new_tokens, temperature=0, compile=False)

    def ours_model_forward():  # every step through the model's own forward (decode_step)
        decode_module.eager_step = lambda model: None
        try:
            generate(ours, PROMPT, new_tokens, temperature=0, compile=False)
        finally:
            decode_module.eager_step = model_forward

    arms = {
        "llama_mini eager step": ours_eager,
        "llama_mini model forward": ours_model_forward,
        "transformers eager": theirs_greedy(theirs, PROMPT, new_tokens),  # bench/vs_transformers.py's
    }
    for run in arms.values():  # warm-up
        run()
    seconds = {name: [] for name in arms}
    for _ in range(repeats):
        for name, run in arms.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    rates = {name: new_tokens / statistics.median(values) for name, values in seconds.items()}
    base = rates["transformers eager"]
    print(f"| decoding, batch 1, {new_tokens} new tokens | tokens/s | vs transformers |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} |")
    return rates


def one_call(arm: str, new_tokens: int, folder: str) -> dict:
    """One call in this process: seconds to the first new token and to the last."""
    model = model_of_shape()
    model.setup_cache(1, max_seq_len=CACHE_POSITIONS)
    options = {
        "eager": dict(compile=False),
        "default": dict(compile=None, compile_cache=folder),
        "compile": dict(compile=True, compile_cache=folder),
    }[arm]
    start = time.perf_counter()
    first = None
    count = 0
    for _ in iter_new_tokens(model, PROMPT, new_tokens, temperature=0, **options):
        count += 1
        if first is None:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    compiled_at_end = type(model.layers[0].attention.cache).__name__ == "StaticKVCache"
    return {"first": first, "total": total, "tokens": count, "compiled_at_end": compiled_at_end}


def run_child(arm: str, new_tokens: int, folder: Path) -> dict:
    command = [sys.executable, __file__, "--child", arm, str(new_tokens), str(folder)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def wait_for_step(folder: Path, timeout: float = 300.0) -> float | None:
    """Seconds until the background build's step lands in `folder` (None past the timeout)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if list(folder.glob("*.pt2")) and not list(folder.glob(".building-*")):
            return time.perf_counter() - start
        time.sleep(0.5)
    return None


def first_call_part(lengths: list[int]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        warm = scratch / "warm"
        for new_tokens in lengths:
            rows.append({"arm": "eager", "new": new_tokens, **run_child("eager", new_tokens, scratch)})
            cold = scratch / f"cold-{new_tokens}"
            result = run_child("default", new_tokens, cold)
            result["step_ready_after_return_s"] = wait_for_step(cold)
            rows.append({"arm": "default, cold", "new": new_tokens, **result})
            if not warm.exists():
                cold.rename(warm)
            rows.append({"arm": "default, warm", "new": new_tokens, **run_child("default", new_tokens, warm)})
            if new_tokens == lengths[0]:  # the build takes as long at every length: built once
                compiled = run_child("compile", new_tokens, scratch / "compile")
                rows.append({"arm": "compile, cold", "new": new_tokens, **compiled})
            compiled = run_child("compile", new_tokens, warm)
            rows.append({"arm": "compile, warm", "new": new_tokens, **compiled})
    print("| new tokens | arm | first token (s) | total (s) | tokens/s | compiled step at the end |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        note = ""
        if row.get("step_ready_after_return_s") is not None:
            note = f" (step saved {row['step_ready_after_return_s']:.0f} s after the call returned)"
        print(
            f"| {row['new']} | {row['arm']} | {row['first']:.3f} | {row['total']:.2f} | "
            f"{row['tokens'] / row['total']:.0f} | {'yes' if row['compiled_at_end'] else 'no'}{note} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["eager", "first-call"], default="eager")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lengths", default="32,256,1024")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "NEW_TOKENS", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        arm, new_tokens, folder = args.child
        print(json.dumps(one_call(arm, int(new_tokens), folder)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, shape {SHAPE}", file=sys.stderr)
    if args.part == "eager":
        eager_part(args.new_tokens, args.repeats)
    else:
        first_call_part([int(value) for value in args.lengths.split(",")])


if __name__ == "__main__":
    main()
