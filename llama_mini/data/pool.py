"""Tokenizing a corpus's documents in parallel: batches of documents, the encoders, and the worker pool.

    document_batches     about 1M characters of whole documents, numbered in corpus order
    encoded_batches      each batch tokenized, in order: here, or by a pool of worker processes
    Encoder              a batch's documents as [bos] ids [eos], their UTF-8 sizes and split scores
    ChatEncoder          the same for conversations, rendered with the chat template, with loss masks

At most _IN_FLIGHT_PER_WORKER batches per worker are in flight, so nothing holds the corpus or its tokens
whole. The batches are the same for any number of workers and come back in the order they went out, so
what is written from them is byte-identical for any `workers`. Workers are separate processes (forked on
Linux, see _START_METHOD), each tokenizing one document at a time on one core, so N workers use N cores;
below PARALLEL_MIN_BYTES the work is done in the calling process instead (`worker_count`).

Conversations (a .jsonl of {"messages": [...]} records, llama_mini.data.sources.ChatLines) are tokenized
with the tokenizer's chat template, or DEFAULT_CHAT_TEMPLATE when it has none, and their loss masks
(llama_mini.tokenizer.chat.encode_chat: True on the assistant tokens and each reply's end-of-turn token).
A conversation that the template or tokenizer cannot take (a special token's text in its content, the
template's own raise_exception) is found in a worker by number (ChatRecordError); the caller, which knows
the corpus, reports it by file and line.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

from llama_mini.data.shards import ChatRows, token_dtype
from llama_mini.data.sources import is_blank
from llama_mini.data.split import validation_score
from llama_mini.errors import DataError
from llama_mini.tokenizer.chat import chat_template_for, encode_chat

if TYPE_CHECKING:  # only for type hints: any object with the same attributes and methods works
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "BATCH_CHARACTERS",
    "PARALLEL_MIN_BYTES",
    "ChatEncoder",
    "ChatRecordError",
    "Encoded",
    "Encoder",
    "batch_digest",
    "document_batches",
    "encoded_batches",
    "encoder_for",
    "usable_cores",
    "utf8_of",
    "worker_count",
]

# Below this size a corpus tokenizes in a few seconds on one core, and starting workers saves little; a
# batch is a fraction of a second of one worker's time, small enough to keep the order cheap. Both were
# sized from the tokenizing rates in docs/BENCHMARKS.md ("Preparing a corpus").
PARALLEL_MIN_BYTES = 16_000_000
BATCH_CHARACTERS = 1 << 20
_IN_FLIGHT_PER_WORKER = 2  # batches submitted ahead per worker: it never waits, memory stays bounded
# Linux forks the workers: they start in milliseconds with llama_mini already imported, where a fresh
# interpreter ("spawn") takes seconds to import torch and the parent's __main__ (train.py's whole training
# stack). Forking a process that has threads (torch starts one) is unsafe only for a child that takes a
# lock another thread held at the fork; the workers run only the tokenizer, numpy and pickling, as a
# PyTorch DataLoader's forked workers do. macOS and Windows spawn (their system libraries are not
# fork-safe): slower to start, the same shards.
_START_METHOD = "fork" if sys.platform == "linux" else "spawn"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def worker_count(workers: int | None, corpus_bytes: int | None, tokenizer: Tokenizer) -> int:
    """The worker processes to tokenize a corpus of `corpus_bytes` with (None: unknown) when `workers`
    are asked for (None: usable_cores()): 1, meaning this process, for a corpus below PARALLEL_MIN_BYTES
    or a tokenizer object that cannot be loaded again in a worker."""
    workers = usable_cores() if workers is None else workers
    if corpus_bytes is not None and corpus_bytes < PARALLEL_MIN_BYTES or not hasattr(tokenizer, "model_path"):
        return 1
    return workers


@dataclass
class Encoded:
    """One batch of documents, tokenized: what the main process needs to route and write them."""

    first: int  # number of the batch's first document in the corpus (empty documents not counted)
    tokens: np.ndarray  # every document's [bos] ids [eos], concatenated
    lengths: np.ndarray  # tokens of each document
    sizes: np.ndarray  # UTF-8 bytes of each document
    scores: np.ndarray  # each document's validation_score
    digest: bytes  # sha256 of the documents' length-prefixed UTF-8 text
    # Chat data only: each token's loss mask, each conversation's first target offset (-1: none) and the
    # UTF-8 bytes of its assistant text (sizes are then those of the rendered conversations).
    masks: np.ndarray | None = None
    first_targets: np.ndarray | None = None
    target_bytes: np.ndarray | None = None

    def chat_rows(self, documents: np.ndarray, flags: np.ndarray) -> ChatRows | None:
        """The ChatRows of the chosen documents (a flag per document, and per token), None for text."""
        if self.masks is None:
            return None
        return ChatRows(
            self.masks[flags],
            self.lengths[documents],
            self.first_targets[documents],
            int(self.target_bytes[documents].sum()),
        )


class Encoder:
    """Tokenizes a batch of documents, one document per call so the tokenizer uses one thread."""

    def __init__(self, tokenizer: Tokenizer, seed: int):
        self.tokenizer, self.seed = tokenizer, seed
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, first: int, texts: Sequence[str]) -> Encoded:
        data = [utf8_of(text, number) for number, text in enumerate(texts, start=first + 1)]
        encoded = self._encode(first, texts)
        encoded.scores = np.fromiter(
            (validation_score(item, self.seed) for item in data), np.float64, len(data)
        )
        encoded.digest = batch_digest(data)
        if encoded.sizes is None:
            encoded.sizes = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        return encoded

    def _encode(self, first: int, texts: Sequence[str]) -> Encoded:
        """The batch's tokens: [bos] ids [eos] per document (scores and digest are filled in after)."""
        ids = [self.tokenizer.encode(text, bos=True, eos=True) for text in texts]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return Encoded(first, tokens, lengths, None, None, b"")


class ChatRecordError(DataError):
    """Conversation `number` (from 1, in corpus order) of a chat corpus cannot be encoded, for `reason`.
    Raised in a worker, which knows the number but not the file: prepare_data names the file and line."""

    def __init__(self, number: int, reason: str):
        super().__init__(number, reason)
        self.number, self.reason = number, reason

    def __str__(self) -> str:
        return f"conversation {self.number} of the corpus: {self.reason}"


def _conversation_tokens(
    tokenizer: Tokenizer, messages: list[dict[str, Any]]
) -> tuple[list[int], np.ndarray, int, int]:
    """One conversation as prepared chat data hold it: (ids, mask as uint8, UTF-8 bytes of the rendered
    text, UTF-8 bytes of the assistant text). The assistant text's bytes are those of each masked run of
    tokens decoded: the replies without the end-of-turn tokens, which are not text."""
    encoding = encode_chat(tokenizer, messages)
    mask = np.fromiter(encoding.mask, dtype=np.uint8, count=len(encoding.mask))
    ids = np.asarray(encoding.ids, dtype=np.int64)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))  # run starts and ends, alternating
    target_bytes = sum(
        len(tokenizer.decode(ids[start:end].tolist()).encode("utf-8"))
        for start, end in zip(edges[::2], edges[1::2], strict=True)
    )
    return encoding.ids, mask, len(encoding.text.encode("utf-8")), target_bytes


def _first_target(mask: np.ndarray) -> int:
    """The offset of a conversation's first assistant token at offset >= 1 (a token at offset 0 is the
    target of no position of a row that starts there), or -1."""
    found = np.flatnonzero(mask[1:])
    return int(found[0]) + 1 if len(found) else -1


class ChatEncoder(Encoder):
    """Tokenizes conversations (their canonical JSON, ChatLines' documents) with the tokenizer's chat
    template (chat_template_for) and their loss masks."""

    def _encode(self, first: int, texts: Sequence[str]) -> Encoded:
        ids, masks, sizes, targets = [], [], [], []
        for number, text in enumerate(texts, start=first + 1):
            try:
                record = _conversation_tokens(self.tokenizer, json.loads(text))
            except DataError as error:
                raise ChatRecordError(number, str(error)) from None
            for values, value in zip((ids, masks, sizes, targets), record, strict=True):
                values.append(value)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return Encoded(
            first=first,
            tokens=np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum())),
            lengths=lengths,
            sizes=np.asarray(sizes, dtype=np.int64),
            scores=None,
            digest=b"",
            masks=np.concatenate(masks) if masks else np.empty(0, np.uint8),
            first_targets=np.asarray([_first_target(mask) for mask in masks], dtype=np.int64),
            target_bytes=np.asarray(targets, dtype=np.int64),
        )


def encoder_for(tokenizer: Tokenizer, seed: int, chat: bool) -> Encoder:
    """The encoder of text documents, or of conversations."""
    return ChatEncoder(tokenizer, seed) if chat else Encoder(tokenizer, seed)


def batch_digest(data: Sequence[bytes]) -> bytes:
    """The sha256 of a batch's documents (their UTF-8 bytes), each prefixed by its length."""
    digest = hashlib.sha256()
    for item in data:
        digest.update(len(item).to_bytes(8, "little"))
        digest.update(item)
    return digest.digest()


def utf8_of(text: str, number: int) -> bytes:
    """The UTF-8 bytes of document `number` (from 1), or a DataError if it holds a lone surrogate."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(
            f"document {number} of the corpus holds {text[error.start]!r}, half of a UTF-16 surrogate pair, "
            f"which is not text: fix or drop it"
        ) from None


_worker_encoder: Encoder | None = None  # each worker process's own, made by _start_worker


def _start_worker(tokenizer_path: str, sha256: str, seed: int, template: str | None) -> None:
    """Load the tokenizer in a fresh worker process and check that it is the one the parent uses; for
    chat data (`template` is the parent's chat template) give it the parent's template, which the files
    need not hold (a template set on the Tokenizer object, or DEFAULT_CHAT_TEMPLATE)."""
    global _worker_encoder
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    # Hugging Face tokenizers would spread each call over all cores: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from llama_mini.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.sha256 != sha256:
        raise DataError(f"tokenizer {tokenizer_path} changed while the data were being prepared: run again")
    if template is not None and chat_template_for(tokenizer) != template:
        tokenizer.chat_template = template
    _worker_encoder = encoder_for(tokenizer, seed, chat=template is not None)


def _exit_with_parent(parent: int) -> None:
    """End this worker when its parent is gone. A worker waits on a queue whose writing end it holds too,
    so a parent killed with SIGKILL, which cannot shut the pool down, would leave it waiting for good; the
    interrupted preparation is continued by the next run, with workers of its own."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode_in_worker(first: int, texts: list[str]) -> Encoded:
    assert _worker_encoder is not None, "_start_worker runs first in every worker"
    return _worker_encoder(first, texts)


def document_batches(documents: Iterator[str], skipped: list[int]) -> Iterator[tuple[int, list[str]]]:
    """(number of the first document, documents) of about BATCH_CHARACTERS each, in corpus order; empty
    documents are left out and counted in skipped[0]."""
    batch: list[str] = []
    size = first = 0
    for text in documents:
        if is_blank(text):
            skipped[0] += 1
            continue
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARACTERS:
            yield first, batch
            first += len(batch)
            batch, size = [], 0
    if batch:
        yield first, batch


def encoded_batches(
    batches: Iterator[tuple[int, list[str]]], tokenizer: Tokenizer, seed: int, workers: int, chat: bool
) -> Iterator[Encoded]:
    """Every batch tokenized, in order: here when workers == 1, else by a pool of `workers` processes
    with at most _IN_FLIGHT_PER_WORKER batches each submitted ahead (and, while they start, by this one)."""
    if workers == 1:
        encoder = encoder_for(tokenizer, seed, chat)
        for first, texts in batches:
            yield encoder(first, texts)
        return
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(_START_METHOD),
        initializer=_start_worker,
        initargs=(
            str(tokenizer.model_path),
            tokenizer.sha256,
            seed,
            chat_template_for(tokenizer) if chat else None,
        ),
    )
    # The batches in order: futures of the workers' results, or results this process made itself. A
    # spawned worker starts Python and imports torch: seconds in which it tokenizes nothing. Until the
    # first worker's result arrives, this process tokenizes the next batches itself instead of waiting;
    # from then on it only reads, routes and writes.
    pending: deque[Future | Encoded] = deque()
    limit = _IN_FLIGHT_PER_WORKER * workers
    encoder = encoder_for(tokenizer, seed, chat)
    workers_started = False
    try:
        batch = next(batches, None)
        while batch is not None or pending:
            if batch is not None and sum(isinstance(item, Future) for item in pending) < limit:
                pending.append(pool.submit(_encode_in_worker, *batch))
                batch = next(batches, None)
                continue
            head = pending[0]
            if isinstance(head, Future) and not head.done() and not workers_started and batch is not None:
                pending.append(encoder(*batch))  # after the submitted batches: the order is kept
                batch = next(batches, None)
                continue
            pending.popleft()
            if isinstance(head, Future):
                workers_started = True
                head = head.result()
            yield head
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
