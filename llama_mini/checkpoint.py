"""Checkpoints: Hugging Face Llama folders by default, plus import of Meta's original format.

A checkpoint is a folder. `save_pretrained` writes one that `transformers.LlamaForCausalLM.from_pretrained`
loads as it is, with the same logits:

    config.json              Hugging Face's Llama schema, plus a "llama_mini" section with our full ModelArgs
    model.safetensors        Hugging Face tensor names and Hugging Face's RoPE layout (see `permute_for_hf`)
    generation_config.json   bos/eos ids and sampling defaults for transformers' `generate`
    tokenizer.model          the SentencePiece model, with tokenizer_config.json and special_tokens_map.json
                             (only when a tokenizer is given or already in the folder)

Every file is replaced atomically and any other file is left alone, so training state saved beside the
weights (optimizer, metrics) survives a new save; transformers ignores files it does not know.

`load_pretrained` reads three formats:

    llama_mini    config.json with a "llama_mini" section: its ModelArgs win over the Hugging Face fields
    Hugging Face  config.json (model_type "llama") + model.safetensors, or the shards listed in
                  model.safetensors.index.json; GQA, tied or untied embeddings, any rope_theta and
                  rms_norm_eps, Llama 3.1's RoPE scaling, an explicit intermediate_size
    Meta          params.json + consolidated.NN.pth (one file per model-parallel shard), Meta's names and
                  RoPE layout, which are ours: no renaming or permutation

Two choices a reader should know about:

- Non-gated feed-forwards (relu, gelu, swish) have no Hugging Face Llama equivalent: Llama's MLP is always
  gated, w2(act(w1 x) * w3 x). Such models still save (training must checkpoint them), with the same tensor
  names, but config.json says model_type "llama_mini", architectures ["LlamaMiniForCausalLM"] and
  "hf_compatible": false, so `transformers.AutoModelForCausalLM` refuses the folder instead of filling in a
  random up_proj. `save_pretrained(..., require_hf=True)` (what `python -m llama_mini.convert` uses) refuses
  to write them at all.
- Llama 3.1's RoPE frequency scaling (rope_type "llama3" in `rope_scaling` / `rope_parameters`, Meta's
  `use_scaled_rope`) becomes `ModelArgs.rope_scaling` and is written back in both transformers' forms.
  Other scalings (linear, dynamic, yarn, longrope, ...) change the angles in ways the model does not
  compute, so they are refused with a CheckpointError rather than loaded with subtly wrong logits.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llama_mini.errors import CheckpointError, ConfigError
from llama_mini.ffn import llama_hidden_dim
from llama_mini.files import atomic_write
from llama_mini.model import ROPE_SCALING_KEYS, ModelArgs, Transformer

__all__ = [
    "FORMAT_VERSION",
    "HF_ACTIVATIONS",
    "detect_format",
    "find_tokenizer",
    "hf_config",
    "is_hf_compatible",
    "load_pretrained",
    "model_args_from_hf_config",
    "model_args_from_meta_params",
    "permute_for_hf",
    "permute_from_hf",
    "read_model_args",
    "save_pretrained",
    "to_hf_state_dict",
    "unwrap_model",
]

FORMAT_VERSION = 1  # of the "llama_mini" section in config.json; bump when its meaning changes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.model"
META_PARAMS_FILE = "params.json"

# Gated feed-forward variant -> Hugging Face Llama's `hidden_act`: its MLP computes
# down_proj(ACT2FN[hidden_act](gate_proj x) * up_proj x), which is our w2(act(w1 x) * w3 x).
# transformers' "gelu" is the exact erf GELU, as is ours; "linear" is the identity.
HF_ACTIVATIONS: dict[str, str] = {
    "swiglu": "silu",
    "geglu": "gelu",
    "reglu": "relu",
    "glu": "sigmoid",
    "bilinear": "linear",
}
_FFN_FROM_HF_ACTIVATION = {act: ffn for ffn, act in HF_ACTIVATIONS.items()}

# Sampling defaults written to generation_config.json: Meta's published ones for Llama 2 and 3.
GENERATION_TEMPERATURE = 0.6
GENERATION_TOP_P = 0.9


# ---------------------------------------------------------------------------------------------------------
# RoPE layout: Meta's adjacent pairs <-> Hugging Face's halves
# ---------------------------------------------------------------------------------------------------------


def permute_for_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of wq or wk from Meta's RoPE pairing to Hugging Face's: (n_heads * D, dim) -> same.

    Our `apply_rotary_emb` (Meta's) rotates features (2i, 2i+1) of each head together, by angle i; Hugging
    Face's `rotate_half` rotates features (i, i + D/2), by angle i. Inside every head, our row 2i + c (pair
    i, component c in {0, 1}) becomes row c * D/2 + i, so Hugging Face turns exactly the points we turn,
    only stored in another order. Attention uses q and k only through q . k, a sum over features that
    does not change when q and k are reordered alike: the model computes the same function. Use n_heads
    for wq and n_kv_heads for wk; wv and wo are never permuted.
    """
    rows, cols = weight.shape
    # (heads, D/2 pairs, 2 components, cols) -> (heads, 2 components, D/2 pairs, cols)
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_for_hf`: Hugging Face's row c * D/2 + i goes back to our row 2i + c."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------------

# Our (Meta's) name inside layer N -> Hugging Face's, both after "layers.N." / "model.layers.N.".
_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",  # the gate W (the only input matrix if non-gated)
    "feed_forward.w3.weight": "mlp.up_proj.weight",  # the value V
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.beta": "mlp.beta",  # ffn="swish"'s beta: only in llama_mini-only checkpoints
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_LLAMA_LAYER_NAMES = {hf: ours for ours, hf in _HF_LAYER_NAMES.items()}
_HF_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_TOP_NAMES = {hf: ours for ours, hf in _HF_TOP_NAMES.items()}
_LAYER = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")

# Tensors some files carry that are recomputed from the config, never loaded: RoPE tables saved by old
# transformers versions (per layer) and by Meta's LLaMA 1/2 code.
_IGNORED = re.compile(r"(model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|rope\.freqs)")


def _hf_name(name: str) -> str:
    if name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[name]
    match = _LAYER.fullmatch(name)
    if match and match.group(2) in _HF_LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_HF_LAYER_NAMES[match.group(2)]}"
    raise CheckpointError(f"parameter {name!r} has no Hugging Face name; is this a llama_mini Transformer?")


def _llama_name(hf_name: str) -> str | None:
    """Our name for a Hugging Face tensor name, or None if the name is not one of Llama's."""
    if hf_name in _LLAMA_TOP_NAMES:
        return _LLAMA_TOP_NAMES[hf_name]
    match = _LAYER.fullmatch(hf_name)
    if match and hf_name.startswith("model.") and match.group(2) in _LLAMA_LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LLAMA_LAYER_NAMES[match.group(2)]}"
    return None


def _strip_wrapper_prefixes(name: str) -> str:
    """Drop what torch.compile ("_orig_mod.", also inside, for compiled blocks) and DDP ("module.") add."""
    parts = [part for part in name.split(".") if part != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def unwrap_model(model: nn.Module) -> Transformer:
    """The Transformer inside torch.compile's (`_orig_mod`) and DDP's (`module`) wrappers, or `model`."""
    while not isinstance(model, Transformer):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            raise CheckpointError(
                f"cannot save a {type(model).__name__}: pass a llama_mini Transformer "
                "(bare or wrapped by torch.compile / DistributedDataParallel)"
            )
        model = inner
    return model


def is_hf_compatible(args: ModelArgs) -> bool:
    """Whether transformers' LlamaForCausalLM computes this model: true for the gated feed-forwards."""
    return args.ffn in HF_ACTIVATIONS


def _not_hf_compatible_message(args: ModelArgs) -> str:
    return (
        f"ffn {args.ffn!r} has no Hugging Face Llama equivalent (Llama's MLP is gated); only "
        f"{', '.join(HF_ACTIVATIONS)} export to Hugging Face: keep it as a llama_mini checkpoint "
        "(save_pretrained without require_hf) and load it with Transformer.from_pretrained"
    )


def to_hf_state_dict(
    state_dict: dict[str, torch.Tensor], args: ModelArgs, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Our state dict -> the tensors of model.safetensors: Hugging Face names and RoPE layout, on the CPU.

    Wrapper prefixes are dropped; with tied embeddings the shared matrix is stored once, as
    model.embed_tokens.weight (safetensors refuses tensors that share memory, and transformers re-ties
    lm_head from `tie_word_embeddings`). `dtype` casts the floating-point tensors.
    """
    tensors = {}
    for name, tensor in state_dict.items():
        name = _strip_wrapper_prefixes(name)
        if name == "output.weight" and args.tie_embeddings:
            continue
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if name.endswith("attention.wq.weight"):
            tensor = permute_for_hf(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_for_hf(tensor, args.n_kv_heads)
        tensors[_hf_name(name)] = tensor.contiguous()
    return tensors


# ---------------------------------------------------------------------------------------------------------
# Configs: ModelArgs <-> config.json and params.json
# ---------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", as transformers writes it


def hf_config(
    args: ModelArgs,
    intermediate_size: int,
    dtype: torch.dtype = torch.float32,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
) -> dict[str, Any]:
    """The config.json for a model: Hugging Face's Llama schema plus a "llama_mini" section.

    `intermediate_size` is the feed-forward's actual hidden size (ModelArgs may only hold the rule that
    gives it). RoPE's base is written both as top-level `rope_theta` (what transformers 4.x reads) and in
    `rope_parameters` (5.x), so either version loads the folder; Llama 3.1's RoPE scaling likewise goes
    into `rope_scaling` (4.x) and `rope_parameters` (5.x), with rope_type "llama3". Non-gated models get
    model_type "llama_mini" and no `hidden_act`, so no Llama class claims them.
    """
    compatible = is_hf_compatible(args)
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.rope_scaling is not None:
        rope_parameters = {"rope_type": "llama3", "rope_theta": args.rope_theta, **args.rope_scaling}
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM" if compatible else "LlamaMiniForCausalLM"],
        "model_type": "llama" if compatible else "llama_mini",
        "hidden_size": args.dim,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,  # ours applies args.dropout in training only; inference has none
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": _dtype_name(dtype),  # transformers 5.x
        "torch_dtype": _dtype_name(dtype),  # transformers 4.x
        "use_cache": True,
        "llama_mini": {
            "format_version": FORMAT_VERSION,
            "hf_compatible": compatible,
            "model_args": args.to_dict(),
        },
    }
    if args.rope_scaling is not None:
        # 4.x's rope_scaling has no rope_theta (4.x warns about keys it does not expect there).
        config["rope_scaling"] = {"rope_type": "llama3", **args.rope_scaling}
    if compatible:
        config["hidden_act"] = HF_ACTIVATIONS[args.ffn]
    return config


def _rope_from_hf(config: dict[str, Any], where: Path) -> tuple[float, dict[str, Any] | None]:
    """RoPE's base and Llama 3.1's scaling (or None) from a 4.x or 5.x config; other scalings are refused.

    4.x writes `rope_theta` and `rope_scaling`, 5.x `rope_parameters`. A `rope_scaling` dict wins over
    `rope_parameters`, as in both transformers versions (5.x turns a legacy rope_scaling into its
    rope_parameters). A "llama3" scaling without original_max_position_embeddings uses
    max_position_embeddings, as transformers does.
    """
    parameters = config.get("rope_parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    theta = parameters.get("rope_theta", config.get("rope_theta"))
    theta = 10000.0 if theta is None else float(theta)
    field = "rope_scaling" if isinstance(config.get("rope_scaling"), dict) else "rope_parameters"
    rope = config["rope_scaling"] if field == "rope_scaling" else parameters
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in (None, "default"):
        return theta, None
    if rope_type != "llama3":
        raise CheckpointError(
            f"{where}: RoPE scaling {rope_type!r} is not supported: llama_mini computes plain RoPE and "
            "Llama 3.1's 'llama3' scaling only; use a model whose rope_type is 'default' or 'llama3'"
        )
    scaling = {"original_max_position_embeddings": config.get("max_position_embeddings", 2048)}
    scaling.update({key: rope[key] for key in ROPE_SCALING_KEYS if key in rope})
    missing = [key for key in ROPE_SCALING_KEYS if key not in scaling]
    if missing:
        raise CheckpointError(
            f"{where}: {field} has rope_type 'llama3' but no {', '.join(missing)}; the config is incomplete"
        )
    return theta, scaling


def model_args_from_hf_config(config: dict[str, Any], where: Path | str = CONFIG_FILE) -> ModelArgs:
    """ModelArgs from a config.json: the "llama_mini" section if there is one, else the Hugging Face fields.

    Hugging Face folders give the feed-forward's size as `intermediate_size`, which LLaMA's rule cannot
    always reproduce, so it becomes an explicit `hidden_dim`. Anything Llama-like that the model does not
    compute (biases, a head_dim other than hidden_size / heads, RoPE scaling other than Llama 3.1's) is
    refused, not ignored.
    """
    where = Path(where)
    section = config.get("llama_mini")
    if section is not None:
        version = section.get("format_version") if isinstance(section, dict) else None
        if not isinstance(version, int) or not isinstance(section.get("model_args"), dict):
            raise CheckpointError(f"{where}: the llama_mini section is malformed; re-save the checkpoint")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: written by a newer llama_mini (format {version}, this one reads up to "
                f"{FORMAT_VERSION}); upgrade llama_mini"
            )
        try:
            return ModelArgs.from_dict(section["model_args"])
        except ConfigError as error:
            raise CheckpointError(f"{where}: {error}") from None

    model_type = config.get("model_type")
    if model_type != "llama":
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; llama_mini loads Llama models "
            "(model_type 'llama') and its own checkpoints"
        )
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in required if key not in config]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}; the config is incomplete")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise CheckpointError(f"{where}: {key} is true, but llama_mini's layers have no biases")
    hidden_act = config.get("hidden_act", "silu")
    if hidden_act not in _FFN_FROM_HF_ACTIVATION:
        raise CheckpointError(
            f"{where}: hidden_act {hidden_act!r} is not supported; use one of "
            f"{', '.join(_FFN_FROM_HF_ACTIVATION)}"
        )
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * n_heads != dim:
        raise CheckpointError(
            f"{where}: head_dim {head_dim} x {n_heads} heads != hidden_size {dim}; llama_mini needs "
            "head_dim = hidden_size / num_attention_heads"
        )
    rope_theta, rope_scaling = _rope_from_hf(config, where)
    try:
        return ModelArgs(
            dim=dim,
            n_layers=config["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads") or n_heads,
            vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"],
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),  # defaults are LlamaConfig's
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=config.get("max_position_embeddings", 2048),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            ffn=_FFN_FROM_HF_ACTIVATION[hidden_act],
        )
    except ConfigError as error:
        raise CheckpointError(f"{where}: {error}") from None


# Fields of Meta's params.json that we understand; "max_batch_size" only sizes Meta's KV cache.
_META_FIELDS = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
    "rope_scaling_factor",
    "rope_high_freq_factor",
    "max_seq_len",
    "max_batch_size",
}

# What `use_scaled_rope` means in Meta's reference code for Llama 3 (llama-models' `apply_scaling`):
# Llama 3.1's settings, hard-coded, since params.json names none.
_META_ROPE_SCALING = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _meta_max_seq_len(params: dict[str, Any], vocab_size: int) -> int:
    # params.json does not record the context length. Guess it from what tells the releases apart:
    # Llama 3's 128K vocabulary -> 8192; Llama 2's norm_eps 1e-5 -> 4096; else LLaMA 1 (1e-6) -> 2048.
    if params.get("max_seq_len"):
        return int(params["max_seq_len"])
    if vocab_size >= 128000:
        return 8192
    return 4096 if params.get("norm_eps") == 1e-5 else 2048


def _meta_rope_scaling(params: dict[str, Any]) -> dict[str, Any] | None:
    # Llama 4's params.json format adds rope_scaling_factor and rope_high_freq_factor; read them if present.
    # Llama 3.2 1B and 3B were trained with factor 32 (their config.json says so), but their params.json,
    # like 3.1's, only says use_scaled_rope, and Meta's reference code applies 8 to them (llama-models
    # issues #166 and #241). We compute what Meta's code computes; adding "rope_scaling_factor": 32 to
    # their params.json gives the published model.
    if not params.get("use_scaled_rope"):
        return None
    scaling = dict(_META_ROPE_SCALING)
    if params.get("rope_scaling_factor") is not None:
        scaling["factor"] = params["rope_scaling_factor"]
    if params.get("rope_high_freq_factor") is not None:
        scaling["high_freq_factor"] = params["rope_high_freq_factor"]
    return scaling


def model_args_from_meta_params(
    params: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: Path | str = META_PARAMS_FILE
) -> ModelArgs:
    """ModelArgs from Meta's params.json and the shapes of the (merged) weights.

    `vocab_size` is -1 in LLaMA 1 and 2's params.json: the embedding's row count gives it. The FFN size
    comes from LLaMA's rule; if w1's shape disagrees, w1 wins as an explicit hidden_dim. Embeddings are
    tied when the file has no output.weight (as llama2.c's exports). `use_scaled_rope` turns on Llama
    3.1's RoPE scaling with the settings of Meta's code (factor 8, or params.json's rope_scaling_factor).
    """
    where = Path(where)
    unknown = sorted(set(params) - _META_FIELDS)
    if unknown:
        raise CheckpointError(
            f"{where}: unsupported field(s) {', '.join(unknown)} (not a plain Llama text model?); "
            f"llama_mini understands {', '.join(sorted(_META_FIELDS))}"
        )
    missing = [key for key in ("dim", "n_layers", "n_heads") if key not in params]
    if missing:
        raise CheckpointError(f"{where}: missing field(s) {', '.join(missing)}; the file is incomplete")
    vocab_size = params.get("vocab_size", -1)
    if vocab_size is None or vocab_size <= 0:
        if "tok_embeddings.weight" not in shapes:
            raise CheckpointError(
                f"{where}: vocab_size is {vocab_size} and the weights have no tok_embeddings"
            )
        vocab_size = shapes["tok_embeddings.weight"][0]
    multiple_of = params.get("multiple_of", 256)
    multiplier = params.get("ffn_dim_multiplier")
    hidden_dim = None
    w1_shape = shapes.get("layers.0.feed_forward.w1.weight")
    if w1_shape is not None and w1_shape[0] != llama_hidden_dim(4 * params["dim"], multiple_of, multiplier):
        hidden_dim = w1_shape[0]
    try:
        return ModelArgs(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"),
            vocab_size=vocab_size,
            multiple_of=multiple_of,
            ffn_dim_multiplier=multiplier,
            hidden_dim=hidden_dim,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=_meta_rope_scaling(params),
            max_seq_len=_meta_max_seq_len(params, vocab_size),
            tie_embeddings="output.weight" not in shapes,
        )
    except ConfigError as error:
        raise CheckpointError(f"{where}: {error}") from None


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """The SentencePiece `tokenizer.model` of a checkpoint folder (or `path` itself if it is one), or None."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    return path if path.is_file() and path.suffix == ".model" else None


def _read_sentencepiece(path: Path) -> dict[str, Any]:
    """The special tokens of a SentencePiece model: bos/eos/unk ids (None if absent) and their pieces."""
    import sentencepiece  # imported here: only saving with a tokenizer needs it

    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path}: not a SentencePiece model ({first_line}); pass a tokenizer.model made by sentencepiece"
        ) from None
    tokens: dict[str, Any] = {}
    ids = {"bos": processor.bos_id(), "eos": processor.eos_id(), "unk": processor.unk_id()}  # -1: none
    for kind, token_id in ids.items():
        valid = 0 <= token_id < processor.vocab_size()
        tokens[f"{kind}_token_id"] = token_id if valid else None
        tokens[f"{kind}_token"] = processor.id_to_piece(token_id) if valid else None
    return tokens


def _tokenizer_files(tokens: dict[str, Any], max_seq_len: int) -> dict[str, dict[str, Any]]:
    # What transformers needs beside tokenizer.model to build a LlamaTokenizer: the special tokens and
    # LLaMA's convention of prepending bos but not appending eos. legacy=False is transformers' current
    # handling of text after special tokens. (transformers 5.x reads tokenizer.model through protobuf.)
    special = {key: tokens[key] for key in ("bos_token", "eos_token", "unk_token") if tokens[key] is not None}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        **special,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
    }
    return {"tokenizer_config.json": tokenizer_config, "special_tokens_map.json": special}


def _write_json(target: Path, value: dict[str, Any]) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n"))


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    require_hf: bool = False,
) -> None:
    """Write `model` as a checkpoint folder (see the module docstring); other files in it are left alone.

    model: a Transformer, bare or wrapped by torch.compile / DDP (their prefixes never reach the file).
    dtype: cast the floating-point tensors to it (e.g. torch.bfloat16 halves the file); None keeps them.
    tokenizer_path: a SentencePiece tokenizer.model (or a folder holding one) to copy in; without it a
        tokenizer.model already in the folder is kept, and the bos/eos ids come from it (else 1 and 2).
    require_hf: refuse (CheckpointError) a model that transformers cannot load, instead of writing a
        llama_mini-only folder.
    """
    model = unwrap_model(model)
    args = model.args
    if require_hf and not is_hf_compatible(args):
        raise CheckpointError(_not_hf_compatible_message(args))
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; save_pretrained needs a folder path")

    tokenizer_source = None
    if tokenizer_path is not None:
        tokenizer_source = find_tokenizer(tokenizer_path)
        if tokenizer_source is None:
            raise CheckpointError(f"{tokenizer_path}: no SentencePiece tokenizer.model there; check the path")
    elif (folder / TOKENIZER_FILE).is_file():
        tokenizer_source = folder / TOKENIZER_FILE
    tokens = _read_sentencepiece(tokenizer_source) if tokenizer_source is not None else None
    bos = tokens["bos_token_id"] if tokens else 1
    eos = tokens["eos_token_id"] if tokens else 2
    folder.mkdir(parents=True, exist_ok=True)  # only now that every input is known to be good

    tensors = to_hf_state_dict(model.state_dict(), args, dtype)
    stored_dtype = tensors["model.embed_tokens.weight"].dtype
    intermediate_size = tensors["model.layers.0.mlp.down_proj.weight"].shape[1]

    # Weights first and config.json last: a folder whose config.json is new has new weights too.
    if tokenizer_source is not None:
        if tokenizer_source.resolve() != (folder / TOKENIZER_FILE).resolve():
            atomic_write(folder / TOKENIZER_FILE, lambda tmp: shutil.copyfile(tokenizer_source, tmp))
        for name, value in _tokenizer_files(tokens, args.max_seq_len).items():
            _write_json(folder / name, value)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    generation = {
        "bos_token_id": bos,
        "eos_token_id": eos,
        "do_sample": True,
        "temperature": GENERATION_TEMPERATURE,
        "top_p": GENERATION_TOP_P,
        "max_length": args.max_seq_len,
    }
    _write_json(folder / GENERATION_CONFIG_FILE, generation)
    _write_json(folder / CONFIG_FILE, hf_config(args, intermediate_size, stored_dtype, bos, eos))


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def _checkpoint_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass the checkpoint folder that holds it")
    return folder


def detect_format(path: str | os.PathLike) -> str:
    """Which kind of checkpoint folder `path` is: "llama_mini", "hf" or "meta" (CheckpointError if none)."""
    folder = _checkpoint_folder(path)
    if (folder / CONFIG_FILE).is_file():
        return "llama_mini" if "llama_mini" in _read_json(folder / CONFIG_FILE) else "hf"
    if (folder / META_PARAMS_FILE).is_file():
        return "meta"
    raise CheckpointError(
        f"{folder} has neither {CONFIG_FILE} (Hugging Face / llama_mini) nor {META_PARAMS_FILE} (Meta); "
        "point to a checkpoint folder"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}); check the file") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); re-save or re-download it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}; check the file")
    return value


def _safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: model.safetensors, or the shards its index lists."""
    if (folder / WEIGHTS_FILE).is_file():  # preferred over an index, as transformers does
        return [folder / WEIGHTS_FILE]
    index_path = folder / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: has no weight_map; re-save or re-download it")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: listed in {WEIGHTS_INDEX_FILE} but missing; download it")
        return files
    if (folder / "pytorch_model.bin").is_file():
        raise CheckpointError(
            f"{folder}: has only pytorch_model.bin; llama_mini reads safetensors: re-save the model with "
            "transformers' save_pretrained (safetensors is its default)"
        )
    raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}; the weights are missing")


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{file}: is truncated or corrupted ({error}); re-download or re-save it"
        ) from None


def _hf_tensors(files: list[Path]) -> Iterator[tuple[str, str, Path | str, torch.Tensor]]:
    """(our name, stored name, file, tensor in the file's layout) for each tensor, one at a time."""
    seen: dict[str, Path] = {}
    for file in files:
        with _open_safetensors(file) as handle:
            for stored in handle.keys():
                if _IGNORED.fullmatch(stored):
                    continue
                if stored in seen:
                    raise CheckpointError(f"{file}: tensor {stored!r} is also in {seen[stored]}; remove one")
                seen[stored] = file
                ours = _llama_name(stored)
                if ours is None:
                    raise CheckpointError(
                        f"{file}: unexpected tensor {stored!r}: not part of a Llama model "
                        "(biases and other extras are unsupported)"
                    )
                try:
                    tensor = handle.get_tensor(stored)
                except SafetensorError as error:
                    raise CheckpointError(
                        f"{file}: is truncated or corrupted ({error}); re-download or re-save it"
                    ) from None
                yield ours, stored, file, tensor


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: unpickle tensors and containers only, never arbitrary code from a download.
    # mmap=True: map the file instead of reading it, so a large model is not held twice in memory.
    errors = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, OSError, zipfile.BadZipFile)
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # a pre-zip (legacy) file
    except errors as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{file}: is truncated or corrupted ({first_line}); re-download or re-save it"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state_dict); not a Meta weights file")
    return {_strip_wrapper_prefixes(name): value for name, value in state.items()}


def _meta_shard_dim(name: str) -> int | None:
    """The dimension along which Meta's model-parallel code split this tensor, or None if replicated.

    Column-parallel layers (wq, wk, wv, w1, w3, output) split their output rows; row-parallel layers
    (wo, w2) their input columns; ParallelEmbedding splits the embedding dimension. Norms are replicated.
    """
    if name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")):
        return 0
    if name.endswith(("feed_forward.w1.weight", "feed_forward.w3.weight")) or name == "output.weight":
        return 0
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) or name == "tok_embeddings.weight":
        return 1
    return None


def _meta_shards(folder: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """Meta's consolidated.NN.pth files, in order, and their (memory-mapped) state dicts."""
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: has {META_PARAMS_FILE} but no consolidated.*.pth; add the weights")
    shards = [_torch_load(file) for file in files]
    for file, shard in zip(files[1:], shards[1:], strict=True):
        if shard.keys() != shards[0].keys():
            raise CheckpointError(
                f"{file}: holds other tensors than {files[0].name}; the shards are not from one checkpoint"
            )
    return files, shards


def _meta_shapes(shards: list[dict[str, torch.Tensor]]) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor once the shards are concatenated, without concatenating them."""
    shapes = {}
    for name, tensor in shards[0].items():
        if _IGNORED.fullmatch(name):
            continue
        shape, dim = list(tensor.shape), _meta_shard_dim(name)
        if dim is not None and dim < tensor.ndim:
            shape[dim] = sum(shard[name].shape[dim] for shard in shards)
        shapes[name] = tuple(shape)
    return shapes


def _meta_tensors(
    shards: list[dict[str, torch.Tensor]], source: str
) -> Iterator[tuple[str, str, Path | str, torch.Tensor]]:
    """Each merged tensor in turn: split ones concatenated along their dimension, replicated ones once."""
    for name in _meta_shapes(shards):
        dim = _meta_shard_dim(name)
        if len(shards) == 1 or dim is None or dim >= shards[0][name].ndim:
            yield name, name, source, shards[0][name]
        else:
            yield name, name, source, torch.cat([shard[name] for shard in shards], dim=dim)


def _meta_args(folder: Path, shards: list[dict[str, torch.Tensor]]) -> ModelArgs:
    params_path = folder / META_PARAMS_FILE
    return model_args_from_meta_params(_read_json(params_path), _meta_shapes(shards), params_path)


def _assemble(
    args: ModelArgs,
    tensors: Iterator[tuple[str, str, Path | str, torch.Tensor]],
    weights: Path | str,
    hf_layout: bool,
    device: torch.device,
    dtype: torch.dtype | None,
) -> Transformer:
    """Build the model on the meta device and move the checked tensors into it, one at a time.

    tensors: (our name, stored name, file, tensor as stored); weights: the file(s) they come from, for
    messages. On the meta device parameters have shapes but no memory, so a large model is never
    allocated twice; `load_state_dict(assign=True)` then makes the loaded tensors themselves the
    parameters. Every tensor's shape is checked before it is used, and every parameter must be found.
    """
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    if args.tie_embeddings:
        del expected["output.weight"]  # stored once, as the embedding
    loaded: dict[str, torch.Tensor] = {}
    for ours, stored, file, tensor in tensors:
        if ours not in expected:
            if ours == "output.weight":  # a tied model's file may carry the shared matrix twice
                continue
            raise CheckpointError(f"{file}: unexpected tensor {stored!r}; the weights and config disagree")
        if tuple(tensor.shape) != expected[ours]:
            raise CheckpointError(
                f"{file}: tensor {stored!r} has shape {list(tensor.shape)} but the config needs "
                f"{list(expected[ours])}; the weights and config come from different models"
            )
        if hf_layout and ours.endswith("attention.wq.weight"):
            tensor = permute_from_hf(tensor, args.n_heads)
        elif hf_layout and ours.endswith("attention.wk.weight"):
            tensor = permute_from_hf(tensor, args.n_kv_heads)
        cast = dtype if dtype is not None and tensor.is_floating_point() else None
        loaded[ours] = tensor.to(device=device, dtype=cast).contiguous()
    missing = [name for name in expected if name not in loaded]
    if missing:
        missing = [_hf_name(name) for name in missing] if hf_layout else missing  # as the file names them
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(f"{weights}: missing tensor(s) {shown}; the weights are incomplete")
    model.load_state_dict(loaded, strict=False, assign=True)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True replaced the shared Parameter: re-tie
    # freqs_cis is not in the state dict: still a meta tensor. Compute it for real, in float32, with the
    # model's own table function, so that rope_scaling (and anything else it honours) applies.
    model.freqs_cis = model._rope_table().to(device)
    return model.eval()


def read_model_args(path: str | os.PathLike) -> ModelArgs:
    """The ModelArgs of a checkpoint folder, from its config (Meta's format also reads weight shapes)."""
    folder = _checkpoint_folder(path)
    if detect_format(folder) == "meta":
        return _meta_args(folder, _meta_shards(folder)[1])
    return model_args_from_hf_config(_read_json(folder / CONFIG_FILE), folder / CONFIG_FILE)


def load_pretrained(
    path: str | os.PathLike, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Transformer:
    """Load a llama_mini, Hugging Face Llama or Meta checkpoint folder as a Transformer, in eval mode.

    device: where the parameters go (default CPU). dtype: cast floating-point tensors to it as they are
    loaded; None keeps the stored dtype (float32, bfloat16, ...). RoPE's table is always float32.
    Missing files, corrupted or truncated weights, shapes that do not match the config and unsupported
    architectures raise a CheckpointError whose one-line message names the file.
    """
    folder = _checkpoint_folder(path)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if detect_format(folder) == "meta":
        files, shards = _meta_shards(folder)
        source = (
            str(files[0]) if len(files) == 1 else f"{folder / 'consolidated.*.pth'} ({len(files)} shards)"
        )
        tensors = _meta_tensors(shards, source)
        return _assemble(
            _meta_args(folder, shards), tensors, source, hf_layout=False, device=device, dtype=dtype
        )
    args = model_args_from_hf_config(_read_json(folder / CONFIG_FILE), folder / CONFIG_FILE)
    files = _safetensors_files(folder)
    weights = files[0] if len(files) == 1 else folder / WEIGHTS_INDEX_FILE
    return _assemble(args, _hf_tensors(files), weights, hf_layout=True, device=device, dtype=dtype)
