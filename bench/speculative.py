"""Speculative decoding: acceptance rate and speed-up against the draft tokens per round (docs/BENCHMARKS.md).

    flock /tmp/llama_bench.lock python bench/speculative.py                     # trains both, then measures
    nice python bench/speculative.py --train-only; flock /tmp/llama_bench.lock python bench/speculative.py
    flock /tmp/llama_bench.lock python bench/speculative.py --draft-tokens 1 2 4 6 8 --new-tokens 200

Trains two models on the demo corpus (Shakespeare) with the project's Trainer and one tokenizer: the draft,
small, first (its run trains the tokenizer and prepares the data), then the model, larger, reading the same
tokenizer and shards. A hundred-odd steps each, so both finish in minutes on a CPU; the runs are
kept in --out and reused by later runs (--retrain to train again). Then, in the same process, for greedy
decoding and for sampling (temperature 0.8, top-p 0.9): plain decoding of the model (`generate`, eager
steps) and speculative decoding with each K of --draft-tokens (`speculative_generate`), one prompt at a
time, each measured --repeats times in turn (so a change of the machine's load hits every arm alike).
Prints a Markdown table: per arm the median new tokens per second, the speed-up over plain decoding in the
same run, the acceptance rate, and new tokens per forward pass of the model.

--serve measures `llama-mini serve --draft` instead: the server's scheduler (llama_mini.serve.scheduler, the
HTTP layer left out, as it is the same for every arm) decoding one request at a time, without a draft (its
batched decode step, batch of one) and with the draft for each K (a round per step), greedy and sampled
(unseeded: a seeded sample never speculates), the same table; greedy tokens are checked equal to the plain
arm's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from llama_mini.checkpoint import load_model, resolve_checkpoint
from llama_mini.generation import SamplingConfig, generate
from llama_mini.generation.speculative import SpeculativeStats, speculative_generate
from llama_mini.serve.scheduler import Finished, NewToken, Scheduler, SequenceRequest
from llama_mini.tokenizer import Tokenizer
from llama_mini.train import TrainConfig, Trainer

PROMPTS = ["ROMEO.\n", "KING HENRY.\nNow, lords, ", "First Citizen.\n", "HAMLET.\nTo be, or not"]
SHAPES = {  # ModelArgs overrides: the draft a few percent of the model, apart from the embeddings
    "draft": dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=2, multiple_of=32),
    "model": dict(dim=256, n_layers=6, n_heads=4, n_kv_heads=4, multiple_of=32),
}


def train(options: argparse.Namespace, name: str, steps: int, tokenizer: str | None) -> Path:
    """Train one of SHAPES on the corpus (unless its run exists); returns its best/ checkpoint."""
    out = Path(options.out) / name
    if out.exists() and not options.retrain:
        found = resolve_checkpoint(
            out
        )  # best/, else the latest step-*/ (a run stopped with SIGTERM saves one)
        if (found / "config.json").exists():
            print(f"reusing {found}")
            return found
    config = TrainConfig(
        data=options.data,
        out=str(out),
        data_dir=str(Path(options.out) / "data"),  # prepared by the first run, read by the second
        tokenizer=tokenizer,
        vocab_size=options.vocab_size,
        max_steps=steps,
        batch_size=options.batch_size,
        eval_interval=steps,
        eval_steps=5,
        sample_tokens=0,
        seed=options.seed,
    )
    started = time.perf_counter()
    summary = Trainer(
        config, model_overrides=dict(SHAPES[name], max_seq_len=options.context), show_progress=False
    ).run()
    print(
        f"trained {name}: {steps} steps in {time.perf_counter() - started:.0f} s, val bpb {summary.val_bpb}"
    )
    return out / "best"


def measure(run, repeats: int) -> tuple[float, SpeculativeStats]:
    """The median tokens per second of `run` over repeats, and the last run's stats."""
    speeds = []
    for _ in range(repeats):
        stats = SpeculativeStats()
        started = time.perf_counter()
        run(stats)
        speeds.append(stats.new_tokens / (time.perf_counter() - started))
    return statistics.median(speeds), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--data", default="shakespeare", help="corpus (any --data of train.py)")
    parser.add_argument("--out", default="out/bench_speculative", help="the two training runs")
    parser.add_argument("--retrain", action="store_true", help="train again even if the runs exist")
    parser.add_argument(
        "--train-only", action="store_true", help="train the two runs and stop (no timing: no lock needed)"
    )
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--context", type=int, default=128, help="max_seq_len of both models")
    parser.add_argument("--draft-steps", type=int, default=150)
    parser.add_argument("--model-steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 2, 4, 6])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help="measure the server's scheduler instead")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's; 1 on a crowded machine)"
    )
    options = parser.parse_args()
    if options.threads is not None:
        torch.set_num_threads(options.threads)

    draft_folder = train(options, "draft", options.draft_steps, None)
    model_folder = train(options, "model", options.model_steps, str(draft_folder))
    if options.train_only:
        return
    tokenizer = Tokenizer(model_folder)
    model, draft = load_model(model_folder).eval(), load_model(draft_folder).eval()
    sizes = [sum(p.numel() for p in network.parameters()) for network in (model, draft)]
    prompts = [tokenizer.encode(text, bos=True) for text in PROMPTS]
    eos = tokenizer.eos_ids
    print(
        f"model {sizes[0]:,} parameters, draft {sizes[1]:,}; {len(prompts)} prompts x {options.new_tokens} "
        f"new tokens; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    if options.serve:
        serve_table(model, draft, prompts, eos, options)
        return
    print("\n| decoding | K | tokens/s | speed-up | acceptance | tokens per forward pass of the model |")
    print("|---|---|---|---|---|---|")
    for mode, sampling in (("greedy", dict(temperature=0)), ("sampled", dict(temperature=0.8, top_p=0.9))):
        settings = dict(sampling, eos_id=eos, seed=0)

        def plain(stats, settings=settings):
            for prompt in prompts:
                generate(model, [prompt], options.new_tokens, compile=False, stats=stats, **settings)

        def speculative(stats, k, settings=settings):
            for prompt in prompts:
                speculative_generate(
                    model, draft, [prompt], options.new_tokens, draft_tokens=k, stats=stats, **settings
                )

        arms = [("plain", None)] + [(f"draft K={k}", k) for k in options.draft_tokens]
        results = {name: [] for name, _ in arms}
        stats_of = {}
        for _ in range(options.repeats):  # arms in turn, so the machine's load hits all alike
            for name, k in arms:
                speed, stats_of[name] = measure(plain if k is None else lambda s, k=k: speculative(s, k), 1)
                results[name].append(speed)
        baseline = statistics.median(results["plain"])
        for name, k in arms:
            speed, stats = statistics.median(results[name]), stats_of[name]
            if k is None:
                print(f"| {mode} | plain | {speed:.1f} | 1.00 | - | 1 |")
            else:
                print(
                    f"| {mode} | {k} | {speed:.1f} | {speed / baseline:.2f} | "
                    f"{100 * stats.acceptance_rate:.0f}% | {stats.tokens_per_round:.2f} |"
                )


def serve_requests(model, draft, prompts, new_tokens: int, k: int, sampling: SamplingConfig):
    """The prompts sent to a fresh Scheduler one after another (each alone, as one client would): the
    tokens of each, the scheduler (its rounds and draft counts), and the wall time."""
    scheduler = Scheduler(model, max_batch_size=8, draft=draft, draft_tokens=k)
    outputs = []
    started = time.perf_counter()
    for prompt in prompts:
        tokens, done = [], []
        scheduler.submit(
            SequenceRequest(tuple(prompt), new_tokens, sampling),
            lambda event, tokens=tokens, done=done: (
                tokens.append(event.token_id) if isinstance(event, NewToken) else done.append(event)
            ),
        )
        while not any(isinstance(event, Finished) for event in done):
            scheduler.step()
        outputs.append(tokens)
    return outputs, scheduler, time.perf_counter() - started


def serve_table(model, draft, prompts, eos, options) -> None:
    print(
        "\n| serve, decoding | K | tokens/s | speed-up | acceptance | tokens per forward pass of the model |"
    )
    print("|---|---|---|---|---|---|")
    for mode, temperature in (("greedy", 0.0), ("sampled", 0.8)):
        sampling = SamplingConfig(temperature=temperature, top_p=0.9 if temperature else None, eos_id=eos)
        arms = [("plain", None)] + [(f"draft K={k}", k) for k in options.draft_tokens]
        speeds = {name: [] for name, _ in arms}
        last = {}
        for _ in range(options.repeats):  # arms in turn, so the machine's load hits all alike
            for name, k in arms:
                outputs, scheduler, seconds = serve_requests(
                    model, None if k is None else draft, prompts, options.new_tokens, k or 1, sampling
                )
                speeds[name].append(sum(map(len, outputs)) / seconds)
                last[name] = outputs, scheduler
        baseline = statistics.median(speeds["plain"])
        for name, k in arms:
            speed = statistics.median(speeds[name])
            if k is None:
                print(f"| {mode} | plain | {speed:.1f} | 1.00 | - | 1 |")
                continue
            outputs, scheduler = last[name]
            if temperature == 0 and outputs != last["plain"][0]:
                raise SystemExit(f"greedy tokens with {name} differ from plain decoding's")
            # the first token of each request comes from its prefill; the others from forward passes of the
            # model: rounds, and plain steps where no round fits (the last token of a request)
            per_round = (sum(map(len, outputs)) - len(outputs)) / max(scheduler.steps, 1)
            acceptance = scheduler.accepted / max(scheduler.drafted, 1)
            print(
                f"| {mode} | {k} | {speed:.1f} | {speed / baseline:.2f} | {100 * acceptance:.0f}% | "
                f"{per_round:.2f} |"
            )


if __name__ == "__main__":
    main()
