"""AdamW against Muon (train.py --optimizer): learning rates swept, several seeds, validation bits per byte
against optimizer steps and against training wall time (a Muon step costs more: five Newton-Schulz
iterations per matrix).

    python bench/optimizer_sweep.py run --out runs/optimizer_sweep --shape default \\
        --adamw-lrs 1e-3 2e-3 4e-3 --muon-lrs 0.01 0.02 0.04 --seeds 0 1 2 --max-steps 600
    python bench/optimizer_sweep.py report --out runs/optimizer_sweep --figure docs/img/optimizer_sweep.png

`run` trains each (optimizer, learning rate, seed) with train.py in its own process, into
OUT/SHAPE-OPTIMIZER-lrLR-sSEED, all runs on one tokenizer and one set of prepared shards (the first run's);
a finished run (its metrics end with the last step's evaluation) is skipped, so the same command resumes
a sweep. `--shape stories15m` trains llama2.c's 15M shape (dim 288, 6 layers; the tokenizer still
the corpus's). Every other flag after `--` goes to train.py unchanged (`-- --batch-size 8 --max-seq-len 128`).
The runs keep the settings the sweep in docs/BENCHMARKS.md was made with (SWEEP_SETTINGS: float32, weight
decay 0.1, the schedule decaying to lr / 10, AdamW at 2e-3 beside Muon), not train.py's later defaults.

`report` prints, per shape, optimizer and learning rate, the final validation bits per byte (mean and
standard deviation over seeds) and the training seconds per step; then, per shape, each optimizer at its best
learning rate at every evaluation (bits per byte, training seconds, Muon minus AdamW paired by seed); and
draws bits per byte against step and against seconds, each optimizer at its best learning rate, one curve
per seed, one row of panels per shape.

The wall time of a run is its training time, summed from metrics.jsonl's windows (tokens / tokens per
second, evaluations excluded). On a shared machine it is noisy: compare optimizers by steps first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llama_mini.console import ArgumentParser  # noqa: E402
from llama_mini.train.config import read_run_config  # noqa: E402

# train.py's defaults when the sweep was made (issue 28 changed them for `make demo` afterwards)
SWEEP_SETTINGS = ["--dtype", "fp32", "--weight-decay", "0.1"]
MUON_RUNS_ADAMW_LR = 2e-3  # the embeddings', norms' and output layer's, beside Muon

# "default": the default model when the sweep was made (4 heads of 48; issue 28 made it 3 of 64 afterwards)
SHAPES = {"default": ["--n-heads", "4"], "stories15m": ["--preset", "stories15m"]}


def run_name(shape: str, optimizer: str, lr: float, seed: int) -> str:
    return f"{shape}-{optimizer}-lr{lr:g}-s{seed}"


def read_metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished(folder: Path, max_steps: int) -> bool:
    return any(m["type"] == "eval" and m["step"] == max_steps for m in read_metrics(folder))


def run(args: argparse.Namespace, train_flags: list[str]) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [("adamw", lr, seed) for lr in args.adamw_lrs for seed in args.seeds]
    plan += [("muon", lr, seed) for lr in args.muon_lrs for seed in args.seeds]
    tokenizer = out / "tokenizer.model"
    for optimizer, lr, seed in plan:
        folder = out / run_name(args.shape, optimizer, lr, seed)
        if finished(folder, args.max_steps):
            continue
        adamw_lr = lr if optimizer == "adamw" else MUON_RUNS_ADAMW_LR
        lr_flags = ["--lr", str(adamw_lr), "--min-lr", f"{adamw_lr / 10:g}"]
        lr_flags += ["--muon-lr", str(lr)] if optimizer == "muon" else []
        shared = ["--tokenizer", str(tokenizer)] if tokenizer.exists() else []
        command = [
            sys.executable, "train.py", "--out", str(folder), "--optimizer", optimizer, *lr_flags,
            *SWEEP_SETTINGS,
            "--seed", str(seed), "--max-steps", str(args.max_steps),
            "--eval-interval", str(args.eval_interval), "--data-dir", str(out / "data"),
            "--sample-tokens", "0", "--keep-last", "1",
            *SHAPES[args.shape], *shared, *train_flags,
        ]  # fmt: skip
        if folder.exists():  # an unfinished run starts over
            shutil.rmtree(folder)
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        if not tokenizer.exists():  # the first run trained it: every other run shares it and its shards
            shutil.copyfile(folder / "tokenizer.model", tokenizer)


def curve(folder: Path) -> list[tuple[int, float, float]]:
    """(step, training seconds up to it, validation bits per byte) at each evaluation."""
    seconds, last_step, tokens_per_step, points = 0.0, 0, None, []
    for record in read_metrics(folder):
        if record["type"] == "train":
            if tokens_per_step is None:
                tokens_per_step = record["tokens"] / record["step"]
            seconds += (record["step"] - last_step) * tokens_per_step / record["tokens_per_second"]
            last_step = record["step"]
        elif record["type"] == "eval":
            points.append((record["step"], seconds, record["val_bpb"]))
    return points


def collect(out: Path) -> dict[tuple[str, str, float], dict[int, list]]:
    """The finished runs' curves, by (shape, optimizer, learning rate) and seed."""
    runs: dict[tuple[str, str, float], dict[int, list]] = defaultdict(dict)
    for folder in sorted(out.iterdir()):
        parts = folder.name.split("-")
        if not folder.is_dir() or len(parts) < 4 or not parts[-1].startswith("s"):
            continue
        shape, optimizer, lr, seed = "-".join(parts[:-3]), parts[-3], float(parts[-2][2:]), int(parts[-1][1:])
        points = curve(folder)
        if points and points[-1][0] == read_run_config(folder / "config.toml")[0]["max_steps"]:
            runs[(shape, optimizer, lr)][seed] = points  # finished: a run still training is left out
    return runs


def report(args: argparse.Namespace) -> None:
    runs = collect(Path(args.out))
    print("| shape | optimizer | lr | seeds | final val bits/byte | train s/step |")
    print("|---|---|--:|--:|--:|--:|")
    best: dict[tuple[str, str], tuple[float, float]] = {}
    for (shape, optimizer, lr), seeds in sorted(runs.items()):
        finals = [points[-1][2] for points in seeds.values()]
        per_step = statistics.mean(points[-1][1] / points[-1][0] for points in seeds.values())
        mean = statistics.mean(finals)
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        print(
            f"| {shape} | {optimizer} | {lr:g} | {len(finals)} | {mean:.4f} ± {spread:.4f} | {per_step:.3f} |"
        )
        if (shape, optimizer) not in best or mean < best[(shape, optimizer)][1]:
            best[(shape, optimizer)] = (lr, mean)
    for shape in sorted({shape for shape, _ in best}):
        print_by_step(shape, runs, best)
    if args.figure:
        draw(runs, best, Path(args.figure))


def print_by_step(shape: str, runs: dict, best: dict) -> None:
    """Each optimizer at its best learning rate, at every evaluation: validation bits per byte and training
    seconds (means over seeds), and Muon minus AdamW paired by seed (a seed fixes the initial weights and
    the batches, whichever the optimizer)."""
    if (shape, "adamw") not in best or (shape, "muon") not in best:
        return
    (adamw_lr, _), (muon_lr, _) = best[(shape, "adamw")], best[(shape, "muon")]
    adamw, muon = runs[(shape, "adamw", adamw_lr)], runs[(shape, "muon", muon_lr)]
    seeds = sorted(set(adamw) & set(muon))
    print(f"\n{shape} shape, each optimizer at its best learning rate, means over seeds {seeds}:\n")
    print(f"| step | adamw {adamw_lr:g}: bits/byte | s | muon {muon_lr:g}: bits/byte | s | muon - adamw |")
    print("|--:|--:|--:|--:|--:|--:|")
    evaluations = min(min(len(adamw[seed]), len(muon[seed])) for seed in seeds)
    for index in range(evaluations):
        at_adamw = [adamw[seed][index] for seed in seeds]
        at_muon = [muon[seed][index] for seed in seeds]
        gaps = [m[2] - a[2] for a, m in zip(at_adamw, at_muon, strict=True)]
        spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        columns = [
            str(at_adamw[0][0]),
            f"{statistics.mean(p[2] for p in at_adamw):.4f}",
            f"{statistics.mean(p[1] for p in at_adamw):.0f}",
            f"{statistics.mean(p[2] for p in at_muon):.4f}",
            f"{statistics.mean(p[1] for p in at_muon):.0f}",
            f"{statistics.mean(gaps):+.4f} ± {spread:.4f}",
        ]
        print("| " + " | ".join(columns) + " |")


def draw(runs: dict, best: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    shapes = sorted({shape for shape, _ in best})
    figure = Figure(figsize=(11, 4 * len(shapes)), layout="constrained")
    axes = figure.subplots(len(shapes), 2, squeeze=False)
    colors = {"adamw": "tab:blue", "muon": "tab:red"}
    for row, shape in enumerate(shapes):
        for (shape_, optimizer), (lr, _) in sorted(best.items()):
            if shape_ != shape:
                continue
            for index, points in enumerate(runs[(shape, optimizer, lr)].values()):
                label = f"{optimizer}, lr {lr:g}" if index == 0 else None
                for column in (0, 1):
                    xs, ys = [p[column] for p in points], [p[2] for p in points]
                    axes[row][column].plot(
                        xs, ys, color=colors[optimizer], alpha=0.8, marker=".", label=label
                    )
        for column, name in enumerate(("optimizer step", "training seconds")):
            axes[row][column].set_xlabel(name)
            axes[row][column].set_ylabel("validation bits per byte")
            axes[row][column].set_title(f"{shape} shape, by {name}")
            axes[row][column].legend()
            axes[row][column].grid(alpha=0.3)
    figure.suptitle("validation bits per byte: each optimizer at its best learning rate, one curve per seed")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(path)


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    sweep = commands.add_parser("run", help="train the runs (flags after -- go to train.py)")
    sweep.add_argument("--out", default="runs/optimizer_sweep")
    sweep.add_argument("--shape", choices=sorted(SHAPES), default="default")
    sweep.add_argument("--adamw-lrs", type=float, nargs="*", default=[1e-3, 2e-3, 4e-3])
    sweep.add_argument("--muon-lrs", type=float, nargs="*", default=[0.01, 0.02, 0.04])
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sweep.add_argument("--max-steps", type=int, default=600)
    sweep.add_argument("--eval-interval", type=int, default=50)
    summary = commands.add_parser("report", help="the table, and the figure with --figure")
    summary.add_argument("--out", default="runs/optimizer_sweep")
    summary.add_argument("--figure", help="where to draw bits per byte against steps and seconds (.png)")
    own, train_flags = sys.argv[1:], []
    if "--" in own:
        own, train_flags = own[: own.index("--")], own[own.index("--") + 1 :]
    args = parser.parse_args(own)
    run(args, train_flags) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
