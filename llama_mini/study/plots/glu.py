"""The GLU family (GLU, Bilinear, ReGLU, GEGLU, SwiGLU) as functions of two inputs: gate a and value b.

    python -m llama_mini.plots glu --out DIR

Why the GLU pictures are two-dimensional. A gated unit takes two numbers from two projections of the same
input, the gate a = (w1 x)_j and the value b = (w3 x)_j, and returns f(a, b) = act(a) * b. "SwiGLU(x)" as
one curve is therefore one of two different slices of that surface:

    the diagonal a = b = x:      f(x, x) = x * silu(x) = x^2 * sigmoid(x)    (both projections equal)
    the value fixed at b = 1:    f(x, 1) = silu(x)                            (the gate activation alone)

The `glu` command draws the surface with both slices marked on it, and each slice beside it, captioned.
All curves come from the functions the model itself runs: the GLU surfaces from the FeedForward classes of
`llama_mini.model.ffn`, the activations from `F.silu`, `F.gelu`, `llama_mini.model.ffn.swish`, ..., and every
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llama_mini.model.ffn import FEED_FORWARDS, GATED_FEED_FORWARDS
from llama_mini.study.plots.style import (
    PlotError,
    add_caption,
    check_format,
    figure_style,
    make_output_folder,
    new_figure,
    save_figure,
)

if typing.TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["GLU_VARIANTS", "GluVariant", "glu_values", "gated_unit", "plot_glu"]


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
    unit = FEED_FORWARDS[ffn](2, 1).double()
    with torch.no_grad():
        unit.w1.weight.copy_(torch.tensor([[1.0, 0.0]]))  # a = x[0]
        unit.w3.weight.copy_(torch.tensor([[0.0, 1.0]]))  # b = x[1]
        unit.w2.weight.copy_(torch.tensor([[1.0], [0.0]]))  # output[0] = f(a, b), output[1] = 0
    return unit.eval()


def glu_values(unit: nn.Module, gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """f(a, b) for tensors a, b of the same shape."""
    with torch.no_grad():
        return unit(torch.stack([gate, value], dim=-1))[..., 0]


def _draw_glu_row(figure: Figure, axes: Sequence[Axes], variant: GluVariant) -> None:
    from matplotlib.colors import CenteredNorm

    unit = gated_unit(variant.ffn)
    line = torch.linspace(-GLU_RANGE, GLU_RANGE, 241, dtype=torch.float64)
    gate, value = torch.meshgrid(line, line, indexing="xy")  # gate varies along x, value along y
    surface = glu_values(unit, gate, value).numpy()

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
    # Beside the map, under its x label, so that no part of the surface is hidden.
    heat.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize=8.5)
    colour_bar = figure.colorbar(image, ax=heat, shrink=0.85)
    colour_bar.ax.set_title("f(a, b)", fontsize=9)

    diagonal_axes.plot(line, glu_values(unit, line, line), **DIAGONAL_STYLE)
    diagonal_axes.set_title(f"diagonal a = b = x:\nf(x, x) = {variant.diagonal}")
    diagonal_axes.set_ylabel("f(x, x)")
    gate_axes.plot(line, glu_values(unit, line, torch.ones_like(line)), **GATE_SLICE_STYLE)
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
    check_format(image_format)
    folder = make_output_folder(out)
    paths = []
    line = torch.linspace(-GLU_RANGE, GLU_RANGE, 241, dtype=torch.float64)
    with figure_style():
        figure = new_figure(12, 4.6)
        diagonal_axes, gate_axes = figure.subplots(1, 2)
        for index, variant in enumerate(GLU_VARIANTS):
            unit = gated_unit(variant.ffn)
            style = {"color": f"C{index}", "linewidth": 2.2 if variant.ffn == "swiglu" else 1.5}
            diagonal_axes.plot(
                line, glu_values(unit, line, line), **style, label=f"{variant.title}: {variant.diagonal}"
            )
            gate_axes.plot(
                line,
                glu_values(unit, line, torch.ones_like(line)),
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
        # Where no curve passes: on the diagonal, x^2 fills the upper left; at b = 1 the upper left is empty.
        diagonal_axes.legend(loc="upper center", frameon=True, framealpha=0.9, edgecolor="none")
        gate_axes.legend(loc="upper left")
        figure.suptitle(
            "The two slices of f(a, b) = act(a) b, for the five gated variants (Shazeer 2020)", fontsize=12
        )
        add_caption(
            figure,
            "One unit, two different curves: SwiGLU is x^2 sigmoid(x) on the diagonal and silu(x) at b = 1; "
            "GLU's diagonal, x sigmoid(x), is SiLU itself.",
        )
        paths.append(save_figure(figure, folder, "glu", image_format))

        widths = [1.25, 1, 1]  # the heat map (with its colour bar) a little wider than the slices
        for variant in GLU_VARIANTS:
            figure = new_figure(15, 4.6)
            _draw_glu_row(figure, figure.subplots(1, 3, gridspec_kw={"width_ratios": widths}), variant)
            add_caption(figure, GLU_CAPTION)
            paths.append(save_figure(figure, folder, f"glu_{variant.ffn}", image_format))
    return paths
