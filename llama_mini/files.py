"""Writing files and folders so that nothing is ever seen half written.

Every file llama_mini writes (tokenizer, token shards, weights, configs) goes to a temporary name in the
same folder and is then renamed over its final name with `os.replace`, which is atomic on one file system:
after a crash the final name holds the old file or the new one, never a mixture. Checkpoint folders are
filled under a temporary name and renamed the same way (`write_folder_atomically`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file opened under a temporary name next to `path`, renamed to `path` when the block ends
    without an error (and deleted when it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(temporary_path)` (for writers that take a file name, such as safetensors' save_file),
    then rename the result to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Fill a temporary sibling folder with `write(folder)`, then swap it in for `target` by renaming.

    A crash before the rename leaves the old `target` untouched (and a `.tmp-` folder to ignore); a crash
    between the two renames leaves the complete old folder under `.old-`. Nothing half-written ever
    carries the final name.
    """
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    old = target.with_name(f".old-{target.name}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
