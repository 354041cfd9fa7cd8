"""Prepared data on disk and the batches drawn from them: shards hold exactly the documents' tokens, read
as one sequence whatever the shard size, are never used half written, and batches are a pure function of
(seed, step) (llama_mini.data.shards, llama_mini.data.batches)."""

import json

import numpy as np
import pytest
import torch
from data_helpers import write_token_data
from numpy.lib.stride_tricks import sliding_window_view

from llama_mini.data import MANIFEST, TokenSplit, get_batch, read_manifest
from llama_mini.data.shards import DataWriter
from llama_mini.errors import ConfigError, DataError
from llama_mini.tokenizer import train_tokenizer


class FakeTokenizer:
    """What writing shards needs; each character becomes the id ord(c) + offset."""

    def __init__(self, vocab_size: int, offset: int = 3):
        self.vocab_size, self.offset = vocab_size, offset
        self.bos_id, self.eos_id, self.sha256 = 1, 2, "fake" * 16

    def encode(self, text, bos=False, eos=False):
        return [self.bos_id] * bos + [ord(c) + self.offset for c in text] + [self.eos_id] * eos


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [
        f"Scene {i}. The king and the queen of 東京 speak {i * 7}.\n\nNaïve lords, café.\n" for i in range(40)
    ]
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=320)


TEXTS = ["The king and the queen.", "Naïve lords of 東京 🙂\n\n", "Scene 42."]


def test_shards_hold_bos_tokens_eos_per_document_and_the_manifest_counts_them(tmp_path, tokenizer):
    train, val = write_token_data(tmp_path, {"train": TEXTS, "val": ["held out"]}, tokenizer)
    expected = [token for text in TEXTS for token in [1, *tokenizer.encode(text), 2]]
    assert np.fromfile(tmp_path / "train-000000.bin", dtype=np.uint16).tolist() == expected
    assert train.read(0, len(train)).tolist() == expected
    assert (train.meta.documents, train.meta.tokens, train.meta.dtype) == (3, len(expected), "uint16")
    assert sum(len(text) for text in TEXTS) == 53  # characters; ï, 東, 京 and 🙂 take 2, 3, 3, 4 bytes
    assert train.meta.bytes == 61 and val.meta.bytes == 8
    assert train.meta.tokenizer_sha256 == tokenizer.sha256 and train.meta.vocab_size == 320
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        MANIFEST,
        "train-000000.bin",
        "val-000000.bin",
    ]


@pytest.mark.parametrize(
    ("vocab_size", "dtype"), [(65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)]
)
def test_shard_dtype_is_uint16_only_when_every_id_fits(tmp_path, vocab_size, dtype):
    fake = FakeTokenizer(vocab_size, offset=vocab_size - 200)  # ids up to vocab_size - 200 + ord("z")
    train, _ = write_token_data(tmp_path, {"train": ["abc", "xyz"], "val": ["v"]}, fake)
    expected = [
        1,
        *(ord(c) + vocab_size - 200 for c in "abc"),
        2,
        1,
        *(ord(c) + vocab_size - 200 for c in "xyz"),
        2,
    ]
    assert train.meta.dtype == np.dtype(dtype).name
    assert np.fromfile(tmp_path / "train-000000.bin", dtype=dtype).tolist() == expected


def test_a_split_cut_into_many_shards_reads_as_one_sequence(tmp_path):
    documents = ["".join(chr(97 + (i + j) % 26) for j in range(i + 1)) for i in range(30)]
    whole, _ = write_token_data(tmp_path / "one", {"train": documents, "val": ["v"]}, FakeTokenizer(300))
    cut, _ = write_token_data(
        tmp_path / "many", {"train": documents, "val": ["v"]}, FakeTokenizer(300), shard_tokens=7
    )
    assert len(cut.meta.shards) == -(-len(whole) // 7) and all(
        tokens == 7 for _, tokens in cut.meta.shards[:-1]
    )
    tokens = whole.read(0, len(whole))
    assert cut.read(0, len(cut)).tolist() == tokens.tolist()
    for start, stop in [(0, 7), (5, 9), (6, 22), (13, 14), (len(whole) - 3, len(whole))]:
        assert cut.read(start, stop).tolist() == tokens[start:stop].tolist()
    starts = np.arange(len(whole) - 10)
    assert np.array_equal(cut.windows(starts, 10), whole.windows(starts, 10))


def test_batches_do_not_depend_on_the_shard_size(tmp_path):
    documents = [f"document number {i} " * 3 for i in range(40)]
    one, _ = write_token_data(tmp_path / "one", {"train": documents, "val": ["v"]}, FakeTokenizer(300))
    many, _ = write_token_data(
        tmp_path / "many", {"train": documents, "val": ["v"]}, FakeTokenizer(300), shard_tokens=50
    )
    for step in range(5):
        for a, b in zip(
            get_batch(one, 8, 32, step, seed=1), get_batch(many, 8, 32, step, seed=1), strict=True
        ):
            assert torch.equal(a, b)


def test_an_interrupted_write_leaves_no_manifest_and_no_temporary_files(tmp_path, tokenizer):
    write_token_data(tmp_path, {"train": TEXTS, "val": ["held out"]}, tokenizer)  # earlier, complete data
    with (
        pytest.raises(RuntimeError, match="interrupted"),
        DataWriter(tmp_path, tokenizer, shard_tokens=4) as writer,
    ):
        writer.write("train", np.arange(10), documents=1, text_bytes=10)
        raise RuntimeError("interrupted")
    assert not (tmp_path / MANIFEST).exists()  # the old data are no longer vouched for
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    with pytest.raises(DataError, match=f"no prepared data in {tmp_path} \\({MANIFEST} not found\\)"):
        TokenSplit(tmp_path, "train")


def test_rewriting_removes_the_shards_the_new_manifest_does_not_list(tmp_path):
    write_token_data(tmp_path, {"train": ["a" * 40], "val": ["v"]}, FakeTokenizer(300), shard_tokens=10)
    write_token_data(tmp_path, {"train": ["a"], "val": ["v"]}, FakeTokenizer(300), shard_tokens=10)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        MANIFEST,
        "train-000000.bin",
        "val-000000.bin",
    ]


def test_truncated_shard_is_an_error(tmp_path, tokenizer):
    write_token_data(tmp_path, {"train": TEXTS, "val": ["held out"]}, tokenizer)
    content = (tmp_path / "train-000000.bin").read_bytes()
    (tmp_path / "train-000000.bin").write_bytes(content[:-2])
    with pytest.raises(
        DataError, match=rf"has {len(content) - 2} bytes but {MANIFEST} promises .* prepare the data again"
    ):
        TokenSplit(tmp_path, "train")


def test_a_manifest_of_another_format_is_an_error(tmp_path, tokenizer):
    write_token_data(tmp_path, {"train": TEXTS, "val": ["held out"]}, tokenizer)
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(DataError, match="is not prepared-data format version 2: prepare the data again"):
        read_manifest(tmp_path)


def test_a_tokenizer_without_bos_or_eos_cannot_write_shards(tmp_path):
    fake = FakeTokenizer(300)
    fake.eos_id = -1
    with pytest.raises(DataError, match="has no bos or eos id"):
        write_token_data(tmp_path, {"train": ["a"], "val": ["b"]}, fake)


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def split(tmp_path) -> TokenSplit:
    """1,004 tokens: bos, ids 3 .. 502, eos, twice (uint32, as the fake's vocabulary is large)."""
    text = "".join(chr(i) for i in range(500))
    train, _ = write_token_data(
        tmp_path, {"train": [text, text], "val": ["v"]}, FakeTokenizer(vocab_size=70000)
    )
    return train


def test_batch_is_windows_of_the_split_with_targets_shifted_by_one(split):
    x, y = get_batch(split, batch_size=8, seq_len=16, step=0, seed=0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    all_windows = sliding_window_view(split.read(0, len(split)).astype(np.int64), 17)
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert (all_windows == row).all(axis=1).any()  # 17 consecutive tokens of the split


def test_batch_is_a_pure_function_of_its_arguments(split):
    x, y = get_batch(split, 4, 16, step=5, seed=1)
    again_x, again_y = get_batch(split, 4, 16, step=5, seed=1)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert not torch.equal(x, get_batch(split, 4, 16, step=6, seed=1)[0])
    assert not torch.equal(x, get_batch(split, 4, 16, step=5, seed=2)[0])


def test_ranks_get_different_slices_of_one_global_batch(split):
    rank0, _ = get_batch(split, 2, 16, step=3, seed=0, rank=0, world_size=2)
    rank1, _ = get_batch(split, 2, 16, step=3, seed=0, rank=1, world_size=2)
    single, _ = get_batch(split, 4, 16, step=3, seed=0)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(torch.cat([rank0, rank1]), single)


def test_a_split_of_exactly_one_window_gives_that_window(tmp_path):
    train, _ = write_token_data(
        tmp_path, {"train": ["abcdefgh"], "val": ["v"]}, FakeTokenizer(vocab_size=300)
    )
    x, y = get_batch(train, batch_size=3, seq_len=9, step=7, seed=0)
    tokens = torch.tensor([1, *(ord(c) + 3 for c in "abcdefgh"), 2])
    assert torch.equal(x, tokens[:-1].expand(3, 9)) and torch.equal(y, tokens[1:].expand(3, 9))


def test_split_shorter_than_a_window_says_to_lower_max_seq_len(split):
    with pytest.raises(
        DataError, match=r"holds 1004 tokens, fewer than .* 1025: lower --max-seq-len or add data"
    ):
        get_batch(split, 2, 1024, step=0, seed=0)


def test_rank_must_be_below_world_size(split):
    with pytest.raises(ConfigError, match="rank must be in 0 .. world_size - 1 = 1"):
        get_batch(split, 2, 16, step=0, seed=0, rank=2, world_size=2)
