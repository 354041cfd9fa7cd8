"""Running the ablation: the shared tokenizer and data, one Trainer per (seed, variant), results.jsonl."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from llama_mini.data import prepare_data, tokenizer_sample
from llama_mini.errors import ConfigError, DataError
from llama_mini.model.ffn import FEED_FORWARDS
from llama_mini.model.sizes import hidden_dim_steps, parameter_counts
from llama_mini.study.ablate.config import AblationConfig
from llama_mini.study.ablate.figures import plot_curves, plot_results, plot_title, training_curves
from llama_mini.study.ablate.report import markdown_table, summarize
from llama_mini.tokenizer import Tokenizer, train_tokenizer
from llama_mini.train import Trainer, list_step_checkpoints
from llama_mini.train.data_feed import shared_data_folder

__all__ = ["CURVES", "PLOT", "RESULTS", "TABLE", "prepare_shared", "read_results", "run_ablation"]

RESULTS = "results.jsonl"
TABLE = "ablation.md"
PLOT = "ablation.png"
CURVES = "ablation_curves.png"


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


def _as_written_now(result: dict[str, Any]) -> dict[str, Any]:
    """A result line with its settings as AblationConfig.settings writes them today.

    Results written before the `weight_init` setting existed were made with GPT-2's N(0, 0.02) ("gpt2"), so
    `--weight-init gpt2` extends such an ablation and the default ("scaled") refuses to mix with it. An
    `n_kv_heads` of None (multi-head attention, as the flag's default spells it) is n_heads, the value
    ModelArgs gives it and the settings now record.
    """
    settings = result.get("settings")
    if not isinstance(settings, dict):
        return result
    settings = dict(settings)
    settings.setdefault("weight_init", "gpt2")
    settings.setdefault("optimizer", "adamw")  # results from before --optimizer: AdamW's
    if settings["optimizer"] == "adamw":  # --muon-lr does not change an AdamW run
        settings.pop("muon_lr", None)
    if "n_kv_heads" in settings and settings["n_kv_heads"] is None:
        settings["n_kv_heads"] = settings.get("n_heads")
    return {**result, "settings": settings}


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


def prepare_shared(config: AblationConfig, out: Path, log) -> tuple[Path, Path]:
    """The tokenizer (trained once on the training split, unless --tokenizer) and the prepared data."""
    train = config.train
    if train.tokenizer is not None:
        tokenizer_path = Path(train.tokenizer)
    else:
        tokenizer_path = out / "tokenizer.model"
        reuse = tokenizer_path.exists() and Tokenizer(tokenizer_path).vocab_size == train.vocab_size
        if not reuse:
            log(f"training a {train.vocab_size}-piece tokenizer on {train.data} ...")
            # the first --tokenizer-sample-mb of the training split, as train.py does: bounded, whatever the
            # corpus's size (the corpus itself is only ever streamed, by prepare_data)
            budget = round(train.tokenizer_sample_mb * 1e6)
            sample = tokenizer_sample(train.data, budget, train.val_fraction, train.split_seed)
            train_tokenizer(sample, tokenizer_path, train.vocab_size)
    tokenizer = Tokenizer(tokenizer_path)
    data_dir = out / "data"  # every run's --data-dir: its shards are in the tokenizer's subfolder
    prepare_data(
        train.data, shared_data_folder(data_dir, tokenizer), tokenizer, train.val_fraction, train.split_seed
    )
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
    results = [_as_written_now(result) for result in read_results(results_path)]
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
        tokenizer_path, data_dir = prepare_shared(config, out, log)
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
    plotted = plot_results(summary, plot_path, title=plot_title(config, wanted))
    curves = training_curves(out, config.variants, sorted({r["seed"] for r in wanted}))
    curves_plotted = plotted and plot_curves(curves, out / CURVES, title=plot_title(config, wanted))
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
