"""PEFT's LoRA adapter format, in and out: what `peft.PeftModel.from_pretrained(model, folder)` reads.

An adapter folder holds two files:

    adapter_config.json         peft_type "LORA", r, lora_alpha, lora_dropout, target_modules (Hugging Face
                                module names: q_proj, k_proj, v_proj, o_proj, gate_proj, down_proj, up_proj),
                                bias "none", base_model_name_or_path (the model the adapter belongs to), ...
    adapter_model.safetensors   per adapted layer, Hugging Face's module path under PEFT's prefix:
                                base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight  (r, in)
                                base_model.model.model.layers.N.self_attn.q_proj.lora_B.weight  (out, r)

PEFT computes h = W x + (lora_alpha / r) B A dropout(x), which is llama_mini.ops.lora's LoRALinear. One
thing changes at this boundary: the rows of wq and wk. Ours are in Meta's RoPE layout and Hugging Face's
q_proj and k_proj rows are permuted (llama_mini.checkpoint.hf.permute_for_hf); the update B A lives in the
weight's rows, and those are B's rows, so lora_B of q_proj and k_proj is permuted like the weight (with
n_heads and n_kv_heads), and lora_A, whose rows are the rank, is not. Then Hugging Face's W + (alpha/r) B A
is our merged weight, permuted: the same model.

A LoRA training run keeps each checkpoint's adapter in its ADAPTER_FOLDER ("adapter/") subfolder, beside
the merged full weights (llama_mini.train.trainer). Not in the checkpoint folder itself: transformers, when
peft is installed, applies an adapter it finds beside a model's config.json to those weights, and applying
it to already merged weights would add the update twice.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llama_mini.checkpoint.common import CONFIG_FILE, read_json, write_json
from llama_mini.checkpoint.hf import hf_name, permute_for_hf, permute_from_hf
from llama_mini.checkpoint.io import assign_weights, load_model
from llama_mini.errors import CheckpointError, ConfigError
from llama_mini.files import atomic_write
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.ops.lora import (
    LORA_TARGETS,
    LoRASettings,
    adapter_settings,
    apply_lora,
    lora_modules,
    merge_lora,
)

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_FOLDER",
    "ADAPTER_WEIGHTS_FILE",
    "PEFT_MODULE_NAMES",
    "StoredAdapter",
    "adapter_config",
    "is_adapter_folder",
    "load_adapter",
    "merge_adapter",
    "merged_model",
    "read_adapter",
    "save_adapter",
]

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FOLDER = "adapter"  # a LoRA run's checkpoints keep their adapter in this subfolder
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the LoraModel, which wraps the transformers model

# Our layer name -> the Hugging Face module name PEFT's target_modules lists.
PEFT_MODULE_NAMES = {
    "wq": "q_proj",
    "wk": "k_proj",
    "wv": "v_proj",
    "wo": "o_proj",
    "w1": "gate_proj",
    "w2": "down_proj",
    "w3": "up_proj",
}
_OUR_TARGETS = {peft: ours for ours, peft in PEFT_MODULE_NAMES.items()}

# Settings of PEFT's LoraConfig that change what the adapter computes; plain LoRA leaves each of them off
# (false, null or empty) and bias "none". An adapter that sets one is refused rather than loaded into
# something that computes otherwise.
_OFF_IN_PLAIN_LORA = (
    "fan_in_fan_out",  # weights stored transposed (GPT-2's Conv1D)
    "use_dora",  # DoRA: a learned magnitude per output row
    "use_rslora",  # scaling alpha / sqrt(r) instead of alpha / r
    "lora_bias",
    "modules_to_save",  # whole layers trained and saved besides the adapters
    "layers_to_transform",
    "rank_pattern",  # other ranks or alphas for some layers
    "alpha_pattern",
)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder holding a PEFT adapter (its adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def adapter_config(settings: LoRASettings, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json for adapters made with `settings`: PEFT's LoraConfig fields.

    Only fields that PEFT has read for many versions are written, each with the value that computes plain
    LoRA; PEFT fills in the rest with its defaults. `inference_mode` true: loading it gives a frozen model
    (PeftModel.from_pretrained(..., is_trainable=True) trains it further).
    """
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": settings.rank,
        "lora_alpha": alpha,
        "lora_dropout": settings.dropout,
        "target_modules": [PEFT_MODULE_NAMES[target] for target in settings.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _peft_key(layer: str, matrix: str) -> str:
    """`layers.0.attention.wq`, "A" -> `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    module = hf_name(f"{layer}.weight").removesuffix(".weight")
    return f"{PEFT_PREFIX}{module}.lora_{matrix}.weight"


def _to_hf_rows(layer: str, matrix: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """lora_B of wq / wk in Hugging Face's RoPE row order (module docstring); everything else as it is."""
    if matrix == "B" and layer.endswith("attention.wq"):
        return permute_for_hf(tensor, args.n_heads)
    if matrix == "B" and layer.endswith("attention.wk"):
        return permute_for_hf(tensor, args.n_kv_heads)
    return tensor


def _from_hf_rows(layer: str, matrix: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    if matrix == "B" and layer.endswith("attention.wq"):
        return permute_from_hf(tensor, args.n_heads)
    if matrix == "B" and layer.endswith("attention.wk"):
        return permute_from_hf(tensor, args.n_kv_heads)
    return tensor


def save_adapter(
    model: nn.Module,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the LoRA adapters of `model` (a Transformer after `apply_lora`) as a PEFT adapter folder.

    base_model_name_or_path: the model the adapter belongs to, which PEFT's AutoPeftModel loads first (a
        LoRA run passes its OUT/base, the frozen base as a Hugging Face folder). dtype: cast the tensors.
    Each file is written atomically, the weights first.
    """
    settings = adapter_settings(model)
    if settings is None:
        raise CheckpointError("the model has no LoRA adapters to save; apply_lora adds them")
    args = model.args
    tensors = {}
    for layer, module in lora_modules(model).items():
        for matrix, linear in (("A", module.lora_A), ("B", module.lora_B)):
            tensor = linear.weight.detach().to("cpu")
            tensor = tensor.to(dtype) if dtype is not None else tensor
            tensors[_peft_key(layer, matrix)] = _to_hf_rows(layer, matrix, tensor, args).contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(
        folder / ADAPTER_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"})
    )
    write_json(folder / ADAPTER_CONFIG_FILE, adapter_config(settings, base_model_name_or_path))


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


@dataclass
class StoredAdapter:
    """A PEFT LoRA adapter as read: its settings, the model it names as its base, and its tensors in our
    names (`layers.0.attention.wq.lora_A.weight`) and our RoPE layout."""

    settings: LoRASettings
    base_model_name_or_path: str | None
    tensors: dict[str, torch.Tensor]


def _settings_from_config(config: dict[str, Any], where: Path) -> LoRASettings:
    """LoRASettings from adapter_config.json; anything other than plain LoRA on our layers is refused."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{where}: peft_type {config.get('peft_type')!r} is not supported; llama_mini reads LoRA adapters"
        )
    unsupported = [key for key in _OFF_IN_PLAIN_LORA if config.get(key)]
    if config.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        shown = ", ".join(f"{key} {config[key]!r}" for key in unsupported)
        raise CheckpointError(
            f"{where}: {shown} not supported (llama_mini computes plain LoRA); merge the adapter with peft "
            "instead (merge_and_unload) and load the merged model"
        )
    modules = config.get("target_modules")
    if not isinstance(modules, list) or not modules or any(name not in _OUR_TARGETS for name in modules):
        raise CheckpointError(
            f"{where}: target_modules {modules!r} must be a list of {', '.join(_OUR_TARGETS)}; llama_mini "
            "reads adapters of a Llama's linear layers named that way"
        )
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or rank <= 0 or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise CheckpointError(f"{where}: r {rank!r} and lora_alpha {alpha!r} must be positive numbers")
    dropout = config.get("lora_dropout") or 0.0
    targets = {_OUR_TARGETS[name] for name in modules}
    return LoRASettings(
        rank=rank,
        alpha=float(alpha),
        dropout=float(dropout),
        targets=tuple(target for target in LORA_TARGETS if target in targets),
    )


_KEY = re.compile(
    re.escape(PEFT_PREFIX) + r"(model\.layers\.\d+\.\w+\.\w+)\.lora_([AB])(?:\.default)?\.weight"
)


def read_adapter(folder: str | os.PathLike, args: ModelArgs) -> StoredAdapter:
    """The adapter in `folder`, checked against a model of shape `args`: its settings, every tensor's name
    and shape (A (r, in), B (out, r)), finite values, and that each adapted layer has both A and B.
    Problems are CheckpointErrors naming the file."""
    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_WEIGHTS_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG_FILE}; point to a PEFT adapter folder")
    config = read_json(config_path)
    settings = _settings_from_config(config, config_path)
    if not weights_path.is_file():
        raise CheckpointError(
            f"{folder}: no {ADAPTER_WEIGHTS_FILE} (llama_mini reads safetensors, not adapter_model.bin); "
            "re-save the adapter with peft's save_pretrained"
        )
    with torch.device("meta"):  # the shapes a model of `args` has, at no cost
        shapes_model = Transformer(args)
    try:
        apply_lora(shapes_model, settings)
    except ConfigError as error:
        raise CheckpointError(f"{config_path}: {error}") from None
    expected = {
        _peft_key(layer, matrix): (layer, matrix, tuple(getattr(module, f"lora_{matrix}").weight.shape))
        for layer, module in lora_modules(shapes_model).items()
        for matrix in ("A", "B")
    }
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                stored = _KEY.fullmatch(key)
                canonical = f"{PEFT_PREFIX}{stored.group(1)}.lora_{stored.group(2)}.weight" if stored else key
                if canonical not in expected:
                    raise CheckpointError(
                        f"{weights_path}: unexpected tensor {key!r}; the adapter does not fit this model "
                        f"({args.n_layers} layers, targets {','.join(settings.targets)})"
                    )
                layer, matrix, shape = expected[canonical]
                tensor = handle.get_tensor(key)
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(
                        f"{weights_path}: tensor {key!r} has shape {list(tensor.shape)} but r "
                        f"{settings.rank} and the model need {list(shape)}: an adapter of another model"
                    )
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(f"{weights_path}: tensor {key!r} holds NaN or inf values")
                tensors[f"{layer}.lora_{matrix}.weight"] = _from_hf_rows(layer, matrix, tensor, args)
    except SafetensorError as error:
        raise CheckpointError(f"{weights_path}: is truncated or corrupted ({error}); re-save it") from None
    missing = [
        key for key, (layer, matrix, _) in expected.items() if f"{layer}.lora_{matrix}.weight" not in tensors
    ]
    if missing:
        shown = ", ".join(missing[:2]) + (f" and {len(missing) - 2} more" if len(missing) > 2 else "")
        raise CheckpointError(f"{weights_path}: missing tensor(s) {shown}; the adapter is incomplete")
    return StoredAdapter(settings, config.get("base_model_name_or_path"), tensors)


@torch.no_grad()
def load_adapter(model: nn.Module, folder: str | os.PathLike) -> LoRASettings:
    """Load the PEFT adapter in `folder` into `model` (a Transformer); returns its settings.

    A model without adapters gets them first (`apply_lora` with the adapter's settings, which freezes the
    base); a model that has them (a LoRA run being resumed) must have the same settings. The values are
    copied into the existing parameters, so an optimizer that holds them keeps holding them.
    """
    stored = read_adapter(folder, model.args)
    present = adapter_settings(model)
    if present is None:
        apply_lora(model, stored.settings)
    elif (present.rank, present.targets, present.alpha) != (
        stored.settings.rank,
        stored.settings.targets,
        stored.settings.alpha,
    ):
        raise CheckpointError(
            f"{folder}: the adapter has r {stored.settings.rank}, alpha {stored.settings.alpha:g}, targets "
            f"{','.join(stored.settings.targets)} but the model's adapters have r {present.rank}, alpha "
            f"{present.alpha:g}, targets {','.join(present.targets)}"
        )
    parameters = dict(model.named_parameters())
    for name, tensor in stored.tensors.items():
        parameters[name].copy_(tensor)
    return stored.settings


def merge_adapter(
    folder: str | os.PathLike, base: str | os.PathLike | None = None, dtype: torch.dtype | None = None
) -> tuple[Transformer, Path]:
    """The model of the PEFT adapter in `folder` merged into its base model, W + (alpha / r) B A: a plain
    Transformer, and the base folder it came from.

    The base is `base` if given; else `folder` itself when it holds a model too (config.json beside the
    adapter, which transformers also reads as base plus adapter); else the adapter's
    base_model_name_or_path when that is a local folder (a LoRA run writes its OUT/base there). The merge
    runs in float32 and the result is cast to `dtype` (default: the base's stored dtype).
    """
    folder = Path(folder)
    if base is None:
        named = read_json(folder / ADAPTER_CONFIG_FILE).get("base_model_name_or_path")
        if (folder / CONFIG_FILE).is_file():
            base = folder
        elif isinstance(named, str) and Path(named).is_dir():
            base = Path(named)
        else:
            raise CheckpointError(
                f"{folder}: its base model {named!r} is not a local folder; pass the base model's folder "
                "with --base"
            )
    model = load_model(base)
    stored = model.tok_embeddings.weight.dtype
    load_adapter(model.float(), folder)
    merge_lora(model)
    return model.to(dtype or stored).eval(), Path(base)


@torch.no_grad()
def merged_model(model: Transformer) -> Transformer:
    """A Transformer with `model`'s adapters merged, leaving `model` as it is (its training goes on).

    Built on the meta device and given tensors by assignment: every untargeted tensor is `model`'s own,
    shared, not copied, and only the merged matrices W + (alpha / r) B A are new. This is what a LoRA run's
    checkpoints save as model.safetensors, the fine-tuned model that every loader (generate.py, convert,
    transformers) reads.
    """
    modules = lora_modules(model)
    state = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if not any(key.startswith(name + ".") for name in modules):
            state[key] = tensor.detach()
    for name, module in modules.items():
        state[f"{name}.weight"] = module.merged_weight()
    with torch.device("meta"):
        merged = Transformer(model.args)
    return assign_weights(merged, state).train(model.training)
