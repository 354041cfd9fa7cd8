"""Pictures for studying the model: activations, the GLU family, training curves, and what the gates learned.

    python -m llama_mini.plots activations --out DIR     # every activation and its derivative (autograd)
    python -m llama_mini.plots glu --out DIR             # GLU, Bilinear, ReGLU, GEGLU, SwiGLU over (a, b)
    python -m llama_mini.plots training RUN [RUN ...] [--out DIR]
    python -m llama_mini.plots ffn-stats --checkpoint DIR [--text TEXT | --text-file FILE] --out DIR
    python -m llama_mini.plots newton-schulz --checkpoint DIR --out DIR   # Muon's orthogonalized update

Each command writes PNG (or SVG with --format svg) into DIR and prints the paths it wrote. One module per
family of figures:

    activations.py   activations and their derivatives
    glu.py           the gated variants as surfaces f(gate a, value b), with their two 1-D slices
    training.py      loss, learning rate and throughput read from runs' metrics.jsonl
    ffn_stats.py     histograms of a checkpoint's feed-forward activations on a text
    newton_schulz.py singular values of a gradient before and after Muon's Newton-Schulz iteration
    style.py         what they share: matplotlib imported on demand, one look, saving
    command.py       the command line
"""

from llama_mini.study.plots.activations import (
    ACTIVATIONS,
    ActivationPanel,
    Curve,
    derivative,
    plot_activations,
)
from llama_mini.study.plots.command import build_parser, main
from llama_mini.study.plots.ffn_stats import (
    GATE_ACTIVATIONS,
    NEAR_ZERO,
    FeedForwardStats,
    feed_forward_statistics,
    plot_ffn_stats,
)
from llama_mini.study.plots.glu import GLU_VARIANTS, GluVariant, gated_unit, glu_values, plot_glu
from llama_mini.study.plots.newton_schulz import muon_update, newton_schulz_polynomial, plot_newton_schulz
from llama_mini.study.plots.style import FORMATS, PlotError
from llama_mini.study.plots.training import RunMetrics, plot_training, read_metrics, run_labels

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
    "build_parser",
    "derivative",
    "feed_forward_statistics",
    "gated_unit",
    "glu_values",
    "main",
    "muon_update",
    "newton_schulz_polynomial",
    "plot_activations",
    "plot_ffn_stats",
    "plot_glu",
    "plot_newton_schulz",
    "plot_training",
    "read_metrics",
    "run_labels",
]
