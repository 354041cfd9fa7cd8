"""The model's parts against their formulas and independent recomputations."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.presets import PRESETS, get_preset
from llama_mini.model.sizes import count_parameters
from llama_mini.model.transformer import (
    INIT_OUTPUT_GAIN,
    Attention,
    RMSNorm,
    Transformer,
    apply_rotary_emb,
    llama3_scaled_frequencies,
    precompute_rotations,
    repeat_kv,
)
from llama_mini.ops.loss import cross_entropy

# Llama 3.1's RoPE scaling as Meta's code and config.json give it, and a small one for head_dim 16: there
# the pairs' wavelengths are 6.3, 20, 63, ... (theta 1e4) or 6.3, 24, 94, ... (theta 5e4) positions, so an
# original context of 32 keeps the first (< 32/4), blends the second and divides the rest: every branch.
LLAMA31_SCALING = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
SMALL_SCALING = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
)


def tiny_args(**overrides) -> ModelArgs:
    return get_preset("tiny", **overrides)


def perturbed_model(args: ModelArgs, seed: int = 0, dtype=torch.float32) -> Transformer:
    """A model whose weights are all random, norms included (a fresh model's norms are all ones)."""
    torch.manual_seed(seed)
    model = Transformer(args).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model.eval()


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=100, n_heads=3), "dim (100) must be divisible by n_heads (3)"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads (4) must be divisible by n_kv_heads (3)"),
        (dict(ffn="swigloo"), "ffn must be one of relu, gelu, swish, glu, bilinear, reglu, geglu, swiglu"),
        (dict(n_layers=0), "n_layers must be a positive integer, got 0"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer, got -5"),
        (dict(dim=24, n_heads=8), "head_dim = dim / n_heads = 3 must be even"),
        (dict(dropout=1.0), "dropout must be in [0, 1)"),
    ],
)
def test_invalid_config_names_the_field(overrides, message):
    with pytest.raises(ConfigError, match="invalid model config") as excinfo:
        ModelArgs(**overrides)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    "rope_scaling, message",
    [
        (
            dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
            "rope_scaling is missing original_max_position_embeddings; it needs all of factor, ",
        ),
        ({**SMALL_SCALING, "factor": 0}, "rope_scaling['factor'] must be a positive number, got 0"),
        (
            {**SMALL_SCALING, "low_freq_factor": "1"},
            "rope_scaling['low_freq_factor'] must be a positive number, got '1'",
        ),
        (
            {**SMALL_SCALING, "high_freq_factor": 1.0},
            "rope_scaling's high_freq_factor (1.0) must be greater than its low_freq_factor (1.0)",
        ),
        (
            {**SMALL_SCALING, "rope_type": "llama3"},
            "rope_scaling has unknown key(s) rope_type; known: factor",
        ),
        (8.0, "rope_scaling must be a dict with factor, low_freq_factor, high_freq_factor, "),
    ],
)
def test_invalid_rope_scaling_names_the_field(rope_scaling, message):
    with pytest.raises(ConfigError, match="invalid model config") as excinfo:
        tiny_args(rope_scaling=rope_scaling)
    assert message in str(excinfo.value)


def test_config_round_trips_through_dict_and_rejects_unknown_fields():
    args = tiny_args(ffn="geglu", tie_embeddings=True)
    assert ModelArgs.from_dict(args.to_dict()) == args
    with pytest.raises(ConfigError, match="unknown setting.*'n_experts' in the model config"):
        ModelArgs.from_dict({**args.to_dict(), "n_experts": 8})


def test_config_with_rope_scaling_round_trips_through_json():
    args = tiny_args(rope_scaling=SMALL_SCALING)
    assert ModelArgs.from_dict(json.loads(json.dumps(args.to_dict()))) == args
    assert ModelArgs.from_dict({**args.to_dict(), "rope_scaling": None}).rope_scaling is None


def test_llama32_preset_has_its_published_rope_scaling_and_owns_its_copy():
    args = get_preset("llama3.2-1b")
    assert args.rope_scaling == {**LLAMA31_SCALING, "factor": 32.0}
    assert args.max_seq_len == 131072
    args.rope_scaling["factor"] = 1.0  # editing one ModelArgs must not edit the preset
    assert get_preset("llama3.2-1b").rope_scaling["factor"] == 32.0
    with torch.device("meta"):
        model = Transformer(get_preset("llama3.2-1b"))
    assert model.rope.rotations.is_meta and model.rope.rotations.shape == (
        131072,
        32,
        2,
    )  # no table allocated


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'llama9'.*stories15m"):
        get_preset("llama9")


# Published totals of real checkpoints, counted on the meta device (no weights allocated).
def test_every_preset_builds_with_the_shapes_its_settings_name():
    for name in PRESETS:
        args = get_preset(name)
        with torch.device("meta"):  # shapes only: llama3-405b is never allocated
            model = Transformer(args)
        assert len(model.layers) == args.n_layers, name
        assert model.tok_embeddings.weight.shape == model.output.weight.shape == (args.vocab_size, args.dim)
        attention = model.layers[-1].attention
        assert attention.wq.weight.shape == (args.n_heads * args.head_dim, args.dim), name
        assert (
            attention.wk.weight.shape
            == attention.wv.weight.shape
            == (args.n_kv_heads * args.head_dim, args.dim)
        )
        assert attention.wo.weight.shape == (args.dim, args.n_heads * args.head_dim), name


# ------------------------------------------------------------------------------------------ RMSNorm


def test_rmsnorm_equals_formula():
    norm = RMSNorm(32, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32))
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_rmsnorm_of_bf16_input_is_computed_in_float32():
    norm = RMSNorm(512).bfloat16()
    x = (torch.randn(4, 512) * 30).bfloat16()
    # Reference: normalise in float64, round once to bf16.
    x64 = x.double()
    expected = (x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    # float32 arithmetic rounded once to bf16 may land one bf16 step (2^-7 relative) from the float64
    # value rounded once, when the exact value lies near a rounding boundary; squaring in bf16 misses by more.
    torch.testing.assert_close(out, expected, rtol=2**-7, atol=0)


# ------------------------------------------------------------------------------------------ RoPE


def complex_rope_reference(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Meta's complex-number RoPE, in float64: pairs (2i, 2i+1) as complex numbers times e^(i m theta_i)."""
    _, seq_len, _, head_dim = x.shape
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)[None, :, None, :]  # (1, T, 1, D/2)
    as_complex = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(as_complex * rotation).flatten(-2)


def test_rope_equals_complex_number_reference():
    xq, xk = torch.randn(2, 50, 4, 16, dtype=torch.float64), torch.randn(2, 50, 2, 16, dtype=torch.float64)
    rotations = precompute_rotations(16, 50, theta=500.0)
    rq, rk = apply_rotary_emb(xq, xk, rotations)
    # our angles are float32 (as in training), the reference's float64: agreement to float32 precision
    torch.testing.assert_close(rq, complex_rope_reference(xq, 500.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rk, complex_rope_reference(xk, 500.0), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norms():
    xq, xk = torch.randn(1, 40, 4, 32), torch.randn(1, 40, 4, 32)
    rq, rk = apply_rotary_emb(xq, xk, precompute_rotations(32, 40))
    torch.testing.assert_close(rq.norm(dim=-1), xq.norm(dim=-1))
    torch.testing.assert_close(rk.norm(dim=-1), xk.norm(dim=-1))
    assert not torch.allclose(rq[:, 1:], xq[:, 1:])  # it did rotate (position 0 is the identity)


def test_rope_dot_product_depends_only_on_relative_offset():
    # The same q and k placed at positions (m, n) and (m + s, n + s) give the same q . k.
    head_dim, length = 32, 64
    rotations = precompute_rotations(head_dim, length)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    xq = q.expand(1, length, 1, head_dim)
    xk = k.expand(1, length, 1, head_dim)
    rq, rk = apply_rotary_emb(xq, xk, rotations)
    dots = rq[0, :, 0] @ rk[0, :, 0].T  # dots[m, n] = rotated q at m . rotated k at n
    for m, n in [(10, 3), (5, 5), (2, 20)]:
        for shift in (1, 7, 30):
            assert dots[m + shift, n + shift].item() == pytest.approx(dots[m, n].item(), abs=1e-4)
    assert abs(dots[10, 3].item() - dots[10, 4].item()) > 1e-3  # and it does depend on the offset


def test_rope_table_stays_float32_when_model_is_cast_to_bf16():
    model = Transformer(tiny_args())
    reference = model.rope.rotations.clone()
    model.to(torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.rope.rotations.dtype == torch.float32
    assert torch.equal(model.rope.rotations, reference)


def test_rope_table_is_rebuilt_after_meta_to_empty():
    with torch.device("meta"):
        model = Transformer(tiny_args())
    model.to_empty(device="cpu")
    expected = precompute_rotations(model.args.head_dim, model.args.max_seq_len, model.args.rope_theta)
    assert torch.equal(model.rope.rotations, expected)


def llama3_scaling_reference(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Meta's `apply_scaling`, one frequency at a time in float64, with the settings as arguments."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    scaled = []
    for freq in freqs.double().tolist():
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            scaled.append(freq)
        elif wavelength > original / low:
            scaled.append(freq / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            scaled.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(scaled, dtype=torch.float64)


@pytest.mark.parametrize("scaling", [LLAMA31_SCALING, {**LLAMA31_SCALING, "factor": 32.0}])
def test_llama3_scaling_equals_metas_piecewise_rule(scaling):
    freqs = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128)  # Llama 3 8B's heads
    scaled = llama3_scaled_frequencies(freqs, **scaling)
    torch.testing.assert_close(scaled.double(), llama3_scaling_reference(freqs, scaling), rtol=1e-6, atol=0)
    kept, divided = scaled == freqs, torch.isclose(scaled, freqs / scaling["factor"], rtol=1e-6, atol=0)
    blended = ~kept & ~divided
    assert kept.sum() > 0 and divided.sum() > 0 and blended.sum() > 0  # every branch is exercised
    assert ((scaled[blended] < freqs[blended]) & (scaled[blended] > freqs[blended] / scaling["factor"])).all()


def test_llama3_scaled_frequencies_equal_transformers_rope_init():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, **SMALL_SCALING},
    )
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert attention_factor == 1.0  # llama3 scaling leaves the attention logits' scale alone
    freqs = 1.0 / 50000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    ours = llama3_scaled_frequencies(freqs, **SMALL_SCALING)
    torch.testing.assert_close(ours, inv_freq, rtol=1e-7, atol=0)
    assert ours[0] == freqs[0]  # wavelength 6.3 < 32 / 4: kept
    assert freqs[1] / 8 < ours[1] < freqs[1]  # 24: blended
    torch.testing.assert_close(ours[2:], freqs[2:] / 8, rtol=1e-7, atol=0)  # 94 and longer > 32: divided
    angles = torch.outer(torch.arange(64, dtype=torch.float32), inv_freq)
    table = precompute_rotations(16, 64, 50000.0, SMALL_SCALING)
    torch.testing.assert_close(table, torch.stack([angles.cos(), angles.sin()], dim=-1), rtol=0, atol=1e-6)


def test_rope_scaling_changes_angles_at_every_position_but_not_the_fastest_pairs():
    # Llama 3.2 1B's heads (head_dim 64) and scaling: not only positions past 8192 are affected.
    scaling = {**LLAMA31_SCALING, "factor": 32.0}
    plain, scaled = precompute_rotations(64, 100, 500000.0), precompute_rotations(64, 100, 500000.0, scaling)
    assert torch.equal(plain[0], scaled[0])  # position 0 is not rotated either way
    assert ((plain - scaled).abs().amax(dim=(1, 2))[1:] > 0).all()  # every later position differs
    assert torch.equal(plain[:, :8], scaled[:, :8])  # wavelengths under 8192 / 4 positions are untouched


def test_model_rope_table_honours_rope_scaling_through_casts_and_meta_builds():
    args = tiny_args(rope_scaling=SMALL_SCALING)  # head_dim 16, theta 1e4, max_seq_len 64
    expected = precompute_rotations(16, 64, 10000.0, SMALL_SCALING)
    assert not torch.equal(expected, precompute_rotations(16, 64, 10000.0))
    model = Transformer(args)
    assert torch.equal(model.rope.rotations, expected)
    model.to(torch.bfloat16)
    assert torch.equal(model.rope.rotations, expected)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    assert torch.equal(model.rope.rotations, expected)


# ------------------------------------------------------------------------------------------ attention


def test_repeat_kv_is_interleaved_not_tiled():
    x = torch.arange(3).float().view(1, 3, 1, 1)  # kv heads 0, 1, 2
    assert repeat_kv(x, 2).flatten().tolist() == [0, 0, 1, 1, 2, 2]


def test_gqa_equals_multi_head_attention_with_kv_heads_repeated_by_hand():
    torch.manual_seed(0)
    gqa_args = ModelArgs(dim=64, n_heads=8, n_kv_heads=2, max_seq_len=32)
    mha_args = ModelArgs(dim=64, n_heads=8, n_kv_heads=8, max_seq_len=32)
    gqa, mha = Attention(gqa_args).double(), Attention(mha_args).double()
    head_dim, n_rep = 8, 4
    with torch.no_grad():
        for name in ("wq", "wo"):
            getattr(mha, name).weight.copy_(getattr(gqa, name).weight)
        for name in ("wk", "wv"):
            # kv head g's rows, copied to query heads g*n_rep .. g*n_rep + n_rep - 1
            per_head = getattr(gqa, name).weight.view(2, head_dim, 64)
            repeated = torch.cat([per_head[h // n_rep] for h in range(8)])
            getattr(mha, name).weight.copy_(repeated)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    rotations = precompute_rotations(head_dim, 10)
    torch.testing.assert_close(gqa(x, rotations), mha(x, rotations), rtol=1e-12, atol=1e-12)


def test_attention_equals_softmax_formula():
    torch.manual_seed(0)
    args = ModelArgs(dim=32, n_heads=4, n_kv_heads=2, max_seq_len=16)
    attn = Attention(args).double()
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    rotations = precompute_rotations(8, 6)
    q = (x @ attn.wq.weight.T).view(1, 6, 4, 8)
    k = (x @ attn.wk.weight.T).view(1, 6, 2, 8)
    v = (x @ attn.wv.weight.T).view(1, 6, 2, 8)
    q, k = apply_rotary_emb(q, k, rotations)
    heads = []
    for h in range(4):
        g = h // 2  # the kv head that query head h reads
        scores = q[0, :, h] @ k[0, :, g].T / math.sqrt(8)
        scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
        heads.append(torch.softmax(scores, dim=-1) @ v[0, :, g])
    expected = torch.cat(heads, dim=-1) @ attn.wo.weight.T
    torch.testing.assert_close(attn(x, rotations)[0], expected, rtol=1e-10, atol=1e-10)


def test_changing_a_later_token_never_changes_earlier_logits():
    model = perturbed_model(tiny_args())
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # MHA, GQA, multi-query
def test_kv_cache_decoding_equals_full_recomputation(n_kv_heads):
    model = perturbed_model(tiny_args(n_kv_heads=n_kv_heads))
    tokens = torch.randint(0, 256, (3, 24))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(max_batch_size=3)
        steps = [model(tokens[:, :8], start_pos=0)]  # prefill 8 positions
        steps.append(model(tokens[:, 8:13], start_pos=8))  # a chunk of 5 after the cache (needs the mask)
        for pos in range(13, 24):  # then one token at a time
            steps.append(model(tokens[:, pos : pos + 1], start_pos=pos))
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_sequence_longer_than_max_seq_len_is_a_clear_error():
    model = Transformer(tiny_args(max_seq_len=16))
    with pytest.raises(ConfigError, match="longer than max_seq_len \\(16\\)"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------------ model


def test_forward_returns_logits_for_every_position():
    model = Transformer(tiny_args())
    logits = model(torch.randint(0, 256, (3, 11)))
    assert logits.shape == (3, 11, 256)
    assert logits.dtype == torch.float32


def test_tied_embeddings_share_one_matrix_counted_once():
    tied = Transformer(tiny_args(tie_embeddings=True))
    untied = Transformer(tiny_args())
    assert tied.output.weight is tied.tok_embeddings.weight
    difference = count_parameters(untied)["total"] - count_parameters(tied)["total"]
    assert difference == 256 * 64
    assert count_parameters(tied)["total"] == sum(p.numel() for p in tied.parameters())


@pytest.mark.parametrize("ffn", ["swiglu", "relu", "swish"])
def test_every_parameter_receives_a_gradient(ffn):
    model = Transformer(tiny_args(ffn=ffn, swish_beta_trainable=True))
    tokens = torch.randint(0, 256, (2, 16))
    cross_entropy(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_a_few_optimizer_steps_drive_the_loss_down():
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 256, (4, 33))
    losses = []
    for _ in range(30):
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # starts near chance: logits of std INIT_OUTPUT_GAIN cost INIT_OUTPUT_GAIN^2 / 2 nats over uniform (test_init.py)
    assert losses[0] == pytest.approx(math.log(256) + INIT_OUTPUT_GAIN**2 / 2, abs=0.1)
    assert losses[-1] < 0.5 * losses[0]  # memorises the fixed batch


def test_dropout_is_active_only_in_training():
    """In eval mode a model with dropout 0.5 computes what the same weights without dropout compute; in
    training it does not (and two passes differ: a new mask each time)."""
    model = Transformer(tiny_args(dropout=0.5))
    plain = Transformer(tiny_args(dropout=0.0))
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, 256, (1, 8))
    expected = plain.eval()(tokens)
    # the same modules and shapes in the same order: bit-identical unless dropout changed something
    torch.testing.assert_close(model.eval()(tokens), expected, rtol=0, atol=0)
    model.train()
    first = model(tokens)
    assert not torch.allclose(first, expected, atol=1e-3)
    assert not torch.equal(first, model(tokens))


def test_float_model_under_cpu_bf16_autocast_keeps_loss_finite_and_close():
    model = perturbed_model(tiny_args())
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        reference = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
            loss = cross_entropy(logits, tokens[:, 1:])
    assert logits.dtype == torch.bfloat16
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=2e-2)


def test_whole_model_equals_recomputation_with_explicit_softmax_attention(monkeypatch):
    # An independent reference for the full forward pass: swap SDPA for softmax(q k^T / sqrt(D) + mask) v.
    model = perturbed_model(tiny_args()).double()
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = model(tokens)

    def explicit_attention(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if is_causal:
            scores = scores.masked_fill(torch.ones_like(scores).triu(1).bool(), float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", explicit_attention)
    with torch.no_grad():
        recomputed = model(tokens)
    torch.testing.assert_close(recomputed, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_static_shape_decoding_with_tensor_positions_equals_full_recomputation(n_kv_heads):
    # start_pos as a 0-d tensor: attention reads the whole cache under a mask, so every step has the
    # same shapes (for CUDA graphs). The logits must be those of the growing-slice path and of no cache.
    model = perturbed_model(tiny_args(n_kv_heads=n_kv_heads))
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(max_batch_size=2)
        steps = [model(tokens[:, :6], start_pos=torch.tensor(0))]  # a prefill through the static path
        steps.append(model(tokens[:, 6:9], start_pos=torch.tensor(6)))  # a chunk after cached positions
        for pos in range(9, 20):
            steps.append(model(tokens[:, pos : pos + 1], start_pos=torch.tensor(pos)))
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_hidden_states_then_the_output_layer_equal_forward():
    torch.manual_seed(0)
    model = Transformer(
        ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=16)
    )
    tokens = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        hidden = model.hidden_states(tokens)
        assert hidden.shape == (2, 9, 32)
        torch.testing.assert_close(model.output(hidden), model(tokens), rtol=0, atol=0)
