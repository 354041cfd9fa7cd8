"""Writing files and folders so that nothing is ever seen half written.

Every file llama_mini writes (tokenizer, token shards, weights, configs) goes to a temporary name in the
same folder and is then renamed over its final name with `os.replace`, which is atomic on one file system:
after a crash the final name holds the old file or the new one, never a mixture. Checkpoint folders are
filled under a temporary name and renamed the same way (`write_folder_atomically`).

A write the file system refuses (no space, a quota, no permission, a read-only file system, a file-size
limit) is a problem of the machine, not a bug: `file_system_failure` says it in words, and every command
reports it in one line naming the path (console.report_errors), with the temporary file or folder removed.

A file gets the mode an ordinary `open(path, "w")` would give it: read and write for everyone the user's
umask allows (0644 under the usual 022), so a teammate, a serving account or the other nodes of a job can
read a shared run folder. (The temporary file is created 0600, which its rename would otherwise keep.)
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from llama_mini.errors import ConfigError

# errno -> how a refused write is said, and what the user can do about it
WRITE_FAILURES = {
    errno.ENOSPC: ("no space left on the device", "free some space or write elsewhere"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or write elsewhere"),
    errno.EACCES: ("permission denied", "check its permissions or write elsewhere"),
    errno.EPERM: ("permission denied", "check its permissions or write elsewhere"),
    errno.EROFS: ("the file system is read-only", "write elsewhere"),
    errno.EFBIG: ("the file would exceed the size this process may write", "raise `ulimit -f`"),
}


def refused_write(error: BaseException) -> tuple[str, str] | None:
    """(cause, fix) when `error` is a write the file system refused, else None.

    Most writers raise an OSError with the kernel's errno. Some see only that a write was cut short: numpy's
    `tofile` ("N requested and M written", no errno) and torch's zip writer ("unexpected pos ...", a
    RuntimeError). Their cause is read off the process and the disk: a file-size limit, or a full disk."""
    if isinstance(error, OSError) and error.errno in WRITE_FAILURES:
        return WRITE_FAILURES[error.errno]
    message = str(error)
    cut_short = (isinstance(error, OSError) and error.errno is None and " requested and " in message) or (
        isinstance(error, RuntimeError) and "unexpected pos" in message
    )
    if not cut_short:
        return None
    if _file_size_limit() is not None:
        return WRITE_FAILURES[errno.EFBIG]
    try:
        nearly_full = shutil.disk_usage(Path(written_path(error) or ".").parent).free < 2**24
    except OSError:
        nearly_full = False
    if nearly_full:
        return WRITE_FAILURES[errno.ENOSPC]
    return (
        "the file system took only part of a write (a full disk or a quota?)",
        "free some space or write elsewhere",
    )


def _file_size_limit() -> int | None:
    """This process's file-size limit in bytes (`ulimit -f`), or None for none."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def file_system_failure(error: BaseException) -> str | None:
    """`error` in one line ("no space left on the device: /path; free some space or write elsewhere") when it
    is a write the file system refused, else None (a bug keeps its traceback)."""
    refused = refused_write(error)
    if refused is None:
        return None
    cause, fix = refused
    path = written_path(error)
    return f"{cause}{f': {path}' if path else ''}; {fix}"


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError raised in the block that names no file (a buffered writer's) names `path`."""
    try:
        yield
    except OSError as error:
        if error.filename is None and not hasattr(error, "written_path"):
            error.written_path = str(path)  # (setting `filename` would hide a message without errno)
        raise


def written_path(error: BaseException) -> str | None:
    """The file a failed write was writing, where known."""
    return getattr(error, "filename", None) or getattr(error, "written_path", None)


@contextmanager
def waiting_lock(path: str | os.PathLike, on_wait: Callable[[], object]) -> Iterator[None]:
    """Hold an OS lock on the file `path` for the block, waiting for another process that holds it (after
    calling `on_wait`, so the wait is said). The kernel releases it if the holder dies; on a system without
    fcntl the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            on_wait()
            fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def check_output_path(path: str | os.PathLike, what: str, folder: bool = True) -> None:
    """ConfigError (one line naming `what`, e.g. "--data-dir") unless `path` can be created as a folder
    (`folder`) or a file: no existing part of it may be a file, and a folder path may not be one itself.
    Called before any work, so a wrong path never ends in a FileExistsError half way."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{what} {path} is a file, not a folder: choose a new or existing folder")
    blocker = next((parent for parent in path.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"{what} {path}: {blocker} is a file, not a folder; choose another path")


def ordinary_file_mode() -> int:
    """0o666 less the process's umask: the mode `open()` gives a new file."""
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set it to read it, and put it back at once
    os.umask(mask)
    return 0o666 & ~mask


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new file next to `path` (descriptor, name) with the mode of an ordinary new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(descriptor, ordinary_file_mode())
    return descriptor, temporary


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file opened under a temporary name next to `path`, renamed to `path` when the block ends
    without an error (and deleted when it raises)."""
    descriptor, temporary = _temporary_beside(Path(path))
    try:
        with naming(path), os.fdopen(descriptor, "wb") as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call `write(temporary_path)` (for writers that take a file name, such as safetensors' save_file),
    then rename the result to `path`."""
    path = Path(path)
    descriptor, temporary = _temporary_beside(path)
    os.close(descriptor)
    try:
        with naming(path):
            write(Path(temporary))
        os.chmod(temporary, ordinary_file_mode())  # a writer may have made the file anew, with its own mode
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_folder_atomically(target: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Fill a temporary sibling folder with `write(folder)`, then swap it in for `target` by renaming.

    A failure before the rename leaves the old `target` untouched (an exception removes the temporary folder;
    a killed process leaves a `.tmp-` folder that the next write removes); a crash
    between the two renames leaves the complete old folder under `.old-`. Nothing half-written ever
    carries the final name.
    """
    target = Path(target)
    tmp = target.with_name(f".tmp-{target.name}")
    old = target.with_name(f".old-{target.name}")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written stays behind
        raise
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
