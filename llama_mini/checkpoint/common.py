"""What the checkpoint formats share: file names, JSON files, and the names torch wrappers add.

A checkpoint is a folder. Its files, by format:

    llama_mini / Hugging Face   config.json, model.safetensors (or model.safetensors.index.json and shards),
                                generation_config.json, tokenizer files
    Meta                        params.json, consolidated.NN.pth, tokenizer.model

A training run folder holds checkpoints instead: RUN_BEST/ and RUN_STEP_PREFIX*/ (train/run_folder.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llama_mini.errors import CheckpointError
from llama_mini.files import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.model"
META_PARAMS_FILE = "params.json"

# A training run folder (train.py --out) holds checkpoints, not weights: best/ (lowest validation loss) and
# step-NNNNNNN/ (the latest few). A folder carries its final name only once it is complete.
RUN_BEST = "best"
RUN_STEP_PREFIX = "step-"

# Tensors some files carry that are recomputed from the config, never loaded: RoPE tables saved by old
# transformers versions (per layer) and by Meta's LLaMA 1/2 code.
IGNORED_TENSORS = re.compile(r"(model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq|rope\.freqs)")


def strip_wrapper_prefixes(name: str) -> str:
    """Drop what torch.compile ("_orig_mod.", also inside, for compiled blocks) and DDP ("module.") add."""
    parts = [part for part in name.split(".") if part != "_orig_mod"]
    while len(parts) > 1 and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: cannot be read ({type(error).__name__}); check the file") from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error}); re-save or re-download it") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}; check the file")
    return value


def write_json(target: Path, value: dict[str, Any]) -> None:
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n"))
