"""A SentencePiece BPE `tokenizer.model`, read without protobuf and written as a Hugging Face tokenizer.json.

transformers reads `tokenizer.model` through protobuf, which is often missing; a `tokenizer.json` is read by
the Rust `tokenizers` library alone. So every checkpoint folder carries both, and `tokenizer_json` makes the
second from the first.

Reading the model. A `.model` file is one protobuf message, ModelProto (sentencepiece_model.proto):

    1 pieces            repeated {1 piece: string, 2 score: float, 3 type: NORMAL=1 UNKNOWN=2 CONTROL=3
                        USER_DEFINED=4 UNUSED=5 BYTE=6}
    2 trainer_spec      3 model_type (UNIGRAM=1 BPE=2 WORD=3 CHAR=4), 24 treat_whitespace_as_suffix,
                        25 split_digits, 26 allow_whitespace_only_pieces, 35 byte_fallback, ...
    3 normalizer_spec   1 name, 2 precompiled_charsmap, 3 add_dummy_prefix, 4 remove_extra_whitespaces,
                        5 escape_whitespaces

The sentencepiece processor's API gives the pieces, scores and ids but not the normalizer or trainer spec,
and sentencepiece's own `sentencepiece_model_pb2` needs protobuf. The wire format is simple (a key varint
= field number << 3 | wire type, then a varint, 4 or 8 fixed bytes, or a length-prefixed byte string), so
`read_sentencepiece_spec` decodes the few fields the conversion needs in 40 lines, applying proto2's
defaults for absent fields (add_dummy_prefix, remove_extra_whitespaces and escape_whitespaces default to
true, model_type to UNIGRAM).

Writing tokenizer.json. SentencePiece's BPE encoder does not store merges: it starts from the characters of
the normalized text and repeatedly joins the adjacent pair whose concatenation is the vocabulary piece with
the highest score (leftmost on ties). A `tokenizers` BPE model applies ranked merges instead, so we list,
for every normal piece, each way of splitting it into two normal pieces, ranked by the piece's score. The
rest of the pipeline mirrors the normalizer:

    normalizer      [Precompiled(charsmap)]        sentencepiece's Unicode normalization (nmt_nfkc...), if any
                    [collapse and strip spaces]    remove_extra_whitespaces
                    Prepend("▁")                   add_dummy_prefix: "Hello" is encoded as "▁Hello"
                    Replace(" ", "▁")              escape_whitespaces
    pre_tokenizer   none                           BPE runs over the whole text, as sentencepiece's does
    model           BPE(byte_fallback)             a character outside the vocabulary becomes <0xNN> pieces
    decoder         ▁ -> " ", bytes -> text, strip the one leading space the dummy prefix added
    post_processor  <s> $A                         LLaMA prepends bos (when the tokenizer adds bos)

The dummy prefix is a normalizer step, not transformers' Metaspace pre-tokenizer: Metaspace adds no "▁" to a
text that already starts with a space, while sentencepiece does (" Hi" -> "▁▁Hi"). As a normalizer step it
applies to each stretch of text between special tokens, so "<s>Hi" encodes as [<s>, ▁Hi], the same ids as
encoding "Hi" with bos: the same convention as `Tokenizer.encode(..., parse_special=True)` for
sentencepiece models.

Every conversion is checked before it is returned: the new tokenizer must give sentencepiece's ids on a
fixed set of awkward texts (space runs, tabs, newlines, digits, emoji, CJK), on every vocabulary piece
and on random concatenations of pieces, and decode them to sentencepiece's text. A model it cannot
represent (unigram, user-defined pieces, whitespace as suffix, ...) or that fails the check raises
UnsupportedModel (which `Tokenizer` reports as a DataError) instead of producing a tokenizer.json that
would silently disagree.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors
from tokenizers import Tokenizer as HFTokenizer

__all__ = ["SentencePieceSpec", "UnsupportedModel", "read_sentencepiece_spec", "tokenizer_json"]

SPACE_SYMBOL = "▁"  # U+2581: how sentencepiece writes a space inside pieces

# ModelProto.SentencePiece.Type and TrainerSpec.ModelType, by their numbers in sentencepiece_model.proto.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}

# Texts every conversion must encode exactly as sentencepiece does (see `_check`).
PROBE_TEXTS = (
    "",
    " ",
    "   ",
    "\n",
    "\n\n",
    "hello world",
    " one leading space",
    "  two leading and two trailing  ",
    "runs of     spaces   inside",
    "tabs\tand\t\ttwo tabs\t",
    "\n\nblank lines\n\n\nand a final newline\n",
    "windows\r\nline end",
    "digits 0123456789 and 3.14159, 20240915 and 1,000,000",
    "naïve café — 東京 🙂 🦙 한국어",
    "    indented code:\n        return x  # comment\n",
    "<s> and </s> and <unk> written as text",
    "\u2581already escaped\u2581",
)
_RANDOM_PROBES = 2000  # random concatenations of pieces, on top of every piece alone
_MAX_PROBE_PIECES = 6


class UnsupportedModel(ValueError):
    """The model cannot be written as a tokenizer.json that encodes exactly as sentencepiece does."""


class Piece(NamedTuple):
    text: str
    score: float
    kind: int  # NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED or BYTE


@dataclass(frozen=True)
class SentencePieceSpec:
    """What a SentencePiece model file says about its pieces, trainer and normalizer."""

    pieces: tuple[Piece, ...]  # in id order
    model_type: str  # "unigram", "bpe", "word" or "char"
    byte_fallback: bool
    split_digits: bool
    allow_whitespace_only_pieces: bool
    treat_whitespace_as_suffix: bool
    normalizer_name: str  # "identity", "nmt_nfkc", ... (informational: the charsmap is what applies)
    precompiled_charsmap: bytes  # empty for the identity normalization
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


# ---------------------------------------------------------------------------------------------------------
# Reading the protobuf wire format
# ---------------------------------------------------------------------------------------------------------


def _varint(data: bytes, position: int) -> tuple[int, int]:
    """A base-128 varint at `position` (7 bits a byte, least significant first): (value, next position)."""
    value = shift = 0
    while True:
        if position >= len(data):
            raise ValueError("truncated varint")
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if byte < 0x80:
            return value, position
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) for each field of one message: an int for varints, bytes otherwise."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type in (1, 2, 5):
            if wire_type == 2:
                size, position = _varint(data, position)
            else:
                size = 8 if wire_type == 1 else 4
            if position + size > len(data):
                raise ValueError("truncated field")
            value, position = data[position : position + size], position + size
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        yield number, value


def _message(data: bytes) -> dict[int, list[int | bytes]]:
    fields: dict[int, list[int | bytes]] = {}
    for number, value in _fields(data):
        fields.setdefault(number, []).append(value)
    return fields


def _last(fields: dict[int, list[int | bytes]], number: int, default):
    """A singular field's value (the last one wins, as in protobuf), or proto2's default when absent."""
    values = fields.get(number)
    return values[-1] if values else default


def read_sentencepiece_spec(model_bytes: bytes) -> SentencePieceSpec:
    """The pieces, trainer and normalizer settings of a SentencePiece model file, without protobuf.

    Raises ValueError when the bytes are not a well-formed message (load the file with sentencepiece
    first to report that to the user).
    """
    model = _message(model_bytes)
    pieces = []
    for raw in model.get(1, []):
        piece = _message(raw)
        score = _last(piece, 2, b"\0\0\0\0")
        pieces.append(
            Piece(
                text=_last(piece, 1, b"").decode("utf-8"),
                score=struct.unpack("<f", score)[0],  # wire type 5: little-endian float32
                kind=_last(piece, 3, NORMAL),
            )
        )
    trainer = _message(_last(model, 2, b""))
    normalizer = _message(_last(model, 3, b""))
    return SentencePieceSpec(
        pieces=tuple(pieces),
        model_type=MODEL_TYPES.get(_last(trainer, 3, 1), "unknown"),
        byte_fallback=bool(_last(trainer, 35, False)),
        split_digits=bool(_last(trainer, 25, False)),
        allow_whitespace_only_pieces=bool(_last(trainer, 26, False)),
        treat_whitespace_as_suffix=bool(_last(trainer, 24, False)),
        normalizer_name=_last(normalizer, 1, b"").decode("utf-8"),
        precompiled_charsmap=_last(normalizer, 2, b""),
        add_dummy_prefix=bool(_last(normalizer, 3, True)),
        remove_extra_whitespaces=bool(_last(normalizer, 4, True)),
        escape_whitespaces=bool(_last(normalizer, 5, True)),
    )


# ---------------------------------------------------------------------------------------------------------
# Building and checking the tokenizers pipeline
# ---------------------------------------------------------------------------------------------------------


def _unsupported(spec: SentencePieceSpec) -> str | None:
    """Why `spec` has no exact tokenizer.json equivalent, or None."""
    kinds = {piece.kind for piece in spec.pieces}
    if spec.model_type != "bpe":
        return f"it is a {spec.model_type} model; only BPE models convert"
    if USER_DEFINED in kinds:
        return "it has user-defined pieces, which sentencepiece matches before BPE"
    if UNUSED in kinds:
        return "it has unused pieces, which sentencepiece re-splits"
    if spec.treat_whitespace_as_suffix:
        return "it puts the space at the end of pieces (treat_whitespace_as_suffix)"
    if not spec.escape_whitespaces:
        return "it does not escape spaces as ▁ (escape_whitespaces=false)"
    if sum(piece.kind == UNKNOWN for piece in spec.pieces) != 1:
        return "it does not have exactly one unknown piece"
    return None


def _merges(spec: SentencePieceSpec) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, the best-scored pieces' splits first.

    The tie order between two splits of the same piece cannot reproduce sentencepiece's leftmost-first rule
    in every case (a rank is per merge, not per piece); `_check` guards against the rare text where it
    matters. Bytes and control pieces never come from merging, so they take no part.
    """
    normal = {piece.text: index for index, piece in enumerate(spec.pieces) if piece.kind == NORMAL}
    ranked = []
    for text, index in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-spec.pieces[index].score, index, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _normalizer(spec: SentencePieceSpec) -> normalizers.Normalizer:
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        # sentencepiece drops leading and trailing spaces and keeps one space of each run (tabs and
        # newlines are spaces only if the charsmap made them so).
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ +| +$"), "")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE_SYMBOL))
    steps.append(normalizers.Replace(" ", SPACE_SYMBOL))
    return normalizers.Sequence(steps)


def _build(spec: SentencePieceSpec, bos_id: int | None) -> HFTokenizer:
    """The tokenizers pipeline of the module docstring; the post-processor prepends `bos_id` unless None."""
    vocab = {piece.text: index for index, piece in enumerate(spec.pieces)}
    unknown = next(piece.text for piece in spec.pieces if piece.kind == UNKNOWN)
    tokenizer = HFTokenizer(
        models.BPE(
            vocab=vocab,
            merges=_merges(spec),
            unk_token=unknown,
            byte_fallback=spec.byte_fallback,
            fuse_unk=True,  # sentencepiece joins a run of unknown characters into one <unk>
        )
    )
    tokenizer.normalizer = _normalizer(spec)
    steps = [decoders.Replace(SPACE_SYMBOL, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix or spec.remove_extra_whitespaces:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # sentencepiece's rule for the first piece
    tokenizer.decoder = decoders.Sequence(steps)
    # Control pieces (<s>, </s>) and <unk> are special: never produced from text, skipped when decoding.
    tokenizer.add_special_tokens(
        [
            AddedToken(piece.text, special=True, normalized=False)
            for piece in spec.pieces
            if piece.kind in (CONTROL, UNKNOWN)
        ]
    )
    if bos_id is not None:
        bos = spec.pieces[bos_id].text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return tokenizer


def _probes(spec: SentencePieceSpec) -> list[str]:
    """PROBE_TEXTS, every normal piece as text, and random runs of pieces (the same every time)."""
    pieces = [piece.text.replace(SPACE_SYMBOL, " ") for piece in spec.pieces if piece.kind == NORMAL]
    rng = random.Random(0)
    runs = [
        "".join(rng.choice(pieces) for _ in range(rng.randint(2, _MAX_PROBE_PIECES)))
        for _ in range(_RANDOM_PROBES if pieces else 0)
    ]
    return [*PROBE_TEXTS, *pieces, *runs]


def _check(tokenizer: HFTokenizer, processor: spm.SentencePieceProcessor, spec: SentencePieceSpec) -> None:
    """Raise UnsupportedModel unless `tokenizer` encodes and decodes the probes exactly as `processor`."""
    texts = _probes(spec)
    tokenizer.encode_special_tokens = True  # "<s>" written in a text is text, as for sentencepiece
    expected = processor.Encode(texts)
    actual = [encoding.ids for encoding in tokenizer.encode_batch(texts, add_special_tokens=False)]
    unknown_id = next(index for index, piece in enumerate(spec.pieces) if piece.kind == UNKNOWN)
    for text, ids, converted in zip(texts, expected, actual, strict=True):
        if converted != ids:
            raise UnsupportedModel(f"it would encode {text[:40]!r} as {converted[:8]} instead of {ids[:8]}")
        # sentencepiece decodes <unk> as " ⁇ ", tokenizers skips it: compare texts without unknowns only.
        if unknown_id not in ids and tokenizer.decode(ids) != processor.Decode(ids):
            raise UnsupportedModel(f"it would decode {text[:40]!r} differently")


@lru_cache(maxsize=8)
def _convert(model_bytes: bytes, add_bos: bool) -> str:
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(model_bytes)
    try:
        spec = read_sentencepiece_spec(model_bytes)
    except ValueError as error:  # sentencepiece read it, so this is a field we cannot decode
        raise UnsupportedModel(f"its protobuf fields cannot be read ({error})") from None
    problem = _unsupported(spec)
    if problem is not None:
        raise UnsupportedModel(problem)
    bos_id = processor.bos_id()
    tokenizer = _build(spec, bos_id if add_bos and 0 <= bos_id < len(spec.pieces) else None)
    _check(HFTokenizer.from_str(tokenizer.to_str()), processor, spec)  # check what will be written
    return tokenizer.to_str(pretty=True)


def tokenizer_json(model_bytes: bytes, add_bos: bool = True) -> str:
    """The Hugging Face tokenizer.json text equivalent to a SentencePiece BPE model file's bytes.

    add_bos: put LLaMA's "<s> $A" post-processor in, so that `tokenizers.Tokenizer.encode(text)` and
        transformers prepend bos as LLaMA's tokenizer does.
    Raises UnsupportedModel (a ValueError; callers add the path and the fix) when no tokenizer.json
    reproduces the model exactly. Cached: checkpoints save the same tokenizer again and again.
    """
    try:
        return _convert(model_bytes, add_bos)
    except RuntimeError as error:  # sentencepiece could not load the bytes at all
        raise UnsupportedModel(f"sentencepiece cannot load it ({error})") from None
