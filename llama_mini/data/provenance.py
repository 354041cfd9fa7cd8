"""What prepared data were made from, so that a rerun or a resumed run can reuse them without reading the
corpus.

A manifest (llama_mini.data.shards) carries a provenance record (`provenance_record`): the settings the
data were made with, the corpus's files with their sizes and modification times, a digest of the text
and the empty documents left out. `prepare_data` first looks at what its folder already holds
(`reusable_manifest`): data prepared with the same tokenizer and split settings from a corpus whose files
have the sizes and modification times recorded then are used as they are, without reading the corpus.
When the files changed, a new run prepares them again and a resumed run keeps the data it started with;
either way one log line says what changed (`describe_change`).

An unfinished preparation records how far it has come (llama_mini.data.shards.DataWriter.checkpoint),
under a digest of everything its output depends on (`preparation_identity`): the settings, the corpus's
files, the tokenizer, the shard size and the batching. A run with the same identity goes on from there,
keeping the shards finished so far; any difference starts the preparation again.

Chat data are rendered with the tokenizer's chat template, which the tokenizer's sha256 does not cover,
so the manifest records the template too (`chat_record`): data rendered with another template are not
reused. The template is the tokenizer's own (or DEFAULT_CHAT_TEMPLATE when it has none), which the run
saves with its checkpoints, so a model fine-tuned on the default template remembers it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_mini.data.checks import shard_change
from llama_mini.data.shards import SPLITS, TokenSplit, read_manifest
from llama_mini.data.sources import InputRecord
from llama_mini.errors import DataError
from llama_mini.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, chat_template_for

if TYPE_CHECKING:  # only for type hints: any object with the same attributes and methods works
    from llama_mini.tokenizer import Tokenizer

__all__ = [
    "ALWAYS_RECORDED",
    "chat_record",
    "describe_change",
    "preparation_identity",
    "provenance_record",
    "reusable_manifest",
    "summary",
]

# The settings that prepared data always record and must match to be reused; a source adds its own
# ("text_field", "data_split") when they change what it reads.
ALWAYS_RECORDED = ("corpus", "val_fraction", "split_seed", "split_rule")


def chat_record(tokenizer: Tokenizer) -> dict[str, Any]:
    """The manifest's "chat" record: the template the conversations are rendered with."""
    template = chat_template_for(tokenizer)
    return {
        "template": template,
        "template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        "default_template": template == DEFAULT_CHAT_TEMPLATE,
    }


def reusable_manifest(
    folder: Path, tokenizer: Tokenizer, wanted: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any] | None:
    """The manifest of complete data in `folder` written with this tokenizer and these settings, or None;
    data whose shards changed since are not complete, and `log` gets a line saying which changed."""
    try:
        manifest = read_manifest(folder)
    except DataError:
        return None
    settings = manifest.get("provenance", {}).get("settings", {})
    # "chat" None (recognise the corpus) accepts either kind here; prepare_data checks the kind found.
    same = all(key in settings for key in ALWAYS_RECORDED) and all(
        settings[key] == wanted.get(key) for key in settings if not (key == "chat" and wanted[key] is None)
    )
    if "chat" in manifest:  # the tokenizer's sha256 does not cover its chat template
        same = same and manifest["chat"]["template"] == chat_template_for(tokenizer)
        same = same and wanted["chat"] is not False
    else:
        same = same and not wanted["chat"]
    if not same or manifest["tokenizer_sha256"] != tokenizer.sha256:
        return None
    change = shard_change(folder, manifest)
    if change is not None:
        log(f"data: shard {change}: it changed since {folder} was prepared; preparing the data again")
        return None
    try:
        for split in SPLITS:
            TokenSplit(folder, split)  # everything else a split needs
    except DataError:
        return None
    return manifest


def preparation_identity(
    settings: dict[str, Any],
    inputs: list[InputRecord] | None,
    tokenizer: Tokenizer,
    chat: dict[str, Any] | None,
    parameters: dict[str, Any],
) -> str:
    """A digest of what the shards of a preparation depend on: its settings, the corpus's files (sizes and
    modification times), the tokenizer, the chat template, and `parameters` (shard size, batching, the
    split's threshold). An interrupted preparation is continued only by one with the same identity."""
    record = {
        "settings": settings,
        "inputs": inputs,
        "tokenizer_sha256": tokenizer.sha256,
        "vocab_size": tokenizer.vocab_size,
        "chat": chat,
        **parameters,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode("utf-8")).hexdigest()


def provenance_record(
    settings: dict[str, Any], inputs: list[InputRecord] | None, digest: str, skipped: int
) -> dict[str, Any]:
    """The manifest's "provenance": what the data were made from."""
    return {
        "settings": settings,  # what the data were made with; the tokenizer is the manifest's own field
        "inputs": inputs,  # [name, size, mtime_ns] of each file read, in order (None: a Hub dataset)
        "digest": digest,  # sha256 over the batches' sha256 of their documents' length-prefixed UTF-8
        "empty_documents": skipped,  # empty or whitespace-only documents left out
        "prepared": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def summary(manifest: dict[str, Any]) -> str:
    """What prepared data hold, in one line: documents (or conversations), tokens and shards per split."""
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    shards = len(train["shards"]) + len(val["shards"])
    skipped = manifest["provenance"].get("empty_documents", 0)
    empty = f", {skipped:,} empty documents skipped" if skipped else ""
    if "chat" in manifest:
        default = manifest["chat"].get("default_template")
        template = "the default chat template" if default else "the tokenizer's chat template"
        return (
            f"{train['documents']:,} training and {val['documents']:,} validation conversations in "
            f"{template}, {train['tokens']:,} and {val['tokens']:,} tokens ({train['target_tokens']:,} and "
            f"{val['target_tokens']:,} of them assistant tokens, which the loss counts) in {shards} shards"
        )
    return (
        f"{train['documents']:,} training and {val['documents']:,} validation documents, {train['tokens']:,} "
        f"and {val['tokens']:,} tokens in {shards} shards{empty}"
    )


def describe_change(recorded: list[InputRecord] | None, current: list[InputRecord] | None) -> str | None:
    """None when the corpus's files are as recorded, else what changed, in a few words."""
    if recorded == current or recorded is None and current is None:
        return None
    if not current:
        return "its files are gone"
    before = {name: (size, mtime) for name, size, mtime in recorded or []}
    after = {name: (size, mtime) for name, size, mtime in current}
    changed = [name for name in before if name in after and before[name] != after[name]]
    parts = []
    if changed:
        name = changed[0]
        parts.append(
            f"{len(changed)} of {len(before)} files changed, first {name}: {_file_state(before[name])} -> "
            f"{_file_state(after[name])}"
        )
    new = [name for name in after if name not in before]
    missing = [name for name in before if name not in after]
    for names, what in ((new, "new"), (missing, "missing")):
        if names:
            parts.append(f"{len(names)} files {what}, first {names[0]}")
    return "; ".join(parts) or "its files were reordered"


def _file_state(state: tuple[int | None, int | None]) -> str:
    size, mtime = state
    if size is None or mtime is None:
        return "missing"
    return f"{size:,} bytes modified {datetime.fromtimestamp(mtime / 1e9):%Y-%m-%d %H:%M:%S}"
