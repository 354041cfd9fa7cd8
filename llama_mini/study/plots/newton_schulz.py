"""What Muon does to an update: the singular values of a SwiGLU matrix's gradient before and after the
Newton-Schulz orthogonalization, and the polynomial that does it.

    python -m llama_mini.plots newton-schulz --checkpoint DIR [--text TEXT] --out DIR

A gradient of a weight matrix, G = U S V^T, has a few large singular values and many small ones: a step
along it moves the weights mostly in a few directions. Muon (Jordan et al. 2024) replaces G by roughly
U V^T, the nearest semi-orthogonal matrix, so that every direction the gradient names moves about as far.
Computing U V^T exactly takes an SVD; Muon instead applies an odd polynomial to X = G / ||G||_F five times,

    X <- a X + b (X X^T) X + c (X X^T)^2 X,    (a, b, c) = (3.4445, -4.7750, 2.0315)

Since X X^T = U S^2 U^T, the polynomial acts on each singular value alone: p(s) = a s + b s^3 + c s^5, with
U and V unchanged. Its slope at 0 is a = 3.4, so five steps multiply a small singular value by 3.4^5 = 480:
every s from 0.003 to 1 ends within [0.68, 1.20] (not exactly 1: the coefficients trade exactness for a
steep start, which Jordan et al. found costs nothing in training). The figure shows both: the spectra of
one block's w1, w3 and w2 gradients (from the checkpoint on a text) and of torch.optim.Muon's update of
them, and p iterated one to five times.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch import nn

from llama_mini.checkpoint import describe_resolution, find_tokenizer, load_model, resolve_checkpoint
from llama_mini.ops.loss import cross_entropy
from llama_mini.study.plots.ffn_stats import DEFAULT_TEXT
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

__all__ = ["NS_COEFFICIENTS", "muon_update", "newton_schulz_polynomial", "plot_newton_schulz"]

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults, from Jordan et al.
MATRICES = ("w1", "w3", "w2")


def newton_schulz_polynomial(s: torch.Tensor, steps: int) -> torch.Tensor:
    """p applied `steps` times to singular values s (of X = G / ||G||_F): what the iteration does to each."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def muon_update(gradient: torch.Tensor) -> torch.Tensor:
    """torch.optim.Muon's orthogonalized update of `gradient` alone (no momentum, no shape scaling): one
    step at learning rate 1 from zero momentum, read off the weights it moved."""
    weight = nn.Parameter(torch.zeros_like(gradient))
    optimizer = torch.optim.Muon([weight], lr=1.0, weight_decay=0.0, momentum=0.0, nesterov=False)
    weight.grad = gradient.clone()
    optimizer.step()
    rows, columns = gradient.shape
    return -weight.detach() / math.sqrt(max(1, rows / columns))


def plot_newton_schulz(
    checkpoint: str | Path,
    out: str | Path,
    image_format: str = "png",
    text: str | None = None,
    tokenizer: str | Path | None = None,
) -> list[Path]:
    """newton_schulz.<format>: left, the singular values of the middle block's w1, w3, w2 gradients
    (divided by their largest) on a text and of Muon's update of each; right, the polynomial iterated."""
    check_format(image_format)
    require_matplotlib()
    if not hasattr(torch.optim, "Muon"):
        raise PlotError(f"this figure uses torch.optim.Muon, new in torch 2.9 (this is {torch.__version__})")
    folder = resolve_checkpoint(checkpoint)
    note = describe_resolution(checkpoint)
    if note:
        print(note, file=sys.stderr)
    tokenizer_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(folder)
    if tokenizer_path is None:
        raise PlotError(
            f"{folder}: has no tokenizer.model; pass --tokenizer with the model's SentencePiece file"
        )
    model = load_model(folder, dtype=torch.float32)
    if not hasattr(model.layers[0].feed_forward, "w3"):
        raise PlotError(f"{folder}: its feed-forward ({model.args.ffn}) is not gated; use a SwiGLU model")
    ids = Tokenizer(tokenizer_path).encode(DEFAULT_TEXT if text is None else text, bos=True)
    tokens = torch.tensor(ids[: model.args.max_seq_len + 1])
    if len(tokens) < 2:
        raise PlotError("the text is too short: pass --text with at least a few words")
    layer = len(model.layers) // 2
    model.train(False)
    cross_entropy(model(tokens[None, :-1]), tokens[None, 1:]).backward()
    feed_forward = model.layers[layer].feed_forward
    spectra = {}
    for name in MATRICES:
        gradient = getattr(feed_forward, name).weight.grad
        before = torch.linalg.svdvals(gradient)
        spectra[name] = (before / before[0], torch.linalg.svdvals(muon_update(gradient)))

    images = make_output_folder(out)
    with figure_style():
        figure = new_figure(12, 4.6)
        left, right = figure.subplots(1, 2)
        colors = {"w1": "tab:blue", "w3": "tab:green", "w2": "tab:red"}
        for name, (before, after) in spectra.items():
            shape = "x".join(map(str, getattr(feed_forward, name).weight.shape))
            index = torch.arange(1, len(before) + 1)
            left.plot(
                index, before, color=colors[name], linestyle="--", label=f"{name} ({shape}) gradient / max"
            )
            left.plot(index, after, color=colors[name], label=f"{name}: Muon's update")
        left.set_yscale("log")
        left.set_xlabel("singular value index (largest first)")
        left.set_ylabel("singular value")
        left.set_title(f"layer {layer}'s SwiGLU matrices, gradient on {len(tokens) - 1} tokens of text")
        left.legend(fontsize=8)
        s = torch.logspace(-4, 0, 400)
        for steps in range(1, 6):
            right.plot(s, newton_schulz_polynomial(s, steps), label=f"{steps} step{'s' * (steps > 1)}")
        right.axhspan(0.68, 1.2, color="0.85", zorder=0, label="[0.68, 1.20]")
        right.set_xscale("log")
        right.set_xlabel("singular value of G / ||G||_F")
        right.set_ylabel("after the iteration")
        right.set_title("p(s) = 3.4445 s - 4.7750 s^3 + 2.0315 s^5, iterated")
        right.legend(fontsize=8)
        figure.suptitle(f"{folder}: Newton-Schulz orthogonalization (torch.optim.Muon)", fontsize=11)
        return [save_figure(figure, images, "newton_schulz", image_format)]
