"""Prepared data from documents in hand, for tests: the shards and manifest that prepare_data writes
from a corpus, written instead from lists of documents or conversations chosen by a test."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llama_mini.data.pool import ChatEncoder, Encoder
from llama_mini.data.provenance import chat_record
from llama_mini.data.shards import DataWriter, TokenSplit
from llama_mini.data.sources import is_blank
from llama_mini.errors import DataError

if TYPE_CHECKING:
    from llama_mini.tokenizer import Tokenizer


def write_token_data(
    out_dir: str | Path,
    splits: dict[str, Sequence[str]],
    tokenizer: Tokenizer,
    *,
    shard_tokens: int | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[TokenSplit, TokenSplit]:
    """Prepared data from documents in hand: `splits` maps "train" and "val" to their documents, written
    in order as [bos] ids [eos] each. A corpus on disk goes through prepare_data, which streams."""
    encoder = Encoder(tokenizer, seed=0)
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
    encoder = ChatEncoder(tokenizer, seed=0)
    with DataWriter(out_dir, tokenizer, shard_tokens, chat_record(tokenizer)) as writer:
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
