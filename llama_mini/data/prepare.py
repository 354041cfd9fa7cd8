"""Preparing a corpus for training: documents stream from their source through tokenization into shards.

    source.documents()      the corpus, one document at a time              (this process: reading only)
      -> batches            about 1M characters of whole documents, numbered in corpus order
      -> workers            each document as [bos] ids [eos], its UTF-8 size and its split score
      -> DataWriter         in batch order, each document's ids to the train or val shards

Nothing holds the corpus, its documents or its tokens whole: a bounded number of batches are in flight
(llama_mini.data.pool, which tokenizes them here or in worker processes, byte-identically for any number
of workers), and the writer appends to the open shard (llama_mini.data.shards).

`prepare_data` first looks at what `out_dir` already holds (llama_mini.data.provenance): data prepared
with the same tokenizer and split settings from an unchanged corpus are used as they are, without reading
the corpus. A preparation that was interrupted (killed, Ctrl-C) is continued by the next one from its last
checkpoint, keeping the shards it finished, to the same bytes as one never interrupted (DataWriter in
llama_mini.data.shards). The data returned are checked as a run opens them (llama_mini.data.checks).

`tokenizer_sample` reads the first `budget` bytes of the training split for a new tokenizer to learn
from, so a corpus of any size trains its tokenizer in the same time.

Chat data (a .jsonl of {"messages": [...]} records, llama_mini.data.sources.ChatLines) take the same
path with another encoder (llama_mini.data.pool.ChatEncoder): each conversation is rendered with the
tokenizer's chat template and tokenized with its loss mask. The conversations are split by the same keyed
hash as documents (of their canonical JSON), written whole and untruncated (how a row of a given context
truncates them is decided when batches are drawn, llama_mini.data.shards.ChatIndex), and the manifest
records the template. A conversation that cannot be encoded is reported by file and line.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llama_mini.console import progress_bar
from llama_mini.data import pool
from llama_mini.data.checks import check_prepared
from llama_mini.data.pool import (
    ChatRecordError,
    Encoder,
    batch_digest,
    document_batches,
    encoded_batches,
    utf8_of,
    worker_count,
)
from llama_mini.data.provenance import (
    ALWAYS_RECORDED,
    chat_record,
    describe_change,
    preparation_identity,
    provenance_record,
    reusable_manifest,
    summary,
)
from llama_mini.data.shards import SHARD_BYTES, DataWriter, TokenSplit, read_manifest, token_dtype
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

if TYPE_CHECKING:  # only for type hints: any object with the same attributes and methods works
    from llama_mini.tokenizer import Tokenizer

__all__ = ["TOKENIZER_SAMPLE_BYTES", "prepare_data", "small_corpus_scores", "tokenizer_sample"]

TOKENIZER_SAMPLE_BYTES = 20_000_000  # train_tokenizer reads at most 20M characters anyway

Log = Callable[[str], None]


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
    verify: bool = False,
) -> tuple[TokenSplit, TokenSplit]:
    """Tokenize corpus `spec` (llama_mini.data.sources) into train and validation shards in `out_dir`,
    split by document with `seed` (llama_mini.data.split); return the two splits, memory-mapped.

    chat: read `spec` as conversations (True), as text (False), or as conversations when its records have
    "messages" (None); chat data are rendered with the tokenizer's chat template, or DEFAULT_CHAT_TEMPLATE
    when it has none (llama_mini.data.pool.ChatEncoder), and reused only with the same template.

    Data already in `out_dir` are used as they are when they were written with this tokenizer and these
    settings, and the corpus's files still have the recorded sizes and modification times
    (llama_mini.data.provenance; `resuming` keeps them even when the corpus changed). workers: tokenizing
    processes (None: usable_cores()); shard_tokens: ids per shard (None: SHARD_BYTES worth); progress: tqdm
    bars on a terminal; log: called with one line per stage.

    An interrupted preparation is continued where it stopped (llama_mini.data.shards.DataWriter). The data
    returned are checked (llama_mini.data.checks): a DataError names a shard holding ids beyond the
    vocabulary, and with `verify` a file whose sha256 is not the one recorded when it was written.
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
    manifest = reusable_manifest(folder, tokenizer, wanted, log)
    if manifest is not None and resuming:
        try:
            current = open_source(spec, text_field, data_split, cache_dir, chat).inputs()
        except DataError:  # the corpus is gone: the prepared data are all a resumed run needs
            current = []
        change = describe_change(manifest["provenance"].get("inputs"), current)
        if change is None:
            log(f"data: reusing {folder} ({summary(manifest)})")
        else:
            log(
                f"data: corpus {spec} changed since {folder} was prepared ({change}); the resumed run goes "
                f"on with the data it started with (start a new run to train on the new corpus)"
            )
        return _checked(folder, verify, log)
    source = open_source(spec, text_field, data_split, cache_dir, chat)
    if manifest is not None and ("chat" in manifest) != source.chat:
        manifest = None  # prepared as text and now read as chat, or the other way round
    if manifest is not None:
        change = describe_change(manifest["provenance"].get("inputs"), source.inputs())
        if change is None:
            log(f"data: reusing {folder} ({summary(manifest)})")
            return _checked(folder, verify, log)
        log(f"data: corpus {spec} changed since {folder} was prepared ({change}); preparing it again")
    workers = worker_count(workers, source.size, tokenizer)
    settings = {key: wanted[key] for key in (*ALWAYS_RECORDED, *source.settings)}
    if source.chat:  # recorded for chat data only: text data keep the settings they always had
        settings["chat"] = True
    try:
        _prepare(source, folder, tokenizer, settings, workers, shard_tokens, progress, log)
    except ChatRecordError as error:
        where = source.locate(error.number) if isinstance(source, ChatLines) else str(error)
        raise DataError(f"{where}: {error.reason}") from None
    return _checked(folder, verify, log)


def _checked(folder: Path, verify: bool, log: Log) -> tuple[TokenSplit, TokenSplit]:
    """The two splits in `folder`, checked as a run opens them (llama_mini.data.checks)."""
    splits = TokenSplit(folder, "train"), TokenSplit(folder, "val")
    check_prepared(splits, verify, log)
    return splits


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
            source, folder, tokenizer, settings, inputs, workers, threshold, {}, shard_tokens, progress, log
        )
    if isinstance(found, _Pass) and found.documents >= 2:  # a large corpus's corner case
        no_validation = found.lowest[0] >= val_fraction
        forced = {found.lowest[1]: True} if no_validation else {found.highest[1]: False}
        if no_validation:
            log("data: no document scored below --val-fraction, so the lowest-scoring one validates")
        else:
            log("data: every document scored below --val-fraction, so the highest-scoring one trains")
        _tokenize(
            source, folder, tokenizer, settings, inputs, workers, None, forced, shard_tokens, progress, log
        )
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
    log(f"data: {summary(manifest)} in {seconds:.1f} s ({megabytes / max(seconds, 1e-9):.1f} MB/s)")


def small_corpus_scores(source: Source, seed: int) -> np.ndarray | None:
    """The validation scores of every non-empty document of a small corpus (llama_mini.data.split), from
    a pass that reads without tokenizing; None as soon as the corpus proves not small."""
    scores: list[float] = []
    size = 0
    for text in source.documents():
        if is_blank(text):
            continue
        data = utf8_of(text, len(scores) + 1)
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
    log: Log,
) -> dict[str, Any] | _Pass:
    """One pass over the corpus: documents to shards by their scores and the small corpus's `threshold`
    (`forced`: document number -> whether it validates, overriding both). Returns the manifest written,
    or, when the split is a corner case (no document, one, or all in one split), a _Pass and no manifest.

    The pass is checkpointed after every batch (DataWriter.checkpoint): an interrupted pass is continued
    by the next one with the same identity, which reads the documents already written without tokenizing
    them (for the digest) and goes on from the first batch not written."""
    val_fraction, seed = settings["val_fraction"], settings["split_seed"]
    found, skipped, digest = _Pass(), [0], hashlib.sha256()
    chat = chat_record(tokenizer) if source.chat else None
    parameters = {
        "shard_tokens": shard_tokens or SHARD_BYTES // token_dtype(tokenizer.vocab_size).itemsize,
        "batch_characters": pool.BATCH_CHARACTERS,
        "threshold": threshold,
        "forced": sorted(forced.items()),
    }
    identity = preparation_identity(settings, inputs, tokenizer, chat, parameters)
    with (
        DataWriter(folder, tokenizer, shard_tokens, chat, identity) as writer,
        _bar(source.size, "tokenizing", progress) as bar,
    ):
        batches = document_batches(source.documents(), skipped)
        if writer.stale_progress:
            log(f"data: {folder} holds an unfinished preparation of other data: preparing from the start")
        if writer.resumed is not None:
            position = writer.resumed
            found = _Pass(position["next"], tuple(position["lowest"]), tuple(position["highest"]))
            kept = sum(len(writer.splits[split].checksums) for split in writer.splits)
            log(
                f"data: going on with the interrupted preparation of {folder} from document "
                f"{found.documents + 1:,} ({kept} finished shards kept)"
            )
            batches = _written_batches_skipped(batches, found.documents, digest, bar)
        for encoded in encoded_batches(batches, tokenizer, seed, workers, source.chat):
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
            writer.checkpoint({"next": found.documents, "lowest": found.lowest, "highest": found.highest})
        if found.documents < 2 or 0 in (writer.counts("train")[0], writer.counts("val")[0]):
            writer.discard()
            return found
        return writer.finish(provenance_record(settings, inputs, digest.hexdigest(), skipped[0]))


def _written_batches_skipped(
    batches: Iterator[tuple[int, list[str]]], written: int, digest: Any, bar: Any
) -> Iterator[tuple[int, list[str]]]:
    """The batches from document number `written` on; the earlier ones, already written by an interrupted
    pass, only go into the `digest` (the sha256 the workers would have computed) and the progress `bar`."""
    for first, texts in batches:
        if first >= written:
            yield first, texts
            continue
        data = [utf8_of(text, number) for number, text in enumerate(texts, start=first + 1)]
        digest.update(batch_digest(data))
        bar.update(sum(map(len, data)))


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
    encoder = Encoder(tokenizer, settings["split_seed"])
    with DataWriter(folder, tokenizer, shard_tokens) as writer:
        for split, part in (("train", train_text), ("val", val_text)):
            encoded = encoder(0, [part])
            writer.write(split, encoded.tokens, 1, int(encoded.sizes.sum()))
        whole = encoder(0, [text]).digest
        writer.finish(provenance_record(settings, inputs, hashlib.sha256(whole).hexdigest(), 0))


@contextmanager
def _bar(total: int | None, description: str, enabled: bool) -> Iterator[Any]:
    """Progress over bytes (MiB, MiB/s, and the time left when the total is known): a tqdm bar on a
    terminal, a plain line every half minute elsewhere (llama_mini.console.progress_bar); a bar is
    cleared, not left half full, when the work fails."""
    bar = progress_bar(total, description, unit="B", enabled=enabled)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------------------
# The tokenizer's sample
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
            size += len(utf8_of(text, len(held)))
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
        if validation_score(utf8_of(text, number), seed) >= val_fraction:
            yield text
