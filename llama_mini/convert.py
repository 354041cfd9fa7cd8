"""Convert a checkpoint into a llama_mini folder that is also a Hugging Face Llama folder.

    python -m llama_mini.convert SRC DST [--dtype bf16|fp16|fp32] [--tokenizer PATH] [--force]

SRC is any folder `Transformer.from_pretrained` reads: llama_mini's own, Hugging Face Llama (single or
sharded safetensors) or Meta's original (params.json + consolidated.*.pth). DST gets config.json,
model.safetensors, generation_config.json and, when SRC has a SentencePiece tokenizer.model (or --tokenizer
names one), the tokenizer files; transformers' LlamaForCausalLM and AutoTokenizer load it as it is.
Models with a non-gated feed-forward have no Hugging Face equivalent and are refused.

Problems with the input (missing or corrupted files, unsupported models) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from llama_mini.checkpoint import detect_format, find_tokenizer, load_pretrained, save_pretrained
from llama_mini.cli import ArgumentParser, report_errors
from llama_mini.errors import CheckpointError
from llama_mini.model import count_parameters

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m llama_mini.convert",
        description="Convert a llama_mini, Hugging Face or Meta checkpoint into a Hugging Face Llama folder.",
    )
    parser.add_argument("src", type=Path, help="checkpoint folder to read")
    parser.add_argument("dst", type=Path, help="folder to write (created if missing)")
    parser.add_argument(
        "--dtype", choices=DTYPES, help="store the weights in this dtype (default: as in SRC)"
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="SentencePiece tokenizer.model to include (default: SRC's)"
    )
    parser.add_argument("--force", action="store_true", help="write into DST even if it is not empty")
    return parser


def _source_tokenizer(src: Path) -> Path | None:
    # SRC's own tokenizer.model, if it is a SentencePiece one. Llama 3's tokenizer.model is a tiktoken
    # file, which LlamaTokenizer cannot read: say so and leave it out rather than write a broken folder.
    tokenizer = find_tokenizer(src)
    if tokenizer is None:
        return None
    import sentencepiece

    try:
        sentencepiece.SentencePieceProcessor(model_file=str(tokenizer))
    except (OSError, RuntimeError):
        print(f"note: {tokenizer} is not a SentencePiece model; not copied", file=sys.stderr)
        return None
    return tokenizer


def convert(
    src: Path, dst: Path, dtype: torch.dtype | None = None, tokenizer: Path | None = None, force: bool = False
) -> str:
    """Convert SRC into DST (see the module docstring) and return a one-line summary."""
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} is a file; DST must be a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise CheckpointError(f"{dst} is not empty; choose an empty or new folder, or pass --force")
    source_format = detect_format(src)
    if tokenizer is None:
        tokenizer = _source_tokenizer(src)
    model = load_pretrained(src, dtype=dtype)  # cast while loading: a bf16 conversion never holds fp32 copies
    save_pretrained(model, dst, tokenizer_path=tokenizer, require_hf=True)
    stored = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    millions = count_parameters(model)["total"] / 1e6
    with_tokenizer = ", with tokenizer" if tokenizer is not None else ""
    return f"converted {src} ({source_format}) -> {dst}: {millions:.2f}M parameters, {stored}{with_tokenizer}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return report_errors(
        lambda: print(convert(args.src, args.dst, DTYPES.get(args.dtype), args.tokenizer, args.force))
    )


if __name__ == "__main__":
    sys.exit(main())
