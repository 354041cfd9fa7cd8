"""Atomic writes: a file is replaced whole or not at all, and no temporary file is left behind."""

import os
import stat

import pytest

from llama_mini import Transformer, get_preset, save_pretrained
from llama_mini.files import atomic_file, atomic_write


def test_atomic_file_replaces_the_old_content_whole(tmp_path):
    path = tmp_path / "sub" / "shard.bin"
    with atomic_file(path) as file:
        file.write(b"first")
    with atomic_file(path) as file:
        file.write(b"second")
    assert path.read_bytes() == b"second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["shard.bin"]


def test_atomic_file_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_file(path) as file:
            file.write(b"half of the new")
            raise RuntimeError("disk on fire")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]


def test_atomic_write_renames_what_a_path_based_writer_wrote(tmp_path):
    path = tmp_path / "config.json"
    atomic_write(path, lambda temporary: temporary.write_text('{"dim": 192}'))
    assert path.read_text() == '{"dim": 192}'

    def failing_writer(temporary):
        temporary.write_text("{")
        raise OSError("no space left")

    with pytest.raises(OSError, match="no space left"):
        atomic_write(path, failing_writer)
    assert path.read_text() == '{"dim": 192}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


@pytest.fixture
def umask():
    """Set the process's umask for one test, and put the old one back."""
    previous = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_the_mode_an_ordinary_write_gives(tmp_path, umask, mask, mode):
    """Not mkstemp's 0600: a teammate or a serving account can read a shared run folder (as umask allows)."""
    umask(mask)
    with atomic_file(tmp_path / "shard.bin") as file:
        file.write(b"tokens")
    atomic_write(tmp_path / "config.json", lambda tmp: tmp.write_text("{}"))
    (tmp_path / "plain.txt").write_text("an ordinary write")
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in tmp_path.iterdir()}
    assert modes == {"shard.bin": mode, "config.json": mode, "plain.txt": mode}


def test_a_saved_checkpoint_is_readable_by_others(tmp_path, umask):
    umask(0o022)
    save_pretrained(Transformer(get_preset("tiny")), tmp_path / "checkpoint")
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "checkpoint").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
