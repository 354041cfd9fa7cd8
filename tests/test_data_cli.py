"""train.py with the data flags, end to end on tiny corpora: --text-field, --data-split, --data-workers,
Parquet and Hugging Face sources, resume without the corpus, and bad input as one line with exit code 2."""

import dataclasses
import json
import re
import sys

import numpy as np
import pytest

import train as train_cli
from llama_mini.data import MANIFEST, TokenSplit, prepare_data
from llama_mini.data import pool as pool_module
from llama_mini.data.checks import check_prepared
from llama_mini.data.sources import Source
from llama_mini.tokenizer import Tokenizer, train_tokenizer
from llama_mini.train.data_feed import shared_data_folder

TINY = dict(
    device="cpu", batch_size=2, eval_steps=1, sample_tokens=0, dim=32, n_layers=1, n_heads=2, max_seq_len=16
)


def story(i: int) -> str:
    return f"Once upon a time, a fox named Fox{i} found {i % 7} red apples.\nThe end.\n"


def flags(**settings) -> list[str]:
    """train.py flags for a 2-step run; `settings` (underscores for dashes) override them."""
    values = {**TINY, "max_steps": 2, "eval_interval": 2, "multiple_of": 16, **settings}
    return [item for name, value in values.items() for item in ("--" + name.replace("_", "-"), str(value))]


def run(args, capsys):
    code = train_cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer([story(i) for i in range(60)], path, vocab_size=300)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_cli_trains_on_a_parquet_folder_with_text_field(tmp_path, tokenizer_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    (tmp_path / "corpus").mkdir()
    for part in range(2):
        stories = [story(20 * part + i) for i in range(20)]
        pq.write_table(
            pa.table({"story": stories, "id": list(range(20))}), tmp_path / "corpus" / f"{part}.parquet"
        )
    out = tmp_path / "run"
    args = flags(
        data=tmp_path / "corpus", text_field="story", tokenizer=tokenizer_path, out=out, data_workers=1
    )
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert "done: 2 steps" in stdout
    settings = json.loads((out / "data" / MANIFEST).read_text())["provenance"]["settings"]
    assert settings["text_field"] == "story"
    train, val = TokenSplit(out / "data", "train"), TokenSplit(out / "data", "val")
    assert train.meta.documents + val.meta.documents == 40


def test_cli_trains_its_own_tokenizer_on_a_saved_dataset_split(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["not this split"] * 3}),
            "validation": datasets.Dataset.from_dict({"body": [story(i) for i in range(40)]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "run"
    (tmp_path / "run.toml").write_text("[train]\nvocab_size = 300\n")  # the size of the tokenizer trained
    args = ["--config", tmp_path / "run.toml"]
    args += flags(data=tmp_path / "saved", data_split="validation", text_field="body", out=out)
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    assert f"tokenizer: training on 0.0 MB of {tmp_path / 'saved'} (the whole training split," in err
    assert (
        TokenSplit(out / "data", "train").meta.documents + TokenSplit(out / "data", "val").meta.documents
        == 40
    )


def test_cli_reads_a_hugging_face_dataset_by_name(tmp_path, tokenizer_path, capsys):
    pytest.importorskip("datasets")
    (tmp_path / "hub").mkdir()
    write_jsonl(tmp_path / "hub" / "train.jsonl", [{"content": story(i)} for i in range(40)])
    write_jsonl(tmp_path / "hub" / "test.jsonl", [{"content": "x"}])
    out = tmp_path / "run"
    args = flags(
        data=f"hf:{tmp_path / 'hub'}",
        data_split="train",
        text_field="content",
        tokenizer=tokenizer_path,
        out=out,
    )
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert (
        TokenSplit(out / "data", "train").meta.documents + TokenSplit(out / "data", "val").meta.documents
        == 40
    )


def test_cli_data_workers_give_the_same_shards_as_one(monkeypatch, tmp_path, tokenizer_path, capsys):
    monkeypatch.setattr(pool_module, "PARALLEL_MIN_BYTES", 0)  # start the workers even for a tiny corpus
    monkeypatch.setattr(pool_module, "BATCH_CHARACTERS", 500)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": story(i)} for i in range(60)])
    for workers in (1, 2):
        code, _, err = run(
            flags(data=corpus, tokenizer=tokenizer_path, out=tmp_path / f"w{workers}", data_workers=workers),
            capsys,
        )
        assert code == 0, err
        assert f"with {workers} worker" in err
    for split in ("train", "val"):
        one, two = TokenSplit(tmp_path / "w1" / "data", split), TokenSplit(tmp_path / "w2" / "data", split)
        assert dataclasses.replace(one.meta, provenance={}) == dataclasses.replace(two.meta, provenance={})
        assert one.meta.provenance["digest"] == two.meta.provenance["digest"]
        assert (one.read(0, len(one)) == two.read(0, len(two))).all()


def test_cli_resume_reaches_training_without_reading_the_corpus(
    monkeypatch, tmp_path, tokenizer_path, capsys
):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": story(i)} for i in range(40)])
    out = tmp_path / "run"
    code, _, err = run(flags(data=corpus, tokenizer=tokenizer_path, out=out), capsys)
    assert code == 0, err

    def unreadable(self):
        raise AssertionError("the corpus was read")

    for kind in Source.__subclasses__():
        monkeypatch.setattr(kind, "documents", unreadable)
    code, stdout, err = run(["--resume", "--out", out, "--max-steps", "4", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "done: 4 steps" in stdout and f"data: reusing {out / 'data'}" in err


@pytest.mark.parametrize(
    ("make", "message"),
    [
        ("bad_jsonl", r"c\.jsonl line 31 is not valid JSON \(Expecting"),
        ("no_field", r'c\.jsonl line 1 has no string "story" field'),
        ("latin1", r"c\.txt is not UTF-8 text: byte 14 \(line 2\) is invalid"),
        ("too_short", r"lower --max-seq-len"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_no_data_are_kept(
    tmp_path, tokenizer_path, capsys, make, message
):
    settings = {}
    if make == "bad_jsonl":
        corpus = tmp_path / "c.jsonl"
        corpus.write_text(
            "".join(json.dumps({"text": story(i)}) + "\n" for i in range(30)) + '{"text": oops}\n'
        )
    elif make == "no_field":
        corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": story(0)}])
        settings = {"text_field": "story"}
    elif make == "latin1":
        corpus = tmp_path / "c.txt"
        corpus.write_bytes("first line\ncafé\n".encode("latin-1"))
    else:
        corpus = tmp_path / "c.txt"
        corpus.write_text("Tiny.\n\nCorpus.\n")
    code, _, err = run(flags(data=corpus, tokenizer=tokenizer_path, out=tmp_path / "run", **settings), capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    assert re.search(message, last), last
    if make != "too_short":
        assert not (tmp_path / "run" / "data" / MANIFEST).exists()


def test_cli_parquet_without_pyarrow_says_how_to_install_it(monkeypatch, tmp_path, capsys):
    (tmp_path / "c.parquet").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = run(flags(data=tmp_path / "c.parquet", out=tmp_path / "run"), capsys)
    assert code == 2
    assert err == (
        "error: reading Parquet files needs the optional package pyarrow: pip install 'llama_mini[data]' "
        "(or pip install pyarrow)\n"
    )


def test_cli_help_lists_the_data_flags(capsys):
    assert train_cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--data-workers", "--text-field", "--data-split", "--tokenizer-sample-mb"):
        assert flag in out


# ---------------------------------------------------------------------------------------------------------
# Damaged shards stop the run in one line
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path, tokenizer_path):
    """A corpus and its data prepared in a folder of their own, which runs share with --data-dir (the
    shards in the tokenizer's subfolder of it): (corpus, --data-dir, the shards' folder)."""
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": story(i)} for i in range(60)])
    tokenizer = Tokenizer(tokenizer_path)
    prepare_data(
        str(corpus), shared_data_folder(tmp_path / "data", tokenizer), tokenizer, 0.1, 1337, workers=1
    )
    return corpus, tmp_path / "data", shared_data_folder(tmp_path / "data", tokenizer)


def test_cli_refuses_a_shard_with_ids_beyond_the_vocabulary_in_one_line(
    tmp_path, tokenizer_path, prepared, capsys
):
    corpus, data_dir, data = prepared
    with open(data / "train-000000.bin", "r+b") as shard:  # the size stays, id 65535 of a 300-id vocabulary
        shard.seek(40)
        shard.write(b"\xff\xff")
    code, _, err = run(
        flags(data=corpus, tokenizer=tokenizer_path, out=tmp_path / "run", data_dir=data_dir), capsys
    )
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: token shard {data / 'train-000000.bin'} holds id 65,535, beyond the vocabulary of 300 ids: "
        f"its bytes are damaged; delete it and run again to prepare the data again"
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step trained


def test_cli_verify_data_finds_a_changed_byte_that_keeps_ids_in_range(
    tmp_path, tokenizer_path, prepared, capsys
):
    corpus, data_dir, data = prepared
    shard = data / "val-000000.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    tokens[3] ^= 1  # another id of the vocabulary: 299 ^ 1 = 298 at most
    tokens.tofile(shard)
    check_prepared((TokenSplit(data, "train"), TokenSplit(data, "val")))  # in range: the cheap check passes
    args = flags(data=corpus, tokenizer=tokenizer_path, out=tmp_path / "run", data_dir=data_dir)
    code, _, err = run([*args, "--verify-data"], capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: --verify-data: {shard} does not have the sha256 recorded in {MANIFEST} when it was written: "
        f"its bytes changed; delete it and run again to prepare the data again"
    )
