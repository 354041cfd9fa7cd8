"""Checkpoint folders in and out: which format a folder is, its model's settings and tensors, and saving.

`save_pretrained` writes a folder that `transformers.LlamaForCausalLM.from_pretrained` loads as it is,
with the same logits:

    config.json              Hugging Face's Llama schema, plus a "llama_mini" section with our full ModelArgs
    model.safetensors        Hugging Face tensor names and Hugging Face's RoPE layout (hf.py)
    generation_config.json   bos/eos ids, and the sampling defaults it is given for transformers' `generate`
    tokenizer files          tokenizer.model (SentencePiece) and/or tokenizer.json, tokenizer_config.json
                             and special_tokens_map.json (when a tokenizer is given or already there)

Every file is replaced atomically and any other file is left alone, so training state saved beside the
weights (optimizer, metrics) survives a new save; transformers ignores files it does not know.

`load_model` reads three formats (through `open_checkpoint`) and builds the model:

    llama_mini    config.json with a "llama_mini" section: its ModelArgs win over the Hugging Face fields
    Hugging Face  config.json (model_type "llama") + model.safetensors, or the shards listed in
                  model.safetensors.index.json; GQA, tied or untied embeddings, any rope_theta and
                  rms_norm_eps, Llama 3.1's RoPE scaling, an explicit intermediate_size (hf.py)
    Meta          params.json + consolidated.NN.pth (one file per model-parallel shard), Meta's names and
                  RoPE layout, which are ours: no renaming or permutation (meta.py)

Every tensor is checked as it is read: its name, its shape against the config, and that every value is
finite. A problem is a CheckpointError whose one-line message names the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from llama_mini.checkpoint.common import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    META_PARAMS_FILE,
    RUN_BEST,
    RUN_STEP_PREFIX,
    WEIGHTS_FILE,
    WEIGHTS_INDEX_FILE,
    read_json,
    write_json,
)
from llama_mini.checkpoint.hf import (
    hf_config,
    hf_name,
    hf_tensors,
    is_hf_compatible,
    model_args_from_hf_config,
    not_hf_compatible_message,
    permute_from_hf,
    safetensors_files,
    to_hf_state_dict,
)
from llama_mini.checkpoint.meta import meta_args, meta_shards, meta_tensors
from llama_mini.errors import CheckpointError, DataError
from llama_mini.files import atomic_write
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.tokenizer import Tokenizer, find_tokenizer_file, is_sentencepiece_model

__all__ = [
    "StoredCheckpoint",
    "assign_weights",
    "describe_resolution",
    "detect_format",
    "find_tokenizer",
    "load_model",
    "open_checkpoint",
    "read_model_args",
    "resolve_checkpoint",
    "save_pretrained",
    "unwrap_model",
]

# (our name, name in the file, file, tensor as stored): what a format's reader yields, one at a time
StoredTensor = tuple[str, str, "Path | str", torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Which folder, which format
# ---------------------------------------------------------------------------------------------------------


def _is_checkpoint(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() or (folder / META_PARAMS_FILE).is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint folder that `path` names: `path` itself, or, for a training run folder, its best/
    checkpoint, else its latest step-*/ one. Commands that take a checkpoint accept either, and say on
    stderr which checkpoint of a run they loaded (`describe_resolution`)."""
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"checkpoint folder {folder} does not exist; check the path")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass the checkpoint folder that holds it")
    if _is_checkpoint(folder):
        return folder
    if _is_checkpoint(folder / RUN_BEST):
        return folder / RUN_BEST
    steps = sorted(
        step for step in folder.glob(f"{RUN_STEP_PREFIX}*") if step.is_dir() and _is_checkpoint(step)
    )
    if steps:
        return steps[-1]
    return folder  # detect_format names what is missing


def describe_resolution(path: str | os.PathLike) -> str | None:
    """ "loading RUN/best" when `path` is a run folder (so the user knows which checkpoint), else None."""
    resolved = resolve_checkpoint(path)
    return None if resolved == Path(path) else f"loading {resolved} (the checkpoint of run folder {path})"


def detect_format(path: str | os.PathLike) -> str:
    """Which kind of checkpoint folder `path` is: "llama_mini", "hf" or "meta" (CheckpointError if none)."""
    folder = resolve_checkpoint(path)
    if (folder / CONFIG_FILE).is_file():
        return "llama_mini" if "llama_mini" in read_json(folder / CONFIG_FILE) else "hf"
    if (folder / META_PARAMS_FILE).is_file():
        return "meta"
    raise CheckpointError(
        f"{folder} has neither {CONFIG_FILE} (Hugging Face / llama_mini) nor {META_PARAMS_FILE} (Meta), "
        f"nor {RUN_BEST}/ or {RUN_STEP_PREFIX}*/ checkpoints of a training run; point to a checkpoint or "
        "run folder"
    )


def find_tokenizer(path: str | os.PathLike) -> Path | None:
    """The tokenizer file of a checkpoint folder (or `path` itself if it is a .model or .json file), or None:
    its tokenizer.model (unless that is Llama 3's tiktoken file), else its tokenizer.json."""
    return find_tokenizer_file(path)


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


def read_model_args(path: str | os.PathLike) -> ModelArgs:
    """The ModelArgs of a checkpoint folder, from its config (Meta's format also reads weight shapes)."""
    folder = resolve_checkpoint(path)
    if detect_format(folder) == "meta":
        return meta_args(folder, meta_shards(folder)[1])
    return model_args_from_hf_config(read_json(folder / CONFIG_FILE), folder / CONFIG_FILE)


@dataclass
class StoredCheckpoint:
    """A checkpoint as stored: its model's settings and a one-pass stream of its tensors.

    `load_state_dict` checks each tensor against the shapes a model built from `args` expects and turns the
    stream into a state dict in our names and RoPE layout; `load_model` does the rest.
    """

    args: ModelArgs
    tensors: Iterator[StoredTensor]
    weights: Path | str  # the file(s) the tensors come from, for messages
    hf_layout: bool  # Hugging Face's names and RoPE layout (else Meta's, which are ours)

    def load_state_dict(
        self,
        expected: dict[str, tuple[int, ...]],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every tensor, checked and in our layout, on `device` (default CPU) and, if floating point, in
        `dtype` (None keeps the stored one). `expected`: our name -> shape, from the model on the meta
        device; a tied output matrix is expected once, as the embedding.

        Each tensor is checked before it is used (its name, its shape, finite values), and every expected
        one must be found. The tensors are read one at a time, so a large model is never held twice.
        """
        args, device = self.args, torch.device(device) if device is not None else torch.device("cpu")
        expected = dict(expected)
        if args.tie_embeddings:
            expected.pop("output.weight", None)  # stored once, as the embedding
        loaded: dict[str, torch.Tensor] = {}
        for ours, stored, file, tensor in self.tensors:
            if ours not in expected:
                if ours == "output.weight":  # a tied model's file may carry the shared matrix twice
                    continue
                raise CheckpointError(
                    f"{file}: unexpected tensor {stored!r}; the weights and config disagree"
                )
            if tuple(tensor.shape) != expected[ours]:
                raise CheckpointError(
                    f"{file}: tensor {stored!r} has shape {list(tensor.shape)} but the config needs "
                    f"{list(expected[ours])}; the weights and config come from different models"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                # What a diverged run leaves behind; generating from it would sample from NaN logits.
                raise CheckpointError(
                    f"{file}: tensor {stored!r} holds non-finite values (NaN or inf), as a diverged run "
                    "leaves behind; load an earlier checkpoint of that run"
                )
            if self.hf_layout and ours.endswith("attention.wq.weight"):
                tensor = permute_from_hf(tensor, args.n_heads)
            elif self.hf_layout and ours.endswith("attention.wk.weight"):
                tensor = permute_from_hf(tensor, args.n_kv_heads)
            cast = dtype if dtype is not None and tensor.is_floating_point() else None
            loaded[ours] = tensor.to(device=device, dtype=cast).contiguous()
        missing = [name for name in expected if name not in loaded]
        if missing:
            missing = (
                [hf_name(name) for name in missing] if self.hf_layout else missing
            )  # as the file has them
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise CheckpointError(f"{self.weights}: missing tensor(s) {shown}; the weights are incomplete")
        return loaded


def open_checkpoint(path: str | os.PathLike) -> StoredCheckpoint:
    """A llama_mini, Hugging Face Llama or Meta checkpoint folder (or a run folder: its best/), ready to
    load. Missing files, corrupted weights and unsupported architectures are CheckpointErrors."""
    folder = resolve_checkpoint(path)
    if detect_format(folder) == "meta":
        files, shards = meta_shards(folder)
        source = (
            str(files[0]) if len(files) == 1 else f"{folder / 'consolidated.*.pth'} ({len(files)} shards)"
        )
        return StoredCheckpoint(
            meta_args(folder, shards), meta_tensors(shards, source), source, hf_layout=False
        )
    args = model_args_from_hf_config(read_json(folder / CONFIG_FILE), folder / CONFIG_FILE)
    files = safetensors_files(folder)
    weights = files[0] if len(files) == 1 else folder / WEIGHTS_INDEX_FILE
    return StoredCheckpoint(args, hf_tensors(files), weights, hf_layout=True)


# ---------------------------------------------------------------------------------------------------------
# Loading: where weights meet a built model
# ---------------------------------------------------------------------------------------------------------


def load_model(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    args: ModelArgs | None = None,
) -> Transformer:
    """The model of a checkpoint folder: llama_mini's own, Hugging Face Llama, or Meta's original format (or
    a training run folder: its best/ checkpoint), in eval mode.

    device: where the weights go (default CPU); dtype: cast floating-point weights to it as they load (None
    keeps the stored dtype). args: the checkpoint's own ModelArgs with settings no weight depends on changed
    (max_seq_len, dropout), for training; default the stored ones. RoPE's table is float32 whatever dtype.
    """
    stored = open_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(args if args is not None else stored.args)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    return assign_weights(model, stored.load_state_dict(expected, device, dtype), device).eval()


def assign_weights(
    model: Transformer, state: dict[str, torch.Tensor], device: torch.device | str | None = None
) -> Transformer:
    """Make the tensors of `state` the parameters of `model` (usually built on the meta device), in place.

    This is the one place where weights meet a built model, whatever their source: a checkpoint file
    (`load_model`), the pieces FSDP gathers for saving, or a LoRA model's merged matrices. On the meta device
    tensors have shapes but no memory, so building there costs nothing, and `load_state_dict(assign=True)`
    makes the given tensors themselves the parameters: a large model is never held twice. Two things are not
    in a state dict and are restored here: the tie between the embedding and the output matrix (assignment
    replaced the shared Parameter with two), and RoPE's table (not stored: computed, in float32, on
    `device`, default the embedding's device). A tied model's `output.weight` may be missing from `state`;
    any other missing or unexpected name is a CheckpointError.
    """
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if model.args.tie_embeddings:
        missing = [name for name in missing if name != "output.weight"]
        model.output.weight = model.tok_embeddings.weight
    if missing or unexpected:
        raise CheckpointError(
            f"the weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
            "the weights and config come from different models"
        )
    model.rope.rotations = model.rope.table(
        device if device is not None else model.tok_embeddings.weight.device
    )
    return model


# ---------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's (`_orig_mod`), DDP's (`module`) and the training loss's (`model`)
    wrappers: the innermost module that has `args` (ModelArgs), or `model` itself."""
    while not isinstance(getattr(model, "args", None), ModelArgs):
        inner = next(
            (getattr(model, name) for name in ("_orig_mod", "module", "model")
             if isinstance(getattr(model, name, None), nn.Module)),
            None,
        )  # fmt: skip
        if inner is None:
            raise CheckpointError(
                f"cannot save a {type(model).__name__}: pass a llama_mini Transformer "
                "(bare or wrapped by torch.compile / DistributedDataParallel)"
            )
        model = inner
    return model


def _read_tokenizer(path: Path) -> Tokenizer:
    """The Tokenizer in `path` (a file from find_tokenizer), already converted to tokenizer.json once, so
    that a tokenizer with no exact tokenizer.json fails here, before anything is written."""
    if path.suffix == ".model" and not is_sentencepiece_model(path):
        raise CheckpointError(
            f"{path}: not a SentencePiece model; pass a tokenizer.model made by sentencepiece, "
            f"or a tokenizer.json"
        )
    try:
        tokenizer = Tokenizer(path)
        tokenizer.tokenizer_json()
    except DataError as error:
        raise CheckpointError(str(error)) from None
    return tokenizer


def save_pretrained(
    model: nn.Module,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    require_hf: bool = False,
    sampling: Any = None,
) -> None:
    """Write `model` as a checkpoint folder (see the module docstring); other files in it are left alone.

    model: a Transformer, bare or wrapped by torch.compile / DDP / the training loss (their prefixes
        never reach the file).
    dtype: cast the floating-point tensors to it (e.g. torch.bfloat16 halves the file); None keeps them.
    tokenizer_path: a tokenizer.model or tokenizer.json (or a folder holding one, see find_tokenizer) whose
        files `Tokenizer.save_pretrained` writes in: a SentencePiece model with the tokenizer.json made
        from it. Without it, a tokenizer already in the folder is kept and its files rewritten. The bos/eos
        ids come from the tokenizer (else 1 and 2).
    require_hf: refuse (CheckpointError) a model that transformers cannot load, instead of writing a
        llama_mini-only folder.
    sampling: how transformers' `generate` should sample by default (anything with `temperature` and
        `top_p`, such as llama_mini.generation.SamplingConfig(), which the trainer and convert pass: one
        home for the project's sampling defaults); None writes greedy decoding.
    """
    model = unwrap_model(model)
    args = model.args
    if require_hf and not is_hf_compatible(args):
        raise CheckpointError(not_hf_compatible_message(args))
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; save_pretrained needs a folder path")

    tokenizer_source = find_tokenizer(tokenizer_path if tokenizer_path is not None else folder)
    if tokenizer_path is not None and tokenizer_source is None:
        raise CheckpointError(f"{tokenizer_path}: no tokenizer.model or tokenizer.json there; check the path")
    tokenizer = _read_tokenizer(tokenizer_source) if tokenizer_source is not None else None
    bos = (tokenizer.bos_id if tokenizer.bos_id >= 0 else None) if tokenizer else 1
    eos = (tokenizer.eos_id if tokenizer.eos_id >= 0 else None) if tokenizer else 2
    folder.mkdir(parents=True, exist_ok=True)  # only now that every input is known to be good

    tensors = to_hf_state_dict(model.state_dict(), args, dtype)
    stored_dtype = tensors["model.embed_tokens.weight"].dtype
    intermediate_size = tensors["model.layers.0.mlp.down_proj.weight"].shape[1]

    # Weights first and config.json last: a folder whose config.json is new has new weights too.
    if tokenizer is not None:
        tokenizer.save_pretrained(folder, model_max_length=args.max_seq_len)
    atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    # Several end ids (Llama 3: end of text, end of turn, ...) go to generation_config as a list.
    eos_ids = list(tokenizer.eos_ids) if tokenizer is not None and len(tokenizer.eos_ids) > 1 else eos
    generation = {"bos_token_id": bos, "eos_token_id": eos_ids, "max_length": args.max_seq_len}
    if sampling is not None and sampling.temperature > 0:
        generation.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p or 1.0)
    else:
        generation["do_sample"] = False
    write_json(folder / GENERATION_CONFIG_FILE, generation)
    write_json(folder / CONFIG_FILE, hf_config(args, intermediate_size, stored_dtype, bos, eos))
