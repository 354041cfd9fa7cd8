"""Text <-> token ids with a sentencepiece BPE model, as in LLaMA, and decoding one token at a time.

`train_tokenizer` fits a byte-pair-encoding vocabulary to a corpus and writes a `tokenizer.model` file;
`Tokenizer` loads that file, or any sentencepiece model such as LLaMA 2's, to encode and decode text;
`StreamDecoder` turns generated ids into text as they arrive.

The settings follow LLaMA's tokenizer, so that a model trained here and Meta's behave alike:

    model_type=bpe           merges learned from pair frequencies (Sennrich et al. 2016)
    byte_fallback=True       a character outside the vocabulary becomes its UTF-8 bytes, <0xE2> <0x80> ...,
                             so no text is ever mapped to <unk> and every string round-trips
    split_digits=True        numbers are spelled digit by digit: "1984" -> 1 9 8 4, which helps arithmetic
    ids                      <unk> = 0, <s> (bos) = 1, </s> (eos) = 2, no pad id (-1)

Unlike LLaMA's, our normalisation is the identity and keeps every space: `decode(encode(text)) == text` for
any text, including runs of spaces, tabs and newlines, so generated text keeps the corpus's layout.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from llama_mini.errors import DataError
from llama_mini.files import atomic_file

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "MAX_TRAINING_CHARACTERS",
    "StreamDecoder",
    "Tokenizer",
    "train_tokenizer",
]

# Small models want a small vocabulary: the embedding and output matrices cost 2 * vocab_size * dim
# parameters (1.6M of the default model's 3.3M at vocab 4096 and dim 192), and the softmax over the
# vocabulary is computed at every position. llama2.c chose 4096 for TinyStories for this reason.
# On Shakespeare's training split (bench/tokenizer_vocab.py, docs/BENCHMARKS.md): 2048 pieces give 2.91
# bytes per token, 4096 give 3.33 and 8192 give 3.70, while the learned pieces seen fewer than 20 times
# (whose embeddings barely train) grow from 34 to 307 to 1658. 4096 sits at the knee, and it is
# `ModelArgs`'s default vocab_size.
DEFAULT_VOCAB_SIZE = 4096

# The trainer sees at most this many characters, evenly sampled from the corpus: more text changes the merges
# of a small vocabulary little but costs time, which grows with the text (the 5 MB of Shakespeare trains in
# under a second, see docs/BENCHMARKS.md), and TinyStories is 2 GB.
MAX_TRAINING_CHARACTERS = 20_000_000

# sentencepiece trains on "sentences" and skips any longer than its max_sentence_length (in bytes). We cut
# the corpus into blocks of whole lines of at most this many characters, newlines kept inside the blocks, so
# the trainer learns "\n" and "\n\n" as pieces (and merges like ".\n"), as they occur in the text it will
# encode. Feeding one line per sentence, as LLaMA did, would leave each newline to byte fallback (<0x0A>):
# on Shakespeare that costs 17% more tokens.
_SENTENCE_CHARACTERS = 2000

_BYTE_PIECES = 256  # byte_fallback adds one piece per byte value, <0x00> .. <0xFF>
_SPECIAL_PIECES = 3  # <unk>, <s>, </s>

_REPLACEMENT_CHARACTER = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte sequence to


def train_tokenizer(
    documents: Iterable[str], out_path: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> Tokenizer:
    """Train a sentencepiece BPE tokenizer on `documents`, write it to `out_path` and return it loaded.

    Deterministic: the same documents and vocab_size give a byte-identical model file. (The trainer runs on
    one thread, because the thread count is stored inside the model file; BPE has no random choices.)
    The file is written to a temporary name and renamed, so a crash never leaves half a model behind.
    Raises `DataError` when the corpus is empty or `vocab_size` does not fit it.
    """
    out_path = Path(out_path)
    documents = documents if isinstance(documents, Sequence) else list(documents)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise DataError(f"vocab_size must be an integer, got {vocab_size!r}: pass --vocab-size N")
    smallest = _BYTE_PIECES + _SPECIAL_PIECES + 1
    if vocab_size < smallest:
        raise DataError(
            f"vocab_size {vocab_size} is too small: the 256 byte pieces and 3 special ids alone take 259; "
            f"raise --vocab-size to at least {smallest} (the default is {DEFAULT_VOCAB_SIZE})"
        )
    sentences = list(_training_sentences(documents, MAX_TRAINING_CHARACTERS))
    if not sentences:
        raise DataError("cannot train a tokenizer on an empty corpus: pass --data with some text in it")

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            split_digits=True,
            # Identity normalisation and no whitespace clean-up: text comes back exactly as it went in.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            # Let runs of spaces (indentation) become single pieces instead of one piece per space.
            allow_whitespace_only_pieces=True,
            # Characters rarer than 1 in 20,000 get no piece and fall back to bytes (LLaMA's value).
            character_coverage=0.99995,
            # 4 bytes is the longest UTF-8 character, so no block of _SENTENCE_CHARACTERS is ever skipped.
            max_sentence_length=4 * _SENTENCE_CHARACTERS + 16,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            # No pad id, as in LLaMA: training packs documents into full windows and never pads, and a
            # padded position would be masked in the loss with IGNORE_INDEX, not with a vocabulary entry.
            pad_id=-1,
            num_threads=1,
            minloglevel=2,  # sentencepiece logs every step at INFO; errors still come back as exceptions
        )
    except RuntimeError as error:
        raise _vocab_size_error(error, vocab_size) from error

    with atomic_file(out_path) as file:
        file.write(model.getvalue())
    return Tokenizer(out_path)


def _training_sentences(documents: Sequence[str], max_characters: int) -> Iterator[str]:
    """Blocks of whole lines (newlines kept) of at most _SENTENCE_CHARACTERS characters, evenly sampled
    down to about `max_characters` characters in all when the corpus is larger."""
    total = sum(len(document) for document in documents)
    keep_fraction = min(1.0, max_characters / total) if total else 1.0
    index = 0
    for document in documents:
        for block in _line_blocks(document, _SENTENCE_CHARACTERS):
            # Keep block i when floor((i + 1) * f) > floor(i * f): an evenly spaced fraction f of the blocks,
            # the same every run, drawn from the whole corpus rather than from its first files.
            if int((index + 1) * keep_fraction) > int(index * keep_fraction):
                yield block
            index += 1


def _line_blocks(text: str, max_characters: int) -> Iterator[str]:
    """Cut `text` into blocks of whole lines of at most `max_characters` (a longer line is cut inside)."""
    block: list[str] = []
    size = 0
    for line in text.splitlines(keepends=True):
        for start in range(0, len(line), max_characters):
            part = line[start : start + max_characters]
            if size + len(part) > max_characters and block:
                yield "".join(block)
                block, size = [], 0
            block.append(part)
            size += len(part)
    if block:
        yield "".join(block)


def _vocab_size_error(error: RuntimeError, vocab_size: int) -> DataError:
    """Turn sentencepiece's complaint about vocab_size into a message that says which flag to change."""
    message = str(error)
    too_high = re.search(r"Vocabulary size too high.*?<= ?(\d+)", message)
    if too_high:
        return DataError(
            f"vocab_size {vocab_size} is too large for this corpus, which supports at most "
            f"{too_high.group(1)} pieces: lower --vocab-size or add more text"
        )
    too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_low:
        return DataError(
            f"vocab_size {vocab_size} is too small for this corpus, which needs {too_low.group(1)} pieces "
            f"(256 bytes, 3 special ids and its common characters): raise --vocab-size"
        )
    return DataError(
        f"sentencepiece could not train a {vocab_size}-piece tokenizer ({message}): "
        f"try another --vocab-size or check the corpus"
    )


class Tokenizer:
    """A sentencepiece model loaded from a `.model` file: ours, or any other such as LLaMA 2's.

    `sha256` is the hex digest of the file's bytes; data shards record it, so a shard encoded with one
    tokenizer is never silently read with another. `pad_id` is -1 when the model has no pad piece.
    """

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        try:
            model_bytes = self.model_path.read_bytes()
        except OSError as error:
            raise DataError(
                f"cannot read tokenizer model {self.model_path} ({error.strerror or error}): "
                f"train one with train_tokenizer or pass the path of a sentencepiece .model file"
            ) from error
        # Hash and parse the same bytes, so the digest always describes the model actually loaded.
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model_bytes)
        except RuntimeError as error:
            raise DataError(
                f"tokenizer model {self.model_path} is not a valid sentencepiece model: "
                f"delete it to train a new one, or pass the path of a sentencepiece .model file"
            ) from error

    @property
    def vocab_size(self) -> int:
        return self._processor.GetPieceSize()

    @property
    def bos_id(self) -> int:
        return self._processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self._processor.pad_id()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with bos_id first and/or eos_id last when asked."""
        return self._processor.Encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` for many texts in one call: sentencepiece spreads them over its threads, much faster
        than a Python loop when the texts are many and short."""
        return self._processor.Encode(list(texts), add_bos=bos, add_eos=eos)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; control ids (bos, eos) decode to nothing."""
        return self._processor.Decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, e.g. '▁the' ('▁' marks a space) or '<0x0A>' (a byte)."""
        return self._processor.IdToPiece(token_id)

    def stream_decoder(self) -> StreamDecoder:
        """A fresh `StreamDecoder` for one generated sequence."""
        return StreamDecoder(self)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Decode generated ids one at a time, so text can be printed as it is generated.

    Decoding each id on its own is wrong in two ways: a character outside the vocabulary arrives as 2-4
    byte pieces that mean nothing until the last one (🙂 = <0xF0> <0x9F> <0x99> <0x82>), and sentencepiece
    drops the leading space of the first piece of a text ('▁Hello' -> 'Hello'), which is right only at the
    very start. So we decode a short window of recent ids twice, without and with the new ones, and emit
    the difference:

        prefix_text = decode(ids[prefix_start:read_start])      text already emitted
        new_text    = decode(ids[prefix_start:])                 the same, plus what the new ids add
        emit new_text[len(prefix_text):], unless new_text ends in U+FFFD (an unfinished character): wait

    Both decodes begin at the same id, so the dropped leading space (if any) cancels out; and the window
    starts at an id that produced text (empty-text ids like eos never advance it), so the first-piece rule
    applies to the same piece in both. After each emission the window slides forward to the ids not yet
    shown, so a push costs O(window), not O(everything generated). The concatenation of all pushes and the
    final `flush` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # the window: ids from prefix_start on
        self._read_start = 0  # index in the window of the first id whose text has not been emitted

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ('' while a character is unfinished)."""
        self._ids.append(int(token_id))
        prefix_text = self.tokenizer.decode(self._ids[: self._read_start])
        new_text = self.tokenizer.decode(self._ids)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHARACTER):
            return ""
        # Slide the window: the ids just emitted become the next window's prefix.
        self._ids = self._ids[self._read_start :]
        self._read_start = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character decodes to U+FFFD) and reset."""
        prefix_text = self.tokenizer.decode(self._ids[: self._read_start])
        new_text = self.tokenizer.decode(self._ids)
        self._ids, self._read_start = [], 0
        return new_text[len(prefix_text) :]
