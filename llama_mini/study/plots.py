"""Pictures for studying the model: activations, the GLU family, training curves, and what the gates learned.

    python -m llama_mini.plots activations --out DIR     # every activation and its derivative (autograd)
    python -m llama_mini.plots glu --out DIR             # GLU, Bilinear, ReGLU, GEGLU, SwiGLU over (a, b)
    python -m llama_mini.plots training --runs RUN [RUN ...] --out DIR
    python -m llama_mini.plots ffn-stats --checkpoint DIR [--text TEXT | --text-file FILE] --out DIR

Each command writes PNG (or SVG with --format svg) into DIR and prints the paths it wrote. matplotlib is
optional for the package (the `plot` extra: pip install 'llama_mini[plot]'); only this module imports it,
and only when a plot is drawn. Figures are drawn on `matplotlib.figure.Figure` objects, never through
pyplot's global state, so no display or interactive backend is ever needed.

Why the GLU pictures are two-dimensional. A gated unit takes two numbers from two projections of the same
input, the gate a = (w1 x)_j and the value b = (w3 x)_j, and returns f(a, b) = act(a) * b. "SwiGLU(x)" as
one curve is therefore one of two different slices of that surface:

    the diagonal a = b = x:      f(x, x) = x * silu(x) = x^2 * sigmoid(x)    (both projections equal)
    the value fixed at b = 1:    f(x, 1) = silu(x)                            (the gate activation alone)

The `glu` command draws the surface with both slices marked on it, and each slice beside it, captioned.
All curves come from the functions the model itself runs: the GLU surfaces from the FeedForward classes of
`llama_mini.model.ffn`, the activations from `F.silu`, `F.gelu`, `llama_mini.model.ffn.swish`, ..., and every
derivative from `torch.autograd.grad`, never from a formula typed in by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
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
from llama_mini.console import ArgumentParser, run_command
from llama_mini.errors import LlamaMiniError
from llama_mini.model.ffn import FEED_FORWARDS, GATED_FEED_FORWARDS, swish
from llama_mini.model.transformer import Transformer
from llama_mini.tokenizer import Tokenizer

if typing.TYPE_CHECKING:  # only for type hints: matplotlib is imported when a plot is drawn
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ACTIVATIONS",
    "FORMATS",
    "GATE_ACTIVATIONS",
    "GLU_VARIANTS",
    "NEAR_ZERO",
    "ActivationPanel",
    "Curve",
    "FeedForwardStats",
    "GluVariant",
    "PlotError",
    "RunMetrics",
    "derivative",
    "feed_forward_statistics",
    "gated_unit",
    "main",
    "plot_activations",
    "plot_ffn_stats",
    "plot_glu",
    "plot_training",
    "read_metrics",
]

FORMATS = ("png", "svg")
PNG_DPI = 120  # a 10-inch-wide figure is 1200 pixels: sharp on screen, and still small files
NEAR_ZERO = 0.05  # a gate output |act(a)| below this passes at most 5% of its value on to w2


class PlotError(LlamaMiniError):
    """A plot cannot be drawn: matplotlib is missing, or a metrics log, text or output folder is unusable."""


# ---------------------------------------------------------------------------------------------------------
# matplotlib, imported on demand
# ---------------------------------------------------------------------------------------------------------


def _matplotlib():
    """The matplotlib module, or a PlotError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'llama_mini[plot]'") from None
    return matplotlib


@contextlib.contextmanager
def _style() -> Iterator[Any]:
    """Our look for every figure (light grid, no top/right frame, frameless legends), as an rc context.

    rcParams are read when a figure and its axes are created, so figures must be made inside the context.
    The SVG hash salt and the missing date make a re-rendered SVG byte-identical to the last one.
    """
    matplotlib = _matplotlib()
    settings = {
        "font.size": 10,
        "axes.titlesize": 10.5,
        "axes.labelsize": 10,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "legend.frameon": False,
        "legend.fontsize": 9,
        "svg.hashsalt": "llama_mini",
    }
    with matplotlib.rc_context(settings):
        yield matplotlib


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    # Figure() without pyplot: not registered with any GUI, freed when dropped; savefig uses Agg for PNG.
    return Figure(figsize=(width, height), layout="constrained")


def _output_folder(out: str | Path) -> Path:
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise PlotError(f"--out {folder} is a file; pass a folder to write the images into")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PlotError(
            f"cannot create --out folder {folder} ({error.strerror or error}); choose another"
        ) from None
    return folder


def _check_format(image_format: str) -> None:
    if image_format not in FORMATS:
        raise PlotError(f"unknown image format {image_format!r}; use one of {', '.join(FORMATS)}")


def _save(figure: Figure, folder: Path, stem: str, image_format: str) -> Path:
    path = folder / f"{stem}.{image_format}"
    # No date (SVG) or software version (PNG) in the file: the same figure gives the same bytes.
    metadata = {"Date": None} if image_format == "svg" else {"Software": None}
    try:
        figure.savefig(path, format=image_format, dpi=PNG_DPI, metadata=metadata)
    except OSError as error:
        raise PlotError(f"cannot write {path} ({error.strerror or error}); check the --out folder") from None
    return path


def _caption(figure: Figure, text: str) -> None:
    """A caption under the axes, in the figure's own layout so it never overlaps them."""
    figure.get_layout_engine().set(h_pad=0.06)
    figure.supxlabel(text, fontsize=9.5, color="0.25")


# ---------------------------------------------------------------------------------------------------------
# Activations and their derivatives
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One function on a panel. A `limit` is a reference drawn in grey (e.g. Swish's beta -> infinity),
    with its own line style so two limits on one panel stay apart."""

    label: str
    function: Callable[[torch.Tensor], torch.Tensor]
    limit: bool = False
    style: str = "-"


@dataclass(frozen=True)
class ActivationPanel:
    """One activation (or one family, like Swish over beta): its curves, a title and its formula."""

    name: str  # the file is activation_<name>.<format>
    title: str
    formula: str  # matplotlib mathtext
    curves: tuple[Curve, ...]
    note: str = ""  # a caption under the panel's own figure


LEAKY_SLOPE = 0.1  # PyTorch's default is 0.01, which is invisible at this scale

ACTIVATIONS: tuple[ActivationPanel, ...] = (
    ActivationPanel(
        "sigmoid", "sigmoid", r"$\sigma(x) = 1 / (1 + e^{-x})$", (Curve(r"$\sigma(x)$", torch.sigmoid),)
    ),
    ActivationPanel("tanh", "tanh", r"$\tanh(x) = 2\sigma(2x) - 1$", (Curve(r"$\tanh(x)$", torch.tanh),)),
    ActivationPanel("relu", "ReLU", r"$\mathrm{ReLU}(x) = \max(0, x)$", (Curve("ReLU", F.relu),)),
    ActivationPanel(
        "leaky_relu",
        f"Leaky ReLU (slope {LEAKY_SLOPE})",
        rf"$\mathrm{{LeakyReLU}}(x) = \max({LEAKY_SLOPE}\,x,\ x)$",
        (Curve(f"slope {LEAKY_SLOPE}", lambda x: F.leaky_relu(x, LEAKY_SLOPE)),),
        note=f"F.leaky_relu's default slope is 0.01; {LEAKY_SLOPE} is drawn so that the negative side shows",
    ),
    ActivationPanel(
        "gelu",
        "GELU, exact and tanh approximation",
        r"$\mathrm{GELU}(x) = x\,\Phi(x)$",
        (
            Curve("exact (erf)", F.gelu),
            Curve("tanh approximation", lambda x: F.gelu(x, approximate="tanh"), style="--"),
        ),
        note=r"$\Phi$: the standard normal CDF.  tanh approximation (GPT-2, F.gelu(x, approximate='tanh')): "
        r"$\frac{x}{2}\,(1 + \tanh(\sqrt{2/\pi}\,(x + 0.044715\,x^3)))$",
    ),
    ActivationPanel(
        "swish",
        r"Swish$_\beta$ (SiLU at $\beta$ = 1)",
        r"$\mathrm{swish}_\beta(x) = x\,\sigma(\beta x)$",
        (
            Curve(r"$\beta$ = 0.1", lambda x: swish(x, 0.1)),
            Curve(r"$\beta$ = 1: SiLU", F.silu),  # what SwiGLU's gate runs
            Curve(r"$\beta$ = 10", lambda x: swish(x, 10.0)),
            Curve(r"$\beta \to \infty$: ReLU", F.relu, limit=True, style="--"),
            Curve(r"$\beta \to 0$: $x/2$", lambda x: x / 2, limit=True, style=":"),
        ),
    ),
)

X_RANGE = 5.0  # curves are drawn on [-X_RANGE, X_RANGE]


def derivative(function: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f'(x) by autograd for an elementwise f: x (N,) -> (N,).

    Each output depends on its own input only, so the gradient of sum_i f(x_i) with respect to x_i is
    f'(x_i): one backward pass gives the whole derivative curve. (At a kink, such as ReLU's at 0, this is
    the value autograd uses in training, here 0.)
    """
    x = x.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(function(x).sum(), x)
    return gradient


def _draw_activation(
    value_axes: Axes, derivative_axes: Axes, panel: ActivationPanel, x: torch.Tensor
) -> None:
    colours = iter(["C0", "C1", "C2", "C3", "C4"])
    for curve in panel.curves:
        colour, width = ("0.5", 1.4) if curve.limit else (next(colours), 1.8)
        style = {"color": colour, "linestyle": curve.style, "linewidth": width, "label": curve.label}
        value_axes.plot(x, curve.function(x).detach(), **style)
        derivative_axes.plot(x, derivative(curve.function, x), **style)
    for axes, what in ((value_axes, "f(x)"), (derivative_axes, "f'(x), by autograd")):
        axes.axhline(0, color="0.3", lw=0.6)
        axes.axvline(0, color="0.3", lw=0.6)
        axes.set_xlim(-X_RANGE, X_RANGE)
        axes.set_xlabel("x")
        axes.set_ylabel(what)
    if len(panel.curves) > 1:
        value_axes.legend(loc="upper left")


def _largest_difference(panel: ActivationPanel, x: torch.Tensor) -> str:
    """For a panel comparing two versions of one function (GELU's): how far apart they get, in words."""
    curves = [curve for curve in panel.curves if not curve.limit]
    if len(curves) != 2:
        return ""
    gap = (curves[0].function(x) - curves[1].function(x)).abs()
    where = x[gap.argmax()].item()
    return f"\nthe two differ by at most {gap.max().item():.1e} (at x = {where:.2f}): the curves overlap"


def plot_activations(out: str | Path, image_format: str = "png") -> list[Path]:
    """activations.<format>, every activation with its derivative, and one activation_<name> per panel."""
    _check_format(image_format)
    folder = _output_folder(out)
    x = torch.linspace(-X_RANGE, X_RANGE, 1001, dtype=torch.float64)  # 1001 points: 0 is one of them
    paths = []
    with _style():
        # The atlas: panels in rows of three, each row of values followed by the row of their derivatives.
        columns = 3
        rows = math.ceil(len(ACTIVATIONS) / columns)
        figure = _figure(4.3 * columns, 2 * 2.75 * rows)
        grid = figure.subplots(2 * rows, columns)
        for index, panel in enumerate(ACTIVATIONS):
            row, column = 2 * (index // columns), index % columns
            value_axes, derivative_axes = grid[row, column], grid[row + 1, column]
            _draw_activation(value_axes, derivative_axes, panel, x)
            value_axes.set_title(panel.formula)
            derivative_axes.set_title(f"{panel.title}: derivative")
        figure.suptitle(
            "Activations (top of each pair) and their derivatives by autograd (below)", fontsize=12
        )
        paths.append(_save(figure, folder, "activations", image_format))

        for panel in ACTIVATIONS:
            figure = _figure(10, 3.7)
            value_axes, derivative_axes = figure.subplots(1, 2)
            _draw_activation(value_axes, derivative_axes, panel, x)
            value_axes.set_title(panel.formula)
            derivative_axes.set_title("derivative, by torch.autograd.grad")
            figure.suptitle(panel.title, fontsize=12)
            note = panel.note + _largest_difference(panel, x)
            if note:
                _caption(figure, note)
            paths.append(_save(figure, folder, f"activation_{panel.name}", image_format))
    return paths


# ---------------------------------------------------------------------------------------------------------
# The GLU family as functions of two inputs: gate a and value b
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GluVariant:
    """A gated variant f(a, b) = act(a) * b, with the formulas of its surface and of its two slices."""

    ffn: str  # its name in ffn.FEED_FORWARDS
    title: str
    formula: str  # f(a, b), mathtext
    diagonal: str  # f(x, x)
    gate: str  # f(x, 1) = act(x)


GLU_VARIANTS: tuple[GluVariant, ...] = (
    GluVariant("glu", "GLU", r"$\sigma(a)\,b$", r"$x\,\sigma(x)$ (which is SiLU)", r"$\sigma(x)$"),
    GluVariant("bilinear", "Bilinear", r"$a\,b$", r"$x^2$", r"$x$ (no activation)"),
    GluVariant("reglu", "ReGLU", r"$\max(0, a)\,b$", r"$x \max(0, x)$", r"$\max(0, x)$"),
    GluVariant("geglu", "GEGLU", r"$\mathrm{GELU}(a)\,b$", r"$x^2\,\Phi(x)$", r"$\mathrm{GELU}(x)$"),
    GluVariant("swiglu", "SwiGLU", r"$\mathrm{silu}(a)\,b$", r"$x^2\,\sigma(x)$", r"$\mathrm{silu}(x)$"),
)

GLU_RANGE = 4.0  # the (a, b) square drawn is [-GLU_RANGE, GLU_RANGE]^2
# Each slice has one look, on the heat map and in its own panel; green and purple stand out on red and blue.
DIAGONAL_STYLE = {"color": "#1a9641", "linestyle": "--", "linewidth": 2.0}
GATE_SLICE_STYLE = {"color": "#7b3294", "linestyle": ":", "linewidth": 2.4}


def gated_unit(ffn: str) -> nn.Module:
    """One hidden unit of the gated variant `ffn`, built from its own class in ffn.py: (..., 2) -> (..., 2).

    The input is the pair [a, b]: a FeedForward with dim 2 and hidden size 1 whose w1 reads a (the gate),
    w3 reads b (the value) and w2 copies the unit's output to output[..., 0]. So output[..., 0] is
    f(a, b) = act(a) * b exactly as the model computes it, with no second copy of the formula to drift.
    """
    if ffn not in GATED_FEED_FORWARDS:
        raise PlotError(f"{ffn!r} is not a gated variant; choose one of {', '.join(GATED_FEED_FORWARDS)}")
    unit = FEED_FORWARDS[ffn](2, 1, multiple_of=None).double()
    with torch.no_grad():
        unit.w1.weight.copy_(torch.tensor([[1.0, 0.0]]))  # a = x[0]
        unit.w3.weight.copy_(torch.tensor([[0.0, 1.0]]))  # b = x[1]
        unit.w2.weight.copy_(torch.tensor([[1.0], [0.0]]))  # output[0] = f(a, b), output[1] = 0
    return unit.eval()


def _glu_values(unit: nn.Module, gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """f(a, b) for tensors a, b of the same shape."""
    with torch.no_grad():
        return unit(torch.stack([gate, value], dim=-1))[..., 0]


def _draw_glu_row(figure: Figure, axes: Sequence[Axes], variant: GluVariant) -> None:
    from matplotlib.colors import CenteredNorm

    unit = gated_unit(variant.ffn)
    line = torch.linspace(-GLU_RANGE, GLU_RANGE, 241, dtype=torch.float64)
    gate, value = torch.meshgrid(line, line, indexing="xy")  # gate varies along x, value along y
    surface = _glu_values(unit, gate, value).numpy()

    heat, diagonal_axes, gate_axes = axes
    extent = (-GLU_RANGE, GLU_RANGE, -GLU_RANGE, GLU_RANGE)
    # Diverging colours centred at 0 (white): red where the unit adds to its output direction in w2, blue
    # where it subtracts. Every variant is odd in b (f(a, -b) = -f(a, b)), so the scale is symmetric.
    image = heat.imshow(
        surface, origin="lower", extent=extent, cmap="RdBu_r", norm=CenteredNorm(0), aspect="equal"
    )
    top = float(abs(surface).max())
    levels = [top * k / 5 for k in range(-4, 5) if k != 0]  # negative levels draw dashed
    heat.contour(gate.numpy(), value.numpy(), surface, levels=levels, colors="k", linewidths=0.5, alpha=0.7)
    heat.contour(gate.numpy(), value.numpy(), surface, levels=[0], colors="0.35", linewidths=1.0)
    heat.plot([-GLU_RANGE, GLU_RANGE], [-GLU_RANGE, GLU_RANGE], **DIAGONAL_STYLE, label="diagonal a = b")
    heat.axhline(1.0, **GATE_SLICE_STYLE, label="value b = 1")
    heat.grid(False)
    heat.set_xlabel("gate a = (w1 x)$_j$")
    heat.set_ylabel("value b = (w3 x)$_j$")
    heat.set_title(f"{variant.title}: f(a, b) = {variant.formula}")
    heat.legend(loc="lower right", fontsize=8, frameon=True, framealpha=0.9)
    colour_bar = figure.colorbar(image, ax=heat, shrink=0.85)
    colour_bar.ax.set_title("f(a, b)", fontsize=9)

    diagonal_axes.plot(line, _glu_values(unit, line, line), **DIAGONAL_STYLE)
    diagonal_axes.set_title(f"diagonal a = b = x:\nf(x, x) = {variant.diagonal}")
    diagonal_axes.set_ylabel("f(x, x)")
    gate_axes.plot(line, _glu_values(unit, line, torch.ones_like(line)), **GATE_SLICE_STYLE)
    gate_axes.set_title(f"value fixed at b = 1, the gate activation alone:\nf(x, 1) = {variant.gate}")
    gate_axes.set_ylabel("f(x, 1)")
    for slice_axes in (diagonal_axes, gate_axes):
        slice_axes.axhline(0, color="0.3", lw=0.6)
        slice_axes.axvline(0, color="0.3", lw=0.6)
        slice_axes.set_xlim(-GLU_RANGE, GLU_RANGE)
        slice_axes.set_xlabel("x")


GLU_CAPTION = (
    "A gated unit multiplies act(gate) by a value from a second projection: f(a, b) = act(a) b. "
    "A 1-D 'GLU(x)' curve is one of two slices of this surface:\n"
    "the diagonal a = b = x (green dashed: both projections equal) or the value fixed at b = 1 (purple "
    "dotted: the gate activation alone). They are different functions. Contours: solid > 0, dashed < 0."
)


def plot_glu(out: str | Path, image_format: str = "png") -> list[Path]:
    """glu.<format>, the two slices of every gated variant compared, and glu_<ffn>.<format> per variant:
    the surface f(a, b) as a heat map with both slices marked on it, and each slice beside it."""
    _check_format(image_format)
    folder = _output_folder(out)
    paths = []
    line = torch.linspace(-GLU_RANGE, GLU_RANGE, 241, dtype=torch.float64)
    with _style():
        figure = _figure(12, 4.6)
        diagonal_axes, gate_axes = figure.subplots(1, 2)
        for index, variant in enumerate(GLU_VARIANTS):
            unit = gated_unit(variant.ffn)
            style = {"color": f"C{index}", "linewidth": 2.2 if variant.ffn == "swiglu" else 1.5}
            diagonal_axes.plot(
                line, _glu_values(unit, line, line), **style, label=f"{variant.title}: {variant.diagonal}"
            )
            gate_axes.plot(
                line,
                _glu_values(unit, line, torch.ones_like(line)),
                **style,
                label=f"{variant.title}: {variant.gate}",
            )
        diagonal_axes.set(title="diagonal a = b = x: f(x, x)", xlabel="x", ylabel="f(x, x)", ylim=(-1.5, 8))
        gate_axes.set(
            title="value fixed at b = 1: f(x, 1) = act(x), the gate alone", xlabel="x", ylabel="f(x, 1)"
        )
        for axes in (diagonal_axes, gate_axes):
            axes.axhline(0, color="0.3", lw=0.6)
            axes.axvline(0, color="0.3", lw=0.6)
            axes.set_xlim(-GLU_RANGE, GLU_RANGE)
            axes.legend(loc="upper left")
        figure.suptitle(
            "The two slices of f(a, b) = act(a) b, for the five gated variants (Shazeer 2020)", fontsize=12
        )
        _caption(
            figure,
            "One unit, two different curves: SwiGLU is x^2 sigmoid(x) on the diagonal and silu(x) at b = 1; "
            "GLU's diagonal, x sigmoid(x), is SiLU itself.",
        )
        paths.append(_save(figure, folder, "glu", image_format))

        widths = [1.25, 1, 1]  # the heat map (with its colour bar) a little wider than the slices
        for variant in GLU_VARIANTS:
            figure = _figure(15, 4.6)
            _draw_glu_row(figure, figure.subplots(1, 3, gridspec_kw={"width_ratios": widths}), variant)
            _caption(figure, GLU_CAPTION)
            paths.append(_save(figure, folder, f"glu_{variant.ffn}", image_format))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Training curves from metrics.jsonl
# ---------------------------------------------------------------------------------------------------------

METRICS_FILE = "metrics.jsonl"  # what training.METRICS names; not imported, to keep this module light
_TRAIN_FIELDS = ("step", "tokens", "loss", "lr", "tokens_per_second")
_EVAL_FIELDS = ("step", "tokens", "val_loss")


@dataclass
class RunMetrics:
    """One run's metrics.jsonl: its "train" records and its "eval" records, each in the order logged."""

    label: str
    path: Path
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def read_metrics(run: str | Path, label: str | None = None) -> RunMetrics:
    """Read a run folder's metrics.jsonl (or that file itself); a PlotError names the file and line if the
    log is missing, empty or garbled. Records of other types are skipped."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise PlotError(f"{path}: no such file; pass a run folder written by train.py or its {METRICS_FILE}")
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PlotError(f"{path}: cannot be read ({type(error).__name__}); check the file") from None
    train, evaluations = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PlotError(
                f"{path}: line {number} is not JSON ({error.msg}); is this a metrics.jsonl?"
            ) from None
        if not isinstance(record, dict):
            raise PlotError(f"{path}: line {number} is not a JSON object; is this a metrics.jsonl?")
        kind = record.get("type")
        if kind not in ("train", "eval"):
            continue
        fields = _TRAIN_FIELDS if kind == "train" else _EVAL_FIELDS
        for field in fields:
            value = record.get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PlotError(
                    f"{path}: line {number} ({kind}) has no number {field!r}; "
                    "is this a metrics.jsonl written by train.py?"
                )
        (train if kind == "train" else evaluations).append(record)
    if not train and not evaluations:
        raise PlotError(
            f"{path}: holds no train or eval records; the run has not logged yet "
            "(it logs every --log-interval steps)"
        )
    return RunMetrics(label or path.resolve().parent.name, path, train, evaluations)


def _run_labels(runs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name, or the path as given where two runs share a folder name."""
    names = [(Path(run) if Path(run).is_dir() else Path(run).parent).resolve().name for run in runs]
    return [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs, strict=True)]


def plot_training(runs: Sequence[str | Path], out: str | Path, image_format: str = "png") -> list[Path]:
    """training.<format>: loss against steps and tokens, learning rate and throughput, runs overlaid.

    Train loss is solid, validation loss dashed, each run in its own colour; the legend gives each run's
    best validation loss.
    """
    _check_format(image_format)
    if not runs:
        raise PlotError("no runs given: pass --runs with one or more run folders or metrics.jsonl files")
    metrics = [read_metrics(run, label) for run, label in zip(runs, _run_labels(runs), strict=True)]
    folder = _output_folder(out)
    with _style():
        from matplotlib.ticker import EngFormatter

        figure = _figure(12, 8)
        (step_axes, token_axes), (lr_axes, speed_axes) = figure.subplots(2, 2)
        for index, run in enumerate(metrics):
            line = {"color": f"C{index % 10}", "linewidth": 1.5}
            best = min((record["val_loss"] for record in run.eval), default=None)
            train_label = run.label + (f" (best val {best:.3f})" if best is not None else "") + ": train"
            for axes, x in ((step_axes, "step"), (token_axes, "tokens")):
                axes.plot(_column(run.train, x), _column(run.train, "loss"), **line, label=train_label)
                if run.eval:
                    axes.plot(
                        _column(run.eval, x), _column(run.eval, "val_loss"), "--o", **line, markersize=4,
                        label=f"{run.label}: validation",
                    )  # fmt: skip
            steps = _column(run.train, "step")
            lr_axes.plot(steps, _column(run.train, "lr"), **line, label=run.label)
            speed_axes.plot(steps, _column(run.train, "tokens_per_second"), **line, label=run.label)

        loss_label = "cross-entropy (nats / token)"
        step_axes.set(title="loss by step (train solid, validation dashed)", xlabel="optimizer step")
        token_axes.set(title="loss by training tokens seen", xlabel="tokens")
        lr_axes.set(
            title="learning rate (warmup, then cosine)", xlabel="optimizer step", ylabel="learning rate"
        )
        speed_axes.set(title="throughput, per logging window", xlabel="optimizer step", ylabel="tokens / s")
        step_axes.set_ylabel(loss_label)
        token_axes.set_ylabel(loss_label)
        token_axes.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not 1200000 or 1.2e6
        speed_axes.yaxis.set_major_formatter(EngFormatter(sep=""))
        lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        speed_axes.set_ylim(bottom=0)
        step_axes.legend()
        if len(metrics) > 1:
            lr_axes.legend()
        figure.suptitle(f"Training: {', '.join(run.label for run in metrics)}", fontsize=12)
        return [_save(figure, folder, "training", image_format)]


def _column(records: list[dict[str, Any]], field: str) -> list[float]:
    return [record[field] for record in records]


# ---------------------------------------------------------------------------------------------------------
# What the gates learned: feed-forward activations of a checkpoint on a text
# ---------------------------------------------------------------------------------------------------------


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
    with BOS first, and cut to max_seq_len tokens. `compare_init` overlays the same statistics of a freshly
    initialised model of the same shape (grey), so the picture shows what training changed.
    """

    _check_format(image_format)
    _matplotlib()  # fail on a missing matplotlib before the slow part
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
    ids = Tokenizer(tokenizer_path).encode(text, bos=True)[: model.args.max_seq_len]
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
    output_folder = _output_folder(out)

    act = GATE_NAMES[model.args.ffn]
    source = text_name or ("a passage of Hamlet" if text == DEFAULT_TEXT else "the given text")
    with _style():
        figure = _figure(4.8 * (3 if stats[0].hidden is not None else 2), 2.6 * len(stats) + 1.2)
        _draw_ffn_histograms(figure, model, stats, baseline)
        figure.suptitle(
            f"{folder}: feed-forward '{model.args.ffn}' on {len(ids)} tokens of {source}\n"
            f"near zero: |{act}(a)| < {NEAR_ZERO}, share of tokens x {stats[0].gate.shape[1]} hidden units",
            fontsize=11,
        )
        return [_save(figure, output_folder, "ffn_stats", image_format)]


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


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _read_text_file(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlotError(f"--text-file {path}: no such file; check the path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PlotError(
            f"--text-file {path}: cannot be read as UTF-8 text ({type(error).__name__})"
        ) from None


def _run(args: argparse.Namespace) -> list[Path]:
    if args.command == "activations":
        return plot_activations(args.out, args.format)
    if args.command == "glu":
        return plot_glu(args.out, args.format)
    if args.command == "training":
        return plot_training(args.runs, args.out, args.format)
    text, text_name = args.text, None
    if args.text_file is not None:
        text, text_name = _read_text_file(args.text_file), Path(args.text_file).name
    return plot_ffn_stats(
        args.checkpoint, args.out, text, args.format, args.tokenizer, args.compare_init, text_name
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, metavar="DIR", help="folder to write the images into")
    common.add_argument("--format", choices=FORMATS, default="png", help="image format (default: png)")
    parser = ArgumentParser(
        prog=prog or "python -m llama_mini.plots",
        description="Plots for studying llama_mini: activations, the GLU family, training runs, FFN gates.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser
    )
    commands.add_parser(
        "activations",
        parents=[common],
        help="sigmoid, tanh, ReLU, Leaky ReLU, GELU, Swish and their derivatives",
    )
    commands.add_parser(
        "glu", parents=[common], help="GLU, Bilinear, ReGLU, GEGLU, SwiGLU as f(gate a, value b)"
    )
    training = commands.add_parser(
        "training", parents=[common], help="loss, lr and tokens/s of one or more runs"
    )
    training.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="RUN",
        help="run folders (or their metrics.jsonl) to overlay",
    )
    stats = commands.add_parser(
        "ffn-stats",
        parents=[common],
        help="histograms of each layer's gates on a text: what the gates learned",
    )
    stats.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="checkpoint folder (llama_mini, HF or Meta) or a run folder",
    )
    text = stats.add_mutually_exclusive_group()
    text.add_argument("--text", help="text to run the model on (default: a passage of Hamlet)")
    text.add_argument("--text-file", metavar="FILE", help="UTF-8 file with the text to run the model on")
    stats.add_argument(
        "--tokenizer", metavar="FILE", help="SentencePiece tokenizer.model (default: the checkpoint's)"
    )
    stats.add_argument(
        "--compare-init",
        action="store_true",
        help="overlay a freshly initialised model of the same shape (grey)",
    )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(build_parser(prog), lambda args: print(*_run(args), sep="\n"), argv)


if __name__ == "__main__":
    sys.exit(main())
