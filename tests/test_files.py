"""Atomic writes: a file is replaced whole or not at all, and no temporary file is left behind."""

import pytest

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
