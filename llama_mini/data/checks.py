"""Checking prepared data when a run opens them, so that damaged shards stop the run with one line instead
of an IndexError from the embedding at the first batch that touches them (or of training on them).

    sizes       every file the manifest lists has the size it records (TokenSplit checks on opening;
                prepare_data prepares the data again when a shard changed, `shard_change` says which)
    token ids   no shard holds an id beyond the vocabulary: a vectorised max per shard, cached in
                CHECKED by the shard's size and modification time, so a run reads each shard once
                after it was written and later runs read nothing (`check_token_ids`)
    checksums   with --verify-data, every file's sha256 equals the one recorded when it was written
                (`verify_checksums`): a full read, which finds damage that keeps ids in range
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llama_mini.data.shards import MANIFEST, SPLITS, TokenSplit
from llama_mini.errors import DataError
from llama_mini.files import atomic_file

__all__ = ["CHECKED", "check_prepared", "check_token_ids", "shard_change", "verify_checksums"]

CHECKED = "checked.json"  # shard name -> [size, mtime_ns, largest id] of the shards checked so far

Log = Callable[[str], None]


def shard_change(folder: str | Path, manifest: dict[str, Any]) -> str | None:
    """None when every file `manifest` lists is in `folder` with the size it records, else which one is not,
    in a few words ("train-000003.bin has 1,000 bytes where prepared.json records 2,000")."""
    folder = Path(folder)
    itemsizes = {"shards": int(manifest["dtype"][4:]) // 8, "masks": 1}
    for split in SPLITS:
        record = manifest["splits"][split]
        files = [
            (name, tokens * itemsizes[kind]) for kind in itemsizes for name, tokens in record.get(kind, [])
        ]
        if "conversations" in record:
            files.append((record["conversations"][0], record["conversations"][1] * 16))
        for name, expected in files:
            try:
                actual = (folder / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if actual != expected:
                return f"{name} has {actual:,} bytes where {MANIFEST} records {expected:,}"
    return None


def check_token_ids(split: TokenSplit) -> None:
    """A DataError naming the first shard of `split` that holds an id >= its vocabulary size, and the fix.
    The largest id of each shard is cached in the folder's CHECKED by (size, modification time)."""
    cache_path = split.folder / CHECKED
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8"))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    changed = False
    for (name, _), tokens in zip(split.meta.shards, split.shards, strict=True):
        status = (split.folder / name).stat()
        key = [status.st_size, status.st_mtime_ns]
        if cache.get(name, [None, None])[:2] != key:
            cache[name] = [*key, int(tokens.max())]  # reads the shard once, at disk (or page cache) speed
            changed = True
        largest = cache[name][2]
        if largest >= split.meta.vocab_size:
            raise DataError(
                f"token shard {split.folder / name} holds id {largest:,}, beyond the vocabulary of "
                f"{split.meta.vocab_size:,} ids: its bytes are damaged; delete it and run again to prepare "
                f"the data again"
            )
    if changed:
        try:
            with atomic_file(cache_path) as file:
                file.write(json.dumps(cache).encode("utf-8"))
        except OSError:  # a read-only data folder: checked again next time
            pass


def verify_checksums(split: TokenSplit) -> int:
    """Compare the sha256 of every file of `split` (tokens, and for chat data masks and conversation
    index) with the manifest's; a DataError names the first that differs. Returns the files compared."""
    manifest = json.loads((split.folder / MANIFEST).read_text(encoding="utf-8"))
    recorded = manifest.get("checksums")
    if not recorded:
        raise DataError(
            f"--verify-data: {split.folder / MANIFEST} records no checksums (the data were prepared by an "
            f"earlier llama_mini): delete it and run again to prepare the data with them, or leave out "
            f"--verify-data"
        )
    record = manifest["splits"][split.meta.split]
    names = [name for kind in ("shards", "masks") for name, _ in record.get(kind, [])]
    names += [record["conversations"][0]] if "conversations" in record else []
    for name in names:
        digest = hashlib.sha256()
        with open(split.folder / name, "rb") as file:
            while chunk := file.read(1 << 24):
                digest.update(chunk)
        if digest.hexdigest() != recorded.get(name):
            raise DataError(
                f"--verify-data: {split.folder / name} does not have the sha256 recorded in {MANIFEST} when "
                f"it was written: its bytes changed; delete it and run again to prepare the data again"
            )
    return len(names)


def check_prepared(splits: tuple[TokenSplit, ...], verify: bool = False, log: Log | None = None) -> None:
    """The checks a run makes on opening its data (see the module docstring): token ids always, checksums
    with `verify`."""
    for split in splits:
        check_token_ids(split)
    if verify:
        files = sum(verify_checksums(split) for split in splits)
        if log is not None:
            log(f"data: --verify-data: the {files} files of {splits[0].folder} have their recorded sha256")
