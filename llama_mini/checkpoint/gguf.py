"""Export to GGUF, llama.cpp's single-file format: the model, its settings and its tokenizer in one file.

    llama-mini convert SRC OUT.gguf [--dtype f32|f16|bf16|q8_0|q5_1|q5_0|q4_1|q4_0] [--tokenizer PATH]

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
  scale (8.5 bits per weight); q4_0 as 32 4-bit values q and a scale d, w = d (q - 8), d = m / -8 for
  the block's weight m of largest magnitude (4.5 bits); q4_1, q5_0 and q5_1 are the same idea with a
  minimum or a fifth bit. Every matrix takes the type, the embedding and output too (llama-quantize's
  --pure), since the gguf package writes no k-quant. A matrix whose rows are not a multiple of 32 long
  cannot be cut into blocks and is stored as f16 instead, as llama.cpp's converter does.

The tokenizer. A SentencePiece model (ours, LLaMA 1/2's) becomes llama.cpp's "llama" tokenizer: every
piece with its score and type (normal, unknown, control, byte), bos/eos/unk ids, add_bos (LLaMA
prepends <s>), and whether SentencePiece adds a leading space and collapses runs of spaces, read from
the model's own normalizer. llama.cpp does not apply SentencePiece's NFKC normalisation; ours uses the
identity, so the two tokenize alike. A byte-level BPE tokenizer.json (Llama 3's, SmolLM's) becomes
llama.cpp's "gpt2" tokenizer: tokens, types and merges, and the name of the pre-tokenizer llama.cpp must
split text with, chosen from the file's own pre_tokenizer; one llama.cpp has no equivalent for is refused
rather than exported to tokenize differently. Either way the file carries bos/eos/padding ids, the
chat template our chat commands render with, and the token that template ends a turn with (eot), at
which llama.cpp stops. Pieces are padded with unused "[PADn]" entries up to the model's vocabulary
size. `GGUFVocab` holds a vocabulary in GGUF's terms whatever its source.

The `gguf` package (pip install gguf) does the byte-level writing; it is imported only when exporting.
"""

from __future__ import annotations

import dataclasses
import json
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
from llama_mini.tokenizer import Tokenizer, chat_stop_ids, chat_template_for

if TYPE_CHECKING:  # the gguf package is optional: imported only when a file is written
    import gguf

__all__ = [
    "GGUF_ARCHITECTURE",
    "GGUF_DTYPES",
    "GGUFExportError",
    "GGUFVocab",
    "byte_level_bpe_vocab",
    "check_gguf_compatible",
    "gguf_tensor_name",
    "gguf_tensors",
    "gguf_vocab",
    "rope_frequency_factors",
    "sentencepiece_vocab",
    "write_gguf",
]

GGUF_ARCHITECTURE = "llama"  # llama.cpp's LLM_ARCH_LLAMA: RMSNorm, RoPE on adjacent pairs, GQA, SwiGLU

# --dtype -> (storage type of the matrices, the file's general.file_type), as names in gguf's enums
# GGMLQuantizationType and LlamaFileType. Vectors are float32 whatever the choice. The quantized types are
# those the gguf package can write (gguf.quants.quantize) among llama.cpp's classic block formats: 32
# weights per block with a float16 scale (and, for the _1 types, a float16 minimum), 8, 5 or 4 bits each.
GGUF_DTYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
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
    """The GGMLQuantizationType of one tensor: float32 for vectors, else the chosen one, with the block
    types falling back to f16 when a row (the innermost dimension) does not split into whole blocks."""
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

    model: llama.cpp's tokenizer family: "llama" (SentencePiece: pieces merged by score) or "gpt2"
        (byte-level BPE: merges in `settings["merges"]`, the pre-tokenizer in `settings["pre"]`, no scores).
    tokens, token_types: one entry per id; types are GGUF's TokenType values (1 normal, 2 unknown,
        3 control, 4 user-defined, 5 unused, 6 byte).
    scores: one per id for "llama"; None where the family has none.
    settings: further tokenizer.ggml.<key> values of this family (bool, str or list of str), such as
        "add_space_prefix" and "remove_extra_whitespaces" for "llama", "pre" and "merges" for "gpt2".
    eot_id: the token the chat template ends a turn with (<|eot_id|>, </s>), which llama.cpp stops at.
    pad_id: the padding token, if the tokenizer has one.
    chat_template: the Jinja chat template, written as tokenizer.chat_template.
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
    eot_id: int | None = None
    pad_id: int | None = None
    chat_template: str | None = None

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
        return dataclasses.replace(
            self,
            tokens=self.tokens + [f"[PAD{i}]" for i in extra],
            token_types=self.token_types + [unused] * len(extra),
            scores=None if self.scores is None else self.scores + [_PAD_SCORE] * len(extra),
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


# llama.cpp chooses its pre-tokenizer (the regular expressions that cut text into words before the merges)
# by the name in tokenizer.ggml.pre, and falls back silently to a default for a name it does not know. So
# the name is chosen from the tokenizer.json's own pre_tokenizer, step by step, and only where llama.cpp's
# expressions for that name (src/llama-vocab.cpp) split every text as the tokenizers library does:
#   ("split", regex)        a Split step, Isolated, not inverted
#   ("digits", individual)  a Digits step
#   ("byte_level", regex)   a ByteLevel step without a prefix space; regex: whether it splits GPT-2's way
# and whether a word that is whole in the vocabulary is taken as it is ("ignore_merges"), which llama.cpp
# ties to the name too.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA_CPP_PRE_TOKENIZERS: dict[tuple[tuple[tuple[str, Any], ...], bool], str] = {
    # Llama 3 (and 3.1, 3.2): its split, then bytes; whole words first
    ((("split", _LLAMA3_SPLIT), ("byte_level", False)), True): "llama-bpe",
    # the same split with merges always applied: llama.cpp's "dbrx" runs Llama 3's expression so
    ((("split", _LLAMA3_SPLIT), ("byte_level", False)), False): "dbrx",
    # SmolLM (and StarCoder): every digit alone, then GPT-2's split
    ((("digits", True), ("byte_level", True)), False): "smollm",
    # GPT-2's split alone
    ((("byte_level", True),), False): "gpt-2",
}


def _pre_tokenizer_steps(pre_tokenizer: Any) -> tuple[tuple[str, Any], ...] | None:
    """The steps of a tokenizer.json pre_tokenizer in the form of _LLAMA_CPP_PRE_TOKENIZERS, or None when a
    step has no place there."""
    if not isinstance(pre_tokenizer, dict):
        return None
    steps = pre_tokenizer.get("pretokenizers") if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer]
    out = []
    for step in steps or []:
        kind = step.get("type")
        if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            regex = (step.get("pattern") or {}).get("Regex")
            if regex is None:
                return None
            out.append(("split", regex))
        elif kind == "Digits":
            out.append(("digits", bool(step.get("individual_digits"))))
        elif kind == "ByteLevel" and not step.get("add_prefix_space"):
            out.append(("byte_level", step.get("use_regex", True)))
        else:
            return None
    return tuple(out)


def _bpe_refusal(path: Path, what: str) -> GGUFExportError:
    return GGUFExportError(
        f"{path}: {what}, so llama.cpp would tokenize differently; GGUF export reads byte-level BPE "
        "tokenizers like Llama 3's, SmolLM's and GPT-2's (or a SentencePiece tokenizer.model)"
    )


def byte_level_bpe_vocab(path: str | os.PathLike) -> GGUFVocab:
    """The "gpt2" GGUF vocabulary of a byte-level BPE tokenizer.json (Llama 3's, SmolLM's, GPT-2's), or of
    the folder holding it with its tokenizer_config.json and generation_config.json.

    Tokens keep their byte-level spelling ("Ġthe"); added tokens are written as their text, control when
    special and user-defined otherwise, as llama.cpp's converter does; ids with no token are unused
    "[PADn]" entries. Merges become "left right" strings. The pre-tokenizer's llama.cpp name is chosen
    from the file (see _LLAMA_CPP_PRE_TOKENIZERS); any other tokenizer is refused. bos, eos, padding,
    add_bos and the chat template come from the `Tokenizer`; end of turn is the token the template ends
    an assistant turn with.
    """
    tokenizer = Tokenizer(path)
    path = tokenizer.model_path
    if path.suffix != ".json":
        raise GGUFExportError(f"{path}: not a tokenizer.json; pass the folder or file of one")
    spec = json.loads(tokenizer.tokenizer_json())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise _bpe_refusal(path, f"its model is {model.get('type')!r}, not a plain byte-level BPE")
    if model.get("end_of_word_suffix") or model.get("dropout"):
        raise _bpe_refusal(path, "its BPE has an end-of-word suffix or dropout")
    if spec.get("normalizer") is not None:
        raise _bpe_refusal(path, f"it normalizes text first ({spec['normalizer'].get('type')})")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise _bpe_refusal(path, "its decoder is not ByteLevel")
    steps = _pre_tokenizer_steps(spec.get("pre_tokenizer"))
    ignore_merges = bool(model.get("ignore_merges", False))
    pre = _LLAMA_CPP_PRE_TOKENIZERS.get((steps, ignore_merges)) if steps is not None else None
    if pre is None:
        kinds = [step.get("type") for step in (spec.get("pre_tokenizer") or {}).get("pretokenizers", [])]
        shown = kinds or (spec.get("pre_tokenizer") or {}).get("type")
        raise _bpe_refusal(
            path, f"its pre-tokenizer ({shown}, ignore_merges={ignore_merges}) has no llama.cpp equivalent"
        )

    by_id: dict[int, tuple[str, int]] = {
        token_id: (text, _TOKEN_TYPES["NORMAL"]) for text, token_id in model["vocab"].items()
    }
    for added in spec.get("added_tokens") or []:
        kind = "CONTROL" if added.get("special") else "USER_DEFINED"
        by_id[added["id"]] = (added["content"], _TOKEN_TYPES[kind])
    size = max(by_id) + 1
    tokens = [by_id.get(i, (f"[PAD{i}]", _TOKEN_TYPES["UNUSED"]))[0] for i in range(size)]
    types = [by_id.get(i, ("", _TOKEN_TYPES["UNUSED"]))[1] for i in range(size)]
    if len(set(tokens)) != len(tokens):  # llama.cpp looks tokens up by their text
        raise _bpe_refusal(path, "two of its ids have the same text")
    merges = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2:
            raise _bpe_refusal(path, f"its merge {merge!r} is not two pieces")
        merges.append(" ".join(pair))

    if tokenizer.eos_id < 0:  # llama.cpp would take id 11 for eos and stop there
        raise GGUFExportError(
            f"{path}: the tokenizer names no eos_token; set eos_token in its tokenizer_config.json"
        )

    def known(token_id: int) -> int | None:
        return token_id if token_id >= 0 else None

    return GGUFVocab(
        model="gpt2",
        tokens=tokens,
        token_types=types,
        bos_id=known(tokenizer.bos_id),
        eos_id=tokenizer.eos_id,
        add_bos=tokenizer.add_bos,
        add_eos=False,
        settings={"pre": pre, "merges": merges},
        eot_id=_end_of_turn_id(tokenizer),
        pad_id=known(tokenizer.pad_id),
        chat_template=chat_template_for(tokenizer),
    )


def _end_of_turn_id(tokenizer: Tokenizer) -> int | None:
    """The token the chat template closes a turn with (<|eot_id|>, <|im_end|>), or None when that is eos
    itself (or the template writes none): the first of `chat_stop_ids`, which come from the template."""
    stops = chat_stop_ids(tokenizer)
    return stops[0] if stops and stops[0] != tokenizer.eos_id else None


def gguf_vocab(path: str | os.PathLike) -> GGUFVocab:
    """The GGUF vocabulary of a tokenizer file or of a folder holding one: a SentencePiece tokenizer.model
    (`sentencepiece_vocab`) or a byte-level BPE tokenizer.json (`byte_level_bpe_vocab`), with the chat
    template our chat commands render with (the tokenizer's own, else DEFAULT_CHAT_TEMPLATE)."""
    found = find_tokenizer(path)
    if found is not None and found.suffix == ".json":
        return byte_level_bpe_vocab(found)
    vocab = sentencepiece_vocab(path)
    tokenizer = Tokenizer(find_tokenizer(path))
    return dataclasses.replace(
        vocab, eot_id=_end_of_turn_id(tokenizer), chat_template=chat_template_for(tokenizer)
    )


def _add_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    special = {"bos": vocab.bos_id, "eos": vocab.eos_id, "unknown": vocab.unk_id}
    special |= {"eot": vocab.eot_id, "padding": vocab.pad_id}
    for key, token_id in special.items():
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
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


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
    vocab: its tokenizer (see `gguf_vocab`), padded here to the model's vocabulary size.
    dtype: a key of GGUF_DTYPES (f32, f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0) for the matrices; vectors
        stay float32.
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
                else:  # bf16 and the block types: packed bytes, (rows, bytes per row), with the type given
                    writer.add_tensor(tensor_name, lib.quants.quantize(array, kind), raw_dtype=kind)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()

    atomic_write(path, write)
    return {tensor_name: kind.name.lower() for tensor_name, kind in storage.items()}
