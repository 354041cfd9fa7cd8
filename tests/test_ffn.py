"""Each feed-forward variant equals its formula from Shazeer (2020), written out here with explicit matmuls.

Notation as in the paper: x W means x @ W for W of shape (dim, hidden). nn.Linear stores its weight as
(out, in), so the paper's W is `module.w1.weight.T`.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from llama_mini.model.args import ModelArgs
from llama_mini.model.ffn import (
    FEED_FORWARDS,
    GATED_FEED_FORWARDS,
    FeedForward,
    SwiGLU,
    build_feed_forward,
    llama_hidden_dim,
)

SHAPES = [(3, 16), (2, 5, 16), (2, 3, 4, 16)]  # several batch dimensions, dim = 16


def make(name: str, dim: int = 16, hidden: int = 24, **kwargs):
    """A float64 module of the named variant with exactly `hidden` hidden units and random weights."""
    torch.manual_seed(0)
    return FEED_FORWARDS[name](dim, hidden, **kwargs).double()


def matrices(module):
    """The paper's W (gate), V (value) and W2 (output) as (in, out) matrices."""
    W = module.w1.weight.T
    W2 = module.w2.weight.T
    V = module.w3.weight.T if hasattr(module, "w3") else None
    return W, V, W2


def sigmoid_by_hand(z):
    return 1.0 / (1.0 + torch.exp(-z))


def gelu_by_hand(z):
    # exact GELU: z * Phi(z), Phi the standard normal CDF
    return z * 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


GATED_FORMULAS = {
    "glu": lambda xW, xV: sigmoid_by_hand(xW) * xV,
    "bilinear": lambda xW, xV: xW * xV,
    "reglu": lambda xW, xV: torch.clamp(xW, min=0) * xV,
    "geglu": lambda xW, xV: gelu_by_hand(xW) * xV,
    "swiglu": lambda xW, xV: xW * sigmoid_by_hand(xW) * xV,
}
NON_GATED_FORMULAS = {
    "relu": lambda xW: torch.clamp(xW, min=0),
    "gelu": gelu_by_hand,
    "swish": lambda xW: xW * sigmoid_by_hand(xW),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_equals_shazeer_formula(shape):
    ffn = make("swiglu")
    x = torch.randn(shape, dtype=torch.float64)
    W, V, W2 = matrices(ffn)
    by_silu = (F.silu(x @ W) * (x @ V)) @ W2
    by_hand = ((x @ W) * sigmoid_by_hand(x @ W) * (x @ V)) @ W2
    torch.testing.assert_close(ffn(x), by_silu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ffn(x), by_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(GATED_FORMULAS))
def test_gated_variant_equals_its_formula(name, shape):
    ffn = make(name)
    x = torch.randn(shape, dtype=torch.float64)
    W, V, W2 = matrices(ffn)
    expected = GATED_FORMULAS[name](x @ W, x @ V) @ W2
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(NON_GATED_FORMULAS))
def test_non_gated_variant_equals_its_formula(name, shape):
    ffn = make(name)
    x = torch.randn(shape, dtype=torch.float64)
    W, V, W2 = matrices(ffn)
    assert V is None  # two matrices only
    expected = NON_GATED_FORMULAS[name](x @ W) @ W2
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)


def test_glu_gate_equals_torch_glu_on_concatenated_projections():
    # F.glu(cat[a, b]) = a * sigmoid(b): with a = xV (value) and b = xW (gate) it is GLU's hidden layer.
    ffn = make("glu")
    x = torch.randn(4, 7, 16, dtype=torch.float64)
    W, V, W2 = matrices(ffn)
    hidden = F.glu(torch.cat([x @ V, x @ W], dim=-1), dim=-1)
    torch.testing.assert_close(ffn(x), hidden @ W2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 2.0, 10.0])
def test_swish_beta_equals_formula(beta):
    ffn = make("swish", beta=beta)
    x = torch.randn(5, 16, dtype=torch.float64)
    W, _, W2 = matrices(ffn)
    # beta is stored as a float32 tensor (like every weight), so 0.1 is 0.1000000015 even in a float64 module
    assert ffn.beta.item() == pytest.approx(beta, rel=1e-7)
    stored_beta = ffn.beta.item()
    expected = ((x @ W) * sigmoid_by_hand(stored_beta * (x @ W))) @ W2
    torch.testing.assert_close(ffn(x), expected, rtol=1e-12, atol=1e-12)


def test_swish_limits_half_identity_and_relu():
    # beta -> 0: x * sigmoid(0) = x / 2.  beta -> infinity: the sigmoid becomes a step, Swish -> ReLU.
    ffn_small = make("swish", beta=1e-9)
    ffn_large = make("swish", beta=1e4)
    x = torch.randn(5, 16, dtype=torch.float64)
    W, _, W2 = matrices(ffn_small)
    torch.testing.assert_close(ffn_small(x), ((x @ W) / 2) @ W2, rtol=1e-7, atol=1e-7)
    W, _, W2 = matrices(ffn_large)
    torch.testing.assert_close(ffn_large(x), torch.relu(x @ W) @ W2, rtol=1e-6, atol=1e-6)


def test_swish_beta_one_is_silu():
    ffn = make("swish", beta=1.0)
    x = torch.randn(5, 16, dtype=torch.float64)
    W, _, W2 = matrices(ffn)
    torch.testing.assert_close(ffn(x), F.silu(x @ W) @ W2, rtol=1e-12, atol=1e-12)


def test_trainable_swish_beta_is_a_parameter_that_learns():
    ffn = make("swish", beta=1.5, trainable_beta=True)
    assert "beta" in dict(ffn.named_parameters())
    ffn(torch.randn(5, 16, dtype=torch.float64)).square().sum().backward()
    assert ffn.beta.grad is not None and ffn.beta.grad.abs().item() > 0


def test_constant_swish_beta_is_a_saved_buffer_not_a_parameter():
    ffn = make("swish", beta=1.5)
    assert "beta" not in dict(ffn.named_parameters())
    assert ffn.state_dict()["beta"].item() == 1.5


def test_swiglu_is_the_feed_forward_not_a_copy():
    assert FEED_FORWARDS["swiglu"] is FeedForward
    assert SwiGLU is FeedForward
    assert set(GATED_FEED_FORWARDS) == {"glu", "bilinear", "reglu", "geglu", "swiglu"}


# Published shapes (../shared/REFERENCES.md): dim, multiple_of, ffn_dim_multiplier -> hidden size.
PUBLISHED_HIDDEN_SIZES = [
    ("LLaMA-7B", 4096, 256, None, 11008),
    ("LLaMA-13B", 5120, 256, None, 13824),
    ("LLaMA-33B", 6656, 256, None, 17920),
    ("LLaMA-65B", 8192, 256, None, 22016),
    ("Llama-2/3-70B", 8192, 4096, 1.3, 28672),
    ("Llama-3-8B", 4096, 1024, 1.3, 14336),
    ("Llama-3.1-405B", 16384, 4096, 1.2, 53248),
    ("Llama-3.2-1B", 2048, 256, 1.5, 8192),
    ("stories15M", 288, 32, None, 768),
]


@pytest.mark.parametrize("model,dim,multiple_of,multiplier,expected", PUBLISHED_HIDDEN_SIZES)
def test_hidden_size_rule_reproduces_published_llama_sizes(model, dim, multiple_of, multiplier, expected):
    assert llama_hidden_dim(dim, multiple_of, multiplier) == expected
    args = ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
    with torch.device("meta"):  # shapes only: a 405B-sized FFN is never allocated
        ffn = build_feed_forward(args)
    assert ffn.w1.weight.shape == (expected, dim)
    assert ffn.w3.weight.shape == (expected, dim)
    assert ffn.w2.weight.shape == (dim, expected)


def ffn_parameters(name: str, dim: int, multiple_of: int) -> int:
    args = ModelArgs(dim=dim, n_heads=1, multiple_of=multiple_of, ffn=name)
    with torch.device("meta"):
        return sum(p.numel() for p in build_feed_forward(args).parameters())


@pytest.mark.parametrize("gated", ["glu", "bilinear", "reglu", "geglu", "swiglu"])
@pytest.mark.parametrize("plain", ["relu", "gelu", "swish"])
def test_gated_and_non_gated_match_in_parameters(gated, plain):
    # dim 288, multiple_of 32 (stories15M): gated 3 * 288 * 768 = non-gated 2 * 288 * 1152 = 663,552 exactly.
    assert ffn_parameters(gated, 288, 32) == ffn_parameters(plain, 288, 32) == 663_552
    # dim 100, multiple_of 1: gated hidden int(800/3) = 266 -> 3 * 100 * 266 = 79,800; non-gated
    # 2 * 100 * 400 = 80,000. The 2/3 cut is floored, so the gated form is 200 parameters (0.25%) smaller.
    assert ffn_parameters(gated, 100, 1) == 79_800
    assert ffn_parameters(plain, 100, 1) == 80_000


def test_explicit_hidden_dim_is_used_as_is():
    for name in FEED_FORWARDS:
        ffn = build_feed_forward(ModelArgs(dim=64, n_heads=4, hidden_dim=100, ffn=name))
        assert ffn.w1.weight.shape == (100, 64)
        assert ffn.w2.weight.shape == (64, 100)


def test_ffn_dim_multiplier_widens_non_gated_too():
    ffn = build_feed_forward(ModelArgs(dim=64, n_heads=4, multiple_of=32, ffn_dim_multiplier=1.5, ffn="relu"))
    assert ffn.hidden_dim == 384  # int(1.5 * 256) = 384, already a multiple of 32
