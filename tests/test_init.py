"""The initialisation rules of Transformer.init_weights: the std of every matrix, what it gives at any
width, the first loss, GPT-2's rule, and that the sweep in bench/init_sweep.py measures the same rule.

Measured standard deviations are compared with the rule's within 5 standard errors of the estimate: the
sample std of n independent normal draws has a relative standard error of about 1 / sqrt(2 n).
"""

import math

import pytest
import torch

from bench.init_sweep import Arm, reinitialise
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import (
    INIT_ATTENTION_GAIN,
    INIT_EMBEDDING_STD,
    INIT_FFN_GAIN,
    INIT_OUTPUT_GAIN,
    INIT_RESIDUAL_GAIN,
    RMSNorm,
    Transformer,
    init_stds,
)
from llama_mini.ops.loss import cross_entropy


def args_for(**overrides) -> ModelArgs:
    """dim 128, 3 layers, 4 query heads sharing 2 key/value heads (so wk and wv are 64 x 128)."""
    values = dict(dim=128, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32)
    return ModelArgs(**{**values, **overrides})


def tolerance(tensor: torch.Tensor) -> float:
    """Relative tolerance of a sample std: 5 standard errors, 5 / sqrt(2 n)."""
    return 5 / math.sqrt(2 * tensor.numel())


def scaled_rule(model: Transformer) -> dict[str, float]:
    """The "scaled" rule written out name by name, independently of init_stds."""
    args = model.args
    depth = math.sqrt(2 * args.n_layers)
    rule = {
        "tok_embeddings.weight": INIT_EMBEDDING_STD,
        "output.weight": INIT_OUTPUT_GAIN / math.sqrt(args.dim),
    }
    for i, layer in enumerate(model.layers):
        hidden = layer.feed_forward.hidden_dim
        for name in ("wq", "wk", "wv"):
            rule[f"layers.{i}.attention.{name}.weight"] = INIT_ATTENTION_GAIN / math.sqrt(args.dim)
        rule[f"layers.{i}.attention.wo.weight"] = INIT_RESIDUAL_GAIN / math.sqrt(args.dim) / depth
        rule[f"layers.{i}.feed_forward.w1.weight"] = INIT_FFN_GAIN / math.sqrt(args.dim)
        rule[f"layers.{i}.feed_forward.w2.weight"] = INIT_RESIDUAL_GAIN / math.sqrt(hidden) / depth
        if layer.feed_forward.gated:
            rule[f"layers.{i}.feed_forward.w3.weight"] = INIT_FFN_GAIN / math.sqrt(args.dim)
    return rule


@pytest.mark.parametrize("ffn", ["swiglu", "relu"])
def test_scaled_init_gives_every_matrix_the_std_of_the_rule(ffn):
    torch.manual_seed(0)
    model = Transformer(args_for(ffn=ffn))
    rule = scaled_rule(model)
    matrices = {name: param for name, param in model.named_parameters() if param.dim() == 2}
    assert set(matrices) == set(rule)
    for name, param in matrices.items():
        assert param.std().item() == pytest.approx(rule[name], rel=tolerance(param)), name


def test_scaled_init_of_tied_embeddings_is_the_output_rule():
    torch.manual_seed(0)
    model = Transformer(args_for(tie_embeddings=True))
    weight = model.tok_embeddings.weight
    assert weight.std().item() == pytest.approx(INIT_OUTPUT_GAIN / math.sqrt(128), rel=tolerance(weight))


def test_gpt2_init_is_0_02_with_the_residual_outputs_smaller_by_sqrt_2_n_layers():
    torch.manual_seed(0)
    model = Transformer(args_for(weight_init="gpt2"))
    residual = 0.02 / math.sqrt(2 * 3)
    for name, param in model.named_parameters():
        if param.dim() == 2:
            expected = residual if name.endswith(("wo.weight", "w2.weight")) else 0.02
            assert param.std().item() == pytest.approx(expected, rel=tolerance(param)), name


@pytest.mark.parametrize("dim", [64, 512])
def test_scaled_init_gives_projection_outputs_the_std_of_their_gain_at_any_width(dim):
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=dim, n_layers=2, n_heads=4, vocab_size=64, multiple_of=32))
    layer = model.layers[0]
    x = layer.attention_norm(torch.randn(4096, dim))  # unit RMS, as every branch reads
    with torch.no_grad():
        assert layer.attention.wq(x).std().item() == pytest.approx(INIT_ATTENTION_GAIN, rel=0.05)
        assert layer.feed_forward.w1(x).std().item() == pytest.approx(INIT_FFN_GAIN, rel=0.05)


def test_first_loss_is_ln_vocab_size_plus_half_the_variance_of_the_logits():
    torch.manual_seed(0)
    model = Transformer(args_for(dim=96, n_heads=4, n_kv_heads=4, vocab_size=2048))
    tokens = torch.randint(0, 2048, (8, 65))
    with torch.no_grad():
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).item()
    # Logits start as N(0, INIT_OUTPUT_GAIN^2) (the final RMSNorm gives unit-RMS inputs), and for V normal
    # logits of variance s^2, E[log sum exp] = ln V + s^2 / 2 while the target's logit averages 0.
    assert loss == pytest.approx(math.log(2048) + INIT_OUTPUT_GAIN**2 / 2, abs=0.02)


def test_init_weights_sets_rmsnorm_weights_back_to_one():
    model = Transformer(args_for())
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.uniform_(0.5, 1.5)
    model.init_weights()
    norms = [m.weight for m in model.modules() if isinstance(m, RMSNorm)]
    assert len(norms) == 2 * 3 + 1 and all(torch.equal(w, torch.ones(128)) for w in norms)


def test_a_config_saved_before_the_init_setting_loads_with_the_scaled_rule():
    saved = args_for().to_dict()
    del saved["weight_init"]
    assert ModelArgs.from_dict(saved).weight_init == "scaled"


def test_init_stds_lists_each_matrix_once_for_tied_embeddings():
    model = Transformer(args_for(tie_embeddings=True))
    stds = init_stds(model)
    assert "output.weight" not in stds and "tok_embeddings.weight" in stds


def test_the_sweep_at_the_default_constants_draws_exactly_the_models_initial_weights():
    model = Transformer(args_for())
    torch.manual_seed(7)
    model.init_weights()
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    reinitialise(model, Arm("swiglu", seed=7))  # the model's constants; seeds the generator with 7
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize(
    "constant, parts",
    [
        ("attention_gain", ("attention.wq", "attention.wk", "attention.wv")),
        ("ffn_gain", ("feed_forward.w1", "feed_forward.w3")),
        ("residual_gain", ("attention.wo", "feed_forward.w2")),
    ],
)
def test_each_gain_of_the_scaled_rule_scales_only_its_own_matrices(constant, parts):
    model = Transformer(args_for())
    base = init_stds(model)
    tripled = init_stds(model, **{constant: 3 * getattr(Arm("swiglu", 0), constant)})
    changed = {name: tripled[name] / base[name] for name in base if tripled[name] != base[name]}
    assert set(changed) == {f"layers.{i}.{part}.weight" for i in range(3) for part in parts}
    assert all(ratio == pytest.approx(3.0) for ratio in changed.values())
