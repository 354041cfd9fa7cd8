"""Training a SentencePiece BPE tokenizer as LLaMA's, so that a model trained here and Meta's behave alike.

`train_tokenizer` fits a byte-pair-encoding vocabulary to a corpus and writes a `tokenizer.model` file:

    model_type=bpe           merges learned from pair frequencies (Sennrich et al. 2016)
    byte_fallback=True       a character outside the vocabulary becomes its UTF-8 bytes, <0xE2> <0x80> ...,
                             so no text is ever mapped to <unk> and every string round-trips
    split_digits=True        numbers are spelled digit by digit: "1984" -> 1 9 8 4, which helps arithmetic
    ids                      <unk> = 0, <s> (bos) = 1, </s> (eos) = 2, no pad id (-1)

Unlike LLaMA's, our normalisation is the identity and keeps every space: `decode(encode(text)) == text` for
any text, including runs of spaces, tabs and newlines, so generated text keeps the corpus's layout.
(add_dummy_prefix stays on, as in LLaMA: "Hello" is encoded as "▁Hello", the way it appears mid-text.)
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from llama_mini.errors import DataError
from llama_mini.files import atomic_file
from llama_mini.tokenizer.core import Tokenizer

__all__ = ["DEFAULT_VOCAB_SIZE", "MAX_TRAINING_CHARACTERS", "train_tokenizer"]

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
