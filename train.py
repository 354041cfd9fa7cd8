"""Train a llama_mini model: `python train.py` learns the default corpus (Shakespeare) on the device at hand.

    python train.py                                   # small model, default corpus, a few minutes on a CPU
    python train.py --data my_texts/ --out runs/mine  # your own .txt folder, .txt file or .jsonl
    python train.py --preset stories15m --max-steps 5000 --batch-size 64
    python train.py --out runs/mine --resume          # continue exactly where a run stopped
    torchrun --nproc_per_node=8 train.py --preset stories110m ...   # data-parallel on 8 GPUs

A thin command line over llama_mini.training: flags map to TrainConfig and ModelArgs fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import typing

from llama_mini.cli import ArgumentParser, report_errors
from llama_mini.fast_paths import ATTENTION_BACKENDS
from llama_mini.ffn import FEED_FORWARDS
from llama_mini.kernels import SWIGLU_KERNELS
from llama_mini.model import ModelArgs
from llama_mini.presets import PRESETS
from llama_mini.training import TrainConfig, Trainer

TRAIN_HELP = {
    "data": "corpus: shakespeare, tinystories, a .txt file, a folder of .txt files, or a .jsonl with 'text'",
    "out": "run folder: checkpoints (step-*/, best/), tokenizer, prepared data, metrics.jsonl",
    "preset": f"model shape by name ({', '.join(PRESETS)}); model flags override single fields",
    "tokenizer": "an existing sentencepiece tokenizer.model to use instead of training one on the corpus",
    "vocab_size": "vocabulary of the tokenizer trained on the corpus",
    "val_fraction": "share of the corpus's documents held out for validation",
    "split_seed": "chooses the validation documents (independent of --seed, so seeds share a split)",
    "data_dir": "folder for the tokenized shards (default: OUT/data); runs on one corpus can share it",
    "max_steps": "optimizer steps to train for",
    "batch_size": "sequences per micro-step, shared out over all processes under torchrun",
    "grad_accum": "micro-steps per optimizer step (tokens per step = batch size x grad accum x max seq len)",
    "lr": "peak learning rate, reached at the end of warmup",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_steps": "steps of linear warmup from 0 to --lr",
    "weight_decay": "AdamW weight decay, on matrices only",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "eval_interval": "steps between evaluations; each evaluation also saves a checkpoint",
    "eval_steps": "validation batches per evaluation",
    "log_interval": "steps between lines of metrics.jsonl and progress updates",
    "keep_last": "step checkpoints to keep (besides best/)",
    "seed": "seeds the weights and the data order",
    "device": "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps",
    "dtype": "auto (bf16 on recent GPUs, fp16 on older ones, fp32 on CPU/MPS), fp32, bf16 or fp16",
    "compile": "torch.compile the model and its loss (None = on for CUDA, off elsewhere)",
    "fused_adamw": "AdamW's fused kernel (None = on for CUDA, off elsewhere)",
    "attention": "SDPA kernel: auto (PyTorch chooses), flash, efficient, cudnn, or math (the plain one)",
    "swiglu_kernel": "SwiGLU activation: auto, eager (the plain one), compiled or triton (fused)",
    "loss_chunk_size": "compute the output layer and loss this many tokens at a time, never holding all "
    "the logits (0 = off; None = auto, by vocabulary and batch size)",
    "peak_tflops": "the device's peak TFLOP/s for MFU (default: looked up for known GPUs)",
    "sample_tokens": "tokens to sample at the end to show what the model learned (0 = none)",
    "sample_prompt": "the prompt of that sample",
}
MODEL_HELP = {
    "dim": "model width",
    "n_layers": "Transformer blocks",
    "n_heads": "query heads (head dim = dim / n_heads)",
    "n_kv_heads": "key/value heads for grouped-query attention (default: n_heads)",
    "vocab_size": None,  # set by the tokenizer: --vocab-size belongs to the tokenizer flags
    "multiple_of": "round the FFN hidden size up to a multiple of this",
    "ffn_dim_multiplier": "widen the FFN hidden size by this factor",
    "hidden_dim": "exact FFN hidden size (default: LLaMA's rule from dim)",
    "norm_eps": "RMSNorm epsilon",
    "rope_theta": "RoPE base",
    "max_seq_len": "context length in tokens",
    "dropout": "dropout on attention and residual branches",
    "tie_embeddings": "share the input embedding and output matrices",
    "ffn": f"feed-forward variant: {', '.join(FEED_FORWARDS)}",
    "swish_beta": "beta of --ffn swish",
    "swish_beta_trainable": "learn swish's beta",
}


def optional_number(kind: type) -> typing.Callable[[str], typing.Any]:
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def add_dataclass_flags(group, cls: type, helps: dict[str, str | None], defaults: object) -> None:
    """One flag per field (dashes for underscores). Flags not given stay out of the parsed namespace
    (argparse.SUPPRESS), so the code can tell explicit choices from defaults."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        help_text = helps.get(field.name)
        if help_text is None:
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = getattr(defaults, field.name)
        shown = f"{help_text} (default: {default})"
        options = {"default": argparse.SUPPRESS, "help": shown}
        if kind in (bool, bool | None):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
        options["type"] = optional_number(base) if type(None) in typing.get_args(kind) else base
        if field.name == "ffn":
            options["choices"] = list(FEED_FORWARDS)
        elif field.name == "dtype":
            options["choices"] = ["auto", "fp32", "bf16", "fp16"]
        elif field.name == "attention":
            options["choices"] = list(ATTENTION_BACKENDS)
        elif field.name == "swiglu_kernel":
            options["choices"] = ["auto", *SWIGLU_KERNELS]
        elif field.name == "preset":
            options["type"], options["choices"] = str, list(PRESETS)
        group.add_argument(flag, metavar=field.name.upper(), **options)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description="Train a LLaMA-style model on a corpus (default: the complete works of Shakespeare).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Model flags apply on top of --preset; on --resume the checkpoint's settings win over "
        "defaults, and flags given explicitly (e.g. a larger --max-steps) change them.",
    )
    parser.add_argument("--resume", action="store_true", help="continue the latest checkpoint in --out")
    add_dataclass_flags(parser.add_argument_group("training"), TrainConfig, TRAIN_HELP, TrainConfig())
    add_dataclass_flags(parser.add_argument_group("model"), ModelArgs, MODEL_HELP, ModelArgs())
    return parser


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    return report_errors(lambda: train(given))


def train(given: dict) -> int:
    resume = given.pop("resume")
    model_fields = {field.name for field in dataclasses.fields(ModelArgs)} - {"vocab_size"}
    model_overrides = {name: value for name, value in given.items() if name in model_fields}
    train_settings = {name: value for name, value in given.items() if name not in model_fields}
    # On --resume the checkpoint's settings are the base, so only --out is needed to find it; the flags
    # given are applied on top of the saved settings (and validated together) by the Trainer.
    config = TrainConfig(out=train_settings.get("out", "out")) if resume else TrainConfig(**train_settings)
    trainer = Trainer(config, model_overrides, resume=resume, resume_overrides=train_settings)
    summary = trainer.run()
    if not trainer.dist.is_main:
        return 0
    if summary.interrupted:
        print(
            f"interrupted at step {summary.step}: saved {summary.checkpoint}; "
            f"continue with: python train.py --out {trainer.config.out} --resume",
            file=sys.stderr,
        )
        return 128 + (trainer.stop_signal or signal.SIGINT)  # the shell's convention: 130 for Ctrl-C
    if summary.sample is not None:
        print(f"\n--- sample ---\n{summary.sample}\n--------------")
    val = f"val loss {summary.val_loss:.4f}, {summary.val_bpb:.3f} bits/byte, " if summary.val_loss else ""
    print(
        f"done: {summary.step} steps, {summary.tokens:,} tokens in {summary.seconds:.0f} s "
        f"({summary.tokens_per_second:,.0f} tokens/s); {val}best checkpoint {trainer.out / 'best'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
