"""The ablation's figures: validation loss per variant beside Shazeer's, and training loss against step."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from llama_mini.model.ffn import FEED_FORWARDS
from llama_mini.study.ablate.config import AblationConfig

__all__ = ["plot_curves", "plot_results", "plot_title", "training_curves"]


def plot_title(config: AblationConfig, results: list[dict[str, Any]]) -> str:
    seeds = len({r["seed"] for r in results})
    model = config.model
    return (
        f"FFN variants: dim {model.dim}, {model.n_layers} layers, {model.weight_init} init, "
        f"{config.train.max_steps} steps, {config.train.data}, {seeds} seed(s)"
    )


def plot_results(summary: list[dict[str, Any]], path: Path, title: str = "") -> bool:
    """Our validation loss per variant (mean, error bar = std over seeds, dots = single seeds) beside
    Shazeer's Table 1, gated variants in one colour and non-gated in another. False if matplotlib is
    missing (the table is still written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed (pip install matplotlib); no plot written", file=sys.stderr)
        return False
    colours = {True: "tab:blue", False: "tab:orange"}
    names = [row["variant"] for row in summary]
    positions = range(len(summary))
    figure, (ours, theirs) = plt.subplots(1, 2, figsize=(11, 4.2))
    for x, row in zip(positions, summary, strict=True):
        colour = colours[row["gated"]]
        ours.errorbar(
            x, row["val_loss"], yerr=row["val_loss_std"] or 0, fmt="o", color=colour, capsize=4, ms=7
        )
        ours.plot([x] * len(row["val_losses"]), row["val_losses"], ".", color=colour, alpha=0.4)
        theirs.plot(x, row["shazeer_65k"], "o", color=colour, ms=7)
    for axis, label, heading in (
        (ours, "validation loss (nats/token)", "ours: mean ± std over seeds, dots = seeds"),
        (theirs, "log-perplexity at 65,536 steps", "Shazeer 2020, Table 1 (T5-base, C4)"),
    ):
        axis.set_xticks(list(positions), names, rotation=30)
        axis.set_ylabel(label)
        axis.set_title(heading, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=colours[g]) for g in (True, False)]
    theirs.legend(handles, ["gated (3 matrices)", "not gated (2 matrices)"], fontsize=9)
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def training_curves(out: Path, variants: list[str], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Training loss against step for each variant and seed, from runs/VARIANT-seedN/metrics.jsonl.

    Returns {variant: {"gated": bool, "per_seed": {seed: {step: loss}}}} for the runs that have metrics.
    """
    curves = {}
    for variant in variants:
        per_seed = {}
        for seed in seeds:
            path = out / "runs" / f"{variant}-seed{seed}" / "metrics.jsonl"
            if path.exists():
                records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
                per_seed[seed] = {r["step"]: r["loss"] for r in records if r.get("type") == "train"}
        if per_seed:
            curves[variant] = {"gated": FEED_FORWARDS[variant].gated, "per_seed": per_seed}
    return curves


def _common_steps(curves: dict[str, dict[str, Any]], names: list[str], seeds: list[int]) -> list[int]:
    return sorted(set.intersection(*(set(curves[n]["per_seed"][seed]) for n in names for seed in seeds)))


def plot_curves(curves: dict[str, dict[str, Any]], path: Path, title: str = "") -> bool:
    """Left: each variant's training loss, mean over seeds, against step. Right: per seed, the gated
    variants' mean loss minus the non-gated ones', and its mean over seeds: does the gap grow or close
    with training? False if there is nothing to plot or matplotlib is missing."""
    if not curves:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    groups = {gated: [n for n in curves if curves[n]["gated"] == gated] for gated in (True, False)}
    colours = {True: plt.get_cmap("Blues"), False: plt.get_cmap("Oranges")}
    figure, (losses, gap) = plt.subplots(1, 2, figsize=(11, 4.2))
    for gated, names in groups.items():
        for index, name in enumerate(names):
            seeds = sorted(curves[name]["per_seed"])
            steps = _common_steps(curves, [name], seeds)
            steps = [step for step in steps if step >= steps[-1] / 10]  # skip the first steps' drop from ln V
            mean = [
                statistics.fmean(curves[name]["per_seed"][seed][step] for seed in seeds) for step in steps
            ]
            shade = colours[gated](0.45 + 0.5 * index / max(1, len(names) - 1))
            losses.plot(steps, mean, color=shade, label=name, lw=1.4, marker="o" if len(steps) == 1 else None)
    losses.set_xlabel("step")
    losses.set_ylabel("training loss (nats/token), mean over seeds")
    losses.legend(fontsize=8, ncol=2)
    losses.grid(alpha=0.3)
    seeds = sorted(set.intersection(*(set(curve["per_seed"]) for curve in curves.values())))
    if groups[True] and groups[False] and seeds:
        steps = _common_steps(curves, list(curves), seeds)
        differences = []
        for seed in seeds:

            def group_mean(names: list[str], step: int, seed: int = seed) -> float:
                return statistics.fmean(curves[name]["per_seed"][seed][step] for name in names)

            differences.append(
                [group_mean(groups[True], step) - group_mean(groups[False], step) for step in steps]
            )
            gap.plot(steps, differences[-1], color="grey", alpha=0.5, lw=0.8)
        gap.plot(
            steps,
            [statistics.fmean(values) for values in zip(*differences, strict=True)],
            color="black",
            lw=1.6,
            marker="o" if len(steps) == 1 else None,  # one logged step is a point, not a line
        )
        gap.axhline(0.0, color="tab:red", lw=0.8, ls="--")
        gap.set_xlabel("step")
        gap.set_ylabel("gated minus non-gated training loss")
        gap.set_title("below 0: gated ahead (grey: single seeds, black: mean)", fontsize=10)
        gap.grid(alpha=0.3)
    else:
        gap.set_axis_off()
    for axes in (losses, gap):
        # Steps are whole numbers: integer ticks, even when the runs logged one step only.
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
