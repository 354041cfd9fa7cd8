"""The train/validation split: whole documents, the same way every time, decided without holding them.

Every document gets a score, a keyed hash of its text and the seed mapped to [0, 1):

    score(document) = blake2b(UTF-8 text, key=str(seed)) read as a 64-bit fraction

and the documents with the lowest scores validate. How many depends on the corpus's size:

    a small corpus       (at most SMALL_CORPUS_BYTES of text in at most SMALL_CORPUS_DOCUMENTS documents)
                         exactly round(n * val_fraction) documents validate, at least 1 and at most n - 1:
                         those with the lowest scores (the first in corpus order, on ties). Its scores
                         are computed in a first, cheap pass over it (no tokenizing), then the documents
                         are routed as they stream past.
    a larger corpus      a document validates when its score is below val_fraction: a decision that
                         needs no other document, so the corpus is split as it streams past, and about
                         val_fraction of the documents (a binomial count) validate. Two corner cases need
                         the whole corpus and are settled after it has been read: when no document scores
                         below val_fraction the lowest-scoring one validates, and when all do the
                         highest-scoring one trains (the first, on ties).
    one document         its text is cut in two near (1 - val_fraction) of its length, at a paragraph
                         end, else a line end, else anywhere (`cut_single_document`)

Either way the same text always lands in the same split (a document repeated in the corpus cannot leak
from training into validation), and the split of a large corpus does not move a document when others are
added. The exact count matters for small corpora, where a binomial count would be noisy (42 works of
Shakespeare at val_fraction 0.1: anywhere from 1 to 9 validation works); for large ones the two rules agree
to within a fraction of a percent. Splitting by document keeps validation text unseen: no window of a
validation document is trained on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

import numpy as np

from llama_mini.errors import ConfigError, DataError

__all__ = [
    "SMALL_CORPUS_BYTES",
    "SMALL_CORPUS_DOCUMENTS",
    "SPLIT_RULE",
    "Threshold",
    "check_val_fraction",
    "cut_single_document",
    "exact_threshold",
    "is_small",
    "split_documents",
    "validates",
    "validation_score",
]

SPLIT_RULE = 1  # the version of these rules, recorded in prepared data: a new rule prepares them again
SMALL_CORPUS_BYTES = 64_000_000  # a first pass over this much text takes well under a second
SMALL_CORPUS_DOCUMENTS = 1_000_000  # and their scores take at most 8 MB

# (score, number) of the last document that validates under the exact rule: document i, with score s,
# validates when (s, i) <= the threshold
Threshold = tuple[float, int]

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_LINE_END = re.compile(r"\n")


def validation_score(document: bytes, seed: int) -> float:
    """The document's score in [0, 1): its UTF-8 bytes hashed with the seed as key (see the module)."""
    digest = hashlib.blake2b(document, digest_size=8, key=str(int(seed)).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")


def exact_threshold(scores: np.ndarray, val_fraction: float) -> Threshold:
    """The threshold that makes exactly round(n * val_fraction) documents (at least 1, at most n - 1) of a
    small corpus validate: the (score, number) of the last of them in (score, number) order. n >= 2."""
    count = min(len(scores) - 1, max(1, round(len(scores) * val_fraction)))
    order = np.lexsort((np.arange(len(scores)), scores))  # by score, then by number
    last = int(order[count - 1])
    return float(scores[last]), last


def validates(scores: np.ndarray, first: int, val_fraction: float, threshold: Threshold | None) -> np.ndarray:
    """Which of the documents numbered first, first + 1, ... with these scores validate: by the small
    corpus's `threshold` if it has one, else by score < val_fraction (the corner cases aside)."""
    if threshold is None:
        return scores < val_fraction
    numbers = np.arange(first, first + len(scores))
    return (scores < threshold[0]) | ((scores == threshold[0]) & (numbers <= threshold[1]))


def is_small(size: int, documents: int) -> bool:
    """Whether a corpus of `size` bytes of text in `documents` documents is split exactly."""
    return size <= SMALL_CORPUS_BYTES and documents <= SMALL_CORPUS_DOCUMENTS


def split_documents(
    documents: Sequence[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split whole documents into (train, val) by the rules of the module docstring; both lists keep the
    documents' order. The list form of what llama_mini.data.prepare_data does while streaming: both give
    the same split of the same documents."""
    check_val_fraction(val_fraction)
    documents = list(documents)
    if not documents:
        raise DataError("no documents to split: pass --data with some text in it")
    if len(documents) == 1:
        train_text, val_text = cut_single_document(documents[0], val_fraction)
        return [train_text], [val_text]
    data = [document.encode("utf-8") for document in documents]
    scores = np.array([validation_score(item, seed) for item in data])
    threshold = None
    if is_small(sum(map(len, data)), len(data)):
        threshold = exact_threshold(scores, val_fraction)
    chosen = validates(scores, 0, val_fraction, threshold)
    if not chosen.any():
        chosen[np.argmin(scores)] = True
    elif chosen.all():
        chosen[np.argmax(scores)] = False
    train = [document for document, val in zip(documents, chosen, strict=True) if not val]
    val = [document for document, val in zip(documents, chosen, strict=True) if val]
    return train, val


def cut_single_document(text: str, val_fraction: float) -> tuple[str, str]:
    """A corpus of one document is cut in two near (1 - val_fraction) of its length: at the nearest
    paragraph end, or if none is within half the validation part's length of that point, at the nearest
    line end, or failing that exactly there. The first part trains, the last validates."""
    if len(text) < 2:
        raise DataError("the corpus is a single document of 1 character, too short to split: add data")
    target = round(len(text) * (1 - val_fraction))
    tolerance = max(1, round(len(text) * val_fraction / 2))
    cut = min(max(target, 1), len(text) - 1)
    for boundary in (_BLANK_LINES, _LINE_END):
        ends = [match.end() for match in boundary.finditer(text) if 0 < match.end() < len(text)]
        nearest = min(ends, key=lambda end: abs(end - target), default=None)
        if nearest is not None and abs(nearest - target) <= tolerance:
            cut = nearest
            break
    return text[:cut], text[cut:]
