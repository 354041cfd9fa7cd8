"""`make demo` in less time: today's settings against candidates, measured side by side in one run.

    python bench/demo_speedrun.py --seeds 0 1 2 --out runs/demo_speedrun
    python bench/demo_speedrun.py --seeds 0 --baseline-steps 200 --out runs/speedrun_small \\
        --candidate muon-half="--optimizer muon --muon-lr 0.01 --max-steps 100" -- --batch-size 8

For each seed, the baseline (`make demo`'s settings before issue 28 changed train.py's defaults, BASELINE:
float32, not compiled, AdamW at 2e-3 with 50 warmup steps and a cosine to 2e-4, weight decay 0.1, 4 heads
of 48, --baseline-steps steps) and every candidate (NAME="train.py flags"; by default train.py's own defaults,
today's `make demo`) are trained one after the other, so the load of the machine hits them alike. A
candidate's result is its final validation bits per byte against the baseline's, and its training time
(metrics.jsonl's windows, evaluations excluded) and whole wall time against the baseline's, as ratios. The
target of issue 28: the baseline's bits per byte in at most half its time. Flags after `--` go to every run,
after the run's own, so they win (a smaller --batch-size or --max-seq-len for a quick check).
"""

from __future__ import annotations

import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.optimizer_sweep import curve  # noqa: E402
from llama_mini.console import ArgumentParser  # noqa: E402

# `make demo` before issue 28 changed train.py's defaults (--max-steps is --baseline-steps).
BASELINE = (
    "--dtype fp32 --no-compile --lr 2e-3 --min-lr 2e-4 --warmup-steps 50 --weight-decay 0.1 --n-heads 4"
)
# train.py's defaults: today's `make demo`.
DEFAULT_CANDIDATES = {"defaults": ""}


def train(folder: Path, flags: list[str], shared: list[str]) -> float:
    """Train into `folder` (replaced); returns the whole wall time in seconds."""
    if folder.exists():
        shutil.rmtree(folder)
    command = [sys.executable, "train.py", "--out", str(folder), "--sample-tokens", "0", *flags, *shared]
    print(" ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo_speedrun")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baseline-steps", type=int, default=600, help="today's `make demo`: 600")
    parser.add_argument("--candidate", action="append", default=[], metavar='NAME="FLAGS"')
    own, extra = sys.argv[1:], []
    if "--" in own:
        own, extra = own[: own.index("--")], own[own.index("--") + 1 :]
    args = parser.parse_args(own)
    candidates = dict(DEFAULT_CANDIDATES)
    if args.candidate:
        candidates = dict(item.split("=", 1) for item in args.candidate)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        shared = ["--seed", str(seed), "--data-dir", str(out / "data"), *extra]
        tokenizer = out / "tokenizer.model"
        if tokenizer.exists():
            shared += ["--tokenizer", str(tokenizer)]
        runs = {"baseline": [*shlex.split(BASELINE), "--max-steps", str(args.baseline_steps)]}
        runs.update({name: shlex.split(flags) for name, flags in candidates.items()})
        for name, flags in runs.items():
            folder = out / f"{name}-s{seed}"
            wall = train(folder, flags, shared)
            if not tokenizer.exists():
                shutil.copyfile(folder / "tokenizer.model", tokenizer)
                shared += ["--tokenizer", str(tokenizer)]
            points = curve(folder)
            step, seconds, bpb = points[-1]
            results.setdefault(name, []).append(
                dict(seed=seed, steps=step, train_s=seconds, wall_s=wall, bpb=bpb)
            )
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict[str, list[dict]]) -> None:
    """Each candidate seed by seed beside the baseline, then the means: bits per byte, its difference, and
    the training time and whole wall time as ratios to the baseline's (the target: at most 0.5)."""
    base = {r["seed"]: r for r in results["baseline"]}
    columns = "run | seed | steps | bits/byte | - baseline | train s | wall s | train / base | wall / base"
    print(f"| {columns} |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, rows in results.items():
        if name == "baseline":
            continue
        for row in [*rows, None]:  # None: the mean over the seeds
            pairs = [(r, base[r["seed"]]) for r in ([row] if row else rows)]
            mean = {key: statistics.mean(r[key] for r, _ in pairs) for key in ("bpb", "train_s", "wall_s")}
            base_bpb = statistics.mean(b["bpb"] for _, b in pairs)
            train_ratio = statistics.mean(r["train_s"] / b["train_s"] for r, b in pairs)
            wall_ratio = statistics.mean(r["wall_s"] / b["wall_s"] for r, b in pairs)
            cells = [
                name,
                row["seed"] if row else "mean",
                pairs[0][0]["steps"],
                f"{mean['bpb']:.4f}",
                f"{mean['bpb'] - base_bpb:+.4f}",
                f"{mean['train_s']:.0f}",
                f"{mean['wall_s']:.0f}",
                f"{train_ratio:.2f}",
                f"{wall_ratio:.2f}",
            ]
            print("| " + " | ".join(map(str, cells)) + " |")
    for row in results["baseline"]:
        print(
            f"baseline, seed {row['seed']}: {row['bpb']:.4f} bits/byte, {row['train_s']:.0f} s training, "
            f"{row['wall_s']:.0f} s wall"
        )


if __name__ == "__main__":
    main()
