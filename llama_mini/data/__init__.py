"""Corpora, train/validation splits, token shards on disk, and random training batches.

The path from text to a training batch, streamed so that no step holds the corpus:

    sources.py    open_source(spec)        a corpus: .txt, .jsonl, Parquet, a Hugging Face dataset, or a
                                           named one (downloads.py fetches `shakespeare` and `tinystories`)
    split.py      validation_score         each document goes to train or val by a keyed hash of its text
    prepare.py    prepare_data(spec, ...)  documents -> tokenizer workers -> shards, reused when unchanged;
                  tokenizer_sample         the bounded sample a new tokenizer learns from
    pool.py       encoded_batches          batches of documents tokenized here or by worker processes
    provenance.py reusable_manifest        what prepared data were made from, so reruns reuse them
    shards.py     TokenSplit(dir, split)   a split's shards, memory-mapped and read as one sequence
    batches.py    get_batch(split, ...)    random windows, a pure function of (seed, step)
    mixture.py    get_mixture_batch        rows from weighted sources, a pure function of (seed, step)

Chat data take the same path: a .jsonl of {"messages": [...]} records (sources.ChatLines) is rendered
with the tokenizer's chat template, stored with a loss mask and a conversation index beside the token
shards (shards.ChatIndex), and drawn as rows that begin a conversation, with IGNORE_INDEX targets off the
assistant tokens (batches.py).
"""

from llama_mini.data.batches import get_batch
from llama_mini.data.downloads import (
    SHAKESPEARE_SHA256,
    TINYSTORIES_URL,
    default_cache_dir,
    fetch_shakespeare,
    fetch_tinystories,
)
from llama_mini.data.pool import PARALLEL_MIN_BYTES, usable_cores
from llama_mini.data.prepare import TOKENIZER_SAMPLE_BYTES, prepare_data, tokenizer_sample
from llama_mini.data.shards import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_BYTES,
    ChatIndex,
    SplitMeta,
    TokenSplit,
    read_manifest,
)
from llama_mini.data.sources import (
    MAX_DOCUMENT_CHARACTERS,
    TEXT_FILE_DOCUMENT_CHARACTERS,
    ChatLines,
    Source,
    load_documents,
    open_source,
)
from llama_mini.data.split import cut_single_document, split_documents, validation_score

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "MAX_DOCUMENT_CHARACTERS",
    "PARALLEL_MIN_BYTES",
    "SHAKESPEARE_SHA256",
    "SHARD_BYTES",
    "TEXT_FILE_DOCUMENT_CHARACTERS",
    "TINYSTORIES_URL",
    "TOKENIZER_SAMPLE_BYTES",
    "ChatIndex",
    "ChatLines",
    "Source",
    "SplitMeta",
    "TokenSplit",
    "cut_single_document",
    "default_cache_dir",
    "fetch_shakespeare",
    "fetch_tinystories",
    "get_batch",
    "load_documents",
    "open_source",
    "prepare_data",
    "read_manifest",
    "split_documents",
    "tokenizer_sample",
    "usable_cores",
    "validation_score",
]
