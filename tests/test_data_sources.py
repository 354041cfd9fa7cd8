"""Every kind of corpus reads as a stream of documents in a fixed order, and bad input is one clear error
naming the file and the line or row (llama_mini.data.sources). Parquet and Hugging Face datasets are built
in temporary folders: nothing is downloaded."""

import json
import re
import sys

import pytest

from llama_mini.data import load_documents, open_source, sources
from llama_mini.errors import DataError

# ---------------------------------------------------------------------------------------------------------
# Text files
# ---------------------------------------------------------------------------------------------------------


def paragraph_chunks_of_whole_text(text: str, min_characters: int) -> list[str]:
    """The rule for a text file, applied to the whole text at once (llama_mini 0.1's implementation)."""
    chunks, start = [], 0
    for blank_lines in re.finditer(r"\n(?:[ \t]*\n)+", text):
        if blank_lines.end() - start >= min_characters:
            chunks.append(text[start : blank_lines.end()])
            start = blank_lines.end()
    if start < len(text):
        chunks.append(text[start:])
    return chunks


def test_small_text_file_is_one_document(tmp_path):
    (tmp_path / "poem.txt").write_text("Shall I compare thee\n\nto a summer's day?\n")
    assert load_documents(str(tmp_path / "poem.txt")) == ["Shall I compare thee\n\nto a summer's day?\n"]


def test_large_text_file_is_cut_into_paragraph_documents(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "TEXT_FILE_DOCUMENT_CHARACTERS", 30)
    paragraphs = [f"paragraph {i} has some words in it.\n" for i in range(6)]
    text = "\n\n".join(paragraphs) + "tail"
    (tmp_path / "big.txt").write_text(text)
    documents = load_documents(str(tmp_path / "big.txt"))
    assert "".join(documents) == text
    assert documents == [paragraph + "\n\n" for paragraph in paragraphs[:-1]] + [paragraphs[-1] + "tail"]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64])
def test_reading_in_small_blocks_cuts_as_the_whole_text_would(monkeypatch, tmp_path, block):
    """Blank-line runs (with spaces and tabs inside) fall across block ends at every offset."""
    monkeypatch.setattr(sources, "_READ_BYTES", block)
    monkeypatch.setattr(sources, "TEXT_FILE_DOCUMENT_CHARACTERS", 12)
    newlines, blanks = "\n", " \t"
    text = "".join(f"line {i} é{newlines * (i % 3 + 1)}{blanks * (i % 2)}\n" for i in range(40)) + "end \n \n"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    assert list(sources.read_text_documents(tmp_path / "t.txt", 12, 10**9)) == paragraph_chunks_of_whole_text(
        text, 12
    )


def test_a_stretch_without_paragraph_ends_is_cut_at_line_ends_below_the_cap(tmp_path):
    text = "".join(f"line {i:02d}\n" for i in range(20)) + "x" * 25  # 8 characters a line
    (tmp_path / "t.txt").write_text(text)
    documents = list(sources.read_text_documents(tmp_path / "t.txt", 5, 20))
    assert "".join(documents) == text
    assert documents[:3] == ["line 00\nline 01\n", "line 02\nline 03\n", "line 04\nline 05\n"]
    assert documents[-2:] == ["x" * 20, "x" * 5] and max(map(len, documents)) <= 20


def test_windows_and_old_mac_line_ends_become_newlines_across_blocks(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_READ_BYTES", 1)  # every "\r\n" is split between two reads
    (tmp_path / "t.txt").write_bytes(b"one\r\ntwo\rthree\r\n\r\nfour")
    assert load_documents(str(tmp_path / "t.txt")) == ["one\ntwo\nthree\n\nfour"]


def test_folder_gives_one_document_per_txt_file_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("not a .txt file")
    (tmp_path / "blank.txt").write_text(" \n\n")  # only whitespace: dropped
    assert load_documents(str(tmp_path)) == ["first", "second"]


def test_invalid_utf8_names_the_byte_and_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_READ_BYTES", 4)  # the bad byte comes in a later block
    (tmp_path / "latin1.txt").write_bytes("ok\nfine\ncafé\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text: byte 11 \(line 3\) is invalid"):
        load_documents(str(tmp_path / "latin1.txt"))


def test_a_character_split_between_blocks_is_read_whole(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "_READ_BYTES", 1)
    (tmp_path / "t.txt").write_text("東京 🙂 café", encoding="utf-8")
    assert load_documents(str(tmp_path / "t.txt")) == ["東京 🙂 café"]


def test_missing_corpus_lists_what_can_be_passed(tmp_path):
    missing = str(tmp_path / "nothing.txt")
    with pytest.raises(
        DataError, match=f"corpus {missing} not found: pass --data shakespeare, tinystories, hf:"
    ):
        open_source(missing)


@pytest.mark.parametrize("make", ["empty_file", "empty_folder", "empty_jsonl"])
def test_empty_corpus_is_an_error(tmp_path, make):
    path = {
        "empty_file": tmp_path / "e.txt",
        "empty_folder": tmp_path / "dir",
        "empty_jsonl": tmp_path / "e.jsonl",
    }[make]
    if make == "empty_folder":
        path.mkdir()
    else:
        path.write_text("\n\n" if make == "empty_file" else '{"text": "  "}\n')
    with pytest.raises(DataError, match=f"corpus {path} is empty"):
        load_documents(str(path))


def test_a_folder_of_two_kinds_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.jsonl").write_text('{"text": "json"}\n')
    with pytest.raises(DataError, match=r"holds .txt and .jsonl files: a corpus folder holds one kind"):
        open_source(str(tmp_path))


def test_inputs_describe_the_files_without_reading_them(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first!")
    inputs = open_source(str(tmp_path)).inputs()
    assert [(name, size) for name, size, _ in inputs] == [("a.txt", 6), ("b.txt", 6)]
    assert inputs[0][2] == (tmp_path / "a.txt").stat().st_mtime_ns


# ---------------------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------------------


def test_jsonl_gives_one_document_per_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two\\nlines", "id": 7}\r\n')
    assert load_documents(str(path)) == ["one", "two\nlines"]


def test_jsonl_reads_the_text_field_asked_for_and_folders_of_jsonl(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"story": "third"}\n')
    (tmp_path / "a.jsonl").write_text('{"story": "first"}\n{"story": "second", "text": "not this"}\n')
    assert load_documents(str(tmp_path), text_field="story") == ["first", "second", "third"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"text": "ok"}\n{"text": "broken"\n', r"corpus.jsonl line 2 is not valid JSON"),
        (
            '{"text": "ok"}\n\n{"body": "no text field"}\n',
            r'corpus.jsonl line 3 has no string "text" field.*--text-field',
        ),
        ('["a list"]\n', r'corpus.jsonl line 1 has no string "text" field'),
        ('{"text": 5}\n', r'corpus.jsonl line 1 has no string "text" field'),
        (
            '{"text": "ok"}\n{"text": "half \\ud83d a pair"}\n',
            r"corpus.jsonl line 2 holds '\\ud83d', half of a UTF-16",
        ),
    ],
)
def test_bad_jsonl_line_is_reported_by_number(tmp_path, lines, message):
    (tmp_path / "corpus.jsonl").write_text(lines)
    with pytest.raises(DataError, match=message):
        load_documents(str(tmp_path / "corpus.jsonl"))


def test_jsonl_line_of_invalid_utf8_is_reported_by_number(tmp_path):
    (tmp_path / "corpus.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl line 2 is not UTF-8 text \(byte 13 of the line"):
        load_documents(str(tmp_path / "corpus.jsonl"))


# ---------------------------------------------------------------------------------------------------------
# Parquet and Hugging Face datasets
# ---------------------------------------------------------------------------------------------------------


def write_parquet(path, columns: dict, row_group_size: int = 2):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_gives_one_document_per_row_across_row_groups_and_files(tmp_path):
    write_parquet(tmp_path / "part-1.parquet", {"text": ["d", "e"], "id": [4, 5]})
    write_parquet(tmp_path / "part-0.parquet", {"text": ["a", None, "b", "c"], "id": [0, 1, 2, 3]})
    source = open_source(str(tmp_path))
    assert list(source.documents()) == ["a", "", "b", "c", "d", "e"]  # a null is an empty document
    assert load_documents(str(tmp_path)) == ["a", "b", "c", "d", "e"]
    assert source.size > 0 and [name for name, _, _ in source.inputs()] == [
        "part-0.parquet",
        "part-1.parquet",
    ]


def test_parquet_without_the_column_names_file_and_columns(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", {"story": ["a"], "id": [1]})
    with pytest.raises(
        DataError, match=r"c.parquet has no column 'text' \(its columns: story, id\): pass --text-field"
    ):
        open_source(str(path))
    assert load_documents(str(path), text_field="story") == ["a"]


def test_parquet_column_that_is_not_text_is_refused(tmp_path):
    path = write_parquet(tmp_path / "c.parquet", {"text": [1, 2]})
    with pytest.raises(DataError, match=r"c.parquet column 'text' holds int64, not text"):
        open_source(str(path))


def test_a_file_that_is_not_parquet_is_a_clear_error(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "c.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"cannot read .*c.parquet as Parquet"):
        open_source(str(tmp_path / "c.parquet"))


@pytest.mark.parametrize(
    ("spec", "module"), [("c.parquet", "pyarrow.parquet"), ("hf:someone/data", "datasets")]
)
def test_a_missing_optional_package_says_how_to_install_it(monkeypatch, tmp_path, spec, module):
    (tmp_path / "c.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"needs the optional package .*: pip install 'llama_mini\[data\]'"):
        open_source(spec)


@pytest.fixture
def saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["one", "two", "three"], "n": [1, 2, 3]}),
            "validation": datasets.Dataset.from_dict({"body": ["held out"], "n": [4]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_saved_dataset_dict_reads_the_split_and_field_asked_for(saved_dataset):
    assert load_documents(str(saved_dataset), text_field="body") == ["one", "two", "three"]
    assert load_documents(str(saved_dataset), text_field="body", data_split="validation") == ["held out"]
    assert "dataset_dict.json" in [name for name, _, _ in open_source(str(saved_dataset), "body").inputs()]


def test_saved_dataset_without_the_split_or_column_is_a_clear_error(saved_dataset):
    with pytest.raises(
        DataError, match=r"has no split 'test' \(its splits: train, validation\): pass --data-split"
    ):
        open_source(str(saved_dataset), "body", "test")
    with pytest.raises(DataError, match=r"has no column 'text' \(its columns: body, n\): pass --text-field"):
        open_source(str(saved_dataset))
    with pytest.raises(DataError, match=r"column 'n' holds .*int64.*, not text"):
        open_source(str(saved_dataset), "n")


def test_a_single_saved_dataset_is_read_whole(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "one"))
    assert load_documents(str(tmp_path / "one")) == ["a", "b"]


def test_hf_dataset_streams_with_load_dataset(tmp_path):
    """hf:NAME goes through datasets.load_dataset(NAME, streaming=True); a local folder of data files is a
    NAME it can read offline, as the Hub's datasets are read online."""
    pytest.importorskip("datasets")
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "train.jsonl").write_text(
        "".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(5))
    )
    source = open_source(f"hf:{tmp_path / 'hub'}", text_field="body")
    assert list(source.documents()) == [f"row {i}" for i in range(5)]
    assert source.inputs() is None  # known by name, config and split
    with pytest.raises(DataError, match=r"has no column 'text' \(its columns: body\)"):
        list(open_source(f"hf:{tmp_path / 'hub'}").documents())
    with pytest.raises(DataError, match=r"cannot load .* split 'test'.*check --data-split"):
        list(open_source(f"hf:{tmp_path / 'hub'}", "body", "test").documents())
