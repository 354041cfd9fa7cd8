"""What the gates learned: each layer's feed-forward activations of a checkpoint on a text.

python -m llama_mini.plots ffn-stats --checkpoint DIR [--text TEXT | --text-file FILE] --out DIR
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llama_mini.checkpoint import (
    describe_resolution,
    detect_format,
    find_tokenizer,
    load_model,
    resolve_checkpoint,
)
from llama_mini.model.ffn import swish
from llama_mini.model.transformer import Transformer
from llama_mini.study.plots.style import (
    PlotError,
    check_format,
    figure_style,
    make_output_folder,
    new_figure,
    require_matplotlib,
    save_figure,
)
from llama_mini.tokenizer import Tokenizer

if typing.TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_TEXT",
    "GATE_ACTIVATIONS",
    "GATE_NAMES",
    "NEAR_ZERO",
    "FeedForwardStats",
    "feed_forward_statistics",
    "plot_ffn_stats",
]

NEAR_ZERO = 0.05  # a gate output |act(a)| below this passes at most 5% of its value on to w2


def _swish_gate(feed_forward: nn.Module, gate: torch.Tensor) -> torch.Tensor:
    return swish(gate, feed_forward.beta)  # FFNSwish's beta: a constant or a learned scalar per layer


# The activation each variant applies to w1 x, as its forward computes it; (feed_forward, w1 x) -> act.
GATE_ACTIVATIONS: dict[str, Callable[[nn.Module, torch.Tensor], torch.Tensor]] = {
    "relu": lambda _, gate: F.relu(gate),
    "gelu": lambda _, gate: F.gelu(gate),
    "swish": _swish_gate,
    "glu": lambda _, gate: torch.sigmoid(gate),
    "bilinear": lambda _, gate: gate,
    "reglu": lambda _, gate: F.relu(gate),
    "geglu": lambda _, gate: F.gelu(gate),
    "swiglu": lambda _, gate: F.silu(gate),
}
GATE_NAMES = {
    "relu": "relu",
    "gelu": "gelu",
    "swish": "swish",
    "glu": "sigmoid",
    "bilinear": "identity",
    "reglu": "relu",
    "geglu": "gelu",
    "swiglu": "silu",
}


@dataclass
class FeedForwardStats:
    """One layer's feed-forward on a text of T tokens; every tensor is (T, hidden_dim), float32, on the CPU.

    gate       w1 x, the gate pre-activations a
    activated  act(a), the gate's output (for non-gated variants, the hidden activation itself)
    hidden     act(a) * w3 x, what w2 reads (gated variants; None for non-gated ones)
    near_zero_share  the share of |act(a)| < NEAR_ZERO: units that pass (almost) nothing on
    """

    layer: int
    gate: torch.Tensor
    activated: torch.Tensor
    hidden: torch.Tensor | None
    near_zero_share: float


def feed_forward_statistics(model: Transformer, tokens: torch.Tensor) -> list[FeedForwardStats]:
    """Run `model` on tokens (T,) and catch every layer's gate w1 x and value w3 x with forward hooks.

    The hooks read the outputs of `feed_forward.w1` and `feed_forward.w3` (nn.Linear modules), so this
    works for every variant without changing the model; the gate activation comes from GATE_ACTIVATIONS,
    chosen by `model.args.ffn`. The model runs in float32, with no gradients.
    """
    captured: dict[tuple[int, str], torch.Tensor] = {}
    handles = []

    def catch(layer: int, name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            captured[layer, name] = output.detach()[0].float().cpu()  # (T, hidden_dim), batch of one

        return hook

    for index, block in enumerate(model.layers):
        handles.append(block.feed_forward.w1.register_forward_hook(catch(index, "gate")))
        if hasattr(block.feed_forward, "w3"):
            handles.append(block.feed_forward.w3.register_forward_hook(catch(index, "value")))
    try:
        with torch.no_grad():
            model(tokens.view(1, -1).to(model.tok_embeddings.weight.device))
    finally:
        for handle in handles:
            handle.remove()

    activate = GATE_ACTIVATIONS[model.args.ffn]
    stats = []
    for index, block in enumerate(model.layers):
        gate = captured[index, "gate"]
        with torch.no_grad():
            activated = activate(block.feed_forward, gate).float().cpu()
        value = captured.get((index, "value"))
        hidden = activated * value if value is not None else None
        share = (activated.abs() < NEAR_ZERO).float().mean().item()
        stats.append(FeedForwardStats(index, gate, activated, hidden, share))
    return stats


DEFAULT_TEXT = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die, to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream: ay, there's the rub;
For in that sleep of death what dreams may come,
When we have shuffled off this mortal coil,
Must give us pause.
"""  # Hamlet III.1; the demo model is trained on Shakespeare, so this is text of the kind it knows


def _histogram_range(values: torch.Tensor) -> tuple[float, float]:
    """The central 99.8% of `values`: a few outliers (common in trained FFNs) would squeeze the rest into
    one bin. Quantiles of an evenly strided sample of at most a million values (torch.quantile has a size
    limit, and a million pins down the 0.1% tails well enough to choose an axis)."""
    flat = values.flatten().double()
    sample = flat[:: max(1, flat.numel() // 1_000_000)]
    low, high = torch.quantile(sample, torch.tensor([0.001, 0.999], dtype=torch.float64)).tolist()
    if high - low < 1e-6:
        low, high = low - 1.0, high + 1.0
    return low, high


def plot_ffn_stats(
    checkpoint: str | Path,
    out: str | Path,
    text: str | None = None,
    image_format: str = "png",
    tokenizer: str | Path | None = None,
    compare_init: bool = False,
    text_name: str | None = None,
) -> list[Path]:
    """ffn_stats.<format>: per-layer histograms of the gate pre-activations a = w1 x, of act(a) and of the
    hidden activation act(a) * w3 x on a text, with each layer's share of near-zero gates.

    `checkpoint` is anything `load_model` reads, a run folder included (its best/). The
    text (default: a passage of Hamlet) is tokenized with the checkpoint's tokenizer (or `tokenizer`),
    with BOS first, and cut to max_seq_len tokens (saying so on stderr). `compare_init` overlays the same
    statistics of a freshly initialised model of the same shape (grey), so the picture shows what training
    changed.
    """

    check_format(image_format)
    require_matplotlib()  # fail on a missing matplotlib before the slow part
    folder = resolve_checkpoint(checkpoint)
    note = describe_resolution(checkpoint)
    if note:
        print(note, file=sys.stderr)
    detect_format(folder)  # a missing or unknown folder is reported as such, before the tokenizer
    tokenizer_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(folder)
    if tokenizer_path is None:
        raise PlotError(
            f"{folder}: has no tokenizer.model; pass --tokenizer with the model's SentencePiece file"
        )
    text = DEFAULT_TEXT if text is None else text
    if not text.strip():
        raise PlotError("the text is empty: pass --text or --text-file with some text in it")
    model = load_model(folder, dtype=torch.float32)
    ids = Tokenizer(tokenizer_path).encode(text, bos=True)
    if len(ids) > model.args.max_seq_len:  # the model reads at most its context; say what was left out
        print(
            f"note: the text is {len(ids):,} tokens; cut to the model's max_seq_len, its first "
            f"{model.args.max_seq_len:,} tokens",
            file=sys.stderr,
        )
        ids = ids[: model.args.max_seq_len]
    tokens = torch.tensor(ids, dtype=torch.long)
    if int(tokens.max()) >= model.args.vocab_size:
        raise PlotError(
            f"{tokenizer_path} gives token ids up to {int(tokens.max())} but the model's vocabulary has "
            f"{model.args.vocab_size}; pass the tokenizer the model was trained with"
        )
    stats = feed_forward_statistics(model, tokens)
    baseline = None
    if compare_init:
        with torch.random.fork_rng():  # the caller's random state is left as it was
            torch.manual_seed(0)
            baseline = feed_forward_statistics(Transformer(model.args).eval(), tokens)
    images = make_output_folder(out)

    act = GATE_NAMES[model.args.ffn]
    source = text_name or ("a passage of Hamlet" if text == DEFAULT_TEXT else "the given text")
    with figure_style():
        figure = new_figure(4.8 * (3 if stats[0].hidden is not None else 2), 2.6 * len(stats) + 1.2)
        _draw_ffn_histograms(figure, model, stats, baseline)
        figure.suptitle(
            f"{folder}: feed-forward '{model.args.ffn}' on {len(ids)} tokens of {source}\n"
            f"near zero: |{act}(a)| < {NEAR_ZERO}, share of tokens x {stats[0].gate.shape[1]} hidden units",
            fontsize=11,
        )
        return [save_figure(figure, images, "ffn_stats", image_format)]


def _draw_ffn_histograms(
    figure: Figure, model: Transformer, stats: list[FeedForwardStats], baseline: list[FeedForwardStats] | None
) -> None:
    """One row per layer: histograms of a = w1 x, act(a) and (gated variants) act(a) * (w3 x).

    Counts are on a log scale, so the tails show beside the peak at 0. The orange band marks where the
    gate is near zero (|act(a)| < NEAR_ZERO): in the a column the inputs that give it, in the act(a)
    column the outputs themselves.
    """
    ffn = model.args.ffn
    act, activate = GATE_NAMES[ffn], GATE_ACTIVATIONS[ffn]
    gated = stats[0].hidden is not None
    columns = [
        ("gate", "a = w1 x"),
        ("activated", f"{act}(a)" if gated else f"{act}(a), the hidden activation"),
    ]
    if gated:
        columns.append(("hidden", f"{act}(a) * (w3 x), what w2 reads"))
    grid = figure.subplots(len(stats), len(columns), squeeze=False)
    for row, layer in enumerate(stats):
        for column, (field, title) in enumerate(columns):
            axes = grid[row, column]
            values = getattr(layer, field)
            low, high = _histogram_range(values)
            bins = torch.linspace(low, high, 81).numpy()
            axes.hist(values.flatten().numpy(), bins=bins, color="C0", alpha=0.85, label="trained")
            if baseline is not None:
                initial = getattr(baseline[row], field).flatten().numpy()
                axes.hist(initial, bins=bins, histtype="step", color="0.2", lw=1.2, label="at initialisation")
            if field != "hidden":
                x = torch.linspace(low, high, 801, dtype=torch.float64)
                gate_output = x if field == "activated" else activate(model.layers[row].feed_forward, x)
                near_zero = (gate_output.abs() < NEAR_ZERO).numpy()
                axes.fill_between(
                    x.numpy(), 0, 1, where=near_zero, transform=axes.get_xaxis_transform(), color="C1",
                    alpha=0.25, lw=0, label=f"|{act}(a)| < {NEAR_ZERO}",
                )  # fmt: skip
            if field == "activated":
                share = f"{100 * layer.near_zero_share:.1f}%"
                if baseline is not None:
                    share += f" (init {100 * baseline[row].near_zero_share:.1f}%)"
                title += f"; near zero: {share}"
            axes.set_title(f"layer {layer.layer}: {title}", fontsize=9.5)
            axes.set_yscale("log")
            axes.set_xlim(low, high)
            if row == len(stats) - 1:
                axes.set_xlabel("value (central 99.8% shown)")
            if column == 0:
                axes.set_ylabel("count (log scale)")
    figure.legend(*grid[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
