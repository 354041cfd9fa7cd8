"""The initialisation sweep: how the starting scale of the weights changes each FFN variant's training.

    python bench/init_sweep.py run --ffn-gains 0.1 0.2 0.5 1 --gpt2 --seeds 0 1      # scale x variant
    python bench/init_sweep.py run --variants relu swiglu --lrs 1e-3 4e-3 --gpt2 --seeds 0 1
    python bench/init_sweep.py run --variants relu swiglu --embedding-stds 0.2 1 --seeds 0 1
    python bench/init_sweep.py report --figure docs/img/init_sweep.png           # tables and the figure

Every run is one run of the FFN ablation (llama_mini.study.ablate, its defaults: dim 96, 4 layers, 4 heads,
context 128, vocabulary 2048, Shakespeare, AdamW with 20 warmup steps and a cosine to lr / 10, batch 8 x 128,
200 steps, one evaluation on 40 validation batches), except for its initial weights and learning rate. The
weights are drawn by `llama_mini.model.transformer.init_stds`, the function `Transformer.init_weights`
uses, with the constants of the run (each defaults to the model's own):

    attention_gain  wq, wk, wv ~ N(0, gain / sqrt(fan_in))
    ffn_gain        w1, w3     ~ N(0, gain / sqrt(fan_in))
    residual_gain   wo, w2     ~ N(0, gain / sqrt(fan_in) / sqrt(2 * n_layers))
    embedding_std   tok_embeddings ~ N(0, std)
    output_gain     output     ~ N(0, gain / sqrt(dim))

or, with --gpt2, also GPT-2's rule (N(0, 0.02), wo and w2 divided by sqrt(2 * n_layers)). Every
combination of the values given is run. Runs with the same seed share their batches and validation
windows across every arm, so differences within a seed are paired. Results go to OUT/results.jsonl, one
line per run, appended as it finishes; running a command again skips the runs already there, so a sweep is
extended by running more commands into the same folder. `--lock FILE` takes an exclusive flock(2) on FILE
around each run, the same lock as `flock FILE command`, so that other jobs sharing the CPU can measure
between runs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from llama_mini.model.ffn import FEED_FORWARDS  # noqa: E402
from llama_mini.model.transformer import (  # noqa: E402
    INIT_ATTENTION_GAIN,
    INIT_EMBEDDING_STD,
    INIT_FFN_GAIN,
    INIT_OUTPUT_GAIN,
    INIT_RESIDUAL_GAIN,
    init_stds,
)
from llama_mini.study.ablate import AblationConfig, read_results  # noqa: E402
from llama_mini.study.ablate.runner import prepare_shared  # noqa: E402
from llama_mini.train import Trainer  # noqa: E402

RESULTS = "results.jsonl"
GPT2 = "gpt2"
CONSTANTS = ("attention_gain", "ffn_gain", "residual_gain", "embedding_std", "output_gain")
DEFAULTS = dict(
    zip(
        CONSTANTS,
        (INIT_ATTENTION_GAIN, INIT_FFN_GAIN, INIT_RESIDUAL_GAIN, INIT_EMBEDDING_STD, INIT_OUTPUT_GAIN),
        strict=True,
    )
)


@dataclass(frozen=True)
class Arm:
    """One run of the sweep: a variant and seed, its learning rate and its initial weights."""

    variant: str
    seed: int
    lr: float = 2e-3
    init: str = "scaled"  # or "gpt2", whose rule has no constants (those below are then unused)
    attention_gain: float = INIT_ATTENTION_GAIN
    ffn_gain: float = INIT_FFN_GAIN
    residual_gain: float = INIT_RESIDUAL_GAIN
    embedding_std: float = INIT_EMBEDDING_STD
    output_gain: float = INIT_OUTPUT_GAIN
    max_steps: int = 200

    @property
    def constants(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in CONSTANTS}

    @property
    def name(self) -> str:
        """A folder name that identifies the run."""
        init = GPT2 if self.init == GPT2 else "-".join(f"{value:g}" for value in self.constants.values())
        return f"{self.variant}-seed{self.seed}-lr{self.lr:g}-{init}-steps{self.max_steps}"

    def stds(self, model: torch.nn.Module) -> dict[str, float]:
        """The std each matrix of `model` starts from in this arm."""
        return init_stds(model, self.init, **self.constants)


def reinitialise(model: torch.nn.Module, arm: Arm) -> None:
    """Draw `model`'s matrices afresh for `arm`, from a generator seeded with the arm's seed."""
    torch.manual_seed(arm.seed)
    stds = arm.stds(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in stds:
                param.normal_(mean=0.0, std=stds[name])


def arms_of(options: argparse.Namespace) -> list[Arm]:
    """Every combination of the command's values; seeds outermost, so a stopped sweep is paired."""
    grid = itertools.product(*(getattr(options, name + "s") for name in CONSTANTS))
    inits = [dict(zip(CONSTANTS, values, strict=True)) for values in grid]
    arms = []
    for seed, lr in itertools.product(options.seeds, options.lrs):
        if options.gpt2:
            arms += [Arm(v, seed, lr, GPT2, max_steps=options.max_steps) for v in options.variants]
        for constants in inits:
            arms += [
                Arm(v, seed, lr, "scaled", **constants, max_steps=options.max_steps) for v in options.variants
            ]
    return arms


@contextlib.contextmanager
def exclusive_lock(path: str | None) -> Iterator[None]:
    """Hold an exclusive flock(2) on `path` (created if missing) for the body; nothing if None."""
    if path is None:
        yield
        return
    import fcntl  # Unix only, and only needed here

    with open(path, "a") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)


def train_arm(arm: Arm, config: AblationConfig, tokenizer: Path, data_dir: Path, out: Path) -> dict[str, Any]:
    """Train one arm (the ablation's run with this arm's lr and initial weights); its result line."""
    run_dir = out / "runs" / arm.name
    if run_dir.exists():  # an unfinished run: start it again
        shutil.rmtree(run_dir)
    train_config = dataclasses.replace(
        config.train_config(arm.seed, run_dir, tokenizer, data_dir),
        lr=arm.lr,
        min_lr=arm.lr / 10,
        max_steps=arm.max_steps,
        eval_interval=arm.max_steps,
        log_interval=min(10, arm.max_steps),
    )
    trainer = Trainer(train_config, config.model_overrides(arm.variant), show_progress=False)
    reinitialise(trainer.raw_model, arm)  # in place: the optimizer holds these same tensors
    summary = trainer.run()
    if summary.interrupted:
        raise KeyboardInterrupt
    for folder in run_dir.iterdir():  # keep metrics.jsonl (the curves), drop the checkpoints
        if folder.is_dir():
            shutil.rmtree(folder)
    return {
        **dataclasses.asdict(arm),
        "gated": FEED_FORWARDS[arm.variant].gated,
        "val_loss": summary.val_loss,
        "val_bpb": summary.val_bpb,
        "train_loss": summary.train_loss,
        "seconds": summary.seconds,
        "tokens_per_second": summary.tokens_per_second,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run(options: argparse.Namespace) -> int:
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS
    done = {Arm(**_arm_fields(r)).name for r in read_results(results_path)}
    todo = [arm for arm in arms_of(options) if arm.name not in done]
    print(f"init sweep: {len(todo)} runs to train into {out} ({len(done)} already there)", flush=True)
    if not todo:
        return 0
    config = AblationConfig.from_settings(variants=list(options.variants), out=str(out), device="cpu")
    tokenizer, data_dir = prepare_shared(config, out, print)
    for index, arm in enumerate(todo, start=1):
        with exclusive_lock(options.lock):
            result = train_arm(arm, config, tokenizer, data_dir, out)
        with results_path.open("a") as file:
            file.write(json.dumps(result) + "\n")
        print(
            f"[{index}/{len(todo)}] {arm.name}: val loss {result['val_loss']:.4f}, {result['seconds']:.0f} s",
            flush=True,
        )
    return 0


def _arm_fields(result: dict[str, Any]) -> dict[str, Any]:
    return {field.name: result[field.name] for field in dataclasses.fields(Arm)}


# ---------------------------------------------------------------------------------------------------------
# The report: tables of means over seeds, the paired gated gap, and the figure
# ---------------------------------------------------------------------------------------------------------


def init_key(result: dict[str, Any]) -> tuple:
    """What a run's initial weights were: ("gpt2",) or the five constants of the scaled rule."""
    return (GPT2,) if result["init"] == GPT2 else tuple(result[name] for name in CONSTANTS)


def mean_losses(results: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    """{(variant, steps, lr, init key): {"mean", "std", "seeds"}}, over the seeds of each arm."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        groups.setdefault((r["variant"], r["max_steps"], r["lr"], init_key(r)), []).append(r["val_loss"])
    return {
        key: {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None,
            "seeds": len(values),
        }
        for key, values in groups.items()
    }


def paired_gap(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Gated minus non-gated mean validation loss, per seed, then its mean and standard error over seeds
    (None for the error from one seed); None without both groups in some seed."""
    by_seed: dict[int, dict[bool, list[float]]] = {}
    for r in results:
        by_seed.setdefault(r["seed"], {True: [], False: []})[r["gated"]].append(r["val_loss"])
    differences = [
        statistics.fmean(g[True]) - statistics.fmean(g[False])
        for g in by_seed.values()
        if g[True] and g[False]
    ]
    if not differences:
        return None
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else None
    return {"gap": statistics.fmean(differences), "standard_error": error, "seeds": len(differences)}


def _gap_text(gap: dict[str, Any] | None) -> str:
    if gap is None:
        return ""
    if gap["standard_error"] is None:
        return f"{gap['gap']:+.3f}"
    return f"{gap['gap']:+.3f} ± {gap['standard_error']:.3f}"


def table(results: list[dict[str, Any]]) -> str:
    """One row per (steps, lr, init): each variant's mean validation loss (seeds) and the paired gap."""
    means = mean_losses(results)
    variants = [v for v in FEED_FORWARDS if any(key[0] == v for key in means)]
    arms = sorted({key[1:] for key in means}, key=lambda k: (k[0], k[1], k[2] != (GPT2,), k[2]))
    lines = [
        "| steps | lr | attention | ffn | residual | embedding | output | "
        + " | ".join(variants)
        + " | gated - non-gated |",
        "|--:|--:|--:|--:|--:|--:|--:|" + "--:|" * (len(variants) + 1),
    ]
    for steps, lr, init in arms:
        constants = ["GPT-2's N(0, 0.02)", "", "", "", ""] if init == (GPT2,) else [f"{c:g}" for c in init]
        cells = []
        for variant in variants:
            cell = means.get((variant, steps, lr, init))
            cells.append(f"{cell['mean']:.3f} ({cell['seeds']})" if cell else "")
        same = [r for r in results if (r["max_steps"], r["lr"], init_key(r)) == (steps, lr, init)]
        row = [str(steps), f"{lr:g}", *constants, *cells, _gap_text(paired_gap(same))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(options: argparse.Namespace) -> int:
    results = read_results(Path(options.out) / RESULTS)
    if options.seeds:
        results = [r for r in results if r["seed"] in options.seeds]
    if not results:
        print(f"no results in {options.out}", file=sys.stderr)
        return 2
    print("Validation loss (nats per token) at the end of each run, mean over seeds (how many):\n")
    print(table(results))
    if options.figure:
        base = {name: getattr(options, name) for name in CONSTANTS}
        plot(results, Path(options.figure), options.lr, options.max_steps, base)
        print(f"\nfigure: {options.figure}")
    return 0


def common_seed_means(runs: list[dict[str, Any]], x: str) -> list[tuple[float, float]]:
    """(x, mean validation loss) for each value of the field `x` among `runs`, each mean taken over the
    seeds that every value has, so that the points of one line are compared on the same seeds."""
    values = sorted({r[x] for r in runs})
    seeds = set.intersection(*({r["seed"] for r in runs if r[x] == value} for value in values))
    return [
        (value, statistics.fmean(r["val_loss"] for r in runs if r[x] == value and r["seed"] in seeds))
        for value in values
    ]


def _differs_from(result: dict[str, Any], base: dict[str, float]) -> set[str]:
    """The constants in which a scaled run differs from `base`."""
    return {name for name in CONSTANTS if result[name] != base[name]}


def plot(results: list[dict[str, Any]], path: Path, lr: float, steps: int, base: dict[str, float]) -> None:
    """Four panels, all at `steps`. Top left: validation loss against the FFN gain at `lr`, the other
    constants at `base`, one line per variant, and GPT-2's rule as open squares at its FFN gain,
    0.02 * sqrt(dim). Top right: the paired gated gap against the same. Bottom left: loss against the
    learning rate, for each variant and init run at several. Bottom right: each other constant varied
    alone around `base`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defaults = AblationConfig()
    train, model = defaults.train, defaults.model
    gpt2_gain = 0.02 * math.sqrt(model.dim)
    results = [r for r in results if r["max_steps"] == steps]
    on_base = [r for r in results if r["init"] == GPT2 or _differs_from(r, base) <= {"ffn_gain"}]
    at_lr = [r for r in on_base if r["lr"] == lr]
    means = mean_losses(at_lr)
    variants = [v for v in FEED_FORWARDS if any(key[0] == v for key in means)]
    gated = [v for v in variants if FEED_FORWARDS[v].gated]
    plain = [v for v in variants if not FEED_FORWARDS[v].gated]
    colour = {v: plt.get_cmap("Blues")(0.45 + 0.5 * i / max(1, len(gated) - 1)) for i, v in enumerate(gated)}
    colour |= {
        v: plt.get_cmap("Oranges")(0.45 + 0.5 * i / max(1, len(plain) - 1)) for i, v in enumerate(plain)
    }
    figure, ((losses, gaps), (rates, alone)) = plt.subplots(2, 2, figsize=(14, 9.5))
    for variant in variants:
        runs = [r for r in at_lr if r["variant"] == variant and r["init"] != GPT2]
        if runs:
            points = common_seed_means(runs, "ffn_gain")
            losses.plot(*zip(*points, strict=True), "o-", color=colour[variant], label=variant, lw=1.4, ms=4)
        old = means.get((variant, steps, lr, (GPT2,)))
        if old:
            losses.plot(gpt2_gain, old["mean"], "s", mfc="none", color=colour[variant], ms=8)
    losses.set_xscale("log", base=2)
    losses.set_xlabel("FFN gain: w1, w3 ~ N(0, gain^2 / fan_in)")
    losses.set_ylabel(f"validation loss after {steps} steps (nats/token)")
    losses.set_title(
        f"mean over common seeds, lr {lr:g}; squares: GPT-2's N(0, 0.02) for every matrix", fontsize=9
    )
    losses.legend(fontsize=8, ncol=2)
    losses.grid(alpha=0.3)

    arms = sorted({init_key(r) for r in at_lr}, key=lambda k: -1.0 if k == (GPT2,) else k[1])
    for init in arms:
        gap = paired_gap([r for r in at_lr if init_key(r) == init])
        if gap is None:
            continue
        old = init == (GPT2,)
        gaps.errorbar(
            gpt2_gain if old else init[1],
            gap["gap"],
            yerr=gap["standard_error"] or 0,
            fmt="s" if old else "o",
            mfc="none" if old else "black",
            color="black",
            capsize=4,
        )
    gaps.axhline(0.0, color="tab:red", lw=0.8, ls="--")
    gaps.set_xscale("log", base=2)
    gaps.set_xlabel("FFN gain")
    gaps.set_ylabel("gated minus non-gated validation loss")
    gaps.set_title("paired by seed, ± standard error over seeds; below 0: gated ahead", fontsize=9)
    gaps.grid(alpha=0.3)

    series: dict[tuple, list[dict[str, Any]]] = {}
    for r in on_base:
        series.setdefault((r["variant"], init_key(r)), []).append(r)
    for (variant, init), runs in sorted(series.items(), key=lambda item: (item[0][0], str(item[0][1]))):
        if len({r["lr"] for r in runs}) < 2:
            continue
        points = common_seed_means(runs, "lr")
        old = init == (GPT2,)
        label = f"{variant}, {'N(0, 0.02)' if old else f'FFN gain {init[1]:g}'}"
        cmap = plt.get_cmap("Blues" if FEED_FORWARDS[variant].gated else "Oranges")
        style, shade = ("s--", 0.5) if old else ("o-", 0.9)
        rates.plot(*zip(*points, strict=True), style, color=cmap(shade), label=label, lw=1.2, ms=4)
    rates.set_xscale("log", base=2)
    rates.set_xlabel("peak learning rate")
    rates.set_ylabel("validation loss, mean over seeds")
    rates.set_title(
        "the learning rate against the init (each line on the seeds all its points have)", fontsize=9
    )
    rates.legend(fontsize=8)
    rates.grid(alpha=0.3)

    probe = {**base, "ffn_gain": DEFAULTS["ffn_gain"]}
    around = [r for r in results if r["lr"] == lr and r["init"] != GPT2 and len(_differs_from(r, probe)) <= 1]
    names = [name for name in CONSTANTS if name != "ffn_gain"]
    for index, name in enumerate(names):
        for variant, style in (("relu", "o-"), ("swiglu", "s--")):
            runs = [r for r in around if r["variant"] == variant and _differs_from(r, probe) <= {name}]
            if len({r[name] for r in runs}) < 2:
                continue
            points = [(value / probe[name], loss) for value, loss in common_seed_means(runs, name)]
            label = f"{name} (base {probe[name]:g}), {variant}"
            alone.plot(*zip(*points, strict=True), style, color=f"C{index}", lw=1.2, ms=4, label=label)
    alone.set_xscale("log", base=2)
    alone.set_xlabel("the constant / its value in the base")
    alone.set_ylabel("validation loss, mean over seeds")
    alone.set_title(
        f"one constant at a time at FFN gain {probe['ffn_gain']:g}, lr {lr:g}, common seeds", fontsize=9
    )
    alone.legend(fontsize=7)
    alone.grid(alpha=0.3)
    figure.suptitle(
        f"Initial scale x FFN variant: dim {model.dim}, {model.n_layers} layers, {steps} steps of "
        f"{train.batch_size} x {model.max_seq_len} tokens, Shakespeare; base: "
        + ", ".join(f"{name} {value:g}" for name, value in base.items() if name != "ffn_gain"),
        fontsize=11,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------------
# Why: the scale of the FFN's hidden units at the start, and how far one optimizer step moves them
# ---------------------------------------------------------------------------------------------------------


def hidden_scales(arm: Arm, dim: int, lr: float, batch_size: int = 8) -> dict[str, float]:
    """For the ablation's model at `dim` (every other setting its default) initialised by `arm`, on a batch
    of random tokens: the RMS of layer 0's FFN hidden units (what w2 reads: act(w1 x), or act(w1 x) * w3 x)
    and the RMS of the change one AdamW step at `lr` on that batch makes to that FFN's output."""
    from llama_mini.model.transformer import Transformer
    from llama_mini.ops.loss import cross_entropy

    config = AblationConfig.from_settings(dim=dim, multiple_of=32)
    model = Transformer(config.model_args(arm.variant))
    reinitialise(model, arm)
    generator = torch.Generator().manual_seed(arm.seed)
    tokens = torch.randint(
        0, config.train.vocab_size, (batch_size, config.model.max_seq_len + 1), generator=generator
    )
    hidden: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    feed_forward = model.layers[0].feed_forward
    feed_forward.w2.register_forward_hook(lambda module, args, out: hidden.append(args[0].detach()))
    feed_forward.register_forward_hook(lambda module, args, out: outputs.append(out.detach()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    optimizer.step()
    with torch.no_grad():
        model(tokens[:, :-1])
    return {
        "hidden": hidden[0].pow(2).mean().sqrt().item(),
        "output": outputs[0].pow(2).mean().sqrt().item(),
        "output_step": (outputs[1] - outputs[0]).pow(2).mean().sqrt().item(),
    }


def scales(options: argparse.Namespace) -> int:
    """Print hidden_scales for each variant, under GPT-2's rule and the scaled rule at each FFN gain."""
    arms = [("N(0, 0.02)", {"init": GPT2})] + [
        (f"FFN gain {gain:g}", {"ffn_gain": gain}) for gain in options.ffn_gains
    ]
    print(
        f"Layer 0's FFN at dim {options.dim}, at the start: RMS of the hidden units / RMS of the change one"
    )
    print(f"AdamW step at lr {options.lr:g} makes to the FFN's output (random tokens, seed 0).\n")
    print("| variant | " + " | ".join(label for label, _ in arms) + " |")
    print("|---|" + "--:|" * len(arms))
    for variant in options.variants:
        cells = []
        for _, values in arms:
            measured = hidden_scales(Arm(variant, 0, **values), options.dim, options.lr)
            cells.append(f"{measured['hidden']:.3f} / {measured['output_step']:.4f}")
        print(f"| {variant} | " + " | ".join(cells) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("run", help="train the runs of a grid not yet in OUT/results.jsonl")
    train.add_argument("--variants", nargs="+", default=list(FEED_FORWARDS), choices=list(FEED_FORWARDS))
    train.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    train.add_argument("--lrs", nargs="+", type=float, default=[2e-3], help="peak learning rates")
    for name in CONSTANTS:
        flag = "--" + name.replace("_", "-") + "s"
        train.add_argument(flag, nargs="+", type=float, default=[DEFAULTS[name]], help=f"values of {name}")
    train.add_argument("--gpt2", action="store_true", help="also run GPT-2's rule")
    train.add_argument("--max-steps", type=int, default=AblationConfig().train.max_steps)
    train.add_argument("--lock", help="hold an exclusive flock on this file during each run")
    shown = commands.add_parser("report", help="print the table; --figure also draws the plot")
    shown.add_argument("--figure", help="write the figure here (PNG)")
    shown.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: all)")
    shown.add_argument("--lr", type=float, default=2e-3, help="the learning rate of the left panels")
    shown.add_argument(
        "--max-steps", type=int, default=AblationConfig().train.max_steps, help="the runs plotted"
    )
    for name in CONSTANTS:
        shown.add_argument(
            "--" + name.replace("_", "-"),
            type=float,
            default=DEFAULTS[name],
            help=f"the figure's base value of {name} (default: the model's)",
        )
    for command in (train, shown):
        command.add_argument("--out", default="runs/init-sweep", help="the sweep's folder")
    measure = commands.add_parser("scales", help="the FFN hidden units' scale at init and after one step")
    measure.add_argument("--variants", nargs="+", default=list(FEED_FORWARDS), choices=list(FEED_FORWARDS))
    measure.add_argument("--ffn-gains", nargs="+", type=float, default=[DEFAULTS["ffn_gain"]])
    measure.add_argument("--dim", type=int, default=AblationConfig().model.dim)
    measure.add_argument("--lr", type=float, default=2e-3)
    options = parser.parse_args(argv)
    return {"run": run, "report": report, "scales": scales}[options.command](options)


if __name__ == "__main__":
    sys.exit(main())
