"""The feed-forward family: LLaMA's SwiGLU and its relatives from "GLU Variants Improve Transformer".

Every Transformer block ends in a position-wise feed-forward network (FFN). Shazeer (2020) compared the
classic two-matrix form, `act(x W1) W2`, with gated forms that multiply an activated *gate* projection by a
plain *value* projection before the output matrix, and found every gated variant better. LLaMA uses SwiGLU.

All forms here are bias-free, as in the paper and in LLaMA. Shapes: x is (..., dim), the hidden
activations are (..., hidden_dim), the output is (..., dim). Meta's names are kept so the code lines up
with the paper and with Meta's checkpoints:

    w1 = W   the gate projection   (dim -> hidden_dim)
    w3 = V   the value projection  (dim -> hidden_dim), gated forms only
    w2 = W2  the output projection (hidden_dim -> dim)

    non-gated:  FFN_act(x) = w2(act(w1 x))                relu, gelu, swish
    gated:      FFN_act(x) = w2(act(w1 x) * w3 x)         glu (sigmoid), bilinear (identity), reglu,
                                                          geglu, swiglu (swish with beta = 1, i.e. SiLU)

A gated FFN has three matrices instead of two, so to spend the same parameters and FLOPs its hidden size
is cut to 2/3 of the non-gated one (the paper: d_ff 3072 -> 2048). LLaMA's rule does exactly that and then
rounds up to a hardware-friendly multiple; see `llama_hidden_dim`.

`hidden_dim` always means one thing here: the width of the hidden activations, the rows of w1. The modules
take it as given and compute their formula; `build_feed_forward` chooses it from ModelArgs (its explicit
`hidden_dim`, else LLaMA's rule). Meta's FeedForward applies the rule inside its constructor instead,
taking 4 * dim as its `hidden_dim` argument: the same sizes, found in one place here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama_mini.model.args import FEED_FORWARD_NAMES, ModelArgs
from llama_mini.model.rounding import round_up


def llama_hidden_dim_steps(
    dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None, gated: bool = True
) -> list[tuple[str, int, str]]:
    """Meta's hidden-size rule, one (formula, value, why) per step; the last value is the hidden size.

    h = 4 * dim                                     the classic FFN's width
    h = int(2 * h / 3), if gated                    2/3: three matrices cost what two of 4*dim did
    h = int(ffn_dim_multiplier * h), if given       Llama 2/3 widen the FFN (e.g. 1.3 for Llama-3-8B)
    h = multiple_of * ceil(h / multiple_of)         round up so matmul shapes tile well on hardware

    Non-gated variants (two matrices) skip the 2/3, so both kinds spend the same parameters up to rounding.
    LLaMA-7B: dim 4096 -> 4 * 4096 = 16384 -> 10922 -> rounded up to a multiple of 256 -> 11008.
    `llama_mini inspect` prints these steps (model/sizes.py).
    """
    h = 4 * dim
    steps = [(f"4 * dim = 4 * {dim}", h, "")]
    if gated:
        steps.append((f"int(2 * {h} / 3)", h := int(2 * h / 3), "gated: 3 matrices instead of 2"))
    if ffn_dim_multiplier is not None:
        steps.append(
            (f"int({ffn_dim_multiplier} * {h})", h := int(ffn_dim_multiplier * h), "ffn_dim_multiplier")
        )
    steps.append((f"round {h} up to a multiple of {multiple_of}", round_up(h, multiple_of), ""))
    return steps


def llama_hidden_dim(
    dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None, gated: bool = True
) -> int:
    """The FFN hidden size by Meta's rule (`llama_hidden_dim_steps`) for a model of width `dim`."""
    return llama_hidden_dim_steps(dim, multiple_of, ffn_dim_multiplier, gated)[-1][1]


def swish(x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Swish_beta(x) = x * sigmoid(beta * x) (Ramachandran et al. 2017).

    beta = 1 is SiLU (`F.silu`); beta -> 0 gives x / 2; beta -> infinity approaches ReLU.
    """
    return x * torch.sigmoid(beta * x)


# ---------------------------------------------------------------------------------------------------------
# Gated forms: three matrices, hidden size by LLaMA's 2/3 rule.
# ---------------------------------------------------------------------------------------------------------


class FeedForward(nn.Module):
    """LLaMA's feed-forward, SwiGLU: FFN_SwiGLU(x) = w2(silu(w1 x) * w3 x).   (..., dim) -> (..., dim)

    `hidden_dim` is the width of the hidden activations (LLaMA's rule gives it: `llama_hidden_dim`).

    The other gated variants subclass this one and change only the activation of the gate in `forward`.
    (Training may swap in `llama_mini.ops.fast_paths.FusedSwiGLU`, which computes silu(gate) * value in
    one fused kernel; a test proves it equal to this formula.)
    """

    gated = True

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate projection W
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # output projection W2
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # value projection V

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


SwiGLU = FeedForward  # the paper's name for LLaMA's FeedForward: one class, two names


class GLU(FeedForward):
    """FFN_GLU(x) = w2(sigmoid(w1 x) * w3 x): Dauphin et al.'s gated linear unit, bias-free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.sigmoid(self.w1(x)) * self.w3(x))


class Bilinear(FeedForward):
    """FFN_Bilinear(x) = w2(w1 x * w3 x): the gate with no activation at all."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.w1(x) * self.w3(x))


class ReGLU(FeedForward):
    """FFN_ReGLU(x) = w2(max(0, w1 x) * w3 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)) * self.w3(x))


class GEGLU(FeedForward):
    """FFN_GEGLU(x) = w2(GELU(w1 x) * w3 x), with the exact (erf) GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)) * self.w3(x))


# ---------------------------------------------------------------------------------------------------------
# Non-gated baselines: two matrices, hidden size by the rule without its 2/3.
# ---------------------------------------------------------------------------------------------------------


class NonGatedFeedForward(nn.Module):
    """The classic Transformer FFN, w2(act(w1 x)); subclasses choose the activation in `forward`.

    `hidden_dim` is the width of the hidden activations: by LLaMA's rule without the 2/3 cut (4 * dim,
    times ffn_dim_multiplier, rounded up), so the two matrices here hold as many parameters as the three of
    a gated FFN at the same dim, up to rounding.
    """

    gated = False

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # W1
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # W2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("use a subclass: FFNReLU, FFNGELU or FFNSwish")


class FFNReLU(NonGatedFeedForward):
    """FFN_ReLU(x) = w2(max(0, w1 x)): the original Transformer's FFN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.relu(self.w1(x)))


class FFNGELU(NonGatedFeedForward):
    """FFN_GELU(x) = w2(GELU(w1 x)), with the exact (erf) GELU, as in BERT and GPT-2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class FFNSwish(NonGatedFeedForward):
    """FFN_Swish(x) = w2(Swish_beta(w1 x)), Swish_beta(z) = z * sigmoid(beta * z).

    `beta` is a constant (a buffer, saved with the weights) or, with `trainable_beta=True`, one learned
    scalar per layer (Ramachandran et al. found learned beta works as well as a tuned constant).
    """

    def __init__(self, dim: int, hidden_dim: int, beta: float = 1.0, trainable_beta: bool = False):
        super().__init__(dim, hidden_dim)
        beta_tensor = torch.tensor(float(beta))
        if trainable_beta:
            self.beta = nn.Parameter(beta_tensor)
        else:
            self.register_buffer("beta", beta_tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swish(self.w1(x), self.beta))


# ModelArgs.ffn's names (FEED_FORWARD_NAMES, in the order of Shazeer's Table 1) -> the class of each.
FEED_FORWARDS: dict[str, type[nn.Module]] = dict(
    zip(
        FEED_FORWARD_NAMES,
        (FFNReLU, FFNGELU, FFNSwish, GLU, Bilinear, ReGLU, GEGLU, FeedForward),
        strict=True,
    )
)
GATED_FEED_FORWARDS = tuple(name for name, cls in FEED_FORWARDS.items() if cls.gated)


def ffn_hidden_dim(args: ModelArgs) -> int:
    """The hidden width of the feed-forward `args` describe: `args.hidden_dim` when given (a Hugging Face
    config's intermediate_size, which the rule cannot always reproduce), else LLaMA's rule."""
    if args.hidden_dim is not None:
        return args.hidden_dim
    gated = FEED_FORWARDS[args.ffn].gated
    return llama_hidden_dim(args.dim, args.multiple_of, args.ffn_dim_multiplier, gated)


def build_feed_forward(args: ModelArgs) -> nn.Module:
    """The feed-forward module that `args.ffn` names, `ffn_hidden_dim(args)` wide."""
    cls, hidden_dim = FEED_FORWARDS[args.ffn], ffn_hidden_dim(args)
    if cls is FFNSwish:
        return FFNSwish(args.dim, hidden_dim, beta=args.swish_beta, trainable_beta=args.swish_beta_trainable)
    return cls(args.dim, hidden_dim)
