"""Decoding speed of two checkouts of llama_mini, compared in one run: is a change to generation free?

    python bench/decode_ab.py --before /path/to/original/checkout --after . --preset stories260k stories15m

Each checkout runs in its own worker process (PYTHONPATH set to it) holding the same random model; the
controller asks them in turn, ABBA, for one greedy `generate` call of --new-tokens tokens, so a machine
whose load changes during the run slows both alike. Reported per shape and mode: each side's best and
median tok/s and the ratio after / before of the medians. Modes: eager; compiled (compile=True with a
compile cache per checkout, built during warm-up); loop, the decode loop alone (next_token_logits returns
fixed logits, so no model runs: what is left is the loop's Python and its small tensor ops). One thread
per worker by default: on a busy machine threads wait for each other at every barrier, which measures the
machine's load more than the code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(threads: int, prompt_len: int, new_tokens: int, cache: str) -> None:
    """Answer each request line "<preset> <mode>" with the seconds of one generate call."""
    import torch

    from llama_mini.generation import decode, generate
    from llama_mini.model.presets import get_preset
    from llama_mini.model.transformer import Transformer

    torch.set_num_threads(threads)
    models = {}
    real_logits = decode.next_token_logits
    for line in sys.stdin:
        preset, mode = line.split()
        if preset not in models:
            torch.manual_seed(0)
            model = Transformer(get_preset(preset, max_seq_len=prompt_len + new_tokens)).eval()
            prompt = torch.randint(3, model.args.vocab_size, (prompt_len,)).tolist()
            models[preset] = model, prompt
        model, prompt = models[preset]
        if mode == "loop":  # the loop alone: next_token_logits returns fixed logits, so no model runs
            fixed = torch.randn(1, model.args.vocab_size, generator=torch.Generator().manual_seed(0))
            decode.next_token_logits = lambda model, tokens, start_pos, fixed=fixed: fixed.expand(
                tokens.shape[0], -1
            )
        start = time.perf_counter()
        new = generate(
            model, [prompt], new_tokens, temperature=0, compile=mode == "compiled", compile_cache=cache
        )
        seconds = time.perf_counter() - start
        decode.next_token_logits = real_logits
        print(json.dumps({"seconds": seconds, "tokens": new[0]}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--before", required=True, help="the checkout to compare against")
    parser.add_argument("--after", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--preset", nargs="+", default=["stories260k", "stories15m"])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10, help="ABBA pairs per shape and mode")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["eager", "compiled", "loop"],
        default=["eager", "compiled", "loop"],
        help="loop: the decode loop's own cost (fixed logits, no model)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.threads, args.prompt_len, args.new_tokens, args.cache)
        return 0

    with tempfile.TemporaryDirectory() as scratch:
        workers = {}
        for side in ("before", "after"):
            checkout = str(Path(getattr(args, side)).resolve())
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--cache",
                f"{scratch}/{side}",
            ]
            command += ["--threads", str(args.threads), "--prompt-len", str(args.prompt_len)]
            command += ["--new-tokens", str(args.new_tokens), "--before", checkout]
            env = {**os.environ, "PYTHONPATH": checkout}
            workers[side] = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=checkout
            )

        def ask(side: str, preset: str, mode: str) -> dict:
            process = workers[side]
            process.stdin.write(f"{preset} {mode}\n")
            process.stdin.flush()
            return json.loads(process.stdout.readline())

        print(f"1-minute load average before the run: {os.getloadavg()[0]:.1f}; {args.threads} thread(s)")
        print("| shape | mode | before best | before median | after best | after median | after / before |")
        print("|---|---|---|---|---|---|---|")
        for preset in args.preset:
            for mode in args.modes:
                tokens = {side: [ask(side, preset, mode) for _ in range(2)][-1]["tokens"] for side in workers}
                assert tokens["before"] == tokens["after"], "the two checkouts decode different tokens"
                seconds = {"before": [], "after": []}
                for _ in range(args.rounds):
                    for side in ("before", "after", "after", "before"):
                        seconds[side].append(ask(side, preset, mode)["seconds"])
                speed = {
                    side: (args.new_tokens / min(times), args.new_tokens / statistics.median(times))
                    for side, times in seconds.items()
                }
                print(
                    f"| {preset} | {mode} | {speed['before'][0]:,.0f} | "
                    f"{speed['before'][1]:,.0f} | {speed['after'][0]:,.0f} | {speed['after'][1]:,.0f} | "
                    f"{speed['after'][1] / speed['before'][1]:.3f} |",
                    flush=True,
                )
        for process in workers.values():
            process.stdin.close()
            process.wait()
        print(f"1-minute load average after the run: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
