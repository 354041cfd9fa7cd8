"""What --log tensorboard (and --log wandb, offline) adds to the time of a training step.

    flock /tmp/llama_bench.lock python bench/tracking_overhead.py              # CPU, a small model
    python bench/tracking_overhead.py --dashboards tensorboard wandb --steps 200 --repeats 3

Two measurements, in the same process, on the same run settings:

    direct      the seconds spent inside the dashboards' calls for each metrics.jsonl record (every
                --log-interval steps and each evaluation), over the seconds of the steps: what logging
                costs the loop, without the machine's noise. What is done once per run (opening the
                dashboards, the settings, closing: W&B's finish) is shown on its own.
    end to end  runs with and without each dashboard, interleaved `--repeats` times: the median seconds
                per step (the steps and the logging calls) of each, and their ratio to the run without
                (noisier: on a shared machine the spread between runs is often more than the cost).

The runs train a small model on a synthetic corpus (llama_mini.train.Trainer, as train.py does) and
evaluate only at their last step; W&B runs offline, its files in the run folder.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, write_json  # noqa: E402
from llama_mini.tokenizer import train_tokenizer  # noqa: E402
from llama_mini.train import (  # noqa: E402
    TrainConfig,
    Trainer,
    tracking,
)
from llama_mini.train import trainer as trainer_module  # noqa: E402


def synthetic_corpus(folder: Path, documents: int = 200, seed: int = 0) -> None:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(3000)]
    folder.mkdir(parents=True)
    for index in range(documents):
        (folder / f"doc{index:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)))


def _timed(method, total: str):
    def timed(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            setattr(TimedDashboards, total, getattr(TimedDashboards, total) + time.perf_counter() - started)

    return timed


class TimedDashboards(tracking.Dashboards):
    """Dashboards that add up the seconds spent sending records (every --log-interval steps and at each
    evaluation) and, apart, the seconds spent once per run (opening, settings, texts, closing)."""

    recurring = 0.0
    once = 0.0

    def __init__(self, *args, **kwargs):
        started = time.perf_counter()
        super().__init__(*args, **kwargs)
        TimedDashboards.once += time.perf_counter() - started

    record = _timed(tracking.Dashboards.record, "recurring")
    text = _timed(tracking.Dashboards.text, "once")
    hyperparameters = _timed(tracking.Dashboards.hyperparameters, "once")
    close = _timed(tracking.Dashboards.close, "once")


def one_run(work: Path, corpus: Path, tokenizer: Path, dashboards: list[str], args) -> dict[str, float]:
    """Train one run; the seconds of its steps (train_step) and of its dashboards' calls."""
    out = work / f"run-{'-'.join(dashboards) or 'none'}"
    shutil.rmtree(out, ignore_errors=True)
    config = TrainConfig(
        data=str(corpus), tokenizer=str(tokenizer), data_dir=str(work / "data"), out=str(out),
        max_steps=args.steps, batch_size=args.batch_size, eval_interval=args.steps, eval_steps=1,
        log_interval=args.log_interval, sample_tokens=0, device="cpu", log=dashboards, wandb_mode="offline",
    )  # fmt: skip
    model = {
        "dim": args.dim,
        "n_layers": args.n_layers,
        "n_heads": args.dim // 32,
        "max_seq_len": args.seq_len,
    }
    trainer = Trainer(config, model, show_progress=False)
    step, steps_seconds = trainer.train_step, []

    def timed_step(index):
        started = time.perf_counter()
        try:
            return step(index)
        finally:
            steps_seconds.append(time.perf_counter() - started)

    trainer.train_step = timed_step
    TimedDashboards.recurring = TimedDashboards.once = 0.0
    trainer.run()
    steps = sum(steps_seconds)
    return {
        "step": steps / args.steps,
        "loop": (steps + TimedDashboards.recurring) / args.steps,  # the steps and what they log
        "logging": TimedDashboards.recurring / args.steps,
        "once": TimedDashboards.once,
    }


def measure(args) -> dict[str, list[dict[str, float]]]:
    """Each variant's runs, interleaved, on one corpus and tokenizer in a temporary folder."""
    variants = [[], *([name] for name in args.dashboards)]
    results: dict[str, list[dict[str, float]]] = {"-".join(v) or "none": [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="tracking-bench-") as folder:
        work = Path(folder)
        corpus = work / "corpus"
        synthetic_corpus(corpus)
        tokenizer = work / "tokenizer.model"
        train_tokenizer([path.read_text() for path in sorted(corpus.glob("*.txt"))[:50]], tokenizer, 512)
        warm_up = argparse.Namespace(**{**vars(args), "steps": 2})  # prepares the data once, for all runs
        one_run(work, corpus, tokenizer, [], warm_up)
        for _ in range(args.repeats):
            for variant in variants:
                results["-".join(variant) or "none"].append(one_run(work, corpus, tokenizer, variant, args))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dashboards", nargs="+", default=["tensorboard"], choices=tracking.DASHBOARDS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--log-interval", type=int, default=10, help="train.py's default: 10")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of each")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_SILENT", "true")
    trainer_module.Dashboards = TimedDashboards  # what the Trainer opens when a run starts
    try:
        results = measure(args)
    finally:
        trainer_module.Dashboards = tracking.Dashboards
    base = statistics.median(run["loop"] for run in results["none"])
    rows = []
    for name, runs in results.items():
        loop = statistics.median(run["loop"] for run in runs)
        logging = statistics.median(run["logging"] / run["step"] for run in runs)
        rows.append(
            {
                "--log": name,
                "ms / step, logging included (median)": 1000 * loop,
                "vs none (end to end)": loop / base,
                "ms / step in dashboard calls": 1000 * statistics.median(run["logging"] for run in runs),
                "dashboard calls / step time (direct)": logging,
                "once per run, s": statistics.median(run["once"] for run in runs),
            }
        )
    info = run_info(torch.device("cpu"))
    print(f"{info}\nsteps {args.steps}, log interval {args.log_interval}, repeats {args.repeats}")
    print_table(rows)
    write_json(args.json, {**info, "settings": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
