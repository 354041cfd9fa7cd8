"""Meta's original format: params.json and consolidated.NN.pth, one file per model-parallel shard.

Meta's names and RoPE layout are ours, so nothing is renamed or permuted; the shards are merged along the
dimension Meta's model-parallel layers split (`_meta_shard_dim`). The .pth files are pickles: they are read
with torch.load(weights_only=True), which unpickles tensors and containers only and refuses anything that
could run code.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from llama_mini.checkpoint.common import IGNORED_TENSORS, META_PARAMS_FILE, read_json, strip_wrapper_prefixes
from llama_mini.errors import CheckpointError, ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.ffn import llama_hidden_dim

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
    if w1_shape is not None and w1_shape[0] != llama_hidden_dim(params["dim"], multiple_of, multiplier):
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
# Reading the shards
# ---------------------------------------------------------------------------------------------------------


def torch_load(file: Path) -> dict[str, torch.Tensor]:
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
        if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
            # weights_only refused a pickled object: the file is whole, but holds more than tensors.
            raise CheckpointError(
                f"{file}: holds Python objects other than tensors, which are not loaded for safety "
                "(unpickling them could run code); if the file is yours and trusted, load it with your own "
                "code and save its state_dict"
            ) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{file}: is truncated or corrupted ({first_line}); re-download or re-save it"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (a state_dict); not a Meta weights file")
    return {strip_wrapper_prefixes(name): value for name, value in state.items()}


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


def meta_shards(folder: Path) -> tuple[list[Path], list[dict[str, torch.Tensor]]]:
    """Meta's consolidated.NN.pth files, in order, and their (memory-mapped) state dicts."""
    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: has {META_PARAMS_FILE} but no consolidated.*.pth; add the weights")
    shards = [torch_load(file) for file in files]
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
        if IGNORED_TENSORS.fullmatch(name):
            continue
        shape, dim = list(tensor.shape), _meta_shard_dim(name)
        if dim is not None and dim < tensor.ndim:
            shape[dim] = sum(shard[name].shape[dim] for shard in shards)
        shapes[name] = tuple(shape)
    return shapes


def meta_tensors(
    shards: list[dict[str, torch.Tensor]], source: str
) -> Iterator[tuple[str, str, Path | str, torch.Tensor]]:
    """Each merged tensor in turn: split ones concatenated along their dimension, replicated ones once."""
    for name in _meta_shapes(shards):
        dim = _meta_shard_dim(name)
        if len(shards) == 1 or dim is None or dim >= shards[0][name].ndim:
            yield name, name, source, shards[0][name]
        else:
            yield name, name, source, torch.cat([shard[name] for shard in shards], dim=dim)


def meta_args(folder: Path, shards: list[dict[str, torch.Tensor]]) -> ModelArgs:
    params_path = folder / META_PARAMS_FILE
    return model_args_from_meta_params(read_json(params_path), _meta_shapes(shards), params_path)
