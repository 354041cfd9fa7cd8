"""Preference data for DPO: pairs of answers to one prompt, the better one "chosen", the worse "rejected".

    a .jsonl file (or a folder of them), one record a line, or a .parquet file (or folder), one a row;
    hf:NAME or hf:NAME:CONFIG, a Hugging Face dataset (split --data-split), streamed with `datasets`;
    a folder written by `Dataset.save_to_disk` (or `DatasetDict.save_to_disk`: --data-split picks one):

    {"prompt": "...", "chosen": "...", "rejected": "..."}                       strings
    {"prompt": [messages], "chosen": [messages], "rejected": [messages]}       conversational, explicit prompt
    {"chosen": [messages], "rejected": [messages]}                             conversational, the prompt the
                                                                               turns the two share

(TRL's DPOTrainer reads the same three forms.) A string prompt is encoded as [bos] prompt, an answer
as answer [eos]. Conversations are rendered with the tokenizer's chat template (llama_mini.tokenizer.chat):
the prompt is the rendering of the prompt turns with the assistant header, the answer every token after
it, through the template's end-of-turn token.

`prepare_preferences` encodes every pair (a preference set is small: thousands of pairs, held in memory),
splits them by a keyed hash of the record's canonical JSON as documents are split (llama_mini.data.split,
exactly round(n * val_fraction) pairs held out), and writes each split as one .npz of token ids and
lengths beside a
manifest, reused when the file, tokenizer, template and split settings are unchanged. A bad record is one
DataError naming its file and line (or row).

`PreferenceSplit.rows` lays a batch of pairs out for the loss (llama_mini.ops.preference): 2B rows, the chosen
answers then the rejected ones, each the prompt and the answer padded to the context, with IGNORE_INDEX
targets off the answer. A pair longer than the context (max_seq_len + 1 tokens, prompt and longer answer)
loses its prompt's first tokens, keeping at least one; an answer longer than all of it is cut at its end
too. Both are counted and reported once per split.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llama_mini.data.sources import open_hub_dataset, open_saved_dataset
from llama_mini.data.split import exact_threshold, validates, validation_score
from llama_mini.errors import DataError
from llama_mini.files import atomic_file
from llama_mini.ops.loss import IGNORE_INDEX
from llama_mini.tokenizer.chat import (
    chat_template_for,
    check_messages,
    common_prefix,
    encode_chat,
    render_chat,
)

if TYPE_CHECKING:
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "PREFERENCE_EXAMPLE",
    "PREFERENCE_MANIFEST",
    "PreferenceSplit",
    "encode_pair",
    "prepare_preferences",
    "preference_records",
]

PREFERENCE_MANIFEST = "preferences.json"
PREFERENCE_FORMAT = 1
PREFERENCE_EXAMPLE = (
    'each record must hold "chosen" and "rejected" (strings with a string "prompt", or lists of '
    '{"role", "content"} messages)'
)
FIELDS = ("prompt", "chosen", "rejected")


def _files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".jsonl", ".parquet") and p.is_file())
        kinds = {p.suffix for p in found}
        if len(kinds) != 1:
            raise DataError(
                f"--dpo: folder {spec} must hold .jsonl or .parquet files of one kind: {PREFERENCE_EXAMPLE}"
            )
        return found
    if path.is_file() and path.suffix in (".jsonl", ".parquet"):
        return [path]
    if not path.exists():
        raise DataError(f"--dpo: preference data {spec} not found: pass a .jsonl or .parquet file")
    raise DataError(
        f"--dpo reads preference pairs from .jsonl or .parquet files, hf:NAME or a save_to_disk folder, "
        f"not {spec}: {PREFERENCE_EXAMPLE}"
    )


def _is_saved_dataset(spec: str) -> bool:
    path = Path(spec).expanduser()
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def preference_records(spec: str, data_split: str = "train") -> Iterator[tuple[str, dict[str, Any]]]:
    """("FILE line N" or "FILE row N", record) of every pair in `spec`, in file order, each checked for
    form (DataError naming the record otherwise); blank lines are skipped."""
    if spec.startswith("hf:") or _is_saved_dataset(spec):
        for where, record in _dataset_rows(spec, data_split):
            yield where, _checked(record, where)
        return
    for path in _files(spec):
        rows = _parquet_rows(path) if path.suffix == ".parquet" else _json_lines(path)
        for where, record in rows:
            yield where, _checked(record, where)


def _dataset_rows(spec: str, data_split: str) -> Iterator[tuple[str, Any]]:
    """The rows of a Hugging Face dataset: hf:NAME[:CONFIG] streamed, or a save_to_disk folder."""
    if spec.startswith("hf:"):
        dataset = open_hub_dataset(spec, data_split)
    else:
        dataset = open_saved_dataset(Path(spec).expanduser(), data_split)
    for number, row in enumerate(dataset, start=1):
        yield f"{spec} row {number}", row


def _json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with open(path, "rb") as file:
            for number, raw in enumerate(file, start=1):
                where = f"{path} line {number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{where} is not UTF-8 text: convert the file to UTF-8") from None
                if not line.strip():
                    continue
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(
                        f"{where} is not valid JSON ({error.msg}): {PREFERENCE_EXAMPLE}"
                    ) from None
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror or error}): check the path") from None


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DataError("reading Parquet files needs pyarrow: pip install 'llama_mini[data]'") from None
    try:
        table = parquet.read_table(path)
    except Exception as error:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
        raise DataError(f"cannot read {path} as Parquet ({error}): check that it is a Parquet file") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"{path} row {number}", row


def _checked(record: Any, where: str) -> dict[str, Any]:
    """The record's prompt, chosen and rejected, checked; conversations as plain message lists."""
    # a table (Parquet, a dataset) gives a record without a field a null in that column
    if not isinstance(record, dict) or record.get("chosen") is None or record.get("rejected") is None:
        raise DataError(f'{where} lacks "chosen" or "rejected": {PREFERENCE_EXAMPLE}')
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not isinstance(prompt, str):
            raise DataError(f'{where}: string answers need a string "prompt": {PREFERENCE_EXAMPLE}')
        if not chosen or not rejected:
            raise DataError(f"{where}: an answer is empty: drop the record or give both answers")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise DataError(f'{where}: "chosen" and "rejected" must both be strings or both message lists')
    try:
        chosen, rejected = check_messages(chosen), check_messages(rejected)
        if prompt is None:  # the prompt is the turns the two share
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        elif isinstance(prompt, list):
            prompt = check_messages(prompt)
        else:
            raise DataError('"prompt" must be a list of messages when the answers are')
    except DataError as error:
        raise DataError(f"{where}: {error}") from None
    if not prompt or not chosen or not rejected:
        raise DataError(
            f"{where}: a conversational pair needs prompt turns and a different answer in each of chosen "
            f"and rejected"
        )
    if any(message["role"] != "assistant" for message in chosen + rejected):
        raise DataError(f'{where}: the answers (the turns after the prompt) must have role "assistant"')
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def encode_pair(tokenizer: Tokenizer, record: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen answer ids, rejected answer ids) of a checked record (see the module docstring)."""
    prompt = record["prompt"]
    if isinstance(prompt, str):
        eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
        prompt_ids = tokenizer.encode(prompt, bos=True)
        return prompt_ids, *(tokenizer.encode(record[name]) + eos for name in ("chosen", "rejected"))
    heading = tokenizer.encode(render_chat(tokenizer, prompt, add_generation_prompt=True), parse_special=True)
    chosen = encode_chat(tokenizer, prompt + record["chosen"]).ids
    rejected = encode_chat(tokenizer, prompt + record["rejected"]).ids
    # The prompt's tokens: those of its rendering that both whole renderings begin with.
    start = min(common_prefix(heading, chosen), common_prefix(heading, rejected))
    if start == len(chosen) or start == len(rejected):
        raise DataError("an answer renders to no tokens of its own: give it some content")
    return chosen[:start], chosen[start:], rejected[start:]


class PreferenceSplit:
    """One split of prepared pairs: `tokens` (all ids, pair after pair: prompt, chosen, rejected) and
    `lengths` (pairs, 3); len() is the number of pairs."""

    def __init__(self, folder: str | Path, split: str):
        self.folder, self.split = Path(folder), split
        try:
            with np.load(self.folder / f"preferences-{split}.npz", allow_pickle=False) as stored:
                self.tokens, self.lengths = stored["tokens"], stored["lengths"]
        except (OSError, KeyError, ValueError) as error:
            raise DataError(
                f"cannot read the prepared preference pairs in {self.folder} ({error}): delete "
                f"{self.folder / PREFERENCE_MANIFEST} to prepare them again"
            ) from None
        self.starts = np.concatenate([[0], np.cumsum(self.lengths.sum(axis=1))])
        self.reported: set[int] = set()
        self.chat = None  # not chat rows: the trainer's chat paths do not apply

    def __len__(self) -> int:
        return len(self.lengths)

    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prompt, chosen, rejected) ids of pair `index`."""
        start = self.starts[index]
        prompt, chosen, _ = self.lengths[index]
        cuts = np.cumsum([prompt, chosen])
        return tuple(np.split(self.tokens[start : self.starts[index + 1]], cuts))

    def truncation(self, seq_len: int) -> tuple[int, int]:
        """(pairs whose prompt loses tokens, pairs whose answers are cut too) at context seq_len."""
        room = seq_len + 1
        answer = self.lengths[:, 1:].max(axis=1)
        return int((self.lengths[:, 0] + answer > room).sum()), int((answer + 1 > room).sum())

    def report(self, seq_len: int, log: Callable[[str], None]) -> None:
        """Once per context: how many pairs it truncates (see the module docstring)."""
        if seq_len in self.reported:
            return
        self.reported.add(seq_len)
        cut, answers_cut = self.truncation(seq_len)
        if cut:
            log(
                f"data: {cut:,} of {len(self):,} {self.split} pairs are longer than max_seq_len + 1 = "
                f"{seq_len + 1} tokens: their prompts lose their first tokens"
                + (f", and {answers_cut:,} answers are cut at the end too" if answers_cut else "")
            )

    def rows(self, indices: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y (2B, seq_len) of pairs `indices`: the chosen rows, then the rejected rows (see the module)."""
        count = len(indices)
        x = np.zeros((2 * count, seq_len), dtype=np.int64)
        y = np.full((2 * count, seq_len), IGNORE_INDEX, dtype=np.int64)
        room = seq_len + 1
        for row, index in enumerate(indices):
            prompt, chosen, rejected = self.pair(int(index))
            kept = min(len(prompt), max(1, room - max(len(chosen), len(rejected))))
            prompt = prompt[len(prompt) - kept :]
            for offset, answer in ((0, chosen), (count, rejected)):
                ids = np.concatenate([prompt, answer[: room - kept]])
                x[row + offset, : len(ids) - 1] = ids[:-1]
                y[row + offset, kept - 1 : len(ids) - 1] = ids[kept:]
        return torch.from_numpy(x), torch.from_numpy(y)


def _input_files(spec: str) -> list[Path]:
    """The local files the pairs are read from (none for a Hub dataset, known by name and split only)."""
    if spec.startswith("hf:"):
        return []
    if _is_saved_dataset(spec):
        return sorted(path for path in Path(spec).expanduser().rglob("*") if path.is_file())
    return _files(spec)


def _identity(spec: str, data_split: str, tokenizer: Tokenizer, val_fraction: float, seed: int) -> str:
    inputs = [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in _input_files(spec)]
    described = {
        "format": PREFERENCE_FORMAT,
        "spec": spec,
        "data_split": data_split,
        "inputs": inputs,
        "tokenizer": tokenizer.sha256,
        "template": chat_template_for(tokenizer),
        "val_fraction": val_fraction,
        "split_seed": seed,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def prepare_preferences(
    spec: str,
    folder: str | Path,
    tokenizer: Tokenizer,
    val_fraction: float,
    seed: int,
    *,
    resuming: bool = False,
    data_split: str = "train",
    log: Callable[[str], None] | None = None,
) -> tuple[PreferenceSplit, PreferenceSplit]:
    """Encode and split the pairs of `spec` into `folder` (see the module docstring), or reuse what is there
    when it was prepared from the same inputs (or, `resuming`, whatever it was prepared from)."""
    log = log or (lambda line: None)
    folder = Path(folder)
    manifest_path = folder / PREFERENCE_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if resuming and manifest is not None:
        return PreferenceSplit(folder, "train"), PreferenceSplit(folder, "val")
    identity = _identity(spec, data_split, tokenizer, val_fraction, seed)
    if manifest is not None and manifest.get("identity") == identity:
        log(f"data: reusing the preference pairs in {folder}")
        return PreferenceSplit(folder, "train"), PreferenceSplit(folder, "val")
    pairs, scores = [], []
    for where, record in preference_records(spec, data_split):
        try:
            pairs.append(encode_pair(tokenizer, record))
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
        canonical = json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
        scores.append(validation_score(canonical.encode("utf-8"), seed))
    if len(pairs) < 2:
        raise DataError(
            f"--dpo: {spec} holds {len(pairs)} preference pair(s): training and validation need at least "
            f"one each; add pairs"
        )
    scores = np.asarray(scores)
    held_out = validates(scores, 0, val_fraction, exact_threshold(scores, val_fraction))
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # from here on, the old pairs are not valid
    counts = {}
    for split, chosen in (("train", ~held_out), ("val", held_out)):
        selected = [pair for pair, keep in zip(pairs, chosen, strict=True) if keep]
        lengths = np.asarray([[len(part) for part in pair] for pair in selected], dtype=np.int64)
        tokens = np.concatenate([np.asarray(part, dtype=np.int64) for pair in selected for part in pair])
        buffer = io.BytesIO()
        np.savez(buffer, tokens=tokens.astype(np.int32), lengths=lengths)
        with atomic_file(folder / f"preferences-{split}.npz") as file:
            file.write(buffer.getvalue())
        counts[split] = len(selected)
    record = {"format": PREFERENCE_FORMAT, "identity": identity, "spec": spec, "pairs": counts}
    with atomic_file(manifest_path) as file:
        file.write((json.dumps(record, indent=1) + "\n").encode("utf-8"))
    log(f"data: {counts['train']:,} training and {counts['val']:,} validation preference pairs in {folder}")
    return PreferenceSplit(folder, "train"), PreferenceSplit(folder, "val")
