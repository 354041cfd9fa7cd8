"""The model a run starts from: random weights, or a pretrained checkpoint's (--init-from), either whole or
frozen with fresh LoRA adapters (--lora-rank).

    resolve_init_from(config, overrides, lora)   a new fine-tuning run: the checkpoint, its shape, tokenizer
    build_model(args, device, ...)               the starting model on a device (one process, DDP, or FSDP's
                                                 main process before it broadcasts the weights)
    skeleton(args, lora)                         the same structure on the meta device (FSDP, checkpoints)

A LoRA run keeps its frozen base once, as a Hugging Face folder in OUT/base (LORA_BASE), written when the run
starts: a resumed run reads its base from there and never reads --init-from again, so the checkpoint it was
initialised from may change or go. A resumed full run starts from random weights, like any resumed run;
its checkpoint then replaces every trainable weight.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llama_mini.checkpoint import load_model, open_checkpoint, resolve_checkpoint, save_pretrained
from llama_mini.errors import CheckpointError, ConfigError
from llama_mini.files import write_folder_atomically
from llama_mini.model.args import ModelArgs
from llama_mini.model.rounding import round_up
from llama_mini.model.transformer import Transformer
from llama_mini.ops.lora import LoRASettings, apply_lora, check_lora_targets, parse_lora_targets
from llama_mini.tokenizer import Tokenizer, find_tokenizer_file, is_sentencepiece_model
from llama_mini.train.config import TrainConfig

__all__ = [
    "ADJUSTABLE_WHEN_FINE_TUNING",
    "LORA_BASE",
    "build_model",
    "load_pretrained",
    "lora_from_config",
    "resolve_init_from",
    "skeleton",
]

LORA_BASE = "base"  # OUT/base/: a LoRA run's frozen base model, a Hugging Face folder written once

# Model settings that a fine-tuning run may set apart from its --init-from checkpoint: no weight depends on
# them. max_seq_len is the training window (a model with a long context trains on shorter windows too).
ADJUSTABLE_WHEN_FINE_TUNING = ("max_seq_len", "dropout")


def lora_from_config(config: TrainConfig) -> LoRASettings | None:
    """The LoRA adapters a run trains, or None for full training."""
    if not config.lora_rank:
        return None
    targets = parse_lora_targets(config.lora_targets)
    return LoRASettings(config.lora_rank, config.lora_alpha, config.lora_dropout, targets)


def resolve_init_from(
    config: TrainConfig, model_overrides: dict[str, Any], lora: LoRASettings | None
) -> tuple[Path, TrainConfig, dict[str, Any]]:
    """A new run with --init-from: (the checkpoint folder, `config` with its tokenizer, the model settings).

    Model settings given (flags, a config file) must agree with the checkpoint, except those in
    ADJUSTABLE_WHEN_FINE_TUNING. The checkpoint's tokenizer becomes the run's --tokenizer (unless one is
    given), so the corpus is prepared with it and no tokenizer is trained. Everything is checked here,
    before the data are prepared: the folder, its config and weight files (not yet read), the tokenizer
    against the model's vocabulary, the LoRA targets against the model's layers.
    """
    try:
        folder = resolve_checkpoint(config.init_from)
        args = open_checkpoint(folder).args  # its config and weight files are there; read later
    except CheckpointError as error:
        raise CheckpointError(f"--init-from: {error}") from None
    saved = args.to_dict()
    conflicts = [
        f"--{name.replace('_', '-')} {value} (the checkpoint has {saved.get(name)})"
        for name, value in model_overrides.items()
        if name not in ADJUSTABLE_WHEN_FINE_TUNING and saved.get(name) != value
    ]
    if conflicts:
        raise ConfigError(
            f"{', '.join(conflicts)} contradicts --init-from {folder}: the model's shape comes from the "
            "checkpoint; drop the flag"
        )
    adjusted = {name: value for name, value in model_overrides.items() if name in ADJUSTABLE_WHEN_FINE_TUNING}
    args = ModelArgs.from_dict({**saved, **adjusted})
    tokenizer = _pretrained_tokenizer(config.tokenizer, folder, args)
    if lora is not None:
        check_lora_targets(args, lora.targets)
    return folder, config.replace(tokenizer=str(tokenizer)), args.to_dict()


def _pretrained_tokenizer(given: str | None, folder: Path, args: ModelArgs) -> Path:
    """The tokenizer file of a fine-tuning run: `given` (--tokenizer) if set, else the checkpoint's. Its
    vocabulary must be the model's, whose embedding may be padded past it, to a multiple of 256 at most
    (ids beyond the tokenizer's never occur in the data)."""
    path = find_tokenizer_file(given if given is not None else folder)
    if given is None and (path is None or (path.suffix == ".model" and not is_sentencepiece_model(path))):
        raise ConfigError(
            f"--init-from {folder} has no tokenizer llama_mini reads (a SentencePiece tokenizer.model or "
            "a tokenizer.json): pass --tokenizer with the tokenizer the model was trained with"
        )
    tokenizer = Tokenizer(path if path is not None else given)  # DataError: a missing or broken file
    if not tokenizer.vocab_size <= args.vocab_size <= round_up(tokenizer.vocab_size, 256):
        raise ConfigError(
            f"tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} tokens but the model of "
            f"--init-from {folder} has {args.vocab_size}: pass --tokenizer with the tokenizer the model "
            "was trained with"
        )
    return tokenizer.model_path


def build_model(
    args: ModelArgs,
    device: torch.device,
    lora: LoRASettings | None = None,
    init_folder: Path | None = None,
    base_folder: Path | None = None,
    resuming: bool = False,
    write_base: bool = False,
    tokenizer_path: Path | None = None,
) -> Transformer:
    """The model before a resumed run's checkpoint is loaded into it, on `device`.

    From scratch: random weights (drawn from torch's generator as seeded by the caller). A new fine-tuning
    run: the weights of `init_folder`. With LoRA: the frozen base, from `init_folder` on a new run (written
    to `base_folder` with `tokenizer_path` when `write_base`: on the main process) or read back from
    `base_folder` on resume, with fresh adapters, which the resumed checkpoint's then replace.
    """
    if lora is not None and resuming:
        model = load_pretrained(base_folder, args, device)
    elif init_folder is not None:
        model = load_pretrained(init_folder, args, device)
        if lora is not None and write_base:
            write_folder_atomically(
                base_folder, lambda folder: save_pretrained(model, folder, tokenizer_path=tokenizer_path)
            )
    else:
        return Transformer(args).to(device)
    if lora is not None:
        apply_lora(model, lora)
    return model


def skeleton(args: ModelArgs, lora: LoRASettings | None = None) -> Transformer:
    """The model's structure (with LoRA's adapters, if any) on the meta device: shapes, no memory."""
    with torch.device("meta"):
        model = Transformer(args)
    if lora is not None:
        apply_lora(model, lora)
    return model


def load_pretrained(folder: Path, args: ModelArgs, device: torch.device) -> Transformer:
    """The weights of checkpoint `folder` in a Transformer of shape `args`, in float32 on `device`.

    `args` is the checkpoint's own, perhaps with another max_seq_len or dropout (which no weight depends
    on). float32: training keeps float32 master weights, as from scratch, and autocast computes in bf16
    where the device has it.
    """
    return load_model(folder, device, torch.float32, args=args).train()
