"""Prepared data on disk: token shards and the manifest that vouches for them.

    DATA/
      train-000000.bin    token ids of the training split: each document as [bos] tokens [eos], all of
      train-000001.bin    them concatenated in corpus order and cut into shards of SHARD_BYTES (the last
      ...                 shorter); uint16 when the vocabulary fits in 16 bits, else uint32
      val-000000.bin      the same for the validation split
      prepared.json       the manifest: format, tokenizer, dtype, each split's shards, documents, tokens
                          and UTF-8 bytes, the provenance (corpus, its files, settings, digest) and
                          each file's sha256
      preparing.json      while the data are being written: how far the writing has come (see below)
      checked.json        the largest id of each shard, cached by its size and modification time
                          (llama_mini.data.checks)

    and for chat data (llama_mini.data.sources.ChatLines), beside each split's token shards:
      train-masks-000000.bin          one uint8 per token, 1 where the token is an assistant token (the
      ...                             loss is computed there), cut exactly as the token shards
      train-conversations-000000.bin  int64 pairs (start, first target) per conversation: where it begins
                                      in the split and the offset from there of its first assistant token
                                      (-1 if it has none), for drawing rows that begin a conversation

Shards are cut by size, not at document ends, so a split reads as one sequence of tokens whatever its
shards (`TokenSplit.read`): a training window may run from one shard into the next, as it may run from
one document into the next. 256 MiB shards keep a 10 GB corpus to a few dozen files, each small enough to
write, copy or check on its own and far below any file-system or memmap limit.

Why masks in files of their own: the tokens keep one format for every kind of data (a chat split reads
as tokens exactly like a text split), and a window's mask is one more gather at the same positions. A byte
per token costs half as much again as uint16 tokens, little for chat corpora, which are small. A chat
manifest also records the chat template the conversations were rendered with ("chat": its text and
sha256), since the tokenizer's sha256 does not cover it: data rendered with another template are not
reused, and a run can tell which template its model is learning.

Writing is crash-safe (llama_mini.files): the old manifest is deleted first, every shard is written under
a partial name (.NAME.partial) and renamed when whole, and the new manifest is written last; `TokenSplit`
opens only shards that a manifest lists, with the size it lists. So data whose writing was interrupted
have no manifest and are never used as they are. Writing is also resumable: after every batch the
writer records in PROGRESS (preparing.json) each shard's state, the finished shards with their sha256,
and how far its input has been read (`DataWriter.checkpoint`). A later preparation of the same data keeps
the finished shards, cuts the open ones back to the recorded size and goes on from there, so a
preparation killed at any point and run again gives the same bytes as one never interrupted; the partial
and temporary files of any other unfinished writing are deleted when writing starts.

The manifest records the sha256 of every file it lists ("checksums"), computed as they are written, for
`train.py --verify-data` (llama_mini.data.checks).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from llama_mini.errors import DataError
from llama_mini.files import atomic_file, file_system_failure, naming

if TYPE_CHECKING:  # only for type hints: any object with the same attributes works
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "PROGRESS",
    "SHARD_BYTES",
    "SPLITS",
    "ChatIndex",
    "ChatRows",
    "DataWriter",
    "SplitMeta",
    "TokenSplit",
    "read_manifest",
    "token_dtype",
]

FORMAT_VERSION = 2  # the layout above; data in another layout are prepared again
MANIFEST = "prepared.json"
SHARD_BYTES = 1 << 28  # 256 MiB: 134M uint16 tokens (about 500 MB of English text) per shard
SPLITS = ("train", "val")
PROGRESS = "preparing.json"  # how far an unfinished preparation has come (DataWriter.checkpoint)
_SHARD_NAME = re.compile(r"(train|val)(-masks|-conversations)?-\d{6}\.bin")
# Files of an interrupted writing: shards being written (.NAME.partial), and atomic_file's temporary files
# of shards, the manifest or the progress (.NAME.RANDOM.tmp).
_LEFTOVER = re.compile(
    r"\.(?:(?:train|val)(?:-masks|-conversations)?-\d{6}\.bin\.partial"
    r"|(?:(?:train|val)(?:-masks|-conversations)?-\d{6}\.bin|prepared\.json|preparing\.json|checked\.json)"
    r"\.\w+\.tmp)"
)
_ONE_FILE = 1 << 62  # "shard size" of a conversation index: never cut
# Format version 1 held each split in one file with a .json beside it: writing data deletes them.
_VERSION_1_FILES = ("train.bin", "train.json", "val.bin", "val.json")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (ids 0 .. 65535), halving the files and memory traffic."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


@dataclass(frozen=True)
class SplitMeta:
    """What one split of prepared data holds. `bytes` is the UTF-8 size of its documents' text, so a loss
    can be reported per byte, which, unlike a loss per token, compares models with different tokenizers:

        bits per byte = loss (nats per token) * tokens / bytes / ln 2

    (`tokens` counts the bos and eos ids too; the loss is averaged over the same tokens.)
    """

    split: str
    tokenizer_sha256: str  # which tokenizer wrote the ids: reading them with another would be nonsense
    vocab_size: int
    dtype: str  # "uint16" or "uint32": the numpy dtype of the ids in the shards
    documents: int
    tokens: int
    bytes: int
    shards: tuple[tuple[str, int], ...]  # (file name, tokens) of each shard, in order
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    target_tokens: int | None = None  # chat data: the assistant tokens, which the loss averages over
    target_bytes: int | None = None  # chat data: the UTF-8 bytes of their text

    @property
    def loss_tokens_per_byte(self) -> float:
        """Tokens per UTF-8 byte of the text the loss is averaged over, for bits per byte: every token of
        text data; the assistant tokens of chat data, whose loss counts nothing else."""
        if self.target_tokens and self.target_bytes:
            return self.target_tokens / self.target_bytes
        return self.tokens / self.bytes


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of the prepared data in `folder`, checked for form; DataError if missing or invalid."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(
            f"no prepared data in {folder} ({MANIFEST} not found): prepare the data (train.py --data "
            f"CORPUS, or llama_mini.data.prepare_data)"
        ) from None
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path} ({error}): prepare the data again") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} {problem}: prepare the data again")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        return f"is not prepared-data format version {FORMAT_VERSION}"
    if manifest.get("dtype") not in ("uint16", "uint32"):
        return f"has dtype {manifest.get('dtype')!r}"
    for split in SPLITS:
        record = manifest.get("splits", {}).get(split)
        keys = ("documents", "tokens", "bytes", "shards")
        if not isinstance(record, dict) or any(key not in record for key in keys):
            return f"lacks the {split} split's {', '.join(keys)}"
        if not record["shards"] or sum(tokens for _, tokens in record["shards"]) != record["tokens"]:
            return f"lists shards of the {split} split that do not add up to its {record['tokens']} tokens"
        if "chat" in manifest:
            masks, conversations = record.get("masks"), record.get("conversations")
            if [tokens for _, tokens in masks or []] != [tokens for _, tokens in record["shards"]]:
                return f"lists mask shards of the {split} split that do not match its token shards"
            if not isinstance(conversations, list) or len(conversations) != 2 or conversations[1] < 1:
                return f"lacks the {split} split's conversation index"
    if "chat" in manifest and not isinstance(manifest["chat"].get("template"), str):
        return "lacks the chat template its conversations were rendered with"
    return None


class TokenSplit:
    """One split of prepared data: its shards memory-mapped read-only and read as one sequence of tokens;
    `len(split)` is the number of tokens and `meta` its SplitMeta.

    `np.memmap` maps a file into the address space instead of reading it: a batch reads from disk only the
    pages its windows touch, and those pages belong to the operating system's file cache, not to this
    process, so they cost no private memory and can be dropped and re-read whenever memory is short. Many
    gigabytes of tokens therefore train in a few hundred megabytes of RAM, and a long run accumulates
    nothing (its resident size may count touched pages, but they stay reclaimable).
    """

    def __init__(self, folder: str | Path, split: str):
        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        record = manifest["splits"][split]
        self.meta = SplitMeta(
            split=split,
            tokenizer_sha256=manifest["tokenizer_sha256"],
            vocab_size=manifest["vocab_size"],
            dtype=manifest["dtype"],
            documents=record["documents"],
            tokens=record["tokens"],
            bytes=record["bytes"],
            shards=tuple((name, tokens) for name, tokens in record["shards"]),
            provenance=manifest.get("provenance", {}),
            target_tokens=record.get("target_tokens"),
            target_bytes=record.get("target_bytes"),
        )
        self.dtype = np.dtype(self.meta.dtype)
        self.shards = [self._open(name, tokens, self.dtype) for name, tokens in self.meta.shards]
        # offsets[i] is the position of shard i's first token in the split; offsets[-1] == len(self)
        self.offsets = np.cumsum([0] + [tokens for _, tokens in self.meta.shards])
        # Chat data: the loss mask and the conversations (None for text data).
        self.chat = ChatIndex(self, manifest["chat"], record) if "chat" in manifest else None

    def _open(self, name: str, count: int, dtype: np.dtype) -> np.memmap:
        """File `name` of the split, mapped as `count` values of `dtype`, after checking its size."""
        path = self.folder / name
        expected = count * np.dtype(dtype).itemsize
        try:
            actual = path.stat().st_size
        except OSError:
            actual = None
        if actual != expected or count == 0:
            found = "is missing" if actual is None else f"has {actual} bytes"
            raise DataError(
                f"token shard {path} {found} but {MANIFEST} promises {count} {np.dtype(dtype).name} values "
                f"({expected} bytes): it is truncated or stale; prepare the data again"
            )
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return self.meta.tokens

    def __repr__(self) -> str:
        return f"TokenSplit({str(self.folder)!r}, {self.meta.split!r}, tokens={len(self)})"

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens start .. stop - 1 of the split, copied out of the shards they lie in."""
        return _read(self.shards, self.offsets, start, stop)

    def windows(self, starts: np.ndarray, length: int, fill: int | None = None) -> np.ndarray:
        """The windows tokens[s : s + length] for each s in `starts`: (len(starts), length), copied.
        fill: the value of positions past the split's end (None: a window must end inside the split).

        The windows inside one shard are gathered from its map in one indexing operation each; the rare
        window that runs into the next shard (or past the end) is read piece by piece.
        """
        return _gather(self.shards, self.offsets, starts, length, fill)


def _read(maps: list[np.memmap], offsets: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Values start .. stop - 1 of the sequence that `maps` (starting at `offsets`) hold, copied."""
    if not 0 <= start <= stop <= offsets[-1]:
        raise IndexError(f"tokens {start} .. {stop} are outside the split's 0 .. {offsets[-1]}")
    parts = []
    shard = int(np.searchsorted(offsets, start, side="right")) - 1
    while start < stop:
        end = min(stop, int(offsets[shard + 1]))
        parts.append(maps[shard][start - offsets[shard] : end - offsets[shard]])
        start, shard = end, shard + 1
    return np.concatenate(parts) if parts else np.empty(0, dtype=maps[0].dtype)


def _gather(
    maps: list[np.memmap], offsets: np.ndarray, starts: np.ndarray, length: int, fill: int | None
) -> np.ndarray:
    """TokenSplit.windows over any sequence cut into `maps` at `offsets` (tokens or their masks)."""
    starts = np.asarray(starts, dtype=np.int64)
    total = int(offsets[-1])
    if fill is None and len(starts) and int(starts.max()) + length > total:
        raise IndexError(f"a window of {length} from {int(starts.max())} runs past the split's {total}")
    out = np.full((len(starts), length), fill or 0, dtype=maps[0].dtype)
    shard_of = np.searchsorted(offsets, starts, side="right") - 1
    crosses = starts + length > offsets[np.minimum(shard_of + 1, len(offsets) - 1)]
    for shard in np.unique(shard_of[~crosses]):
        rows = np.flatnonzero((shard_of == shard) & ~crosses)
        local = starts[rows] - offsets[shard]
        out[rows] = maps[shard][local[:, None] + np.arange(length)]
    for row in np.flatnonzero(crosses):
        start = int(starts[row])
        piece = _read(maps, offsets, start, min(start + length, total))
        out[row, : len(piece)] = piece
    return out


class ChatIndex:
    """The chat part of a split (see the module docstring): each token's loss mask, and each conversation's
    start and first target. `template` is the chat template the conversations were rendered with.

    Rows of a chat batch begin at a conversation's start (llama_mini.data.batches), so for a row of
    seq_len + 1 tokens:
        a conversation longer than seq_len + 1 tokens is truncated: its later tokens are in no row
            (`longer_than`);
        a conversation whose first assistant token is not at an offset 1 .. seq_len has no target in
            its row, and is never drawn as a row's start (`row_starts`; `untrained` counts them).
    Both depend on seq_len only, so the same prepared data serve runs of any context, and they are
    computed from the index alone (16 bytes per conversation), never from the tokens.
    """

    def __init__(self, split: TokenSplit, chat: dict[str, Any], record: dict[str, Any]):
        self.split = split
        self.template: str = chat["template"]
        self.template_sha256: str = chat.get("template_sha256", "")
        self.masks = [split._open(name, tokens, np.dtype(np.uint8)) for name, tokens in record["masks"]]
        name, count = record["conversations"]
        index = split._open(name, 2 * count, np.dtype(np.int64)).reshape(count, 2)
        self.starts = np.array(index[:, 0])  # 16 bytes a conversation: read into memory once
        self.first_targets = np.array(index[:, 1])
        self.lengths = np.diff(np.append(self.starts, len(split)))
        self._row_starts: dict[int, np.ndarray] = {}
        self._reported: set[int] = set()  # the seq_lens `report` has reported

    def __len__(self) -> int:
        return len(self.starts)

    def mask_windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The masks of TokenSplit.windows(starts, length), as bool; False past the split's end."""
        return _gather(self.masks, self.split.offsets, starts, length, fill=0).astype(bool)

    def row_starts(self, seq_len: int) -> np.ndarray:
        """The starts of the conversations that have a target in a row of seq_len + 1 tokens from them."""
        if seq_len not in self._row_starts:
            trains = (self.first_targets >= 1) & (self.first_targets <= seq_len)
            self._row_starts[seq_len] = self.starts[trains]
        return self._row_starts[seq_len]

    def longer_than(self, seq_len: int) -> int:
        """How many conversations a row of seq_len + 1 tokens truncates."""
        return int((self.lengths > seq_len + 1).sum())

    def untrained(self, seq_len: int) -> int:
        """How many conversations have no assistant token within a row of seq_len + 1 tokens from them."""
        return len(self) - len(self.row_starts(seq_len))

    def describe(self, seq_len: int) -> str | None:
        """One line about the conversations that do not fit rows of seq_len + 1 tokens, or None."""
        longer, untrained = self.longer_than(seq_len), self.untrained(seq_len)
        if not longer and not untrained:
            return None
        name, window = self.split.meta.split, seq_len + 1
        parts = []
        if longer:
            parts.append(
                f"{longer:,} of {len(self):,} {name} conversations are longer than the context (rows of "
                f"max_seq_len + 1 = {window} tokens) and are truncated to it"
            )
        if untrained:
            parts.append(
                f"{untrained:,} have no assistant token within it and train nothing (never a row's start)"
            )
        return "chat: " + "; ".join(parts)

    def report(self, seq_len: int, log: Callable[[str], None]) -> None:
        """`log` the line of `describe(seq_len)`, if any, the first time this is called for seq_len: a run
        draws thousands of batches and says it once."""
        if seq_len not in self._reported:
            self._reported.add(seq_len)
            line = self.describe(seq_len)
            if line is not None:
                log(line)


@dataclass
class ChatRows:
    """What chat data add to a `DataWriter.write` of whole conversations: each token's mask, each
    conversation's length and first target offset (-1 for none), and the assistant text's UTF-8 bytes."""

    masks: np.ndarray  # (tokens,) bool or uint8
    lengths: np.ndarray  # (conversations,) tokens of each
    first_targets: np.ndarray  # (conversations,) offset of its first assistant token at offset >= 1, or -1
    target_bytes: int


class _SplitWriter:
    """Appends values to one sequence of shards named PREFIX-000000.bin, ..., starting a new shard every
    `shard_tokens` values. The open shard is written as .NAME.partial and renamed to NAME when whole; each
    shard's sha256 is computed as it is written."""

    def __init__(self, folder: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.prefix, self.shard_tokens = folder, prefix, shard_tokens
        self.dtype = np.dtype(dtype)
        self.shards: list[list[Any]] = []  # [name, tokens] of the shards begun so far
        self.checksums: dict[str, str] = {}  # sha256 of each finished shard
        self.documents = self.bytes = 0
        self._file: IO[bytes] | None = None  # the open shard's .partial file
        self._hash: Any = None  # and its sha256 so far

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self._file is None or self.shards[-1][1] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1][1]
            data = tokens[:room].tobytes()
            with naming(self._file.name):
                self._file.write(data)
            self._hash.update(data)
            self.shards[-1][1] += min(room, len(tokens))
            tokens = tokens[room:]

    def _next_shard(self) -> None:
        self._finish_shard()
        name = f"{self.prefix}-{len(self.shards):06d}.bin"
        self._file = open(_partial(self.folder / name), "wb")  # noqa: SIM115 (closed by _finish_shard)
        self._hash = hashlib.sha256()
        self.shards.append([name, 0])

    def _finish_shard(self) -> None:
        """Close the open shard and rename it to its final name."""
        if self._file is not None:
            file, self._file = self._file, None
            with naming(file.name):
                file.close()
            name = self.shards[-1][0]
            os.replace(_partial(self.folder / name), self.folder / name)
            self.checksums[name] = self._hash.hexdigest()

    def close(self) -> dict[str, Any]:
        self._finish_shard()
        tokens = sum(count for _, count in self.shards)
        return {"documents": self.documents, "tokens": tokens, "bytes": self.bytes, "shards": self.shards}

    def abort(self) -> None:
        """Delete the open shard's partial file (the shards already renamed have no manifest: unused)."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
            _partial(self.folder / self.shards[-1][0]).unlink(missing_ok=True)

    def forget(self) -> None:
        """Start again from nothing, leaving the files as they are."""
        if self._file is not None:
            self._file.close()
        self.__init__(self.folder, self.prefix, self.dtype, self.shard_tokens)

    def state(self) -> dict[str, Any]:
        """What `restore` needs to go on from here, after writing out what was written so far."""
        if self._file is not None:
            with naming(self._file.name):
                self._file.flush()
        return {
            "shards": [list(shard) for shard in self.shards],
            "open": self._file is not None,
            "checksums": dict(self.checksums),
            "documents": self.documents,
            "bytes": self.bytes,
        }

    def restore(self, state: dict[str, Any]) -> bool:
        """Go on from `state` (a `state()` of an earlier process): its finished shards must be there with
        their sizes, and its open shard hold at least the recorded values (those after them are cut off).
        False, and nothing changed, when they are not."""
        itemsize = self.dtype.itemsize
        shards = [list(shard) for shard in state["shards"]]
        finished = shards[:-1] if state["open"] else shards
        for name, tokens in finished:
            if _size(self.folder / name) != tokens * itemsize:
                return False
        if state["open"]:
            name, tokens = shards[-1]
            partial, final = _partial(self.folder / name), self.folder / name
            if _size(partial) is None and (_size(final) or 0) >= tokens * itemsize:
                os.replace(final, partial)  # finished after the state was taken: it is open again
            if (_size(partial) or -1) < tokens * itemsize:
                return False
            self._file = open(partial, "r+b")  # noqa: SIM115 (closed by _finish_shard)
            self._file.truncate(tokens * itemsize)
            self._hash = hashlib.sha256()
            while chunk := self._file.read(1 << 24):
                self._hash.update(chunk)
        self.shards, self.checksums = shards, dict(state["checksums"])
        self.documents, self.bytes = state["documents"], state["bytes"]
        return True


def _partial(path: Path) -> Path:
    """Where the shard `path` is written until it is whole."""
    return path.with_name(f".{path.name}.partial")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


class DataWriter:
    """Writes prepared data into `folder`: use as a context manager, `write` tokens of either split in
    any interleaving, then `finish(provenance)`. Leaving the block by an error deletes the open shards'
    partial files and writes no manifest.

    chat: for chat data, the manifest's "chat" record ({"template": ..., "template_sha256": ...}); each
    `write` then brings its ChatRows, and the masks and conversation index are written beside the tokens.

    identity: makes the writing resumable. `checkpoint(position)` records, in PROGRESS, how far the writing
    has come (every shard's state, and `position`: where the caller is in its input); a later DataWriter
    with the same identity whose files are still as recorded goes on from there, and `resumed` is that
    `position` (None when starting afresh). An interruption (kill -9, Ctrl-C) thus loses only what was
    written since the last checkpoint; an error (an exception other than KeyboardInterrupt) gives up and
    deletes the progress with the partial files, since a rerun will not go the same way.
    """

    def __init__(
        self,
        folder: str | Path,
        tokenizer: Tokenizer,
        shard_tokens: int | None = None,
        chat: dict[str, Any] | None = None,
        identity: str | None = None,
    ):
        if chat is None and (tokenizer.bos_id < 0 or tokenizer.eos_id < 0):
            # (Chat data need neither: the conversation index marks where each begins.)
            raise DataError(
                f"tokenizer {getattr(tokenizer, 'model_path', tokenizer)} has no bos or eos id, which "
                f"shards need to mark document boundaries: use a tokenizer trained by llama_mini or LLaMA's"
            )
        self.folder = Path(folder)
        self.tokenizer, self.chat, self.identity = tokenizer, chat, identity
        self.dtype = token_dtype(tokenizer.vocab_size)
        self.shard_tokens = shard_tokens or SHARD_BYTES // self.dtype.itemsize
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)  # from here on, the old data are not valid
        self.splits = {
            split: _SplitWriter(self.folder, split, self.dtype, self.shard_tokens) for split in SPLITS
        }
        self.masks: dict[str, _SplitWriter] = {}
        self.conversations: dict[str, _SplitWriter] = {}
        self.targets = {split: [0, 0] for split in SPLITS}  # chat: assistant tokens and their bytes
        if chat is not None:
            for split in SPLITS:
                self.masks[split] = _SplitWriter(self.folder, f"{split}-masks", np.uint8, self.shard_tokens)
                self.conversations[split] = _SplitWriter(
                    self.folder, f"{split}-conversations", np.int64, _ONE_FILE
                )
        self.resumed: dict[str, Any] | None = None
        self.stale_progress = False  # whether PROGRESS recorded another preparation, now given up
        self._resume()
        self._remove_leftovers()

    def __enter__(self) -> DataWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, *_: Any) -> None:
        if kind is None:
            return
        refused = file_system_failure(error) is not None  # a full disk: the rerun after it goes the same way
        if (issubclass(kind, Exception) and not refused) or self.identity is None:
            self.discard()
        else:  # interrupted: the partial files and the last checkpoint stay, for the next run to go on
            for writer in self._writers():
                writer.forget()

    def _resume(self) -> None:
        """Go on from PROGRESS if it records a preparation with this identity whose files are as recorded."""
        try:
            progress = json.loads((self.folder / PROGRESS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        writers = self._named_writers()
        states = progress.get("writers", {}) if isinstance(progress, dict) else {}
        if (
            self.identity is None
            or progress.get("identity") != self.identity
            or set(states) != set(writers)
            or not all(writer.restore(states[name]) for name, writer in writers.items())
        ):
            for writer in writers.values():
                writer.forget()
            self.stale_progress = True
            (self.folder / PROGRESS).unlink(missing_ok=True)
            return
        self.targets = {split: list(values) for split, values in progress["targets"].items()}
        self.resumed = progress["position"]

    def _remove_leftovers(self) -> None:
        """Delete the temporary and partial files of earlier writing that this one does not go on with."""
        open_files = {
            _partial(self.folder / writer.shards[-1][0]).name
            for writer in self._writers()
            if writer._file is not None
        }
        for path in self.folder.iterdir():
            if _LEFTOVER.fullmatch(path.name) and path.name not in open_files:
                path.unlink(missing_ok=True)

    def _named_writers(self) -> dict[str, _SplitWriter]:
        return {writer.prefix: writer for writer in self._writers()}

    def write(
        self, split: str, tokens: np.ndarray, documents: int, text_bytes: int, chat: ChatRows | None = None
    ) -> None:
        """Append `tokens` (whole documents, [bos] ... [eos] each; for chat data whole conversations, with
        their ChatRows) to `split`."""
        if (chat is None) != (self.chat is None):
            raise ValueError("a chat DataWriter writes ChatRows with every write, a text one never")
        writer = self.splits[split]
        if chat is not None:
            position = sum(count for _, count in writer.shards)  # where these conversations begin
            lengths = np.asarray(chat.lengths, dtype=np.int64)
            starts = position + np.cumsum(lengths) - lengths
            index = np.stack([starts, np.asarray(chat.first_targets, dtype=np.int64)], axis=1)
            self.conversations[split].write(index.reshape(-1))
            self.masks[split].write(np.asarray(chat.masks, dtype=np.uint8))
            self.targets[split][0] += int(np.count_nonzero(chat.masks))
            self.targets[split][1] += chat.target_bytes
        writer.write(tokens)
        writer.documents += documents
        writer.bytes += text_bytes

    def checkpoint(self, position: dict[str, Any]) -> None:
        """Record in PROGRESS that everything written so far is done, with the caller's `position` (see the
        class docstring): the shards finished so far are kept by a later run, with their checksums."""
        if self.identity is None:
            raise ValueError("only a DataWriter with an identity can be resumed")
        progress = {
            "identity": self.identity,
            "position": position,
            "writers": {name: writer.state() for name, writer in self._named_writers().items()},
            "targets": self.targets,
        }
        with atomic_file(self.folder / PROGRESS) as file:
            file.write(json.dumps(progress).encode("utf-8"))

    def discard(self) -> None:
        """Give up: delete the open shards' partial files and the progress, and write no manifest."""
        for writer in self._writers():
            writer.abort()
        (self.folder / PROGRESS).unlink(missing_ok=True)

    def _writers(self) -> list[_SplitWriter]:
        return [*self.splits.values(), *self.masks.values(), *self.conversations.values()]

    def counts(self, split: str) -> tuple[int, int]:
        """(documents, tokens) written to `split` so far."""
        writer = self.splits[split]
        return writer.documents, sum(count for _, count in writer.shards)

    def finish(self, provenance: dict[str, Any]) -> dict[str, Any]:
        """Close the last shards, write the manifest, delete shards it does not list; return it."""
        splits = {split: writer.close() for split, writer in self.splits.items()}
        if self.chat is not None:
            for split, record in splits.items():
                (name, values), *_ = self.conversations[split].close()["shards"] or [(None, 0)]
                record["masks"] = self.masks[split].close()["shards"]
                record["conversations"] = [name, values // 2]
                record["target_tokens"], record["target_bytes"] = self.targets[split]
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": self.tokenizer.sha256,
            "vocab_size": self.tokenizer.vocab_size,
            "dtype": self.dtype.name,
            "splits": splits,
            "provenance": provenance,
            # sha256 of every file listed above, which --verify-data compares (llama_mini.data.checks)
            "checksums": {name: sha for writer in self._writers() for name, sha in writer.checksums.items()},
        }
        if self.chat is not None:
            manifest["chat"] = self.chat
        with atomic_file(self.folder / MANIFEST) as file:
            file.write((json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
        (self.folder / PROGRESS).unlink(missing_ok=True)
        listed = {
            name for record in splits.values() for name, _ in record["shards"] + record.get("masks", [])
        }
        listed |= {record["conversations"][0] for record in splits.values() if "conversations" in record}
        for path in self.folder.iterdir():
            unlisted = _SHARD_NAME.fullmatch(path.name) and path.name not in listed
            if unlisted or path.name in _VERSION_1_FILES:
                path.unlink(missing_ok=True)
        return manifest
