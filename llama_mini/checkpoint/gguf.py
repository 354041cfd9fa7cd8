"""Export to GGUF, llama.cpp's single-file format: the model, its settings and its tokenizer in one file.

    llama-mini convert SRC OUT.gguf [--dtype f32|f16|bf16|q8_0] [--tokenizer PATH] [--force]

This module writes a loaded model (`write_gguf`); llama_mini/convert.py reads the checkpoint and calls it.

A GGUF file is a header of typed key/value metadata, a table of tensors (name, shape, storage type) and
the tensor data, aligned. llama.cpp (and what is built on it: ollama, LM Studio, llama-cpp-python) reads
it with no Python and no config files beside it, so everything the model needs goes in:

    metadata   general.*       architecture "llama", name, file type, quantization version
               llama.*         context, embedding and FFN lengths, block count, head counts, RMS eps,
                               RoPE base and dimension count, vocabulary size
               tokenizer.*     the vocabulary: pieces, scores, types, special ids, bos/space conventions
    tensors    token_embd, output_norm, output (absent when tied: llama.cpp reuses token_embd),
               blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
               ffn_down}, and rope_freqs when Llama 3.1's RoPE scaling is on

Three facts a reader should know:

- RoPE layout. llama.cpp's "llama" architecture rotates adjacent pairs (2i, 2i+1) of each head, Meta's
  layout and ours, so wq and wk are written as they are. (llama.cpp's own converter reads Hugging Face
  folders and undoes Hugging Face's permutation; writing our tensors unpermuted is the same thing.)
  tests/test_gguf.py proves it: llama.cpp's greedy tokens and logits match ours.
- Only SwiGLU. The "llama" architecture always computes w2(silu(w1 x) * w3 x). A model with another
  feed-forward (non-gated relu/gelu/swish, a trainable Swish beta, or the gated glu/bilinear/reglu/geglu)
  would load there and silently compute something else, so it is refused.
- Storage types. Vectors (the RMSNorm weights, rope_freqs) stay float32, as llama.cpp keeps them; the
  matrices take the chosen type. q8_0 stores blocks of 32 weights as 32 int8 values and one float16
  scale (8.5 bits per weight); a matrix whose rows are not a multiple of 32 long cannot be cut into
  blocks and is stored as f16 instead, as llama.cpp's converter does.

The tokenizer. A SentencePiece model (ours, LLaMA 1/2's) becomes llama.cpp's "llama" tokenizer: every
piece with its score and type (normal, unknown, control, byte), bos/eos/unk ids, add_bos (LLaMA
prepends <s>), and whether SentencePiece adds a leading space and collapses runs of spaces, read from
the model's own normalizer. llama.cpp does not apply SentencePiece's NFKC normalisation; ours uses the
identity, so the two tokenize alike. Pieces are padded with unused "[PADn]" entries up to the model's
vocabulary size. `GGUFVocab` holds a vocabulary in GGUF's terms whatever its source, so a byte-level BPE
reader (llama.cpp's "gpt2" model: tokens, types and merges, no scores) can be added beside
`sentencepiece_vocab` without touching the writer.

The `gguf` package (pip install gguf) does the byte-level writing; it is imported only when exporting.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from llama_mini.checkpoint.io import find_tokenizer, unwrap_model
from llama_mini.errors import CheckpointError
from llama_mini.files import atomic_write
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import llama3_scaled_frequencies

if TYPE_CHECKING:  # the gguf package is optional: imported only when a file is written
    import gguf

__all__ = [
    "GGUF_ARCHITECTURE",
    "GGUF_DTYPES",
    "GGUFExportError",
    "GGUFVocab",
    "check_gguf_compatible",
    "gguf_tensor_name",
    "gguf_tensors",
    "rope_frequency_factors",
    "sentencepiece_vocab",
    "write_gguf",
]

GGUF_ARCHITECTURE = "llama"  # llama.cpp's LLM_ARCH_LLAMA: RMSNorm, RoPE on adjacent pairs, GQA, SwiGLU

# --dtype -> (storage type of the matrices, the file's general.file_type), as names in gguf's enums
# GGMLQuantizationType and LlamaFileType. Vectors are float32 whatever the choice.
GGUF_DTYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}

# Our (Meta's) parameter names -> llama.cpp's tensor names for the llama architecture.
_GGUF_TOP_NAMES = {
    "tok_embeddings.weight": "token_embd.weight",
    "norm.weight": "output_norm.weight",
    "output.weight": "output.weight",
}
_GGUF_LAYER_NAMES = {
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",  # the gate W: silu is applied to it
    "feed_forward.w3.weight": "ffn_up.weight",  # the value V
    "feed_forward.w2.weight": "ffn_down.weight",
}
ROPE_FREQS_NAME = "rope_freqs.weight"

# GGUF's TokenType values (gguf.TokenType), spelled out so a vocabulary can be built without the package.
_TOKEN_TYPES = {"NORMAL": 1, "UNKNOWN": 2, "CONTROL": 3, "USER_DEFINED": 4, "UNUSED": 5, "BYTE": 6}
_PAD_SCORE = -1000.0  # the score llama.cpp's converter gives padding pieces: never chosen by a merge


class GGUFExportError(CheckpointError):
    """A model, tokenizer or path that cannot become a GGUF file; the message says why and what to do."""


def gguf_module():
    """The gguf package, or a one-line error that says how to install it."""
    try:
        import gguf
    except ImportError:
        raise GGUFExportError(
            "writing GGUF needs the gguf package: pip install gguf (or pip install 'llama_mini[gguf]')"
        ) from None
    return gguf


# ---------------------------------------------------------------------------------------------------------
# What llama.cpp's llama architecture can represent
# ---------------------------------------------------------------------------------------------------------


def check_gguf_compatible(args: ModelArgs) -> None:
    """Raise GGUFExportError unless llama.cpp's "llama" architecture computes exactly this model.

    Its feed-forward is hard-wired to SwiGLU, w2(silu(w1 x) * w3 x). Every other variant of ours would
    load (the tensors have the same names and shapes, or fewer) and then compute something else.
    """
    if args.ffn == "swiglu":
        return
    if args.ffn in ("relu", "gelu", "swish"):
        trainable = args.ffn == "swish" and args.swish_beta_trainable
        kind = "a non-gated Swish with a trainable beta" if trainable else "a non-gated"
        raise GGUFExportError(
            f"ffn {args.ffn!r} cannot be written to GGUF: it is {kind} feed-forward (two matrices), and "
            "llama.cpp's llama architecture computes SwiGLU only; keep this model as a llama_mini checkpoint"
        )
    raise GGUFExportError(
        f"ffn {args.ffn!r} cannot be written to GGUF: llama.cpp's llama architecture applies SiLU to the "
        "gate (SwiGLU), so it would compute a different model; only ffn 'swiglu' exports to GGUF"
    )


def rope_frequency_factors(args: ModelArgs) -> torch.Tensor | None:
    """llama.cpp's form of Llama 3.1's RoPE scaling: per-pair divisors of the frequencies, (head_dim/2,).

    llama.cpp turns pair i by position * base^(-2i/d) / factor[i], reading the factors from the tensor
    rope_freqs.weight. Our `llama3_scaled_frequencies` gives the scaled frequencies themselves, so
    factor = plain frequency / scaled frequency: 1 for the fast pairs, `factor` for the slow ones, a blend
    between. Computed in float64 so the float32 result is the correctly rounded quotient. None without
    scaling.
    """
    if args.rope_scaling is None:
        return None
    dim = args.head_dim
    plain = 1.0 / args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaled = llama3_scaled_frequencies(plain, **args.rope_scaling)
    return (plain / scaled).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------------------


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for one of our parameters: "layers.3.attention.wq.weight" -> "blk.3.attn_q.weight"."""
    if name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"blk.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}"
    raise GGUFExportError(f"parameter {name!r} has no GGUF name; is this a llama_mini Transformer?")


def gguf_tensors(model: nn.Module) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor of the file, in our layout (no RoPE permutation).

    Arrays keep PyTorch's (out_features, in_features) shape; GGUF lists dimensions innermost first, and
    the gguf writer reverses them. A tied output matrix is the embedding: written once, as token_embd.
    """
    model = unwrap_model(model)
    args = model.args
    for name, tensor in model.state_dict().items():
        if name == "output.weight" and args.tie_embeddings:
            continue
        array = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        yield gguf_tensor_name(name), np.ascontiguousarray(array)
    factors = rope_frequency_factors(args)
    if factors is not None:
        yield ROPE_FREQS_NAME, factors.numpy()


def _storage_type(array: np.ndarray, dtype: str, lib: Any) -> Any:
    """The GGMLQuantizationType of one tensor: float32 for vectors, else the chosen one, with q8_0
    falling back to f16 when a row (the innermost dimension) does not split into whole 32-weight blocks."""
    if array.ndim < 2:
        return lib.GGMLQuantizationType.F32
    storage = lib.GGMLQuantizationType[GGUF_DTYPES[dtype][0]]
    block_size = lib.GGML_QUANT_SIZES[storage][0]
    if array.shape[-1] % block_size:
        return lib.GGMLQuantizationType.F16
    return storage


# ---------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GGUFVocab:
    """A tokenizer as GGUF stores it under tokenizer.ggml.*, whatever file it came from.

    model: llama.cpp's tokenizer family: "llama" (SentencePiece: pieces merged by score) or, for a
        future byte-level BPE reader, "gpt2" (merges in `settings["merges"]`, no scores).
    tokens, token_types: one entry per id; types are GGUF's TokenType values (1 normal, 2 unknown,
        3 control, 4 user-defined, 5 unused, 6 byte).
    scores: one per id for "llama"; None where the family has none.
    settings: further tokenizer.ggml.<key> values of this family (bool, str or list of str), such as
        "add_space_prefix" and "remove_extra_whitespaces" for "llama", "pre" and "merges" for "gpt2".
    """

    model: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    add_bos: bool = True
    add_eos: bool = False
    settings: dict[str, Any] = field(default_factory=dict)

    def padded_to(self, vocab_size: int) -> GGUFVocab:
        """This vocabulary with unused "[PADn]" entries appended up to the model's `vocab_size`.

        llama.cpp takes the vocabulary size from the token list, and the embedding must have that many
        rows; models often round their vocabulary up (to 4096, or a multiple of 64) past the tokenizer's.
        """
        if len(self.tokens) > vocab_size:
            raise GGUFExportError(
                f"the tokenizer has {len(self.tokens)} pieces but the model's vocabulary has only "
                f"{vocab_size} rows; pass the --tokenizer the model was trained with"
            )
        extra = range(len(self.tokens), vocab_size)
        unused = _TOKEN_TYPES["UNUSED"]
        return GGUFVocab(
            model=self.model,
            tokens=self.tokens + [f"[PAD{i}]" for i in extra],
            token_types=self.token_types + [unused] * len(extra),
            scores=None if self.scores is None else self.scores + [_PAD_SCORE] * len(extra),
            bos_id=self.bos_id,
            eos_id=self.eos_id,
            unk_id=self.unk_id,
            add_bos=self.add_bos,
            add_eos=self.add_eos,
            settings=dict(self.settings),
        )


def sentencepiece_vocab(path: str | os.PathLike) -> GGUFVocab:
    """The "llama" GGUF vocabulary of a SentencePiece model file (or of the folder holding tokenizer.model).

    Each piece keeps its score (for BPE, minus its merge rank) and its type. SentencePiece's user-defined
    pieces have no query in its Python API and are written as normal pieces, as llama.cpp's converter
    does. Whether SentencePiece prefixes a space ("dummy prefix") and collapses runs of spaces is read
    by normalising a probe string, so llama.cpp is told what the model file actually does.
    """
    import sentencepiece  # a dependency of llama_mini; imported here to keep module import light

    model_file = find_tokenizer(path)
    if model_file is None:
        path = Path(path)
        if path.suffix == ".json" or (path / "tokenizer.json").is_file():
            raise GGUFExportError(
                f"{path}: a tokenizer.json (byte-level BPE, llama.cpp's 'gpt2' family) cannot be written to "
                "GGUF yet, only a SentencePiece tokenizer.model; pass --tokenizer with one"
            )
        raise GGUFExportError(f"{path}: no SentencePiece tokenizer.model there; check the path")
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_file.read_bytes())
    except (OSError, RuntimeError):
        raise GGUFExportError(
            f"{model_file}: not a SentencePiece model (GGUF export reads SentencePiece tokenizers only); "
            "pass --tokenizer with the model's SentencePiece tokenizer.model"
        ) from None
    tokens, scores, types = [], [], []
    for token_id in range(processor.vocab_size()):
        tokens.append(processor.IdToPiece(token_id))
        scores.append(float(processor.GetScore(token_id)))
        if processor.IsUnknown(token_id):
            kind = "UNKNOWN"
        elif processor.IsControl(token_id):
            kind = "CONTROL"
        elif processor.IsUnused(token_id):
            kind = "UNUSED"
        elif processor.IsByte(token_id):
            kind = "BYTE"
        else:
            kind = "NORMAL"
        types.append(_TOKEN_TYPES[kind])

    def special(token_id: int) -> int | None:
        return token_id if 0 <= token_id < processor.vocab_size() else None  # -1: the model has none

    # SentencePiece marks spaces with U+2581; "a  b" shows both conventions at once:
    # "▁a▁▁b" = dummy prefix, spaces kept; "a▁b" = no prefix, runs of spaces collapsed.
    probe = processor.Normalize("a  b")
    return GGUFVocab(
        model="llama",
        tokens=tokens,
        token_types=types,
        scores=scores,
        bos_id=special(processor.bos_id()),
        eos_id=special(processor.eos_id()),
        unk_id=special(processor.unk_id()),
        add_bos=True,  # LLaMA's convention, and what our generation does: <s> first, no </s> last
        add_eos=False,
        settings={
            "add_space_prefix": probe.startswith("\u2581"),
            "remove_extra_whitespaces": "\u2581\u2581" not in probe,
        },
    )


def _add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    for key, token_id in (("bos", vocab.bos_id), ("eos", vocab.eos_id), ("unknown", vocab.unk_id)):
        if token_id is not None:
            writer.add_uint32(f"tokenizer.ggml.{key}_token_id", token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    for key, value in vocab.settings.items():
        name = f"tokenizer.ggml.{key}"
        if isinstance(value, bool):
            writer.add_bool(name, value)
        elif isinstance(value, str):
            writer.add_string(name, value)
        else:
            writer.add_array(name, list(value))


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------


def write_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    vocab: GGUFVocab,
    dtype: str = "f32",
    name: str | None = None,
) -> dict[str, str]:
    """Write `model` and `vocab` as one GGUF file at `path`, atomically; return {tensor: storage type}.

    model: a llama_mini Transformer (bare or wrapped by torch.compile / DDP) whose feed-forward is SwiGLU.
    vocab: its tokenizer (see `sentencepiece_vocab`), padded here to the model's vocabulary size.
    dtype: "f32", "f16", "bf16" or "q8_0" for the matrices; vectors stay float32.
    name: general.name, what llama.cpp prints when it loads the file.
    The file appears complete or not at all (written under a temporary name, then renamed); an existing
    file at `path` is replaced.
    """
    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(GGUF_DTYPES)}")
    model = unwrap_model(model)
    args = model.args
    check_gguf_compatible(args)
    vocab = vocab.padded_to(args.vocab_size)
    lib = gguf_module()
    path = Path(path)

    tensors = list(gguf_tensors(model))
    storage = {tensor_name: _storage_type(array, dtype, lib) for tensor_name, array in tensors}
    hidden_dim = model.layers[0].feed_forward.w1.weight.shape[0]

    def write(temporary: Path) -> None:
        writer = lib.GGUFWriter(temporary, GGUF_ARCHITECTURE)  # writes general.architecture
        try:
            if name:
                writer.add_name(name)
            writer.add_file_type(lib.LlamaFileType[GGUF_DTYPES[dtype][1]])
            writer.add_quantization_version(lib.GGML_QUANT_VERSION)
            writer.add_vocab_size(args.vocab_size)
            writer.add_context_length(args.max_seq_len)
            writer.add_embedding_length(args.dim)
            writer.add_block_count(args.n_layers)
            writer.add_feed_forward_length(hidden_dim)
            writer.add_head_count(args.n_heads)
            writer.add_head_count_kv(args.n_kv_heads)
            writer.add_layer_norm_rms_eps(args.norm_eps)
            writer.add_rope_freq_base(args.rope_theta)
            writer.add_rope_dimension_count(args.head_dim)
            _add_vocab(writer, vocab)
            for tensor_name, array in tensors:
                kind = storage[tensor_name]
                if kind == lib.GGMLQuantizationType.F32:
                    writer.add_tensor(tensor_name, array)
                elif kind == lib.GGMLQuantizationType.F16:
                    writer.add_tensor(tensor_name, array.astype(np.float16))
                else:  # bf16 and q8_0: packed bytes, (rows, bytes per row), with the element type given
                    writer.add_tensor(tensor_name, lib.quants.quantize(array, kind), raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)
    return {tensor_name: kind.name.lower() for tensor_name, kind in storage.items()}
