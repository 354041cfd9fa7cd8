"""The Hugging Face Llama format: tensor names, the RoPE layout, and config.json.

Our model keeps Meta's names (`layers.N.attention.wq.weight`) and Meta's RoPE layout (adjacent pairs);
a Hugging Face folder has Hugging Face's names (`model.layers.N.self_attn.q_proj.weight`) and its layout
(halves), so the rows of wq and wk are permuted at this boundary (`permute_for_hf`, `permute_from_hf`).
config.json follows transformers' LlamaConfig, plus a "llama_mini" section with our whole ModelArgs.

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

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llama_mini.checkpoint.common import (
    CONFIG_FILE,
    IGNORED_TENSORS,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    read_json,
    strip_wrapper_prefixes,
)
from llama_mini.errors import CheckpointError, ConfigError
from llama_mini.model.args import ROPE_SCALING_KEYS, ModelArgs

FORMAT_VERSION = 1  # of the "llama_mini" section in config.json; bump when its meaning changes

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


def hf_name(name: str) -> str:
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


def is_hf_compatible(args: ModelArgs) -> bool:
    """Whether transformers' LlamaForCausalLM computes this model: true for the gated feed-forwards."""
    return args.ffn in HF_ACTIVATIONS


def not_hf_compatible_message(args: ModelArgs) -> str:
    return (
        f"ffn {args.ffn!r} has no Hugging Face Llama equivalent (Llama's MLP is gated); only "
        f"{', '.join(HF_ACTIVATIONS)} export to Hugging Face: keep it as a llama_mini checkpoint "
        "(save_pretrained without require_hf) and load it with llama_mini.load_model"
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
        name = strip_wrapper_prefixes(name)
        if name == "output.weight" and args.tie_embeddings:
            continue
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if name.endswith("attention.wq.weight"):
            tensor = permute_for_hf(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_for_hf(tensor, args.n_kv_heads)
        tensors[hf_name(name)] = tensor.contiguous()
    return tensors


# ---------------------------------------------------------------------------------------------------------
# config.json <-> ModelArgs
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


# ---------------------------------------------------------------------------------------------------------
# Reading the weights
# ---------------------------------------------------------------------------------------------------------


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: model.safetensors, or the shards its index lists."""
    if (folder / WEIGHTS_FILE).is_file():  # preferred over an index, as transformers does
        return [folder / WEIGHTS_FILE]
    index_path = folder / WEIGHTS_INDEX_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
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


def hf_tensors(files: list[Path]) -> Iterator[tuple[str, str, Path | str, torch.Tensor]]:
    """(our name, stored name, file, tensor in the file's layout) for each tensor, one at a time."""
    seen: dict[str, Path] = {}
    for file in files:
        with _open_safetensors(file) as handle:
            for stored in handle.keys():
                if IGNORED_TENSORS.fullmatch(stored):
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
