"""Preparing a corpus for training: documents stream from their source through tokenization into shards.

    source.documents()      the corpus, one document at a time              (this process: reading only)
      -> batches            about 1M characters of whole documents, numbered in corpus order
      -> workers            each document as [bos] ids [eos], its UTF-8 size and its split score
      -> DataWriter         in batch order, each document's ids to the train or val shards

Nothing holds the corpus, its documents or its tokens whole: at most 2 batches per worker are in flight,
and the writer appends to the open shard. The batches are the same for any number of workers and come
back in the order they went out, so the shards are byte-identical for any `workers`. Workers are separate
processes (forked on Linux, see _START_METHOD), each tokenizing one document at a time on one core, so N
workers use N cores; below PARALLEL_MIN_BYTES the work is done here instead.

`prepare_data` first looks at what `out_dir` already holds: data prepared with the same tokenizer and
split settings from a corpus whose files have the sizes and modification times recorded then are used as
they are, without reading the corpus. When the files changed, a new run prepares them again and a resumed
run keeps the data it started with; either way one log line says what changed.

`tokenizer_sample` reads the first `budget` bytes of the training split for a new tokenizer to learn
from, so a corpus of any size trains its tokenizer in the same time.

Chat data (a .jsonl of {"messages": [...]} records, llama_mini.data.sources.ChatLines) take the same
path with another encoder: each conversation is rendered with the tokenizer's chat template, or
DEFAULT_CHAT_TEMPLATE when it has none, and tokenized with its loss mask (llama_mini.tokenizer.chat.
encode_chat: True on the assistant tokens and each reply's end-of-turn token). The template is the
tokenizer's own, which the run saves with its checkpoints, so a model fine-tuned on the default template
remembers it. The conversations are split by the same keyed hash as documents (of their canonical JSON),
written whole and untruncated (how a row of a given context truncates them is decided when batches are
drawn, llama_mini.data.shards.ChatIndex), and the manifest records the template. A conversation that the
template or tokenizer cannot take (a special token's text in its content, the template's own
raise_exception) is found in a worker by number and reported by file and line.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llama_mini.data.shards import ChatRows, DataWriter, TokenSplit, read_manifest, token_dtype
from llama_mini.data.sources import HELP_DATA, ChatLines, InputRecord, Source, is_blank, open_source
from llama_mini.data.split import (
    SPLIT_RULE,
    Threshold,
    check_val_fraction,
    cut_single_document,
    exact_threshold,
    is_small,
    split_documents,
    validates,
    validation_score,
)
from llama_mini.errors import DataError
from llama_mini.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, chat_template_for, encode_chat

if TYPE_CHECKING:  # only for type hints: any object with the same attributes and methods works
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "PARALLEL_MIN_BYTES",
    "TOKENIZER_SAMPLE_BYTES",
    "ChatRecordError",
    "prepare_data",
    "tokenizer_sample",
    "usable_cores",
    "write_chat_data",
    "write_token_data",
]

TOKENIZER_SAMPLE_BYTES = 20_000_000  # train_tokenizer reads at most 20M characters anyway
PARALLEL_MIN_BYTES = 16_000_000  # below about 3 s of tokenizing on one core, workers save little
_BATCH_CHARACTERS = 1 << 20  # a batch is about 0.2 s of one worker's time: small enough to keep order cheap
_IN_FLIGHT_PER_WORKER = 2  # batches submitted ahead per worker: it never waits, memory stays bounded
# Linux forks the workers: they start in milliseconds with llama_mini already imported, where a fresh
# interpreter ("spawn") takes seconds to import torch and the parent's __main__ (train.py's whole training
# stack). Forking a process that has threads (torch starts one) is unsafe only for a child that takes a
# lock another thread held at the fork; the workers run only the tokenizer, numpy and pickling, as a
# PyTorch DataLoader's forked workers do. macOS and Windows spawn (their system libraries are not
# fork-safe): slower to start, the same shards.
_START_METHOD = "fork" if sys.platform == "linux" else "spawn"

Log = Callable[[str], None]

# The settings that prepared data always record and must match to be reused; a source adds its own
# ("text_field", "data_split") when they change what it reads.
_ALWAYS_RECORDED = ("corpus", "val_fraction", "split_seed", "split_rule")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one, else all of them)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------
# Tokenizing batches of documents, here or in worker processes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Encoded:
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


class _Encoder:
    """Tokenizes a batch of documents, one document per call so the tokenizer uses one thread."""

    def __init__(self, tokenizer: Tokenizer, seed: int):
        self.tokenizer, self.seed = tokenizer, seed
        self.dtype = token_dtype(tokenizer.vocab_size)

    def __call__(self, first: int, texts: Sequence[str]) -> _Encoded:
        digest = hashlib.sha256()
        data = []
        for number, text in enumerate(texts, start=first + 1):
            encoded = _utf8(text, number)
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
            data.append(encoded)
        encoded = self._encode(first, texts)
        encoded.scores = np.fromiter(
            (validation_score(item, self.seed) for item in data), np.float64, len(data)
        )
        encoded.digest = digest.digest()
        if encoded.sizes is None:
            encoded.sizes = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        return encoded

    def _encode(self, first: int, texts: Sequence[str]) -> _Encoded:
        """The batch's tokens: [bos] ids [eos] per document (scores and digest are filled in after)."""
        ids = [self.tokenizer.encode(text, bos=True, eos=True) for text in texts]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=int(lengths.sum()))
        return _Encoded(first, tokens, lengths, None, None, b"")


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


class _ChatEncoder(_Encoder):
    """Tokenizes conversations (their canonical JSON, ChatLines' documents) with the tokenizer's chat
    template (chat_template_for) and their loss masks."""

    def _encode(self, first: int, texts: Sequence[str]) -> _Encoded:
        ids, masks, sizes, targets = [], [], [], []
        for number, text in enumerate(texts, start=first + 1):
            try:
                record = _conversation_tokens(self.tokenizer, json.loads(text))
            except DataError as error:
                raise ChatRecordError(number, str(error)) from None
            for values, value in zip((ids, masks, sizes, targets), record, strict=True):
                values.append(value)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        return _Encoded(
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


def _encoder(tokenizer: Tokenizer, seed: int, chat: bool) -> _Encoder:
    """The encoder of text documents, or of conversations."""
    return _ChatEncoder(tokenizer, seed) if chat else _Encoder(tokenizer, seed)


def _utf8(text: str, number: int) -> bytes:
    """The UTF-8 bytes of document `number` (from 1), or a DataError if it holds a lone surrogate."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(
            f"document {number} of the corpus holds {text[error.start]!r}, half of a UTF-16 surrogate pair, "
            f"which is not text: fix or drop it"
        ) from None


_worker_encoder: _Encoder | None = None  # each worker process's own, made by _start_worker


def _start_worker(tokenizer_path: str, sha256: str, seed: int, template: str | None) -> None:
    """Load the tokenizer in a fresh worker process and check that it is the one the parent uses; for
    chat data (`template` is the parent's chat template) give it the parent's template, which the files
    need not hold (a template set on the Tokenizer object, or DEFAULT_CHAT_TEMPLATE)."""
    global _worker_encoder
    # Hugging Face tokenizers would spread each call over all cores: the workers are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    from llama_mini.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.sha256 != sha256:
        raise DataError(f"tokenizer {tokenizer_path} changed while the data were being prepared: run again")
    if template is not None and chat_template_for(tokenizer) != template:
        tokenizer.chat_template = template
    _worker_encoder = _encoder(tokenizer, seed, chat=template is not None)


def _encode_in_worker(first: int, texts: list[str]) -> _Encoded:
    assert _worker_encoder is not None, "_start_worker runs first in every worker"
    return _worker_encoder(first, texts)


def _batches(documents: Iterator[str], skipped: list[int]) -> Iterator[tuple[int, list[str]]]:
    """(number of the first document, documents) of about _BATCH_CHARACTERS each, in corpus order; empty
    documents are left out and counted in skipped[0]."""
    batch: list[str] = []
    size = first = 0
    for text in documents:
        if is_blank(text):
            skipped[0] += 1
            continue
        batch.append(text)
        size += len(text)
        if size >= _BATCH_CHARACTERS:
            yield first, batch
            first += len(batch)
            batch, size = [], 0
    if batch:
        yield first, batch


def _encoded_batches(
    batches: Iterator[tuple[int, list[str]]], tokenizer: Tokenizer, seed: int, workers: int, chat: bool
) -> Iterator[_Encoded]:
    """Every batch tokenized, in order: here when workers == 1, else by a pool of `workers` processes
    with at most _IN_FLIGHT_PER_WORKER batches each submitted ahead (and, while they start, by this one)."""
    if workers == 1:
        encoder = _encoder(tokenizer, seed, chat)
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
    pending: deque[Future | _Encoded] = deque()
    limit = _IN_FLIGHT_PER_WORKER * workers
    encoder = _encoder(tokenizer, seed, chat)
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


# ---------------------------------------------------------------------------------------------------------
# prepare_data
# ---------------------------------------------------------------------------------------------------------


def prepare_data(
    spec: str,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    *,
    text_field: str = "text",
    data_split: str = "train",
    workers: int | None = None,
    resuming: bool = False,
    shard_tokens: int | None = None,
    progress: bool = False,
    log: Log | None = None,
    chat: bool | None = None,
) -> tuple[TokenSplit, TokenSplit]:
    """Tokenize corpus `spec` (llama_mini.data.sources) into train and validation shards in `out_dir`,
    split by document with `seed` (llama_mini.data.split); return the two splits, memory-mapped.

    chat: read `spec` as conversations (True), as text (False), or as conversations when its records have
    "messages" (None); chat data are rendered with the tokenizer's chat template, or DEFAULT_CHAT_TEMPLATE
    when it has none (see the module docstring), and reused only with the same template.

    Data already in `out_dir` are used as they are when they were written with this tokenizer and these
    settings, and the corpus's files still have the recorded sizes and modification times (see the module
    docstring; `resuming` keeps them even when the corpus changed). workers: tokenizing processes (None:
    usable_cores()); shard_tokens: ids per shard (None: SHARD_BYTES worth); progress: tqdm bars on a
    terminal; log: called with one line per stage.
    """
    check_val_fraction(val_fraction)
    folder, log = Path(out_dir), log or (lambda line: None)
    wanted = {
        "corpus": spec,
        "text_field": text_field,
        "data_split": data_split,
        "val_fraction": val_fraction,
        "split_seed": seed,
        "split_rule": SPLIT_RULE,
        "chat": chat,
    }
    manifest = _reusable(folder, tokenizer, wanted)
    if manifest is not None and resuming:
        try:
            current = open_source(spec, text_field, data_split, cache_dir, chat).inputs()
        except DataError:  # the corpus is gone: the prepared data are all a resumed run needs
            current = []
        change = _describe_change(manifest["provenance"].get("inputs"), current)
        if change is None:
            log(f"data: reusing {folder} ({_summary(manifest)})")
        else:
            log(
                f"data: corpus {spec} changed since {folder} was prepared ({change}); the resumed run goes "
                f"on with the data it started with (start a new run to train on the new corpus)"
            )
        return TokenSplit(folder, "train"), TokenSplit(folder, "val")
    source = open_source(spec, text_field, data_split, cache_dir, chat)
    if manifest is not None and ("chat" in manifest) != source.chat:
        manifest = None  # prepared as text and now read as chat, or the other way round
    if manifest is not None:
        change = _describe_change(manifest["provenance"].get("inputs"), source.inputs())
        if change is None:
            log(f"data: reusing {folder} ({_summary(manifest)})")
            return TokenSplit(folder, "train"), TokenSplit(folder, "val")
        log(f"data: corpus {spec} changed since {folder} was prepared ({change}); preparing it again")
    workers = usable_cores() if workers is None else workers
    if source.size is not None and source.size < PARALLEL_MIN_BYTES or not hasattr(tokenizer, "model_path"):
        workers = 1  # small, or a tokenizer object that cannot be loaded again in a worker
    settings = {key: wanted[key] for key in (*_ALWAYS_RECORDED, *source.settings)}
    if source.chat:  # recorded for chat data only: text data keep the settings they always had
        settings["chat"] = True
    try:
        _prepare(source, folder, tokenizer, settings, workers, shard_tokens, progress, log)
    except ChatRecordError as error:
        where = source.locate(error.number) if isinstance(source, ChatLines) else str(error)
        raise DataError(f"{where}: {error.reason}") from None
    return TokenSplit(folder, "train"), TokenSplit(folder, "val")


def _chat_manifest(tokenizer: Tokenizer) -> dict[str, Any]:
    """The manifest's "chat" record: the template the conversations are rendered with."""
    template = chat_template_for(tokenizer)
    return {
        "template": template,
        "template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "default_template": template == DEFAULT_CHAT_TEMPLATE,
    }


def _reusable(folder: Path, tokenizer: Tokenizer, wanted: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of complete data in `folder` written with this tokenizer and these settings, or None."""
    try:
        manifest = read_manifest(folder)
        for split in ("train", "val"):
            TokenSplit(folder, split)  # every shard there, with its size
    except DataError:
        return None
    settings = manifest.get("provenance", {}).get("settings", {})
    # "chat" None (recognise the corpus) accepts either kind here; prepare_data checks the kind found.
    same = all(key in settings for key in _ALWAYS_RECORDED) and all(
        settings[key] == wanted.get(key) for key in settings if not (key == "chat" and wanted[key] is None)
    )
    if "chat" in manifest:  # the tokenizer's sha256 does not cover its chat template
        same = same and manifest["chat"]["template"] == chat_template_for(tokenizer)
        same = same and wanted["chat"] is not False
    else:
        same = same and not wanted["chat"]
    return manifest if same and manifest["tokenizer_sha256"] == tokenizer.sha256 else None


@dataclass
class _Pass:
    """What one pass over the corpus found, for the corner cases of the split."""

    documents: int = 0
    lowest: tuple[float, int] = (2.0, -1)  # (score, number) of the first document with the lowest score
    highest: tuple[float, int] = (-1.0, -1)  # and of the first with the highest


def _prepare(
    source: Source,
    folder: Path,
    tokenizer: Tokenizer,
    settings: dict[str, Any],
    workers: int,
    shard_tokens: int | None,
    progress: bool,
    log: Log,
) -> None:
    """Tokenize `source` into `folder` with the split rules of llama_mini.data.split: a small corpus is
    scored first and split exactly; a larger one is split as it streams, and tokenized a second time in
    the rare corner case of no document (or every one) validating by score."""
    size = "" if source.size is None else f", {source.size / 1e6:,.1f} MB"
    plural = "s" if workers > 1 else ""
    log(f"data: tokenizing {source.spec} ({source.kind}{size}) into {folder} with {workers} worker{plural}")
    inputs = source.inputs()  # before reading: a file changed while being read then counts as changed
    started = time.perf_counter()
    val_fraction = settings["val_fraction"]
    scores = small_corpus_scores(source, settings["split_seed"])
    found = None
    if scores is None or len(scores) >= 2:
        threshold = None if scores is None else exact_threshold(scores, val_fraction)
        found = _tokenize(
            source, folder, tokenizer, settings, inputs, workers, threshold, {}, shard_tokens, progress
        )
    if isinstance(found, _Pass) and found.documents >= 2:  # a large corpus's corner case
        no_validation = found.lowest[0] >= val_fraction
        forced = {found.lowest[1]: True} if no_validation else {found.highest[1]: False}
        if no_validation:
            log("data: no document scored below --val-fraction, so the lowest-scoring one validates")
        else:
            log("data: every document scored below --val-fraction, so the highest-scoring one trains")
        _tokenize(source, folder, tokenizer, settings, inputs, workers, None, forced, shard_tokens, progress)
    elif found is None or isinstance(found, _Pass):
        documents = len(scores) if scores is not None else found.documents
        if documents == 0:
            raise DataError(
                f"corpus {source.spec} is empty: it holds no text; {HELP_DATA} with some text in it"
            )
        if source.chat:  # a conversation is never cut in two
            raise DataError(
                f"chat corpus {source.spec} holds 1 conversation: training and validation need at least "
                f"one each; add conversations"
            )
        _write_single_document(source, folder, tokenizer, settings, inputs, shard_tokens)
    seconds = time.perf_counter() - started
    manifest = read_manifest(folder)
    megabytes = sum(manifest["splits"][split]["bytes"] for split in ("train", "val")) / 1e6
    log(f"data: {_summary(manifest)} in {seconds:.1f} s ({megabytes / max(seconds, 1e-9):.1f} MB/s)")


def small_corpus_scores(source: Source, seed: int) -> np.ndarray | None:
    """The validation scores of every non-empty document of a small corpus (llama_mini.data.split), from
    a pass that reads without tokenizing; None as soon as the corpus proves not small."""
    scores: list[float] = []
    size = 0
    for text in source.documents():
        if is_blank(text):
            continue
        data = _utf8(text, len(scores) + 1)
        size += len(data)
        scores.append(validation_score(data, seed))
        if not is_small(size, len(scores)):
            return None
    return np.array(scores, dtype=np.float64)


def _tokenize(
    source: Source,
    folder: Path,
    tokenizer: Tokenizer,
    settings: dict[str, Any],
    inputs: list[InputRecord] | None,
    workers: int,
    threshold: Threshold | None,
    forced: dict[int, bool],
    shard_tokens: int | None,
    progress: bool,
) -> dict[str, Any] | _Pass:
    """One pass over the corpus: documents to shards by their scores and the small corpus's `threshold`
    (`forced`: document number -> whether it validates, overriding both). Returns the manifest written,
    or, when the split is a corner case (no document, one, or all in one split), a _Pass and no manifest."""
    val_fraction, seed = settings["val_fraction"], settings["split_seed"]
    found, skipped, digest = _Pass(), [0], hashlib.sha256()
    chat = _chat_manifest(tokenizer) if source.chat else None
    with (
        DataWriter(folder, tokenizer, shard_tokens, chat) as writer,
        _bar(source.size, "tokenizing", progress) as bar,
    ):
        batches = _batches(source.documents(), skipped)
        for encoded in _encoded_batches(batches, tokenizer, seed, workers, source.chat):
            count = len(encoded.lengths)
            chosen = validates(encoded.scores, encoded.first, val_fraction, threshold)
            for number, value in forced.items():
                if encoded.first <= number < encoded.first + count:
                    chosen[number - encoded.first] = value
            in_val = np.repeat(chosen, encoded.lengths)  # one flag per token
            for split, documents, flags in (("train", ~chosen, ~in_val), ("val", chosen, in_val)):
                size = int(encoded.sizes[documents].sum())
                rows = encoded.chat_rows(documents, flags)
                writer.write(split, encoded.tokens[flags], int(documents.sum()), size, rows)
            low, high = int(np.argmin(encoded.scores)), int(np.argmax(encoded.scores))
            if encoded.scores[low] < found.lowest[0]:
                found.lowest = (float(encoded.scores[low]), encoded.first + low)
            if encoded.scores[high] > found.highest[0]:
                found.highest = (float(encoded.scores[high]), encoded.first + high)
            found.documents += count
            digest.update(encoded.digest)
            bar.update(int(encoded.sizes.sum()))
        if found.documents < 2 or 0 in (writer.counts("train")[0], writer.counts("val")[0]):
            writer.discard()
            return found
        return writer.finish(_provenance(settings, inputs, digest.hexdigest(), skipped[0]))


def _write_single_document(
    source: Source,
    folder: Path,
    tokenizer: Tokenizer,
    settings: dict[str, Any],
    inputs: list[InputRecord] | None,
    shard_tokens: int | None,
) -> None:
    """A corpus of one document: read it again and write its two parts (llama_mini.data.split)."""
    text = next(text for text in source.documents() if not is_blank(text))
    train_text, val_text = cut_single_document(text, settings["val_fraction"])
    encoder = _Encoder(tokenizer, settings["split_seed"])
    with DataWriter(folder, tokenizer, shard_tokens) as writer:
        for split, part in (("train", train_text), ("val", val_text)):
            encoded = encoder(0, [part])
            writer.write(split, encoded.tokens, 1, int(encoded.sizes.sum()))
        whole = encoder(0, [text]).digest
        writer.finish(_provenance(settings, inputs, hashlib.sha256(whole).hexdigest(), 0))


def _provenance(
    settings: dict[str, Any], inputs: list[InputRecord] | None, digest: str, skipped: int
) -> dict[str, Any]:
    return {
        "settings": settings,  # what the data were made with; the tokenizer is the manifest's own field
        "inputs": inputs,  # [name, size, mtime_ns] of each file read, in order (None: a Hub dataset)
        "digest": digest,  # sha256 over the batches' sha256 of their documents' length-prefixed UTF-8
        "empty_documents": skipped,  # empty or whitespace-only documents left out
        "prepared": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _summary(manifest: dict[str, Any]) -> str:
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    shards = len(train["shards"]) + len(val["shards"])
    skipped = manifest["provenance"].get("empty_documents", 0)
    empty = f", {skipped:,} empty documents skipped" if skipped else ""
    if "chat" in manifest:
        default = manifest["chat"].get("default_template")
        template = "the default chat template" if default else "the tokenizer's chat template"
        return (
            f"{train['documents']:,} training and {val['documents']:,} validation conversations in "
            f"{template}, {train['tokens']:,} and {val['tokens']:,} tokens ({train['target_tokens']:,} and "
            f"{val['target_tokens']:,} of them assistant tokens, which the loss counts) in {shards} shards"
        )
    return (
        f"{train['documents']:,} training and {val['documents']:,} validation documents, {train['tokens']:,} "
        f"and {val['tokens']:,} tokens in {shards} shards{empty}"
    )


def _describe_change(recorded: list[InputRecord] | None, current: list[InputRecord] | None) -> str | None:
    """None when the corpus's files are as recorded, else what changed, in a few words."""
    if recorded == current or recorded is None and current is None:
        return None
    if not current:
        return "its files are gone"
    before = {name: (size, mtime) for name, size, mtime in recorded or []}
    after = {name: (size, mtime) for name, size, mtime in current}
    changed = [name for name in before if name in after and before[name] != after[name]]
    parts = []
    if changed:
        name = changed[0]
        parts.append(
            f"{len(changed)} of {len(before)} files changed, first {name}: {_file_state(before[name])} -> "
            f"{_file_state(after[name])}"
        )
    new = [name for name in after if name not in before]
    missing = [name for name in before if name not in after]
    for names, what in ((new, "new"), (missing, "missing")):
        if names:
            parts.append(f"{len(names)} files {what}, first {names[0]}")
    return "; ".join(parts) or "its files were reordered"


def _file_state(state: tuple[int | None, int | None]) -> str:
    size, mtime = state
    if size is None or mtime is None:
        return "missing"
    return f"{size:,} bytes modified {datetime.fromtimestamp(mtime / 1e9):%Y-%m-%d %H:%M:%S}"


@contextmanager
def _bar(total: int | None, description: str, enabled: bool) -> Iterator[Any]:
    """A tqdm bar counting bytes (MB, MB/s, and an ETA when the total is known) on a terminal, else
    nothing; it is cleared, not left half full, when the work fails."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total,
        desc=description,
        unit="B",
        unit_scale=True,
        dynamic_ncols=True,
        disable=None if enabled else True,  # None: shown only on a terminal
    )
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------------
# The tokenizer's sample, and prepared data from documents in hand
# ---------------------------------------------------------------------------------------------------------


def tokenizer_sample(
    spec: str,
    budget: int = TOKENIZER_SAMPLE_BYTES,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    *,
    text_field: str = "text",
    data_split: str = "train",
    progress: bool = False,
    log: Log | None = None,
    chat: bool | None = None,
) -> list[str]:
    """The training-split documents among the first of corpus `spec`, up to `budget` bytes of them (the
    document that crosses the budget is kept whole): what a new tokenizer learns from. Conversations
    (`chat`, as in prepare_data) are split as prepare_data splits them, and sampled as "role: content"
    lines (ChatLines.text_of).

    The same budget whatever the corpus's size, so a 10 GB corpus trains its tokenizer as fast as a 100 MB
    one; the first documents, so the sample is reproducible and needs no pass over the whole corpus (shuffle
    a corpus sorted by topic, or raise the budget). The split is prepare_data's (llama_mini.data.split): a
    small corpus is read whole (at most SMALL_CORPUS_BYTES) and split exactly, a larger one document by
    document.
    """
    check_val_fraction(val_fraction)
    log = log or (lambda line: None)
    source = open_source(spec, text_field, data_split, cache_dir, chat)
    held, size = [], 0  # the documents of what may be a small corpus
    for text in source.documents():
        if not is_blank(text):
            held.append(text)
            size += len(_utf8(text, len(held)))
            if not is_small(size, len(held)):
                held = None
                break
    if held is not None and not held:
        raise DataError(f"corpus {spec} is empty: it holds no text; {HELP_DATA} with some text in it")
    sample: list[str] = []
    sampled = 0
    training = (
        split_documents(held, val_fraction, seed)[0]
        if held is not None
        else _training_documents(source, val_fraction, seed)
    )
    with _bar(budget, "tokenizer sample", progress) as bar:
        for document in training:
            text = source.text_of(document)
            sample.append(text)
            data_size = len(text.encode("utf-8"))
            sampled += data_size
            bar.update(min(data_size, budget - bar.n))
            if sampled >= budget:
                break
    whole = "the whole training split" if sampled < budget else f"its first {budget / 1e6:,.1f} MB"
    log(f"tokenizer: training on {sampled / 1e6:,.1f} MB of {spec} ({whole}, {len(sample):,} documents)")
    return sample


def _training_documents(source: Source, val_fraction: float, seed: int) -> Iterator[str]:
    """The training split of a corpus that is not small, as it streams past."""
    for number, text in enumerate((text for text in source.documents() if not is_blank(text)), start=1):
        if validation_score(_utf8(text, number), seed) >= val_fraction:
            yield text


def write_token_data(
    out_dir: str | Path,
    splits: dict[str, Sequence[str]],
    tokenizer: Tokenizer,
    *,
    shard_tokens: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[TokenSplit, TokenSplit]:
    """Prepared data from documents in hand: `splits` maps "train" and "val" to their documents, written
    in order as [bos] ids [eos] each. For tests and tools that make their own documents; a corpus on disk
    goes through prepare_data, which streams."""
    encoder = _Encoder(tokenizer, seed=0)
    with DataWriter(out_dir, tokenizer, shard_tokens) as writer:
        for split in ("train", "val"):
            documents = [text for text in splits[split] if not is_blank(text)]
            if not documents:
                raise DataError(f"no {split} documents to write to {out_dir}: pass some text")
            for first in range(0, len(documents), 256):
                encoded = encoder(first, documents[first : first + 256])
                writer.write(split, encoded.tokens, len(encoded.lengths), int(encoded.sizes.sum()))
        writer.finish({"settings": {}, "inputs": None, **(provenance or {})})
    return TokenSplit(out_dir, "train"), TokenSplit(out_dir, "val")


def write_chat_data(
    out_dir: str | Path,
    splits: dict[str, Sequence[Sequence[dict[str, Any]]]],
    tokenizer: Tokenizer,
    *,
    shard_tokens: int | None = None,
) -> tuple[TokenSplit, TokenSplit]:
    """Prepared chat data from conversations in hand: `splits` maps "train" and "val" to lists of
    conversations (each a list of {"role", "content"} messages), written in order with their masks and
    rendered with the tokenizer's chat template (or the default). The chat counterpart of
    write_token_data; a .jsonl corpus goes through prepare_data."""
    encoder = _ChatEncoder(tokenizer, seed=0)
    with DataWriter(out_dir, tokenizer, shard_tokens, _chat_manifest(tokenizer)) as writer:
        for split in ("train", "val"):
            if not splits[split]:
                raise DataError(f"no {split} conversations to write to {out_dir}: pass some")
            documents = [json.dumps(list(messages), ensure_ascii=False) for messages in splits[split]]
            encoded = encoder(0, documents)
            every = np.ones(len(documents), dtype=bool)
            rows = encoded.chat_rows(every, np.ones(len(encoded.tokens), dtype=bool))
            writer.write(split, encoded.tokens, len(documents), int(encoded.sizes.sum()), rows)
        writer.finish({"settings": {"chat": True}, "inputs": None})
    return TokenSplit(out_dir, "train"), TokenSplit(out_dir, "val")
