"""What every study figure shares: matplotlib imported on demand, one look, atomic saving.

matplotlib is optional for the package (the `plot` extra: pip install 'llama_mini[plot]'); only the plots
import it, and only when a plot is drawn. Figures are drawn on `matplotlib.figure.Figure` objects, never
through pyplot's global state, so no display or interactive backend is ever needed.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llama_mini.errors import LlamaMiniError

if typing.TYPE_CHECKING:  # only for type hints: matplotlib is imported when a plot is drawn
    from matplotlib.figure import Figure

__all__ = [
    "FORMATS",
    "PNG_DPI",
    "PlotError",
    "add_caption",
    "check_format",
    "figure_style",
    "make_output_folder",
    "new_figure",
    "require_matplotlib",
    "save_figure",
]

FORMATS = ("png", "svg")
PNG_DPI = 120  # a 10-inch-wide figure is 1200 pixels: sharp on screen, and still small files


class PlotError(LlamaMiniError):
    """A plot cannot be drawn: matplotlib is missing, or a metrics log, text or output folder is unusable."""


def require_matplotlib():
    """The matplotlib module, or a PlotError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'llama_mini[plot]'") from None
    return matplotlib


@contextlib.contextmanager
def figure_style() -> Iterator[Any]:
    """Our look for every figure (light grid, no top/right frame, frameless legends), as an rc context.

    rcParams are read when a figure and its axes are created, so figures must be made inside the context.
    The SVG hash salt and the missing date make a re-rendered SVG byte-identical to the last one.
    """
    matplotlib = require_matplotlib()
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


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    # Figure() without pyplot: not registered with any GUI, freed when dropped; savefig uses Agg for PNG.
    return Figure(figsize=(width, height), layout="constrained")


def make_output_folder(out: str | Path) -> Path:
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


def check_format(image_format: str) -> None:
    if image_format not in FORMATS:
        raise PlotError(f"unknown image format {image_format!r}; use one of {', '.join(FORMATS)}")


def save_figure(figure: Figure, folder: Path, stem: str, image_format: str) -> Path:
    path = folder / f"{stem}.{image_format}"
    # No date (SVG) or software version (PNG) in the file: the same figure gives the same bytes.
    metadata = {"Date": None} if image_format == "svg" else {"Software": None}
    try:
        figure.savefig(path, format=image_format, dpi=PNG_DPI, metadata=metadata)
    except OSError as error:
        raise PlotError(f"cannot write {path} ({error.strerror or error}); check the --out folder") from None
    return path


def add_caption(figure: Figure, text: str) -> None:
    """A caption under the axes, in the figure's own layout so it never overlaps them."""
    figure.get_layout_engine().set(h_pad=0.06)
    figure.supxlabel(text, fontsize=9.5, color="0.25")
