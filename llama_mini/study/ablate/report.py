"""The ablation's report: means over seeds, both rankings, the paired gated gap, and ablation.md."""

from __future__ import annotations

import math
import statistics
from typing import Any

from llama_mini.study.ablate.config import AblationConfig

__all__ = ["SHAZEER_TABLE1", "findings", "gated_gap", "markdown_table", "spearman", "summarize"]

# Shazeer 2020, Table 1: T5-base on C4, held-out log-perplexity after 65,536 and 524,288 steps (lower is
# better; the paper gives a standard deviation of about 0.003-0.010 over runs). Ranks below use 65,536.
SHAZEER_TABLE1: dict[str, tuple[float, float]] = {
    "relu": (1.997, 1.677),
    "gelu": (1.983, 1.679),
    "swish": (1.994, 1.683),
    "glu": (1.982, 1.663),
    "bilinear": (1.960, 1.648),
    "reglu": (1.953, 1.645),
    "geglu": (1.942, 1.633),
    "swiglu": (1.944, 1.636),
}


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std from a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _ranks(values: dict[str, float]) -> dict[str, int]:
    """1 for the lowest value (the best loss), 2 for the next, ..."""
    return {name: rank for rank, name in enumerate(sorted(values, key=values.__getitem__), start=1)}


def summarize(results: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """One row per variant with results, in `variants` order: means and stds over seeds, and ranks.

    `rank` orders our mean validation loss; `shazeer_rank` orders Table 1's 65,536-step log-perplexity
    among the same variants, so the two rankings compare like with like.
    """
    rows = []
    for variant in variants:
        runs = [r for r in results if r["variant"] == variant]
        if not runs:
            continue
        loss, loss_std = _mean_std([r["val_loss"] for r in runs])
        bpb, bpb_std = _mean_std([r["val_bpb"] for r in runs])
        rows.append(
            {
                "variant": variant,
                "gated": runs[0]["gated"],
                "ffn_hidden_dim": runs[0]["ffn_hidden_dim"],
                "ffn_parameters": runs[0]["ffn_parameters"],
                "parameters": runs[0]["parameters"],
                "seeds": sorted(r["seed"] for r in runs),
                "val_losses": [r["val_loss"] for r in sorted(runs, key=lambda r: r["seed"])],
                "val_loss": loss,
                "val_loss_std": loss_std,
                "val_bpb": bpb,
                "val_bpb_std": bpb_std,
                "tokens_per_second": statistics.fmean(r["tokens_per_second"] for r in runs),
                "shazeer_65k": SHAZEER_TABLE1[variant][0],
                "shazeer_524k": SHAZEER_TABLE1[variant][1],
            }
        )
    ours = _ranks({row["variant"]: row["val_loss"] for row in rows})
    theirs = _ranks({row["variant"]: row["shazeer_65k"] for row in rows})
    for row in rows:
        row["rank"], row["shazeer_rank"] = ours[row["variant"]], theirs[row["variant"]]
    return rows


def spearman(summary: list[dict[str, Any]]) -> float | None:
    """Spearman's rank correlation between our ranking and Shazeer's (1 = the same order); None if < 3."""
    n = len(summary)
    if n < 3:
        return None
    squared = sum((row["rank"] - row["shazeer_rank"]) ** 2 for row in summary)
    return 1 - 6 * squared / (n * (n * n - 1))


def gated_gap(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Mean validation loss of the gated variants minus that of the non-gated ones, paired by seed.

    Within a seed every variant saw the same batches and initial embeddings, so the difference of the two
    group means is taken per seed, d_s, and the gap is mean(d_s) with standard error std(d_s) / sqrt(n).
    Pairing removes the part of the seed noise the variants share. Needs both groups in >= 2 seeds.
    """
    by_seed: dict[int, dict[bool, list[float]]] = {}
    for r in results:
        by_seed.setdefault(r["seed"], {True: [], False: []})[r["gated"]].append(r["val_loss"])
    differences = [
        statistics.fmean(groups[True]) - statistics.fmean(groups[False])
        for groups in by_seed.values()
        if groups[True] and groups[False]
    ]
    if len(differences) < 2:
        return None
    gap = statistics.fmean(differences)
    standard_error = statistics.stdev(differences) / math.sqrt(len(differences))
    return {
        "gap": gap,
        "standard_error": standard_error,
        "seeds": len(differences),
        "standard_errors": gap / standard_error if standard_error > 0 else math.inf,
        "per_seed": differences,
    }


# ---------------------------------------------------------------------------------------------------------
# The table and the plot
# ---------------------------------------------------------------------------------------------------------


def _plus_minus(mean: float, std: float | None) -> str:
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def markdown_table(
    summary: list[dict[str, Any]], results: list[dict[str, Any]], config: AblationConfig
) -> str:
    """The Markdown report: the table, what the runs were, and the reading of the numbers."""
    seeds = sorted({r["seed"] for r in results})
    lines = [
        "| variant | gated | FFN hidden | FFN params | total params | val loss | val bits/byte | tokens/s "
        "| our rank | Shazeer 65k log-ppl | Shazeer rank |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in summary:
        lines.append(
            f"| {row['variant']} | {'yes' if row['gated'] else 'no'} | {row['ffn_hidden_dim']} "
            f"| {row['ffn_parameters']:,} | {row['parameters']:,} "
            f"| {_plus_minus(row['val_loss'], row['val_loss_std'])} "
            f"| {_plus_minus(row['val_bpb'], row['val_bpb_std'])} | {row['tokens_per_second']:,.0f} "
            f"| {row['rank']} | {row['shazeer_65k']:.3f} | {row['shazeer_rank']} |"
        )
    devices = sorted({r.get("device", "?") for r in results})
    train, model = config.train, config.model
    lines += [
        "",
        f"Mean ± sample standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
        f"validation loss in nats per token after {train.max_steps} steps of {train.batch_size} x "
        f"{model.max_seq_len} tokens; model dim {model.dim}, {model.n_layers} layers, {model.n_heads} heads, "
        f"vocabulary {train.vocab_size}, {model.weight_init} init, lr {train.lr:g}, corpus "
        f"{train.data}; device {', '.join(devices)}. "
        "Tokens/s: training tokens over the run's wall time, evaluation included. Ranks: 1 = lowest loss "
        "among the variants here. Shazeer's numbers are T5-base log-perplexities on C4: compare the "
        "orderings, not the values.",
    ]
    ffn_sizes = sorted({row["ffn_parameters"] for row in summary})
    if len(ffn_sizes) > 1:
        lines.append(
            f"FFN parameters are not matched exactly: {ffn_sizes[0]:,} to {ffn_sizes[-1]:,} "
            f"({100 * (ffn_sizes[-1] / ffn_sizes[0] - 1):.1f}% apart); choose dim and multiple_of so that "
            "8 * dim / 3 and 4 * dim are multiples of multiple_of."
        )
    lines += [""] + [f"- {finding}" for finding in findings(summary, results)]
    return "\n".join(lines)


def findings(summary: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[str]:
    """Plain sentences on what the numbers say: the gated gap against its noise, the rankings."""
    found = []
    gap = gated_gap(results)
    if gap is not None:
        verdict = "more" if abs(gap["standard_errors"]) > 2 else "less"
        per_seed = ", ".join(f"{difference:+.4f}" for difference in gap["per_seed"])
        found.append(
            f"Gated minus non-gated mean validation loss, paired by seed: {gap['gap']:+.4f} nats "
            f"(per seed {per_seed}; standard error {gap['standard_error']:.4f} over {gap['seeds']} seeds, "
            f"{abs(gap['standard_errors']):.1f} standard errors: {verdict} than 2)."
        )
    stds = [row["val_loss_std"] for row in summary if row["val_loss_std"] is not None]
    if stds:
        found.append(
            f"Seed noise: the standard deviation of one variant's loss over seeds is "
            f"{statistics.fmean(stds):.4f} on average."
        )
    gated = [row["val_loss"] for row in summary if row["gated"]]
    plain = [row["val_loss"] for row in summary if not row["gated"]]
    if gated and plain:
        if max(gated) < min(plain):
            sentence = "Every gated variant beats every non-gated one on the mean, as in Shazeer's Table 1"
            # On the mean is not the same as beyond the noise: say which it is.
            if gap is None or abs(gap["standard_errors"]) <= 2:
                sentence += ", but not by more than 2 standard errors of the paired gap"
        else:
            sentence = (
                "Not every gated variant beats every non-gated one on the mean (in Shazeer's Table 1 all do)"
            )
        found.append(sentence + ".")
    rho = spearman(summary)
    if rho is not None:
        found.append(f"Spearman rank correlation between our ranking and Shazeer's: {rho:+.2f}.")
    seconds = sum(r.get("seconds", 0.0) for r in results)
    found.append(
        f"Training time: {seconds:.0f} s ({seconds / 60:.1f} min) summed over the {len(results)} runs "
        "(each run's wall time, evaluation included; preparing the shared data adds to a first run)."
    )
    return found
