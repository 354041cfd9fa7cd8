"""`llama-mini convert` (python -m llama_mini.convert): a checkpoint into a Hugging Face folder, or GGUF.

    llama-mini convert SRC DST [--dtype bf16|fp16|fp32] [--tokenizer PATH] [--force]
    llama-mini convert SRC OUT.gguf [--dtype f32|f16|bf16|q8_0|..|q4_0] [--tokenizer PATH] [--force]

SRC is any folder `load_model` reads: llama_mini's own, Hugging Face Llama (single or
sharded safetensors), Meta's original (params.json + consolidated.*.pth), or a training run folder (its
best/). DST gets config.json, model.safetensors, generation_config.json and, when SRC has a tokenizer (or
--tokenizer names one), the tokenizer files; transformers' LlamaForCausalLM and AutoTokenizer load it as it
is. Models with a non-gated feed-forward have no Hugging Face equivalent and are refused.
A DST ending in .gguf is one GGUF file for llama.cpp instead, tokenizer included
(llama_mini/checkpoint/gguf.py).

Problems with the input (missing or corrupted files, unsupported models) print one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from llama_mini.checkpoint import (
    describe_resolution,
    detect_format,
    find_tokenizer,
    load_model,
    read_model_args,
    resolve_checkpoint,
    save_pretrained,
)
from llama_mini.checkpoint.gguf import (
    GGUF_DTYPES,
    GGUFExportError,
    check_gguf_compatible,
    gguf_module,
    gguf_vocab,
    write_gguf,
)
from llama_mini.checkpoint.peft import is_adapter_folder, merge_adapter
from llama_mini.console import ArgumentParser, run_command
from llama_mini.errors import CheckpointError
from llama_mini.files import check_output_path
from llama_mini.generation.sampling import SamplingConfig
from llama_mini.model.sizes import count_parameters

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# GGUF spells fp32 and fp16 f32 and f16; either spelling works for either destination. The block types
# (q8_0 .. q4_0) are GGUF only.
_GGUF_SPELLING = {"fp32": "f32", "fp16": "f16"}
_FOLDER_SPELLING = {gguf: folder for folder, gguf in _GGUF_SPELLING.items()}


def _parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog or "python -m llama_mini.convert",
        description="Convert a llama_mini, Hugging Face or Meta checkpoint into a Hugging Face Llama folder.",
    )
    parser.add_argument("src", type=Path, help="checkpoint folder to read")
    parser.add_argument(
        "dst", type=Path, help="folder to write (created if missing), or a .gguf file for llama.cpp"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted({*DTYPES, *GGUF_DTYPES, *_FOLDER_SPELLING}),
        help="store the weights in this dtype (default: as in SRC; f32 for .gguf; q8_0 .. q4_0: .gguf only)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer.model or tokenizer.json (or its folder) to include (default: SRC's)",
    )
    parser.add_argument(
        "--force", action="store_true", help="write into DST even if it is not empty (or replace the .gguf)"
    )
    parser.add_argument(
        "--base",
        type=Path,
        help="for a SRC that is a PEFT LoRA adapter folder (adapter_config.json): the base model to merge it "
        "into (default: the adapter's base_model_name_or_path, when that is a local folder)",
    )
    return parser


def _source_tokenizer(src: Path) -> Path | None:
    # SRC's own tokenizer: its SentencePiece tokenizer.model, else its tokenizer.json (Llama 3, SmolLM).
    # Meta's Llama 3 folders hold a tiktoken tokenizer.model, which neither library reads, and a few
    # SentencePiece models (unigram ones, say) have no exact tokenizer.json: say so and leave the tokenizer
    # out rather than fail the conversion or write a folder that transformers would read wrongly.
    from llama_mini.errors import DataError
    from llama_mini.tokenizer import Tokenizer, is_sentencepiece_model

    tokenizer = find_tokenizer(src)
    if tokenizer is None:
        return None
    if tokenizer.suffix == ".model" and not is_sentencepiece_model(tokenizer):
        print(f"note: {tokenizer} is not a SentencePiece model; not copied", file=sys.stderr)
        return None
    try:
        Tokenizer(tokenizer).tokenizer_json()
    except DataError as error:
        print(f"note: {error}; not copied", file=sys.stderr)
        return None
    return tokenizer


def convert(
    src: Path,
    dst: Path,
    dtype: torch.dtype | None = None,
    tokenizer: Path | None = None,
    force: bool = False,
    base: Path | None = None,
) -> str:
    """Convert SRC into DST (see the module docstring) and return a one-line summary.

    A SRC holding a PEFT LoRA adapter (adapter_config.json, such as a LoRA run's RUN/best/adapter) is
    merged into its base model (`base`, else the one the adapter names), W + (alpha / r) B A, and DST is
    the plain merged model. A LoRA run's checkpoints already hold that merged model beside their adapter/,
    so converting the run folder itself gives the same folder.
    """
    check_output_path(dst, "DST")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise CheckpointError(f"{dst} is not empty; choose an empty or new folder, or pass --force")
    src = resolve_checkpoint(src)  # a training run folder: its best/ (main() says so)
    if is_adapter_folder(src):  # a PEFT LoRA adapter: merged into its base, in float32, then cast
        model, base = merge_adapter(src, base, dtype)
        source_format = f"LoRA adapter merged into {base}"
        if tokenizer is None:
            tokenizer = _source_tokenizer(src) or _source_tokenizer(base)
    else:
        source_format = detect_format(src)
        if tokenizer is None:
            tokenizer = _source_tokenizer(src)
        # cast while loading: a bf16 conversion never holds fp32 copies
        model = load_model(src, dtype=dtype)
    save_pretrained(model, dst, tokenizer_path=tokenizer, require_hf=True, sampling=SamplingConfig())
    stored = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    millions = count_parameters(model)["total"] / 1e6
    with_tokenizer = ", with tokenizer" if tokenizer is not None else ""
    return f"converted {src} ({source_format}) -> {dst}: {millions:.2f}M parameters, {stored}{with_tokenizer}"


def _folder_dtype(name: str | None) -> torch.dtype | None:
    name = _FOLDER_SPELLING.get(name, name)
    if name is not None and name not in DTYPES:
        raise CheckpointError(f"--dtype {name} is for .gguf files; a folder takes {', '.join(DTYPES)}")
    return DTYPES.get(name) if name else None


def export_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str = "f32",
    tokenizer: str | os.PathLike | None = None,
    force: bool = False,
) -> str:
    """Convert the checkpoint folder `src` (llama_mini, Hugging Face or Meta) into the GGUF file `dst`.

    tokenizer: a SentencePiece tokenizer.model or a byte-level BPE tokenizer.json, or the folder holding
    one (default: src's own), read with its chat template and special tokens. A GGUF file carries its
    tokenizer, so one is required. Every input is checked before anything is written, and an existing `dst` is
    replaced only with force=True. Returns a one-line summary.
    """
    src, dst = resolve_checkpoint(src), Path(dst)
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    if dst.is_dir():
        raise GGUFExportError(f"{dst} is a folder; name the .gguf file to write")
    check_output_path(dst, "DST", folder=False)
    if dst.exists() and not force:
        raise GGUFExportError(f"{dst} already exists; choose another name, or pass --force to replace it")
    source_format = detect_format(src)
    args = read_model_args(src)
    check_gguf_compatible(args)  # before reading any weights
    tokenizer = tokenizer if tokenizer is not None else find_tokenizer(src)
    if tokenizer is None:
        raise GGUFExportError(
            f"{src} has no tokenizer.model or tokenizer.json, and a GGUF file must carry its tokenizer: "
            "pass --tokenizer with the model's tokenizer file or folder"
        )
    vocab = gguf_vocab(tokenizer)
    vocab.padded_to(args.vocab_size)  # fails here, before the weights are read, if it cannot fit
    gguf_module()  # a missing gguf package is reported before the weights are read
    model = load_model(src)
    storage = write_gguf(model, dst, vocab, dtype, name=src.resolve().name)
    blocks = dtype.startswith("q")
    fallback = sorted(name for name, kind in storage.items() if kind == "f16" and blocks)
    note = f" ({len(fallback)} matrices in f16: rows not a multiple of 32)" if fallback else ""
    padding = args.vocab_size - len(vocab.tokens)
    pieces = f"{len(vocab.tokens)} pieces" + (f" + {padding} padding" if padding else "")
    millions = count_parameters(model)["total"] / 1e6
    megabytes = dst.stat().st_size / 2**20
    return (
        f"converted {src} ({source_format}) -> {dst}: {millions:.2f}M parameters, {dtype}{note}, "
        f"tokenizer of {pieces}, {megabytes:.1f} MiB"
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    return run_command(_parser(prog), _run, argv)


def _run(args: argparse.Namespace) -> None:
    note = describe_resolution(args.src) if args.src.is_dir() else None  # a training run folder
    if note:
        print(note, file=sys.stderr)
    if args.dst.suffix.lower() == ".gguf":  # the destination's suffix chooses the format
        dtype = _GGUF_SPELLING.get(args.dtype, args.dtype) or "f32"
        print(export_gguf(args.src, args.dst, dtype, args.tokenizer, args.force))
    else:
        dtype = _folder_dtype(args.dtype)
        print(convert(args.src, args.dst, dtype, args.tokenizer, args.force, base=args.base))


if __name__ == "__main__":
    sys.exit(main())
