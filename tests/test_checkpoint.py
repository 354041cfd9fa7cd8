"""Checkpoints: Hugging Face parity in both directions, Meta's format, round trips and clear errors.

Every model here is tiny and float32, its parameters perturbed with seeded noise (norm weights around 1,
not all ones) so that a wrong permutation, a swapped matrix or a dropped norm changes the logits.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llama_mini.checkpoint import (
    HF_ACTIVATIONS,
    detect_format,
    find_tokenizer,
    load_model,
    model_args_from_hf_config,
    permute_for_hf,
    permute_from_hf,
    read_model_args,
    save_pretrained,
    to_hf_state_dict,
)
from llama_mini.errors import CheckpointError
from llama_mini.generation import SamplingConfig
from llama_mini.model.args import ModelArgs
from llama_mini.model.ffn import GATED_FEED_FORWARDS
from llama_mini.model.presets import get_preset
from llama_mini.model.transformer import Transformer, apply_rotary_emb, precompute_rotations

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 96

# Llama 3.1's RoPE scaling with a small original context: at head_dim 16 and rope_theta 50000 the pairs'
# wavelengths are 6.3, 24, 94, ... positions, so the first is kept (< 32/4), the second blended and the
# rest divided by 8. Meta's code has an original context of 8192 instead.
SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32)
META_SCALING = {**SCALING, "original_max_position_embeddings": 8192}


def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Seeded noise on every parameter: matrices N(0, 0.05) added, 1-D (norm) weights 1 + N(0, 0.2)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.add_(0.05 * noise)
    return model


def tokens(vocab_size: int, seed: int = 0, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def hf_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """transformers' random tiny Llama: rope_theta 50000, rms_norm_eps 1e-6, intermediate_size 100."""
    settings = dict(
        hidden_size=64,
        intermediate_size=100,  # no (multiple_of, multiplier) gives 100 from dim 64: must be read as is
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        rope_theta=50000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(**{**settings, **overrides})
    config._attn_implementation = "eager"
    return perturb_(LlamaForCausalLM(config), seed).eval()


def our_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    args = get_preset("tiny", **{"vocab_size": VOCAB, "rope_theta": 50000.0, "norm_eps": 1e-6, **overrides})
    return perturb_(Transformer(args), seed).eval()


def load_hf(folder) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def stored_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def meta_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our state dict is Meta's consolidated.00.pth: same names, same RoPE layout, output stored."""
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state["rope.freqs"] = torch.randn(model.args.head_dim // 2)  # LLaMA 1/2 files carry it; never loaded
    return state


def write_meta(folder, state_dicts: list[dict], params: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for index, state in enumerate(state_dicts):
        torch.save(state, folder / f"consolidated.{index:02d}.pth")


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------------
# RoPE layout permutation
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_heads", [1, 3])
def test_permute_from_hf_inverts_permute_for_hf(n_heads):
    weight = torch.randn(n_heads * 8, 5)
    assert torch.equal(permute_from_hf(permute_for_hf(weight, n_heads), n_heads), weight)
    assert torch.equal(permute_for_hf(permute_from_hf(weight, n_heads), n_heads), weight)
    assert not torch.equal(permute_for_hf(weight, n_heads), weight)


def test_permute_for_hf_sends_pair_components_to_head_halves():
    # Two heads of D = 4: our rows (a0, b0, a1, b1) per head become Hugging Face's (a0, a1, b0, b1).
    rows = torch.arange(8.0).unsqueeze(1)
    assert permute_for_hf(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_permuted_wq_under_rotate_half_equals_our_adjacent_pair_rope():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n_heads, head_dim, dim, seq_len, theta = 3, 8, 12, 7, 500.0
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(seq_len, dim, generator=generator)
    wq = torch.randn(n_heads * head_dim, dim, generator=generator)
    rotations = precompute_rotations(head_dim, seq_len, theta)

    q = (x @ wq.T).view(1, seq_len, n_heads, head_dim)
    ours, _ = apply_rotary_emb(q, q, rotations)  # (1, T, H, D), Meta's pairs

    # Hugging Face: q from the permuted rows, rotated by rotate_half with cos/sin repeated over both halves.
    q_hf = (x @ permute_for_hf(wq, n_heads).T).view(1, seq_len, n_heads, head_dim).transpose(1, 2)
    cos = torch.cat([rotations[..., 0]] * 2, dim=-1).unsqueeze(0)  # (1, T, D)
    sin = torch.cat([rotations[..., 1]] * 2, dim=-1).unsqueeze(0)
    theirs, _ = apply_rotary_pos_emb(q_hf, q_hf, cos, sin)  # (1, H, T, D)

    # The same rotated features, in the permuted order: permute ours per head and compare.
    ours_in_hf_order = permute_for_hf(ours.reshape(seq_len, n_heads * head_dim).T, n_heads).T
    theirs = theirs.transpose(1, 2).reshape(seq_len, n_heads * head_dim)
    torch.testing.assert_close(ours_in_hf_order, theirs, rtol=0, atol=1e-5)


def test_hf_activations_cover_exactly_the_gated_variants():
    from transformers.activations import ACT2FN

    assert set(HF_ACTIVATIONS) == set(GATED_FEED_FORWARDS)
    assert all(name in ACT2FN for name in HF_ACTIVATIONS.values())


# ---------------------------------------------------------------------------------------------------------
# Hugging Face -> llama_mini
# ---------------------------------------------------------------------------------------------------------

HF_CASES = {
    "gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "multi-query": dict(num_key_value_heads=1, tie_word_embeddings=False),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_transformers_checkpoint_loads_with_equal_logits(case, tmp_path):
    reference = hf_model(**HF_CASES[case])
    reference.save_pretrained(tmp_path)

    model = load_model(tmp_path)
    args = model.args
    assert (args.n_kv_heads, args.hidden_dim, args.rope_theta, args.norm_eps) == (
        HF_CASES[case]["num_key_value_heads"],
        100,
        50000.0,
        1e-6,
    )
    assert args.tie_embeddings == HF_CASES[case]["tie_word_embeddings"]
    if args.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    batch = tokens(VOCAB)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), reference(batch).logits, rtol=0, atol=1e-5)


def test_sharded_transformers_checkpoint_loads_with_equal_logits(tmp_path):
    reference = hf_model(seed=1)
    reference.save_pretrained(tmp_path / "single")
    tensors = stored_tensors(tmp_path / "single" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_bytes((tmp_path / "single" / "config.json").read_bytes())
    for file, keys in shards.items():
        save_file({key: tensors[key] for key in keys}, str(folder / file), metadata={"format": "pt"})
    weight_map = {key: file for file, keys in shards.items() for key in keys}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )

    model = load_model(folder)
    batch = tokens(VOCAB, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), reference(batch).logits, rtol=0, atol=1e-5)


def test_hf_config_rope_theta_is_read_from_4x_and_5x_fields():
    base = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
    )
    assert model_args_from_hf_config({**base, "rope_theta": 123.0}).rope_theta == 123.0  # 4.x
    v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 456.0}}
    assert model_args_from_hf_config(v5).rope_theta == 456.0
    assert model_args_from_hf_config(base).rope_theta == 10000.0
    assert model_args_from_hf_config(base).n_kv_heads == 4  # num_key_value_heads absent: MHA


def with_plain_rope(model: Transformer) -> Transformer:
    """The same weights under plain RoPE: what a loader that ignored the scaling would compute."""
    plain = Transformer(dataclasses.replace(model.args, rope_scaling=None))
    plain.load_state_dict(model.state_dict())
    return plain.eval()


@pytest.mark.parametrize("version", ["5.x", "4.x"])
def test_llama3_scaled_transformers_checkpoint_loads_with_equal_logits(version, tmp_path):
    reference = hf_model(rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, **SCALING})
    reference.save_pretrained(tmp_path)  # 5.x: everything in rope_parameters
    if version == "4.x":  # as Llama 3.1's config.json: rope_theta on top, rope_scaling without it
        config = json.loads((tmp_path / "config.json").read_text())
        config.pop("rope_parameters")
        config.update(rope_theta=50000.0, rope_scaling={"rope_type": "llama3", **SCALING})
        (tmp_path / "config.json").write_text(json.dumps(config))

    model = load_model(tmp_path)
    assert (model.args.rope_theta, model.args.rope_scaling) == (50000.0, SCALING)
    batch = tokens(VOCAB)
    with torch.no_grad():
        expected = reference(batch).logits
        torch.testing.assert_close(model(batch), expected, rtol=0, atol=1e-5)
        assert (with_plain_rope(model)(batch) - expected).abs().max() > 1e-2  # the scaling matters here


def test_hf_config_llama3_scaling_is_read_from_4x_and_5x_fields():
    base = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    configs = [
        {**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **SCALING}},  # 4.x
        {**base, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **SCALING}},  # 4.x's older key
        {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **SCALING}},  # 5.x
    ]
    for config in configs:
        args = model_args_from_hf_config(config)
        assert (args.rope_theta, args.rope_scaling) == (5e5, SCALING)
    # Without original_max_position_embeddings transformers uses max_position_embeddings; so do we.
    short = {key: value for key, value in SCALING.items() if key != "original_max_position_embeddings"}
    args = model_args_from_hf_config({**base, "rope_scaling": {"rope_type": "llama3", **short}})
    assert args.rope_scaling == {**short, "original_max_position_embeddings": 64}
    assert model_args_from_hf_config({**base, "rope_scaling": None}).rope_scaling is None


def test_incomplete_or_invalid_llama3_scaling_is_a_clear_error():
    base = dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=100,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
    )
    no_factor = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    with pytest.raises(CheckpointError) as error:
        model_args_from_hf_config({**base, "rope_parameters": no_factor}, "m/config.json")
    assert one_line(error) == (
        "m/config.json: rope_parameters has rope_type 'llama3' but no factor; the config is incomplete"
    )
    inverted = {"rope_type": "llama3", **SCALING, "high_freq_factor": 0.5}
    with pytest.raises(CheckpointError) as error:
        model_args_from_hf_config({**base, "rope_scaling": inverted}, "m/config.json")
    assert one_line(error).startswith(
        "m/config.json: invalid model config: rope_scaling's high_freq_factor (0.5) must be greater than"
    )


@pytest.mark.parametrize(
    "rope_type, rope",
    [
        ("linear", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),  # transformers 4.x
        ("dynamic", {"rope_scaling": {"type": "dynamic", "factor": 2.0}}),  # 4.x's older key
        ("yarn", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e4, "factor": 4.0}}),  # 5.x
    ],
)
def test_other_rope_scalings_are_refused_not_ignored(rope_type, rope, tmp_path):
    hf_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    (tmp_path / "config.json").write_text(json.dumps({**config, **rope}))
    with pytest.raises(CheckpointError, match=f"RoPE scaling '{rope_type}' is not supported") as error:
        load_model(tmp_path)
    assert one_line(error).startswith(str(tmp_path / "config.json"))
    assert "use a model whose rope_type is 'default' or 'llama3'" in one_line(error)


# ---------------------------------------------------------------------------------------------------------
# llama_mini -> Hugging Face, and round trips
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ffn, tie, n_kv_heads",
    [
        ("swiglu", False, 2),
        ("swiglu", True, 1),
        ("geglu", False, 4),
        ("reglu", True, 2),
        ("glu", False, 1),
        ("bilinear", False, 2),
    ],
)
def test_our_checkpoint_loads_in_transformers_with_equal_logits(ffn, tie, n_kv_heads, tmp_path):
    model = our_model(ffn=ffn, tie_embeddings=tie, n_kv_heads=n_kv_heads)
    save_pretrained(model, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["hidden_act"], config["intermediate_size"]) == (HF_ACTIVATIONS[ffn], 192)
    reference = load_hf(tmp_path)
    assert reference.config.rope_parameters["rope_theta"] == 50000.0
    batch = tokens(VOCAB, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(reference(batch).logits, model(batch), rtol=0, atol=1e-5)


def test_llama3_scaled_checkpoint_loads_in_transformers_with_equal_logits(tmp_path):
    model = our_model(rope_scaling=SCALING)
    save_pretrained(model, tmp_path)

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", **SCALING}  # transformers 4.x
    assert config["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 50000.0, **SCALING}  # 5.x
    reference = load_hf(tmp_path)
    assert reference.config.rope_parameters["rope_type"] == "llama3"
    batch = tokens(VOCAB, seed=8)
    with torch.no_grad():
        expected = reference(batch).logits
        torch.testing.assert_close(model(batch), expected, rtol=0, atol=1e-5)
        assert (with_plain_rope(model)(batch) - expected).abs().max() > 1e-2  # the scaling matters here


def test_llama3_scaled_round_trip_is_bit_exact_and_the_hf_fields_agree(tmp_path):
    model = our_model(rope_scaling=SCALING)
    save_pretrained(model, tmp_path)
    loaded = load_model(tmp_path)

    assert loaded.args == model.args
    assert torch.equal(loaded.rope.rotations, model.rope.rotations)  # the loader's table is the scaled one
    batch = tokens(VOCAB, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["llama_mini"]  # what a reader of the Hugging Face fields alone sees
    hf_args = model_args_from_hf_config(config)
    assert (hf_args.rope_theta, hf_args.rope_scaling) == (50000.0, SCALING)


def test_config_carries_rope_theta_for_transformers_4_and_5(tmp_path):
    save_pretrained(our_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_theta"] == 50000.0
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert config["llama_mini"]["format_version"] == 1
    assert config["llama_mini"]["hf_compatible"] is True
    assert config["llama_mini"]["model_args"] == our_model().args.to_dict()


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_is_bit_exact(tie, tmp_path):
    model = our_model(tie_embeddings=tie, hidden_dim=72)
    save_pretrained(model, tmp_path)
    loaded = load_model(tmp_path)

    assert loaded.args == model.args
    assert detect_format(tmp_path) == "llama_mini" and read_model_args(tmp_path) == model.args
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[name], reloaded[name]) for name in original)
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in loaded.parameters())
    if tie:
        assert loaded.output.weight is loaded.tok_embeddings.weight
    batch = tokens(VOCAB, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


def test_tied_embeddings_are_stored_once(tmp_path):
    save_pretrained(our_model(tie_embeddings=True), tmp_path)
    names = stored_tensors(tmp_path / "model.safetensors").keys()
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True


def test_bf16_save_writes_bf16_tensors_and_loads_them(tmp_path):
    model = our_model()
    save_pretrained(model, tmp_path, dtype=torch.bfloat16)

    assert {t.dtype for t in stored_tensors(tmp_path / "model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = load_model(tmp_path)  # dtype=None keeps what is stored
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    assert loaded.rope.rotations.dtype == torch.float32  # the RoPE table stays float32
    assert torch.equal(loaded.layers[0].attention.wq.weight, model.layers[0].attention.wq.weight.bfloat16())


def test_load_casts_to_the_requested_dtype(tmp_path):
    save_pretrained(our_model(), tmp_path)
    loaded = load_model(tmp_path, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.rope.rotations.dtype == torch.float32


def test_wrapper_prefixes_never_reach_the_file(tmp_path):
    class DataParallelLike(nn.Module):  # DDP stores the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    class CompiledLike(nn.Module):  # torch.compile's OptimizedModule stores it as ._orig_mod
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *args, **kwargs):
            return self._orig_mod(*args, **kwargs)

    model = our_model()
    save_pretrained(model, tmp_path / "plain")
    expected = stored_tensors(tmp_path / "plain" / "model.safetensors")

    model.layers[0] = CompiledLike(model.layers[0])  # a block compiled on its own: "layers.0._orig_mod."
    assert any("_orig_mod" in name for name in model.state_dict())
    save_pretrained(DataParallelLike(CompiledLike(model)), tmp_path / "wrapped")
    written = stored_tensors(tmp_path / "wrapped" / "model.safetensors")
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[name], expected[name]) for name in expected)

    prefixed = {f"module._orig_mod.{name}": tensor for name, tensor in our_model().state_dict().items()}
    assert to_hf_state_dict(prefixed, our_model().args).keys() == expected.keys()


def test_save_leaves_other_files_alone_and_overwrites_its_own(tmp_path):
    (tmp_path / "training_state.pt").write_bytes(b"optimizer")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    save_pretrained(our_model(seed=0), tmp_path)
    second = our_model(seed=1)
    save_pretrained(second, tmp_path)

    assert (tmp_path / "training_state.pt").read_bytes() == b"optimizer"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(os.listdir(tmp_path)) == [
        "config.json",
        "generation_config.json",
        "metrics.jsonl",
        "model.safetensors",
        "training_state.pt",
    ]  # no temporary files left behind
    assert torch.equal(load_model(tmp_path).output.weight, second.output.weight)


def test_generation_config_has_token_ids_and_the_sampling_defaults_it_is_given(tmp_path):
    """The sampling defaults have one home, SamplingConfig: the trainer and convert pass it; without it the
    folder asks transformers' generate for greedy decoding."""
    save_pretrained(our_model(), tmp_path / "greedy")
    generation = json.loads((tmp_path / "greedy" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False, "max_length": 64}
    defaults = SamplingConfig()
    save_pretrained(our_model(), tmp_path / "sampled", sampling=defaults)
    generation = json.loads((tmp_path / "sampled" / "generation_config.json").read_text())
    assert generation == {
        "bos_token_id": 1,
        "eos_token_id": 2,
        "do_sample": True,
        "temperature": defaults.temperature,
        "top_p": defaults.top_p,
        "max_length": 64,
    }
    assert (defaults.temperature, defaults.top_p) == (0.8, 0.9)


# ---------------------------------------------------------------------------------------------------------
# Non-gated feed-forwards: llama_mini-only checkpoints
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ffn, extra", [("relu", {}), ("swish", {"swish_beta_trainable": True})])
def test_non_gated_checkpoint_round_trips_and_is_marked_llama_mini_only(ffn, extra, tmp_path):
    model = our_model(ffn=ffn, **extra)
    save_pretrained(model, tmp_path)
    loaded = load_model(tmp_path)

    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[name], reloaded[name]) for name in original)
    batch = tokens(VOCAB, seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["llama_mini"]["hf_compatible"] is False
    assert (config["model_type"], config["architectures"]) == ("llama_mini", ["LlamaMiniForCausalLM"])
    assert "hidden_act" not in config
    with pytest.raises(ValueError, match="llama_mini"):  # so transformers' Auto classes refuse it
        transformers.AutoConfig.from_pretrained(tmp_path)


def test_exporting_non_gated_model_to_hf_is_refused(tmp_path):
    with pytest.raises(CheckpointError) as error:
        save_pretrained(our_model(ffn="relu"), tmp_path / "out", require_hf=True)
    assert one_line(error).startswith("ffn 'relu' has no Hugging Face Llama equivalent")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------
# Meta's original format
# ---------------------------------------------------------------------------------------------------------


def meta_params(args: ModelArgs) -> dict:
    # As in LLaMA 2's params.json: vocab_size -1 (read off the embedding), no max_seq_len.
    return dict(
        dim=args.dim,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads,
        vocab_size=-1,
        multiple_of=args.multiple_of,
        norm_eps=1e-5,
        rope_theta=args.rope_theta,
    )


def test_meta_checkpoint_loads_with_equal_logits(tmp_path):
    model = our_model(norm_eps=1e-5)
    write_meta(tmp_path, [meta_state_dict(model)], meta_params(model.args))

    loaded = load_model(tmp_path)
    assert detect_format(tmp_path) == "meta"
    assert (loaded.args.vocab_size, loaded.args.hidden_dim, loaded.args.max_seq_len) == (VOCAB, None, 4096)
    assert loaded.layers[0].feed_forward.hidden_dim == 192  # LLaMA's rule, as the file's w1 says
    batch = tokens(VOCAB, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


def test_two_shard_meta_checkpoint_concatenates_along_the_parallel_dims(tmp_path):
    model = our_model(norm_eps=1e-5)
    state = meta_state_dict(model)
    split_dims = {
        "wq": 0,
        "wk": 0,
        "wv": 0,
        "w1": 0,
        "w3": 0,
        "output": 0,
        "wo": 1,
        "w2": 1,
        "tok_embeddings": 1,
    }
    shards: list[dict] = [{}, {}]
    for name, tensor in state.items():
        dim = next((d for key, d in split_dims.items() if f"{key}.weight" in name), None)
        parts = tensor.chunk(2, dim=dim) if dim is not None else (tensor, tensor)  # norms are replicated
        for shard, part in zip(shards, parts, strict=True):
            shard[name] = part.clone()
    write_meta(tmp_path, shards, meta_params(model.args))

    loaded = load_model(tmp_path)
    batch = tokens(VOCAB, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


def test_meta_hidden_dim_comes_from_w1_when_the_rule_disagrees(tmp_path):
    model = our_model(norm_eps=1e-5, hidden_dim=100)  # the rule gives 192 for dim 64, multiple_of 32
    write_meta(tmp_path, [meta_state_dict(model)], meta_params(model.args))
    loaded = load_model(tmp_path)
    assert loaded.args.hidden_dim == 100
    batch = tokens(VOCAB, seed=7)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


@pytest.mark.parametrize(
    "extra, factor",
    [
        ({}, 8.0),  # Llama 3.1 and 3.2's params.json: Meta's code hard-codes factor 8
        ({"rope_scaling_factor": 32.0}, 32.0),  # Llama 4's field, which also gives 3.2 1B/3B their 32
    ],
)
def test_meta_scaled_rope_loads_with_metas_settings(extra, factor, tmp_path):
    scaling = {**META_SCALING, "factor": factor}
    model = our_model(norm_eps=1e-5, rope_scaling=scaling)
    params = {**meta_params(model.args), "use_scaled_rope": True, **extra}
    write_meta(tmp_path, [meta_state_dict(model)], params)

    loaded = load_model(tmp_path)
    assert loaded.args.rope_scaling == scaling
    # loaded's table is longer (max_seq_len 4096): its first 64 rows are the model's
    assert torch.equal(loaded.rope.rotations[:64], model.rope.rotations)
    assert not torch.equal(model.rope.rotations, with_plain_rope(model).rope.rotations)
    batch = tokens(VOCAB, seed=10)
    with torch.no_grad():
        assert torch.equal(loaded(batch), model(batch))


# ---------------------------------------------------------------------------------------------------------
# Errors: one line that names the file and the problem
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "checkpoint"
    save_pretrained(our_model(), folder)
    return folder


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as error:
        load_model(tmp_path / "nowhere")
    assert "nowhere" in one_line(error)


def test_folder_without_config_or_params_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="neither config.json .* nor params.json") as error:
        load_model(tmp_path)
    assert str(tmp_path) in one_line(error)


def test_missing_weights_file_is_a_clear_error(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load_model(saved)


def test_truncated_safetensors_is_a_clear_error(saved):
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is truncated or corrupted") as error:
        load_model(saved)
    assert one_line(error).startswith(str(weights))


def test_garbage_safetensors_is_a_clear_error(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match="is truncated or corrupted") as error:
        load_model(saved)
    assert one_line(error).startswith(str(weights))


def test_tensor_with_the_wrong_shape_is_a_clear_error(saved):
    weights = saved / "model.safetensors"
    tensors = stored_tensors(weights)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # config: 2 kv heads -> (32, 64)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError) as error:
        load_model(saved)
    assert one_line(error) == (
        f"{weights}: tensor 'model.layers.1.self_attn.k_proj.weight' has shape [64, 64] but the config needs "
        "[32, 64]; the weights and config come from different models"
    )


def test_missing_tensor_is_a_clear_error(saved):
    weights = saved / "model.safetensors"
    tensors = stored_tensors(weights)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, str(weights))
    with pytest.raises(
        CheckpointError, match=r"missing tensor\(s\) model.layers.0.mlp.up_proj.weight;"
    ) as error:
        load_model(saved)
    assert one_line(error).startswith(str(weights))


def test_unexpected_tensor_is_a_clear_error(saved):
    weights = saved / "model.safetensors"
    tensors = stored_tensors(weights)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(saved)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported") as error:
        load_model(tmp_path)
    assert one_line(error).startswith(str(tmp_path / "config.json"))


def test_invalid_config_json_is_a_clear_error(saved):
    (saved / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_model(saved)


def test_shard_missing_from_index_is_a_clear_error(saved):
    (saved / "model.safetensors").unlink()
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}
    (saved / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00001-of-00001.safetensors: listed in .* but missing"):
        load_model(saved)


def test_truncated_meta_weights_are_a_clear_error(tmp_path):
    model = our_model()
    write_meta(tmp_path, [meta_state_dict(model)], meta_params(model.args))
    weights = tmp_path / "consolidated.00.pth"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="is truncated or corrupted") as error:
        load_model(tmp_path)
    assert one_line(error).startswith(str(weights))


def test_pytorch_bin_only_folder_is_a_clear_error(saved):
    (saved / "model.safetensors").rename(saved / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="has only pytorch_model.bin"):
        load_model(saved)


# ---------------------------------------------------------------------------------------------------------
# Tokenizer files
# ---------------------------------------------------------------------------------------------------------


def test_find_tokenizer_returns_the_folders_tokenizer_model(tmp_path, sentencepiece_model):
    assert find_tokenizer(tmp_path) is None
    save_pretrained(our_model(), tmp_path, tokenizer_path=sentencepiece_model)
    assert find_tokenizer(tmp_path) == tmp_path / "tokenizer.model"
    assert (tmp_path / "tokenizer.model").read_bytes() == sentencepiece_model.read_bytes()


def test_tokenizer_config_files_describe_the_sentencepiece_model(tmp_path, sentencepiece_model):
    save_pretrained(our_model(), tmp_path, tokenizer_path=sentencepiece_model.parent)  # a folder works too
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer_config == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 64,
    }
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_transformers_tokenizer_matches_sentencepiece(tmp_path, sentencepiece_model):
    pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")
    import sentencepiece

    save_pretrained(our_model(), tmp_path, tokenizer_path=sentencepiece_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    text = "once upon a time the lazy fox"
    assert tokenizer(text).input_ids == [reference.bos_id(), *reference.encode(text)]


def test_not_a_sentencepiece_model_is_a_clear_error(tmp_path):
    fake = tmp_path / "tokenizer.model"
    fake.write_text("IQ== 0\n")  # a tiktoken line, as in Llama 3's tokenizer.model
    with pytest.raises(CheckpointError, match="not a SentencePiece model") as error:
        save_pretrained(our_model(), tmp_path / "out", tokenizer_path=fake)
    assert one_line(error).startswith(str(fake))
    assert not (tmp_path / "out").exists()  # nothing is written before the inputs are checked
