"""Checkpoints: Hugging Face Llama folders by default, plus import of Meta's original format and GGUF export.

    io.py      which folder and format; reading a checkpoint's settings and tensors; save_pretrained
    hf.py      the Hugging Face format: names, RoPE layout, config.json
    meta.py    Meta's params.json and consolidated.NN.pth
    common.py  file names and what the formats share

`load_model(path)` and `save_pretrained(model, path)` are the way in and out (also exported by the package
root: `from llama_mini import load_model`); `assign_weights` is the one place where weights meet a built
model. The model itself reads no files: this package imports it, never the other way round.
"""

from llama_mini.checkpoint.common import RUN_BEST, RUN_STEP_PREFIX
from llama_mini.checkpoint.hf import (
    FORMAT_VERSION,
    HF_ACTIVATIONS,
    hf_config,
    is_hf_compatible,
    model_args_from_hf_config,
    permute_for_hf,
    permute_from_hf,
    to_hf_state_dict,
)
from llama_mini.checkpoint.io import (
    StoredCheckpoint,
    assign_weights,
    describe_resolution,
    detect_format,
    find_tokenizer,
    load_model,
    open_checkpoint,
    read_model_args,
    resolve_checkpoint,
    save_pretrained,
    unwrap_model,
)
from llama_mini.checkpoint.meta import model_args_from_meta_params

__all__ = [
    "FORMAT_VERSION",
    "HF_ACTIVATIONS",
    "RUN_BEST",
    "RUN_STEP_PREFIX",
    "StoredCheckpoint",
    "assign_weights",
    "describe_resolution",
    "detect_format",
    "find_tokenizer",
    "hf_config",
    "is_hf_compatible",
    "load_model",
    "model_args_from_hf_config",
    "model_args_from_meta_params",
    "open_checkpoint",
    "permute_for_hf",
    "permute_from_hf",
    "read_model_args",
    "resolve_checkpoint",
    "save_pretrained",
    "to_hf_state_dict",
    "unwrap_model",
]
