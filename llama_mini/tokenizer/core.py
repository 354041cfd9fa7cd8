"""One `Tokenizer` for two file formats, the checkpoint-folder files around them, and decoding as ids arrive.

    tokenizer.model   a SentencePiece model (ours, LLaMA 1 and 2's), run by the sentencepiece library
    tokenizer.json    a Hugging Face tokenizer (Llama 3's and SmolLM's byte-level BPE, or ours converted),
                      run by the Rust `tokenizers` library

Beside either file, a folder may hold what transformers reads with it, and the Tokenizer reads it too:

    tokenizer_config.json    bos_token, eos_token, pad_token, add_bos_token, chat_template
    generation_config.json   eos_token_id, one id or a list (Llama 3 instruct also stops at <|eot_id|>)
    chat_template.jinja      the chat template in a file of its own (newer transformers)

Which file a folder is read from (`find_tokenizer_file`): tokenizer.model, else tokenizer.json. Our folders
carry both, which encode identically (checked when the json is made), but the .model is the original: its
sha256 is the one the training run recorded in its data shards, and sentencepiece is the reference the json
was checked against. The one exception is Llama 3's tiktoken `tokenizer.model` (in Meta's folders), which
neither library reads: then a tokenizer.json beside it is used.

Special tokens written inside a text: `encode(text)` treats all text as text, so "<s>" in a corpus is three
characters, never bos (sentencepiece's rule; transformers' default differs). Chat templates write their
control tokens as text ("<|eot_id|>"), so `encode(text, parse_special=True)` turns the text of each special
token into its id, as transformers does by default.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer as HFTokenizer

from llama_mini.errors import DataError
from llama_mini.files import atomic_write
from llama_mini.tokenizer.sentencepiece_model import UnsupportedModel, tokenizer_json

__all__ = [
    "StreamDecoder",
    "Tokenizer",
    "find_tokenizer_file",
    "is_sentencepiece_model",
]

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The named special tokens of transformers' tokenizers, which chat templates see as variables.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
)

_REPLACEMENT_CHARACTER = "\ufffd"  # what an incomplete UTF-8 byte sequence decodes to


def is_sentencepiece_model(path: str | os.PathLike) -> bool:
    """Whether sentencepiece can load `path` (Llama 3's tiktoken tokenizer.model, for one, it cannot)."""
    try:
        model_bytes = Path(path).read_bytes()
        spm.SentencePieceProcessor().LoadFromSerializedProto(model_bytes)
    except (OSError, RuntimeError):
        return False
    return True


# A tiktoken BPE file (Meta's Llama 3 tokenizer.model) is text: one "<base64 token> <rank>" per line.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+\r?\n")


def _is_tiktoken(path: Path) -> bool:
    with path.open("rb") as file:
        return _TIKTOKEN_LINE.fullmatch(file.readline(1000)) is not None


def find_tokenizer_file(path: str | os.PathLike) -> Path | None:
    """The file a `Tokenizer` reads for `path`, or None when there is none.

    A folder: its tokenizer.model, unless that is Llama 3's tiktoken file and a tokenizer.json is beside it;
    else its tokenizer.json. (A damaged tokenizer.model is still returned, so that loading it says so rather
    than another file being read in its place.) A file: itself, if it is a `.model` or `.json` file.
    """
    path = Path(path)
    if not path.is_dir():
        return path if path.is_file() and path.suffix in (".model", ".json") else None
    model, json_file = path / SENTENCEPIECE_FILE, path / TOKENIZER_JSON_FILE
    if model.is_file() and not (json_file.is_file() and _is_tiktoken(model)):
        return model
    return json_file if json_file.is_file() else None


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None when there is no such file."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} cannot be read as JSON ({error}): fix the file or delete it") from None
    if not isinstance(value, dict):
        raise DataError(
            f"{path} holds a JSON {type(value).__name__}, not an object: fix the file or delete it"
        )
    return value


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ..., ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _write_json(path: Path, value: dict[str, Any]) -> None:
    _write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


class _SentencePieceBackend:
    """A tokenizer.model, through the sentencepiece library."""

    def __init__(self, path: Path):
        try:
            self.model_bytes = path.read_bytes()
        except OSError as error:
            raise DataError(
                f"cannot read tokenizer model {path} ({error.strerror or error}): "
                f"train one with train_tokenizer or pass the path of a sentencepiece .model file"
            ) from error
        # Hash and parse the same bytes, so the digest always describes the model actually loaded.
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self.processor = spm.SentencePieceProcessor()
        try:
            self.processor.LoadFromSerializedProto(self.model_bytes)
        except RuntimeError as error:
            raise DataError(
                f"tokenizer model {path} is not a valid sentencepiece model: "
                f"delete it to train a new one, or pass the path of a sentencepiece .model file"
            ) from error
        processor = self.processor
        self.vocab_size = processor.GetPieceSize()
        # Control pieces (<s>, </s>) and <unk> never come out of text; they are what parse_special matches.
        self.special_tokens = {
            processor.IdToPiece(i): i
            for i in range(self.vocab_size)
            if processor.IsControl(i) or processor.IsUnknown(i)
        }
        self._special_pattern = _alternation(self.special_tokens)
        ids = {"bos_token": processor.bos_id(), "eos_token": processor.eos_id()}
        ids |= {"unk_token": processor.unk_id(), "pad_token": processor.pad_id()}
        self.ids = {
            name: token_id if 0 <= token_id < self.vocab_size else -1 for name, token_id in ids.items()
        }
        self.token_names = {name: processor.IdToPiece(i) for name, i in self.ids.items() if i >= 0}

    def encode(self, texts: list[str], parse_special: bool, bos_id: int, eos_id: int) -> list[list[int]]:
        if not parse_special or self._special_pattern is None:
            # The model's own bos/eos (the only ones a Tokenizer asks for), added 5x faster than in Python.
            return self.processor.Encode(texts, add_bos=bos_id >= 0, add_eos=eos_id >= 0)
        return [_with_ends(self._encode_parsing_special(text), bos_id, eos_id) for text in texts]

    def _encode_parsing_special(self, text: str) -> list[int]:
        # re.split with a capturing group alternates text, special token, text, ...: each stretch of text is
        # encoded on its own (with its dummy prefix), so "<s>Hi" gives the ids of encode("Hi", bos=True).
        ids: list[int] = []
        for index, part in enumerate(self._special_pattern.split(text)):
            if index % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.processor.Encode(part))
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.processor.Decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.IdToPiece(token_id)

    def token_id(self, text: str) -> int | None:
        token_id = self.processor.PieceToId(text)
        return token_id if self.processor.IdToPiece(token_id) == text else None

    def tokenizer_json(self, path: Path, add_bos: bool) -> str:
        try:
            return tokenizer_json(self.model_bytes, add_bos)
        except UnsupportedModel as reason:
            raise DataError(
                f"{path} cannot be written as a Hugging Face tokenizer.json: {reason}; use a tokenizer "
                f"trained by llama_mini (train_tokenizer) or a LLaMA-style BPE model with byte_fallback"
            ) from None


class _HuggingFaceBackend:
    """A tokenizer.json, through the tokenizers library."""

    def __init__(self, path: Path):
        try:
            self.json_text = path.read_text(encoding="utf-8")
            self.tokenizer = HFTokenizer.from_str(self.json_text)
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read tokenizer file {path} ({error}): check the path") from None
        except Exception as error:  # tokenizers raises a bare Exception for a malformed file
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DataError(
                f"{path} is not a Hugging Face tokenizer.json ({first_line}): pass a tokenizer.json "
                f"saved by tokenizers or transformers, or a sentencepiece tokenizer.model"
            ) from None
        # Settings stored in the file that would change what encode returns: we pad and truncate elsewhere.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.tokenizer.encode_special_tokens = True  # text is text, see the module docstring
        self._parsing: HFTokenizer | None = None  # a second copy that matches special tokens, made on demand
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            token.content: token_id
            for token_id, token in self.tokenizer.get_added_tokens_decoder().items()
            if token.special
        }

    def encode(self, texts: list[str], parse_special: bool, bos_id: int, eos_id: int) -> list[list[int]]:
        if parse_special and self._parsing is None:
            self._parsing = HFTokenizer.from_str(self.tokenizer.to_str())
            self._parsing.no_padding()
            self._parsing.no_truncation()
        tokenizer = self._parsing if parse_special else self.tokenizer
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        return [_with_ends(encoding.ids, bos_id, eos_id) for encoding in encodings]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            raise IndexError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return piece

    def token_id(self, text: str) -> int | None:
        return self.tokenizer.token_to_id(text)

    def adds_bos(self, bos_id: int) -> bool:
        """Whether the file's post-processor starts every text with bos, as Llama 3's does."""
        ids = self.tokenizer.encode("", add_special_tokens=True).ids
        return bos_id >= 0 and ids[:1] == [bos_id]


def _with_ends(ids: list[int], bos_id: int, eos_id: int) -> list[int]:
    """`ids` with bos_id first and eos_id last, each unless it is -1."""
    if bos_id < 0 and eos_id < 0:
        return ids
    return ([bos_id] if bos_id >= 0 else []) + ids + ([eos_id] if eos_id >= 0 else [])


def _alternation(texts: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of `texts`, longest first (so "<|eot|>" wins over a shorter prefix of it)."""
    texts = sorted(texts, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, texts)) + ")") if texts else None


class Tokenizer:
    """Text <-> token ids with a tokenizer.model or a tokenizer.json (see the module docstring).

    path: a tokenizer.model or tokenizer.json file, or a folder holding one (`find_tokenizer_file`).

    vocab_size, bos_id, eos_id, pad_id      ids are -1 when the tokenizer has no such token
    eos_ids          every id that ends a generation, eos_id first: the ids of generation_config.json's
                     eos_token_id list (Llama 3 instruct: <|end_of_text|>, <|eom_id|>, <|eot_id|>)
    add_bos          whether the model's own tokenizer starts a text with bos (LLaMA's do, SmolLM's not)
    special_tokens   the text of each special token -> its id
    special_token_names   "bos_token" -> "<s>", ...: the variables a chat template sees
    chat_template    the Jinja chat template of tokenizer_config.json or chat_template.jinja, or None
    model_path       the file read
    sha256           identifies what encode and decode do. Data shards record it, so a shard encoded with
                     one tokenizer is never silently read with another. For a tokenizer.model it is the
                     digest of the file (unchanged since llama_mini had only those); for a tokenizer.json,
                     of its canonical JSON and the bos/eos/pad ids, which encode(bos=, eos=) adds.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            found = find_tokenizer_file(path)
            if found is None:
                raise DataError(
                    f"{path} has no {SENTENCEPIECE_FILE} or {TOKENIZER_JSON_FILE}: pass the folder or file "
                    f"of the tokenizer the model was trained with"
                )
            path = found
        self.model_path = path
        folder = path.parent
        config = _read_json_object(folder / TOKENIZER_CONFIG_FILE) or {}
        generation = _read_json_object(folder / GENERATION_CONFIG_FILE) or {}
        if path.suffix == ".json":
            self._backend: _SentencePieceBackend | _HuggingFaceBackend = _HuggingFaceBackend(path)
            self._read_special_tokens(config, generation, folder)
            self.add_bos = self._backend.adds_bos(self.bos_id)
            self.sha256 = self._json_sha256()
        else:
            self._backend = _SentencePieceBackend(path)
            self.special_token_names = dict(self._backend.token_names)
            ids = self._backend.ids
            self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
            self.add_bos = True
            self.sha256 = self._backend.sha256
        if isinstance(config.get("add_bos_token"), bool):
            self.add_bos = config["add_bos_token"]
        self.eos_ids = self._read_eos_ids(generation, folder)
        self.special_tokens = dict(self._backend.special_tokens)
        self.chat_template, self._chat_template_file = _read_chat_template(config, folder)
        self._chat_template_as_read = self.chat_template  # to see, when saving, if a template was set

    def _read_special_tokens(self, config: dict[str, Any], generation: dict[str, Any], folder: Path) -> None:
        """bos/eos/pad of a tokenizer.json: named in tokenizer_config.json, else ids in generation_config."""
        names = {name: _token_text(config.get(name)) for name in NAMED_SPECIAL_TOKENS}
        for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
            fallback = generation.get(key)
            fallback = fallback[0] if isinstance(fallback, list) and fallback else fallback
            if names[name] is None and isinstance(fallback, int) and 0 <= fallback < self._backend.vocab_size:
                names[name] = self._backend.id_to_piece(fallback)
        self.special_token_names = {name: text for name, text in names.items() if text is not None}
        ids = {}
        for name, text in self.special_token_names.items():
            token_id = self._backend.token_id(text)
            if token_id is None:
                raise DataError(
                    f"{folder / TOKENIZER_CONFIG_FILE}: {name} {text!r} is not in the vocabulary of "
                    f"{self.model_path}: fix {name} or use the matching tokenizer.json"
                )
            ids[name] = token_id
        self.bos_id, self.eos_id = ids.get("bos_token", -1), ids.get("eos_token", -1)
        self.pad_id = ids.get("pad_token", -1)

    def _read_eos_ids(self, generation: dict[str, Any], folder: Path) -> tuple[int, ...]:
        listed = generation.get("eos_token_id", [])
        listed = [listed] if isinstance(listed, int) else listed
        if not isinstance(listed, list) or not all(
            isinstance(i, int) and 0 <= i < self.vocab_size for i in listed
        ):
            raise DataError(
                f"{folder / GENERATION_CONFIG_FILE}: eos_token_id {listed!r} is not a token id or a list of "
                f"them (0 .. {self.vocab_size - 1}): fix it or delete the file"
            )
        first = [self.eos_id] if self.eos_id >= 0 else []
        return tuple(dict.fromkeys(first + listed))  # no repeats, eos_id first

    def _json_sha256(self) -> str:
        canonical = json.loads(self._backend.json_text)
        for setting in ("padding", "truncation"):  # ignored by encode, so not part of the identity
            canonical.pop(setting, None)
        identity = {
            "tokenizer.json": canonical,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }
        text = json.dumps(identity, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    @property
    def bos_token(self) -> str | None:
        return self.special_token_names.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_token_names.get("eos_token")

    def encode(
        self, text: str, bos: bool = False, eos: bool = False, *, parse_special: bool = False
    ) -> list[int]:
        """Token ids of `text`, with bos_id first and/or eos_id last when asked (and the tokenizer has them).

        parse_special: turn the text of a special token ("<|eot_id|>", "</s>") into its id, as a chat
            template's output needs; by default all text is text.
        """
        return self.encode_batch([text], bos, eos, parse_special=parse_special)[0]

    def encode_batch(
        self, texts: Sequence[str], bos: bool = False, eos: bool = False, *, parse_special: bool = False
    ) -> list[list[int]]:
        """`encode` for many texts in one call: both libraries spread them over their threads, much faster
        than a Python loop when the texts are many and short."""
        bos_id = self.bos_id if bos else -1
        eos_id = self.eos_id if eos else -1
        return self._backend.encode(list(texts), parse_special, bos_id, eos_id)

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`; special ids (bos, eos, <|eot_id|>) decode to nothing."""
        return self._backend.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`, e.g. '▁the' ('▁' marks a space), '<0x0A>' (a byte), or in a
        byte-level BPE 'Ġthe' ('Ġ' is the byte of a space)."""
        return self._backend.id_to_piece(token_id)

    def stream_decoder(self) -> StreamDecoder:
        """A fresh `StreamDecoder` for one generated sequence."""
        return StreamDecoder(self)

    def tokenizer_json(self) -> str:
        """The Hugging Face tokenizer.json text of this tokenizer: the file's own, or the tokenizer.model
        converted (see `sentencepiece_model`; DataError when it has no exact equivalent)."""
        if isinstance(self._backend, _HuggingFaceBackend):
            return self._backend.json_text
        return self._backend.tokenizer_json(self.model_path, self.add_bos)

    def save_pretrained(self, folder: str | os.PathLike, model_max_length: int | None = None) -> None:
        """Write the tokenizer's files into a checkpoint folder, for llama_mini and transformers alike.

        A tokenizer.model is copied and converted: the folder gets tokenizer.model, tokenizer.json,
        tokenizer_config.json (tokenizer_class PreTrainedTokenizerFast, so that transformers reads the
        tokenizer.json as it is and needs neither sentencepiece nor protobuf) and special_tokens_map.json.
        A tokenizer.json is copied with its own tokenizer_config.json (and chat_template.jinja), and a
        stale tokenizer.model in the folder is removed, since it would be read first. Several end ids are
        kept in a minimal generation_config.json when the folder has none. A `chat_template`
        set on the Tokenizer (say DEFAULT_CHAT_TEMPLATE, for a model fine-tuned on it) is written too.
        model_max_length: the model's context, written to tokenizer_config.json.
        Files are written atomically; the conversion runs first, so a DataError leaves the folder as it was.
        """
        folder = Path(folder)
        json_text = self.tokenizer_json()
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(self._backend, _SentencePieceBackend):
            config = self._sentencepiece_config()
            self._copy_to(folder / SENTENCEPIECE_FILE)
            _write_text(folder / TOKENIZER_JSON_FILE, json_text)
        else:
            config = _read_json_object(self.model_path.parent / TOKENIZER_CONFIG_FILE) or self._json_config()
            self._copy_to(folder / TOKENIZER_JSON_FILE)
            (folder / SENTENCEPIECE_FILE).unlink(missing_ok=True)
            if self.chat_template != self._chat_template_as_read:
                config["chat_template"] = self.chat_template
            elif self._chat_template_file is not None:
                _write_text(folder / CHAT_TEMPLATE_FILE, self.chat_template)
        if model_max_length is not None:
            config["model_max_length"] = model_max_length
        special = {
            name: text
            for name, text in self.special_token_names.items()
            if name in ("bos_token", "eos_token", "unk_token")
        }
        _write_json(folder / TOKENIZER_CONFIG_FILE, config)
        _write_json(folder / SPECIAL_TOKENS_MAP_FILE, special)
        if len(self.eos_ids) > 1 and not (folder / GENERATION_CONFIG_FILE).exists():
            # Several end ids (Llama 3's <|eot_id|> beside <|end_of_text|>) live in generation_config.json;
            # a folder without one (a run folder) gets a minimal one, so the ids survive a reload. A
            # checkpoint's save_pretrained then writes its full generation_config.json with the same list.
            _write_json(
                folder / GENERATION_CONFIG_FILE,
                {"bos_token_id": self.bos_id, "eos_token_id": list(self.eos_ids)},
            )

    def _copy_to(self, target: Path) -> None:
        if target.exists() and target.resolve() == self.model_path.resolve():
            return
        atomic_write(target, lambda temporary: shutil.copyfile(self.model_path, temporary))

    def _sentencepiece_config(self) -> dict[str, Any]:
        # What transformers needs to build the tokenizer from tokenizer.json alone. LLaMA's convention:
        # prepend bos, not eos. PreTrainedTokenizerFast, not LlamaTokenizer: transformers 5 rebuilds a
        # LlamaTokenizer's pipeline with a Metaspace pre-tokenizer, which drops the dummy prefix of a text
        # that starts with a space (see sentencepiece_model), so only the generic class reads ours as it is.
        names = self.special_token_names
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **{name: names[name] for name in ("bos_token", "eos_token", "unk_token") if name in names},
            "pad_token": names.get("pad_token"),
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config

    def _json_config(self) -> dict[str, Any]:
        # A tokenizer.json that came without a tokenizer_config.json: name its special tokens, and leave
        # adding bos to the file's own post-processor.
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self.special_token_names,
            "clean_up_tokenization_spaces": False,
        }

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"


def _read_chat_template(config: dict[str, Any], folder: Path) -> tuple[str | None, Path | None]:
    """The chat template and the file it came from, if it came from chat_template.jinja.

    tokenizer_config.json holds a template string, or a list of {"name", "template"} of which we take the
    one named "default" (as transformers does when no template is named).
    """
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template, None
    file = folder / CHAT_TEMPLATE_FILE
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8"), file
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read {file} ({error}): fix the file or delete it") from None
    return None, None


class StreamDecoder:
    """Decode generated ids one at a time, so text can be printed as it is generated.

    Decoding each id on its own is wrong in two ways: a character outside the vocabulary arrives as 2-4
    byte pieces that mean nothing until the last one (🙂 = <0xF0> <0x9F> <0x99> <0x82>; a byte-level BPE
    splits characters into bytes the same way), and sentencepiece drops the leading space of the first
    piece of a text ('▁Hello' -> 'Hello'), which is right only at the very start. So we decode a short
    window of recent ids twice, without and with the new ones, and emit the difference:

        prefix_text = decode(ids[prefix_start:read_start])      text already emitted
        new_text    = decode(ids[prefix_start:])                 the same, plus what the new ids add
        emit new_text[len(prefix_text):], unless new_text ends in U+FFFD (an unfinished character): wait

    Both decodes begin at the same id, so the dropped leading space (if any) cancels out; and the window
    starts at an id that produced text (empty-text ids like eos never advance it), so the first-piece rule
    applies to the same piece in both. After each emission the window slides forward to the ids not yet
    shown, so a push costs O(window), not O(everything generated). The concatenation of all pushes and the
    final `flush` equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._ids: list[int] = []  # the window: ids from prefix_start on
        self._read_start = 0  # index in the window of the first id whose text has not been emitted

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes ('' while a character is unfinished)."""
        self._ids.append(int(token_id))
        prefix_text = self.tokenizer.decode(self._ids[: self._read_start])
        new_text = self.tokenizer.decode(self._ids)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHARACTER):
            return ""
        # Slide the window: the ids just emitted become the next window's prefix.
        self._ids = self._ids[self._read_start :]
        self._read_start = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character decodes to U+FFFD) and reset."""
        prefix_text = self.tokenizer.decode(self._ids[: self._read_start])
        new_text = self.tokenizer.decode(self._ids)
        self._ids, self._read_start = [], 0
        return new_text[len(prefix_text) :]
