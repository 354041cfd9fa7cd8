"""Prepared data are checked when a run opens them: token ids against the vocabulary, cached by each
shard's size and modification time, and with --verify-data every file's sha256 (llama_mini.data.checks)."""

import json
import os

import numpy as np
import pytest
from data_helpers import write_chat_data, write_token_data

from llama_mini.data import MANIFEST, TokenSplit
from llama_mini.data.checks import CHECKED, check_token_ids, verify_checksums
from llama_mini.errors import DataError
from llama_mini.tokenizer import train_tokenizer

TEXTS = [f"line {i}: the quick brown fox." for i in range(30)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS, tmp_path_factory.mktemp("tok") / "tokenizer.model", 300)


def damage(path, offset: int, value: int, keep_time: bool = False) -> None:
    """Write the uint16 `value` at token `offset` of shard `path` (its size stays)."""
    status = path.stat()
    tokens = np.fromfile(path, dtype=np.uint16)
    tokens[offset] = value
    tokens.tofile(path)
    if keep_time:
        os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def test_the_largest_id_of_each_shard_is_cached_by_its_size_and_modification_time(tmp_path, tokenizer):
    train, _ = write_token_data(tmp_path, {"train": TEXTS, "val": ["held out"]}, tokenizer, shard_tokens=64)
    check_token_ids(train)
    cache = json.loads((tmp_path / CHECKED).read_text())
    shard = tmp_path / "train-000001.bin"
    status = shard.stat()
    assert cache["train-000001.bin"] == [
        status.st_size,
        status.st_mtime_ns,
        int(np.fromfile(shard, np.uint16).max()),
    ]
    damage(shard, 5, 999, keep_time=True)  # the cache vouches for it: not read again
    check_token_ids(TokenSplit(tmp_path, "train"))
    damage(shard, 5, 999)  # a new modification time: read again
    with pytest.raises(DataError, match=r"train-000001.bin holds id 999, beyond the vocabulary of 300 ids"):
        check_token_ids(TokenSplit(tmp_path, "train"))


def test_verify_checksums_compares_every_file_of_a_chat_split(tmp_path, tokenizer):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    train, _ = write_chat_data(tmp_path, {"train": [chat] * 5, "val": [chat]}, tokenizer, shard_tokens=40)
    files = verify_checksums(train)
    assert files == len(train.meta.shards) * 2 + 1  # tokens, masks, conversation index
    index = tmp_path / "train-conversations-000000.bin"
    index.write_bytes(index.read_bytes()[:-1] + b"\x01")
    with pytest.raises(DataError, match="train-conversations-000000.bin does not have the sha256 recorded"):
        verify_checksums(train)


def test_verify_checksums_asks_for_data_prepared_with_them(tmp_path, tokenizer):
    train, _ = write_token_data(tmp_path, {"train": TEXTS, "val": ["held out"]}, tokenizer)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    del manifest["checksums"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="records no checksums .* leave out --verify-data"):
        verify_checksums(train)
