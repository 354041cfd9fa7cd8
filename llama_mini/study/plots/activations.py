"""Activations and their derivatives: sigmoid, tanh, ReLU, Leaky ReLU, GELU and the Swish family.

    python -m llama_mini.plots activations --out DIR

Every curve comes from the function the model itself runs (`F.silu`, `F.gelu`, `llama_mini.model.ffn.swish`,
...), and every derivative from `torch.autograd.grad`, never from a formula typed in by hand.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llama_mini.model.ffn import swish
from llama_mini.study.plots.style import (
    add_caption,
    check_format,
    figure_style,
    make_output_folder,
    new_figure,
    save_figure,
)

if typing.TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["ACTIVATIONS", "ActivationPanel", "Curve", "derivative", "plot_activations"]


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
    check_format(image_format)
    folder = make_output_folder(out)
    x = torch.linspace(-X_RANGE, X_RANGE, 1001, dtype=torch.float64)  # 1001 points: 0 is one of them
    paths = []
    with figure_style():
        # The atlas: panels in rows of three, each row of values followed by the row of their derivatives.
        columns = 3
        rows = math.ceil(len(ACTIVATIONS) / columns)
        figure = new_figure(4.3 * columns, 2 * 2.75 * rows)
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
        paths.append(save_figure(figure, folder, "activations", image_format))

        for panel in ACTIVATIONS:
            figure = new_figure(10, 3.7)
            value_axes, derivative_axes = figure.subplots(1, 2)
            _draw_activation(value_axes, derivative_axes, panel, x)
            value_axes.set_title(panel.formula)
            derivative_axes.set_title("derivative, by torch.autograd.grad")
            figure.suptitle(panel.title, fontsize=12)
            note = panel.note + _largest_difference(panel, x)
            if note:
                add_caption(figure, note)
            paths.append(save_figure(figure, folder, f"activation_{panel.name}", image_format))
    return paths
