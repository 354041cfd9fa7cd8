"""A checkpoint and its tokenizer, loaded for evaluation (`llama-mini eval`, the harness's model class)."""

from __future__ import annotations

from pathlib import Path

import torch

from llama_mini.checkpoint import find_tokenizer, load_model, resolve_checkpoint
from llama_mini.errors import CheckpointError
from llama_mini.model.transformer import Transformer
from llama_mini.ops.quantize import QuantizeSettings, check_quantize, quantize
from llama_mini.tokenizer import Tokenizer

__all__ = ["load_model_and_tokenizer"]


def load_model_and_tokenizer(
    checkpoint: str | Path,
    tokenizer: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    quantization: QuantizeSettings | None = None,
) -> tuple[Transformer, Tokenizer]:
    """The model of a checkpoint folder (llama_mini, Hugging Face, Meta, or a run folder's best/) and its
    tokenizer (or `tokenizer`, a tokenizer.model / tokenizer.json file or folder); CheckpointError when the
    folder does not exist or has no tokenizer. With `quantization`, the linear layers are quantized
    (llama_mini.ops.quantize); a scheme the device cannot run is a ConfigError before loading."""
    quantization = quantization or QuantizeSettings()
    check_quantize(quantization.quantize, quantization.group_size, device or "cpu")
    folder = Path(checkpoint)
    if not folder.exists():
        raise CheckpointError(
            f"checkpoint {folder} does not exist: pass a run folder, a checkpoint folder written by "
            f"save_pretrained, or a Hugging Face or Meta Llama folder"
        )
    folder = Path(resolve_checkpoint(folder))
    if tokenizer is not None and not Path(tokenizer).exists():
        raise CheckpointError(
            f"--tokenizer {tokenizer} does not exist: pass the model's tokenizer.model or .json"
        )
    path = find_tokenizer(tokenizer if tokenizer is not None else folder)
    if path is None:
        where = f"--tokenizer {tokenizer}" if tokenizer is not None else f"checkpoint {folder}"
        raise CheckpointError(
            f"{where} has no tokenizer (tokenizer.model or tokenizer.json): pass --tokenizer with the one "
            f"the model was trained with"
        )
    tokens = Tokenizer(path)
    model = load_model(folder, device=device, dtype=dtype)
    quantize(model, quantization.quantize, quantization.group_size)
    if tokens.vocab_size > model.args.vocab_size:
        raise CheckpointError(
            f"the tokenizer has {tokens.vocab_size} pieces but the model only {model.args.vocab_size}: "
            f"pass the tokenizer the model was trained with (--tokenizer)"
        )
    return model, tokens
