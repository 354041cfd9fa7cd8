"""The feed-forward ablation: one model trained with each FFN variant, at matched parameters, over seeds.

    python -m llama_mini.ablate                                   # 8 variants x 3 seeds, minutes on a CPU
    python -m llama_mini.ablate --variants relu swiglu --seeds 0 1 2 3 4
    python -m llama_mini.ablate --device cuda --data tinystories --vocab-size 4096 --dim 384 --n-layers 6 \\
        --n-heads 6 --max-seq-len 256 --batch-size 64 --max-steps 5000 --warmup-steps 200 --lr 1e-3 \\
        --min-lr 1e-4 --eval-steps 100 --out runs/ablation-gpu      # a size for a GPU (docs/ABLATION.md)

A small replication of Shazeer (2020), "GLU Variants Improve Transformer", Table 1. Every run has the same
model except its feed-forward, the same tokenizer and prepared data (one train/validation split), the same
steps and settings. Runs with the same seed draw the same training and validation batches, and variants
of the same shapes start from the same weights, so within a seed the variants differ only in the FFN.
Seeds change the initial weights and the order of the batches; the spread over seeds is the noise that a
difference between variants must beat.

Matched parameters: a gated FFN has three d x h matrices, a non-gated one two, so LLaMA's rule gives the
gated variants h = 2/3 * 4d and the others h = 4d (`ffn.llama_hidden_dim`), both rounded up to
`multiple_of`. When 8d/3 and 4d are both multiples of multiple_of the FFNs hold exactly the same number
of parameters: the default dim 96 with multiple_of 32 gives h = 256 and 384, and
3 * 96 * 256 = 2 * 96 * 384 = 73,728 per layer. Otherwise the table says how far apart they are.

The run folder (--out) holds `tokenizer.model` and `data/` (shared by all runs), `runs/VARIANT-seedN/`
(each run's metrics.jsonl; checkpoints are deleted unless --keep-checkpoints), `results.jsonl` (one line
per finished run, appended as it finishes), `ablation.md` (the table and what it says), `ablation.png`
(validation loss per variant beside Shazeer's) and `ablation_curves.png` (training loss against step).
Running the same command again skips finished runs and restarts an unfinished one from its start; adding
seeds or variants to the command extends the ablation. Results made with other settings are refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama_mini.console import ArgumentParser, run_command
from llama_mini.data import prepare_data, tokenizer_sample
from llama_mini.errors import ConfigError, DataError
from llama_mini.model.args import FeedForwardName, InitName, ModelArgs
from llama_mini.model.ffn import FEED_FORWARDS
from llama_mini.model.sizes import hidden_dim_steps, parameter_counts
from llama_mini.settings import add_flags, choice_problems, setting
from llama_mini.tokenizer import Tokenizer, train_tokenizer
from llama_mini.train import TrainConfig, Trainer, list_step_checkpoints

__all__ = [
    "SHAZEER_TABLE1",
    "AblationConfig",
    "findings",
    "gated_gap",
    "main",
    "markdown_table",
    "plot_curves",
    "plot_results",
    "read_results",
    "run_ablation",
    "spearman",
    "summarize",
]

RESULTS = "results.jsonl"
TABLE = "ablation.md"
PLOT = "ablation.png"
CURVES = "ablation_curves.png"

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


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


# The training and model settings an ablation exposes (every run shares them); their help texts are
# TrainConfig's and ModelArgs', their defaults the ablation's own, below.
TRAIN_SETTINGS = ("data", "tokenizer", "vocab_size", "val_fraction", "split_seed", "max_steps", "batch_size",
                  "lr", "min_lr", "warmup_steps", "eval_steps", "device", "dtype", "compile")  # fmt: skip
MODEL_SETTINGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len", "weight_init")


@dataclass
class AblationConfig:
    """The ablation's settings; every run uses them all, with its own variant and seed.

    The defaults finish 8 variants x 3 seeds in about 15 minutes on a 2-core CPU (docs/ABLATION.md).
    """

    variants: list[FeedForwardName] = setting(
        factory=lambda: list(FEED_FORWARDS), help="FFN variants to train"
    )
    seeds: list[int] = setting(factory=lambda: [0, 1, 2], help="seeds: initial weights and batch order")
    out: str = setting(
        "runs/ablation", "ablation folder: shared data, runs/, results.jsonl, ablation.md, ablation.png"
    )
    keep_checkpoints: bool = setting(False, "keep each run's checkpoints")
    # TRAIN_SETTINGS, with the ablation's defaults
    data: str = setting("shakespeare", flag=False)
    tokenizer: str | None = setting(None, flag=False)  # None = train one once, into out
    vocab_size: int = setting(2048, flag=False)  # small, so that the FFN is a large share of the model
    val_fraction: float = setting(0.1, flag=False)
    split_seed: int = setting(0, flag=False)  # one train/validation split for every run, whatever its seed
    max_steps: int = setting(200, flag=False)
    batch_size: int = setting(
        8, flag=False
    )  # at a fixed budget of tokens, 200 steps of 8 beat 100 of 16 here
    lr: float = setting(2e-3, flag=False)
    min_lr: float = setting(2e-4, flag=False)
    warmup_steps: int = setting(20, flag=False)
    eval_steps: int = setting(40, flag=False)  # validation batches at the end of each run
    device: str = setting("auto", flag=False)
    dtype: str = setting("auto", flag=False)
    compile: bool | None = setting(None, flag=False)
    # MODEL_SETTINGS: every run the same model but for ffn
    dim: int = setting(96, flag=False)
    n_layers: int = setting(4, flag=False)
    n_heads: int = setting(4, flag=False)
    n_kv_heads: int | None = setting(None, flag=False)
    multiple_of: int = setting(32, flag=False)
    max_seq_len: int = setting(128, flag=False)
    weight_init: InitName = setting("scaled", flag=False)

    def __post_init__(self) -> None:
        problems = choice_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))
        if not self.variants or not self.seeds:
            raise ConfigError("--variants and --seeds need at least one value each")
        if len(set(self.variants)) != len(self.variants) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("--variants and --seeds must not repeat a value")
        self.model_args("swiglu")  # a bad model shape fails here, before any data is prepared
        self.train_config(self.seeds[0], Path(self.out))

    def model_args(self, variant: str, vocab_size: int | None = None) -> ModelArgs:
        return ModelArgs(
            dim=self.dim,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            multiple_of=self.multiple_of,
            max_seq_len=self.max_seq_len,
            vocab_size=vocab_size or self.vocab_size,
            ffn=variant,
            weight_init=self.weight_init,
        )

    def model_overrides(self, variant: str) -> dict[str, Any]:
        """The ModelArgs fields a Trainer is given (it sets vocab_size from the tokenizer itself)."""
        values = self.model_args(variant).to_dict()
        del values["vocab_size"]
        return values

    def train_config(
        self, seed: int, out: Path, tokenizer: Path | None = None, data_dir: Path | None = None
    ) -> TrainConfig:
        """One run's TrainConfig: the same for every run but `seed` and `out`.

        One evaluation, at the end (eval_interval = max_steps): the final validation loss is what the
        table compares, and each evaluation also writes a checkpoint.
        """
        return TrainConfig(
            data=self.data,
            out=str(out),
            tokenizer=str(tokenizer) if tokenizer else self.tokenizer,
            vocab_size=self.vocab_size,
            val_fraction=self.val_fraction,
            split_seed=self.split_seed,
            data_dir=str(data_dir) if data_dir else None,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            lr=self.lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            eval_interval=self.max_steps,
            eval_steps=self.eval_steps,
            log_interval=min(10, self.max_steps),
            keep_last=1,
            seed=seed,
            device=self.device,
            dtype=self.dtype,
            compile=self.compile,
            sample_tokens=0,
        )

    def settings(self) -> dict[str, Any]:
        """What determines a run's result besides its variant and seed: stored with every result, and
        compared on resume so that runs with different settings never share a table."""
        values = dataclasses.asdict(self)
        for name in ("variants", "seeds", "out", "keep_checkpoints"):
            del values[name]
        return values


# ---------------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------------


def read_results(path: Path) -> list[dict[str, Any]]:
    """The finished runs in results.jsonl, in order. A torn last line (a crash while appending) is skipped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    results = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise DataError(
                f"{path}, line {number}: not valid JSON; delete the line to rerun that run"
            ) from None
    return results


def _with_old_defaults(result: dict[str, Any]) -> dict[str, Any]:
    """A result line with the settings added since it was written, at the values it was made with.

    Results written before the `weight_init` setting existed were made with GPT-2's N(0, 0.02) ("gpt2"), so
    `--weight-init gpt2` extends such an ablation and the default ("scaled") refuses to mix with it.
    """
    settings = result.get("settings")
    if isinstance(settings, dict) and "weight_init" not in settings:
        result = {**result, "settings": {**settings, "weight_init": "gpt2"}}
    return result


def _check_settings(results: list[dict[str, Any]], settings: dict[str, Any], path: Path) -> None:
    for result in results:
        if result.get("settings") != settings:
            saved = result.get("settings") or {}
            changed = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
            differences = ", ".join(f"{key} {saved.get(key)!r} -> {settings.get(key)!r}" for key in changed)
            raise ConfigError(
                f"{path} holds runs made with other settings ({differences}): pass the same settings "
                "to extend that ablation, or choose a new --out"
            )


def _prepare_shared(config: AblationConfig, out: Path, log) -> tuple[Path, Path]:
    """The tokenizer (trained once on the training split, unless --tokenizer) and the prepared data."""
    if config.tokenizer is not None:
        tokenizer_path = Path(config.tokenizer)
    else:
        tokenizer_path = out / "tokenizer.model"
        reuse = tokenizer_path.exists() and Tokenizer(tokenizer_path).vocab_size == config.vocab_size
        if not reuse:
            log(f"training a {config.vocab_size}-piece tokenizer on {config.data} ...")
            # the first --tokenizer-sample-mb of the training split, as train.py does: bounded, whatever the
            # corpus's size (the corpus itself is only ever streamed, by prepare_data)
            budget = round(TrainConfig().tokenizer_sample_mb * 1e6)
            sample = tokenizer_sample(config.data, budget, config.val_fraction, config.split_seed)
            train_tokenizer(sample, tokenizer_path, config.vocab_size)
    tokenizer = Tokenizer(tokenizer_path)
    data_dir = out / "data"
    prepare_data(config.data, data_dir, tokenizer, config.val_fraction, config.split_seed)
    return tokenizer_path, data_dir


def run_ablation(config: AblationConfig, log=print) -> dict[str, Any]:
    """Train every (seed, variant) not yet in out/results.jsonl, then write the table and the plot.

    Seeds are the outer loop, so an interrupted ablation already holds complete comparisons for its first
    seeds. Returns {"results", "summary", "table", "plot", "curves", "interrupted"} (a plot is None
    when matplotlib is missing); `log` receives one line per event.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS
    settings = config.settings()
    results = [_with_old_defaults(result) for result in read_results(results_path)]
    _check_settings(results, settings, results_path)
    done = {(result["variant"], result["seed"]) for result in results}
    todo = [
        (seed, variant) for seed in config.seeds for variant in config.variants if (variant, seed) not in done
    ]
    total = len(config.seeds) * len(config.variants)
    log(
        f"ablation: {len(config.variants)} variants x {len(config.seeds)} seeds = {total} runs, "
        f"{total - len(todo)} already done, into {out}"
    )
    interrupted = False
    if todo:
        tokenizer_path, data_dir = _prepare_shared(config, out, log)
        for index, (seed, variant) in enumerate(todo, start=1):
            result = _train_one(config, variant, seed, tokenizer_path, data_dir, out, settings)
            if result is None:
                interrupted = True
                log(f"interrupted during {variant} seed {seed}; run the same command again to go on")
                break
            with results_path.open("a") as file:
                file.write(json.dumps(result) + "\n")  # one write: a line is there whole or not at all
            results.append(result)
            log(
                f"[{index}/{len(todo)}] {variant:<8} seed {seed}: val loss {result['val_loss']:.4f}, "
                f"{result['val_bpb']:.4f} bits/byte, {result['tokens_per_second']:,.0f} tokens/s, "
                f"{result['seconds']:.0f} s"
            )
    wanted = [r for r in results if r["variant"] in config.variants and r["seed"] in config.seeds]
    if not wanted:  # interrupted before the first run finished: nothing to tabulate
        return {
            "results": [],
            "summary": [],
            "table": None,
            "plot": None,
            "curves": None,
            "interrupted": True,
        }
    table_path, plot_path = out / TABLE, out / PLOT
    summary = summarize(wanted, config.variants)
    table_path.write_text(markdown_table(summary, wanted, config) + "\n")
    plotted = plot_results(summary, plot_path, title=_plot_title(config, wanted))
    curves = training_curves(out, config.variants, sorted({r["seed"] for r in wanted}))
    curves_plotted = plotted and plot_curves(curves, out / CURVES, title=_plot_title(config, wanted))
    return {
        "results": wanted,
        "summary": summary,
        "table": table_path,
        "plot": plot_path if plotted else None,
        "curves": out / CURVES if curves_plotted else None,
        "interrupted": interrupted,
    }


def _train_one(
    config: AblationConfig,
    variant: str,
    seed: int,
    tokenizer_path: Path,
    data_dir: Path,
    out: Path,
    settings: dict[str, Any],
) -> dict[str, Any] | None:
    """Train one run from scratch and return its result line (None if it was interrupted)."""
    run_dir = out / "runs" / f"{variant}-seed{seed}"
    if run_dir.exists():  # an unfinished run (its result was never written): start it again
        shutil.rmtree(run_dir)
    # Every run reads the one data set prepared in out/data, split once with split_seed, so all seeds
    # and variants are evaluated on the same validation text.
    run_config = config.train_config(seed, run_dir, tokenizer_path, data_dir)
    trainer = Trainer(run_config, config.model_overrides(variant), show_progress=False)
    summary = trainer.run()
    if summary.interrupted:
        return None
    counts = parameter_counts(trainer.model_args)
    if not config.keep_checkpoints:
        for folder in [*list_step_checkpoints(run_dir), run_dir / "best"]:
            shutil.rmtree(folder, ignore_errors=True)
    hidden, _ = hidden_dim_steps(trainer.model_args)
    return {
        "variant": variant,
        "seed": seed,
        "gated": FEED_FORWARDS[variant].gated,
        "ffn_hidden_dim": hidden,
        "ffn_parameters": counts["feed_forward"],
        "parameters": counts["total"],
        "val_loss": summary.val_loss,
        "val_bpb": summary.val_bpb,
        "train_loss": summary.train_loss,
        "steps": summary.step,
        "tokens": summary.tokens,
        "seconds": summary.seconds,
        "tokens_per_second": summary.tokens_per_second,
        "device": str(trainer.device),
        "settings": settings,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


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
    lines += [
        "",
        f"Mean ± sample standard deviation over {len(seeds)} seed(s) ({', '.join(map(str, seeds))}); "
        f"validation loss in nats per token after {config.max_steps} steps of {config.batch_size} x "
        f"{config.max_seq_len} tokens; model dim {config.dim}, {config.n_layers} layers, {config.n_heads} "
        f"heads, vocabulary {config.vocab_size}, {config.weight_init} init, lr {config.lr:g}, corpus "
        f"{config.data}; device {', '.join(devices)}. "
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


def _plot_title(config: AblationConfig, results: list[dict[str, Any]]) -> str:
    seeds = len({r["seed"] for r in results})
    return (
        f"FFN variants: dim {config.dim}, {config.n_layers} layers, {config.weight_init} init, "
        f"{config.max_steps} steps, {config.data}, {seeds} seed(s)"
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
            losses.plot(steps, mean, color=shade, label=name, lw=1.4)
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
        )
        gap.axhline(0.0, color="tab:red", lw=0.8, ls="--")
        gap.set_xlabel("step")
        gap.set_ylabel("gated minus non-gated training loss")
        gap.set_title("below 0: gated ahead (grey: single seeds, black: mean)", fontsize=10)
        gap.grid(alpha=0.3)
    else:
        gap.set_axis_off()
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    defaults = AblationConfig()
    parser = ArgumentParser(
        prog=prog or "python -m llama_mini.ablate",
        description="Train the same model with each feed-forward variant over several seeds and compare "
        "validation losses with Shazeer (2020), Table 1.",
    )
    add_flags(parser, AblationConfig)
    add_flags(
        parser.add_argument_group("training (every run)"), TrainConfig, only=TRAIN_SETTINGS, defaults=defaults
    )
    add_flags(
        parser.add_argument_group("model (every run)"), ModelArgs, only=MODEL_SETTINGS, defaults=defaults
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(_parser(prog), lambda options: _ablate(vars(options)), argv)


def _ablate(options: dict[str, Any]) -> int:
    started = time.perf_counter()
    try:
        outcome = run_ablation(AblationConfig(**options), log=lambda line: print(line, flush=True))
    except KeyboardInterrupt:  # between runs (a run itself stops cleanly and returns)
        print("interrupted; run the same command again to go on", file=sys.stderr)
        return 130
    if outcome["table"] is None:
        print("interrupted before any run finished; run the same command again to go on", file=sys.stderr)
        return 130
    print()
    print(outcome["table"].read_text(), end="")
    print(f"\ntable: {outcome['table']}")
    print(f"plot:  {outcome['plot']}" if outcome["plot"] else "plot:  not written (no matplotlib)")
    if outcome["curves"]:
        print(f"training curves: {outcome['curves']}")
    print(f"wall time {time.perf_counter() - started:.0f} s")
    return 130 if outcome["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
