"""Sizes and costs: analytic parameter counts, hidden sizes, FLOPs, KV bytes and training memory against
built models, published numbers and what autograd saves (llama_mini/model/sizes.py)."""

import math

import pytest
import torch

from llama_mini.model.ffn import FEED_FORWARDS
from llama_mini.model.presets import PRESETS, get_preset
from llama_mini.model.sizes import (
    activation_bytes_per_token,
    count_parameters,
    hidden_dim_steps,
    kv_cache_bytes_per_token,
    parameter_counts,
    parameter_shapes,
    training_flops_per_token,
    training_memory,
)
from llama_mini.model.transformer import Transformer


def build_on_meta(args) -> Transformer:
    with torch.device("meta"):
        return Transformer(args)


def tiny_args(**overrides):
    return get_preset("tiny", **overrides)


PUBLISHED_PARAMETER_COUNTS = {
    "llama-7b": 6_738_415_616,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3.2-1b": 1_235_814_400,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETER_COUNTS))
def test_preset_matches_published_parameter_count(name):
    with torch.device("meta"):
        model = Transformer(get_preset(name))
    assert count_parameters(model)["total"] == PUBLISHED_PARAMETER_COUNTS[name]


def test_stories_presets_have_llama2c_sizes():
    hidden = {"stories260k": 172, "stories15m": 768, "stories42m": 1376, "stories110m": 2048}
    for name, expected in hidden.items():
        with torch.device("meta"):
            model = Transformer(get_preset(name))
        assert model.layers[0].feed_forward.hidden_dim == expected
    with torch.device("meta"):
        model = Transformer(get_preset("stories15m"))
    assert round(count_parameters(model)["total"] / 1e6) == 15


def test_parameter_counts_by_part():
    args = tiny_args()  # dim 64, 2 layers, 4 heads, 2 kv heads (head_dim 16), vocab 256, ffn hidden 192
    counts = count_parameters(Transformer(args))
    assert counts["embedding"] == 256 * 64
    assert counts["output"] == 256 * 64
    assert counts["attention"] == 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64)
    assert counts["feed_forward"] == 2 * 3 * 64 * 192
    assert counts["norms"] == (2 * 2 + 1) * 64
    assert counts["total"] == sum(p.numel() for p in Transformer(args).parameters())
    assert counts["non_embedding"] == counts["total"] - counts["embedding"]


def test_training_flops_per_token_is_6n_plus_attention_term():
    model = Transformer(tiny_args())
    counts = count_parameters(model)
    assert training_flops_per_token(model.args, 64) == 6 * counts["non_embedding"] + 12 * 2 * 64 * 64
    # the tied output projection is still a (dim x vocab) matmul per token
    assert training_flops_per_token(tiny_args(tie_embeddings=True), 64) == training_flops_per_token(
        model.args, 64
    )


@pytest.mark.parametrize("name", list(PRESETS))
def test_counts_equal_count_parameters_of_every_preset_on_meta(name):
    args = get_preset(name)
    assert parameter_counts(args) == count_parameters(build_on_meta(args))


@pytest.mark.parametrize("ffn", list(FEED_FORWARDS))
@pytest.mark.parametrize("tied", [False, True])
def test_counts_equal_count_parameters_for_every_variant_tied_or_not(ffn, tied):
    args = get_preset("tiny", ffn=ffn, tie_embeddings=tied, swish_beta_trainable=ffn == "swish")
    assert parameter_counts(args) == count_parameters(build_on_meta(args))


def test_counts_equal_a_real_model_on_cpu():
    args = get_preset("tiny")
    assert parameter_counts(args) == count_parameters(Transformer(args))


def test_build_on_meta_allocates_no_storage():
    model = build_on_meta(get_preset("llama3-8b"))
    assert all(param.device.type == "meta" for param in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_hidden_dim_equals_the_built_models(name):
    for ffn in ("swiglu", "relu"):
        args = get_preset(name, ffn=ffn)
        hidden, _ = hidden_dim_steps(args)
        assert hidden == build_on_meta(args).layers[0].feed_forward.hidden_dim


def test_hidden_dim_steps_for_llama_7b():
    hidden, steps = hidden_dim_steps(get_preset("llama-7b"))
    assert hidden == 11008
    assert steps[0] == "4 * dim = 4 * 4096 = 16384"
    assert steps[1].startswith("int(2 * 16384 / 3) = 10922")
    assert steps[-1] == "round 10922 up to a multiple of 256 = 11008"


def test_hidden_dim_steps_show_the_multiplier_for_llama3_8b():
    hidden, steps = hidden_dim_steps(get_preset("llama3-8b"))
    assert hidden == 14336
    assert any(step.startswith("int(1.3 * 10922) = 14198") for step in steps)


def test_hidden_dim_steps_say_when_the_size_is_explicit():
    hidden, steps = hidden_dim_steps(get_preset("tiny", hidden_dim=100))
    assert hidden == 100
    assert steps == ["explicit hidden_dim = 100 (no rounding rule applied)"]


def test_kv_cache_of_llama3_8b_in_bf16_is_128_kib_per_token():
    args = get_preset("llama3-8b")
    assert kv_cache_bytes_per_token(args, "bf16") == 131072
    assert kv_cache_bytes_per_token(args, "fp32") == 262144


# ------------------------------------------------------------------------------------------ training memory


def saved_bytes(args, dtype, chunk_size=0, checkpointing=False, batch=2, seq_len=16):
    """Bytes of the distinct tensors autograd saves in one forward pass of the training loss, weights left
    out: every saved tensor passes through a saved-tensor hook, counted once per storage."""
    from llama_mini.ops.loss import NextTokenLoss
    from llama_mini.train.parallel import checkpoint_activations

    torch.manual_seed(0)
    model = Transformer(args).to(dtype)
    if checkpointing:
        checkpoint_activations(model)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, args.vocab_size, (batch, seq_len))
    targets = torch.randint(0, args.vocab_size, (batch, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        NextTokenLoss(model, chunk_size)(tokens, targets)
    return sum(storages.values())


@pytest.mark.parametrize("ffn", list(FEED_FORWARDS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_bytes_per_block_are_what_autograd_saves(ffn, dtype):
    """Per block, exactly: the difference between models of 3 and 2 layers is one block's saved tensors."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    args = {layers: tiny_args(n_layers=layers, ffn=ffn) for layers in (2, 3)}
    measured = saved_bytes(args[3], torch_dtype) - saved_bytes(args[2], torch_dtype)
    # swish also keeps its scalar beta, once per block (not per token)
    beta = torch_dtype.itemsize if ffn == "swish" else 0
    assert measured == 2 * 16 * activation_bytes_per_token(args[2], dtype)["block"] + beta


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_bytes_of_the_whole_model_are_what_autograd_saves(chunked, dtype):
    """The whole count; what it leaves out is the per-sequence RoPE table (T x D x 4 bytes), the chunked
    loss's V x d weight gradient (per micro-batch) and the plain loss's scalar."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    args = tiny_args()  # GQA: 4 heads share 2 kv heads, so k and v are repeated before attention
    batch, seq_len = 2, 16
    measured = saved_bytes(args, torch_dtype, chunk_size=8 if chunked else 0, batch=batch, seq_len=seq_len)
    per_token = activation_bytes_per_token(args, dtype, chunked_loss=chunked)["total"]
    rope_table = seq_len * args.head_dim * 4
    loss_extra = args.vocab_size * args.dim * torch_dtype.itemsize if chunked else 4
    assert measured == batch * seq_len * per_token + rope_table + loss_extra


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_activation_checkpointing_keeps_only_each_blocks_input(dtype):
    """With checkpointing, forward keeps L * c * d per token plus the head; the plan adds the one block
    rebuilt at a time in backward."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    args = tiny_args(n_layers=3)
    batch, seq_len = 2, 16
    measured = saved_bytes(args, torch_dtype, chunk_size=8, checkpointing=True, batch=batch, seq_len=seq_len)
    parts = activation_bytes_per_token(args, dtype, checkpointing=True)
    kept = parts["total"] - parts["block"]  # what forward keeps; the rebuilt block comes in backward
    assert kept == 3 * torch_dtype.itemsize * args.dim + parts["head"]
    extra = seq_len * args.head_dim * 4 + args.vocab_size * args.dim * torch_dtype.itemsize
    assert measured == batch * seq_len * kept + extra


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_shapes_are_the_built_models(name):
    for tied in (False, True):
        args = get_preset(name, tie_embeddings=tied)
        built = {name: tuple(p.shape) for name, p in build_on_meta(args).named_parameters()}
        assert parameter_shapes(args) == built


def test_ddp_holds_16_bytes_per_parameter_and_fsdp_a_share_of_them():
    args = get_preset("llama3-8b")
    plan = training_memory(args, processes=8, dtype="bf16")
    parameters = 8_030_261_248
    ddp, fsdp = plan["ddp"], plan["fsdp"]
    assert plan["parameters"] == parameters
    assert ddp["weights"] + ddp["gradients"] + ddp["adamw"] == 16 * parameters
    assert ddp["compute_copies"] == 2 * parameters  # autocast's bf16 cast of every weight
    # every first dimension of llama3-8b divides by 8: the pieces are exactly an eighth
    assert fsdp["weights"] + fsdp["gradients"] + fsdp["adamw"] == 16 * parameters // 8
    # gathered in bf16: the root (embeddings 128256 x 4096, output, norm) and 2 blocks, gradients of the
    # root and of one block
    root = 2 * 128256 * 4096 + 4096
    block = (parameters - root) // 32
    assert fsdp["compute_copies"] == 2 * (2 * root + 3 * block)
    assert plan["totals"]["fsdp_checkpointed"] < plan["totals"]["fsdp_plain"] < plan["totals"]["ddp_plain"]


def test_fsdp_pieces_round_each_first_dimension_up():
    args = tiny_args()  # vocab 256, dim 64: the (64,) norm weights split 3 ways as 22 + 22 + 20 (padded)
    plan = training_memory(args, processes=3, dtype="fp32")
    pieces = sum(-(-shape[0] // 3) * math.prod(shape[1:]) for shape in parameter_shapes(args).values())
    assert plan["fsdp"]["weights"] == 4 * pieces
    assert pieces * 3 >= plan["parameters"]
    assert training_memory(args, processes=1, dtype="fp32")["fsdp"]["weights"] == 4 * plan["parameters"]


def test_inspector_prints_the_memory_plan(capsys):
    from llama_mini.study.inspector import main

    assert main(["--preset", "llama3-8b", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "DDP against FSDP over 8 GPUs" in out
    adamw = next(line for line in out.splitlines() if "AdamW's two moments" in line)
    assert adamw.split()[-4:] == ["59.8", "GiB", "7.5", "GiB"]  # 8 bytes per parameter, all or an eighth
    assert "with activation checkpointing" in out
