"""Preparing a corpus streams it into shards: the split of split_documents, the same bytes for any number
of workers, a bounded read-ahead, prepared data reused without reading the corpus, changes reported in one
line, and nothing half written ever used (llama_mini.data.prepare)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llama_mini.data import (
    MANIFEST,
    TokenSplit,
    load_documents,
    prepare_data,
    split_documents,
    tokenizer_sample,
)
from llama_mini.data import pool as pool_module
from llama_mini.data import prepare as prepare_module
from llama_mini.data import split as split_module
from llama_mini.data.checks import CHECKED
from llama_mini.data.shards import PROGRESS, DataWriter
from llama_mini.data.sources import Source
from llama_mini.errors import DataError
from llama_mini.tokenizer import train_tokenizer


def scene(i: int) -> str:
    return f"Scene {i}. The king speaks of {i * 7} crowns.\n\nThe queen of 東京 answers {i}.\n"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(
        [scene(i) for i in range(40)], tmp_path_factory.mktemp("tok") / "tokenizer.model", 320
    )


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(30):
        (folder / f"{i:02d}.txt").write_text(scene(i) * (1 + i % 3))
    return folder


def encoded(tokenizer, documents) -> list[int]:
    return [token for text in documents for token in tokenizer.encode(text, bos=True, eos=True)]


@pytest.mark.parametrize("size", ["small", "large"])
def test_prepared_splits_are_those_of_split_documents(monkeypatch, corpus, tmp_path, tokenizer, size):
    if size == "large":  # the per-document rule
        monkeypatch.setattr(split_module, "SMALL_CORPUS_BYTES", 0)
    train, val = prepare_data(str(corpus), tmp_path / "out", tokenizer, val_fraction=0.2, seed=1)
    train_documents, val_documents = split_documents(load_documents(str(corpus)), 0.2, seed=1)
    assert train.read(0, len(train)).tolist() == encoded(tokenizer, train_documents)
    assert val.read(0, len(val)).tolist() == encoded(tokenizer, val_documents)
    assert (train.meta.documents, val.meta.documents) == (len(train_documents), len(val_documents))
    assert val.meta.bytes == sum(len(text.encode()) for text in val_documents)


def test_the_manifest_records_settings_files_and_a_digest(corpus, tmp_path, tokenizer):
    prepare_data(str(corpus), tmp_path / "out", tokenizer, val_fraction=0.2, seed=1)
    provenance = json.loads((tmp_path / "out" / MANIFEST).read_text())["provenance"]
    assert provenance["settings"] == {
        "corpus": str(corpus),
        "val_fraction": 0.2,
        "split_seed": 1,
        "split_rule": 1,
    }
    status = (corpus / "07.txt").stat()
    assert provenance["inputs"][7] == ["07.txt", status.st_size, status.st_mtime_ns]
    assert len(provenance["inputs"]) == 30 and len(provenance["digest"]) == 64


def test_shards_are_byte_identical_for_one_and_two_worker_processes(monkeypatch, corpus, tmp_path, tokenizer):
    monkeypatch.setattr(pool_module, "PARALLEL_MIN_BYTES", 0)  # use the pool even for a small corpus
    monkeypatch.setattr(pool_module, "BATCH_CHARACTERS", 300)  # many batches in flight at once
    lines = []
    for workers in (1, 2):
        prepare_data(
            str(corpus),
            tmp_path / f"w{workers}",
            tokenizer,
            0.2,
            1,
            workers=workers,
            shard_tokens=500,
            log=lines.append,
        )
    assert lines[2].endswith("with 2 workers")  # the second run's first line
    files = prepared_files(tmp_path / "w1")
    assert files == prepared_files(tmp_path / "w2") and len(files) > 4


def test_the_corpus_is_read_a_batch_ahead_of_the_shards_never_whole(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setattr(pool_module, "BATCH_CHARACTERS", 1000)
    monkeypatch.setattr(split_module, "SMALL_CORPUS_BYTES", 0)  # no first pass to count the scores
    read = [0]

    class Counting(Source):
        spec, kind, size = "counting", "a test corpus", 200_000

        def documents(self):
            read[0] = 0  # counts this pass's reads (the first, cut short, asked if the corpus is small)
            for i in range(2000):  # 100 characters each: 10 a batch
                read[0] += 1
                yield f"{i:04d} " + "x" * 95

    monkeypatch.setattr(prepare_module, "open_source", lambda *args: Counting())
    ahead = []
    write = DataWriter.write
    monkeypatch.setattr(
        DataWriter,
        "write",
        lambda self, split, *a: (
            ahead.append(read[0] - sum(self.counts(s)[0] for s in ("train", "val"))) or write(self, split, *a)
        ),
    )
    prepare_data("counting", tmp_path, tokenizer, workers=1)
    assert read[0] == 2000 and len(ahead) == 400  # 200 batches, each written to both splits
    assert max(ahead) <= 10  # the documents of the batch being written, and no more


def test_prepared_data_are_reused_without_reading_the_corpus(monkeypatch, corpus, tmp_path, tokenizer):
    first = prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1)
    written = (tmp_path / "out" / MANIFEST).stat().st_mtime_ns

    def unreadable(self):
        raise AssertionError("the corpus was read")

    for kind in Source.__subclasses__():
        monkeypatch.setattr(kind, "documents", unreadable)
    lines = []
    again = prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1, log=lines.append)
    assert again[0].meta == first[0].meta and again[1].meta == first[1].meta
    assert (tmp_path / "out" / MANIFEST).stat().st_mtime_ns == written
    assert len(lines) == 1 and lines[0].startswith(f"data: reusing {tmp_path / 'out'} (")


def test_a_changed_corpus_is_prepared_again_and_one_line_says_what_changed(corpus, tmp_path, tokenizer):
    prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1)
    (corpus / "03.txt").write_text("changed text, longer than before? no.")
    os.utime(corpus / "03.txt", ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    lines = []
    train, _ = prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1, log=lines.append)
    assert lines[0].startswith(
        f"data: corpus {corpus} changed since {tmp_path / 'out'} was prepared (1 of 30 files changed, first 03.txt: "
    )
    assert " -> 37 bytes modified " in lines[0] and lines[0].endswith("); preparing it again")
    assert train.meta.provenance["inputs"][3][1] == 37


def test_a_resumed_run_keeps_its_data_when_the_corpus_changed_or_is_gone(
    monkeypatch, corpus, tmp_path, tokenizer
):
    first, _ = prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1)
    for path in corpus.iterdir():
        path.unlink()
    corpus.rmdir()
    lines = []
    again, _ = prepare_data(
        str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1, resuming=True, log=lines.append
    )
    assert again.meta == first.meta
    assert "(its files are gone); the resumed run goes on with the data it started with" in lines[0]
    with pytest.raises(DataError, match="not found"):  # a new run needs the corpus
        prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1)


@pytest.mark.parametrize("change", ["val_fraction", "seed", "tokenizer"])
def test_other_split_settings_or_another_tokenizer_prepare_again(corpus, tmp_path, tokenizer, change):
    prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1)
    other = (
        train_tokenizer([scene(i) for i in range(5)], tmp_path / "other.model", 300)
        if change == "tokenizer"
        else tokenizer
    )
    lines = []
    prepare_data(
        str(corpus),
        tmp_path / "out",
        other,
        0.3 if change == "val_fraction" else 0.2,
        seed=2 if change == "seed" else 1,
        log=lines.append,
    )
    assert lines[0].startswith("data: tokenizing")


def test_the_text_field_matters_only_to_corpora_that_have_fields(corpus, tmp_path, tokenizer):
    prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1)
    lines = []
    prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1, text_field="body", log=lines.append)
    assert lines[0].startswith("data: reusing")
    (tmp_path / "c.jsonl").write_text(
        "".join(json.dumps({"text": scene(i), "body": f"b{i}"}) + "\n" for i in range(9))
    )
    prepare_data(str(tmp_path / "c.jsonl"), tmp_path / "j", tokenizer, 0.2, seed=1)
    lines.clear()
    prepare_data(
        str(tmp_path / "c.jsonl"), tmp_path / "j", tokenizer, 0.2, seed=1, text_field="body", log=lines.append
    )
    assert lines[0].startswith("data: tokenizing")


def test_a_small_corpus_is_scored_in_a_first_pass_and_split_exactly(monkeypatch, tmp_path, tokenizer):
    documents = [scene(i) for i in range(20)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    train, val = prepare_data(str(tmp_path / "c.jsonl"), tmp_path / "out", tokenizer, 0.25, seed=3)
    assert (train.meta.documents, val.meta.documents) == (15, 5)


def test_in_a_large_corpus_with_no_document_validating_by_score_a_second_pass_moves_the_lowest(
    monkeypatch, tmp_path, tokenizer
):
    monkeypatch.setattr(split_module, "SMALL_CORPUS_BYTES", 0)
    documents = [scene(i) for i in range(3)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    lowest = min(split_module.validation_score(text.encode(), 0) for text in documents)
    lines = []
    train, val = prepare_data(
        str(tmp_path / "c.jsonl"), tmp_path / "out", tokenizer, lowest / 2, seed=0, log=lines.append
    )
    train_documents, val_documents = split_documents(documents, lowest / 2, seed=0)
    assert len(val_documents) == 1 and val.read(0, len(val)).tolist() == encoded(tokenizer, val_documents)
    assert train.read(0, len(train)).tolist() == encoded(tokenizer, train_documents)
    assert any("the lowest-scoring one validates" in line for line in lines)


def test_a_corpus_of_one_document_is_cut_in_two(tmp_path, tokenizer):
    text = "".join(f"paragraph {i}.\nsecond line.\n\n" for i in range(10))
    (tmp_path / "one.txt").write_text(text)
    train, val = prepare_data(str(tmp_path / "one.txt"), tmp_path / "out", tokenizer, 0.2)
    (train_text,), (val_text,) = split_documents([text], 0.2)
    assert train.read(0, len(train)).tolist() == encoded(tokenizer, [train_text])
    assert val.read(0, len(val)).tolist() == encoded(tokenizer, [val_text])


def test_empty_documents_are_skipped_and_counted(tmp_path, tokenizer):
    lines = [{"text": scene(i) if i % 3 else " \n"} for i in range(12)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = []
    train, val = prepare_data(str(tmp_path / "c.jsonl"), tmp_path / "out", tokenizer, 0.2, log=log.append)
    assert train.meta.documents + val.meta.documents == 8 and train.meta.provenance["empty_documents"] == 4
    assert "4 empty documents skipped" in log[-1]


def test_an_empty_corpus_is_an_error(tmp_path, tokenizer):
    (tmp_path / "c.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="corpus .*c.jsonl is empty"):
        prepare_data(str(tmp_path / "c.jsonl"), tmp_path / "out", tokenizer)


def test_a_bad_line_midway_leaves_no_manifest_and_no_temporary_files(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setattr(pool_module, "BATCH_CHARACTERS", 200)  # shards are being written when it fails
    monkeypatch.setattr(split_module, "SMALL_CORPUS_BYTES", 0)  # (a small corpus fails in its first pass)
    rows = [json.dumps({"text": scene(i)}) for i in range(60)] + ['{"text": "broken"']
    (tmp_path / "c.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="c.jsonl line 61 is not valid JSON"):
        prepare_data(str(tmp_path / "c.jsonl"), tmp_path / "out", tokenizer, shard_tokens=100)
    names = [path.name for path in (tmp_path / "out").iterdir()]
    assert MANIFEST not in names and not [name for name in names if name.endswith(".tmp")]
    assert any(name.startswith("train-") for name in names)  # shards were written, and are not used:
    with pytest.raises(DataError, match="no prepared data"):
        TokenSplit(tmp_path / "out", "train")


# ---------------------------------------------------------------------------------------------------------
# The tokenizer's sample
# ---------------------------------------------------------------------------------------------------------


def test_the_tokenizer_sample_is_the_first_training_documents_up_to_the_budget(tmp_path):
    documents = [f"document {i} " * 20 for i in range(200)]  # about 260 bytes each
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    lines = []
    sample = tokenizer_sample(
        str(tmp_path / "c.jsonl"), budget=5000, val_fraction=0.3, seed=4, log=lines.append
    )
    train_documents, _ = split_documents(documents, 0.3, seed=4)
    assert sample == train_documents[: len(sample)]
    sizes = [len(text.encode()) for text in sample]
    assert sum(sizes) >= 5000 > sum(sizes[:-1])  # the document that crosses the budget is the last
    assert lines == [
        f"tokenizer: training on {sum(sizes) / 1e6:.1f} MB of {tmp_path / 'c.jsonl'} (its first 0.0 MB, {len(sample)} documents)"
    ]


def test_a_corpus_within_the_budget_gives_its_whole_training_split(corpus):
    sample = tokenizer_sample(str(corpus), budget=10**9, val_fraction=0.2, seed=1)
    assert sample == split_documents(load_documents(str(corpus)), 0.2, seed=1)[0]


def test_prepared_tokens_fit_the_dtype_of_the_vocabulary(tmp_path, corpus, tokenizer):
    train, _ = prepare_data(str(corpus), tmp_path / "out", tokenizer)
    assert train.dtype == np.uint16 and int(train.read(0, len(train)).max()) < tokenizer.vocab_size


# ---------------------------------------------------------------------------------------------------------
# An interrupted preparation goes on where it stopped
# ---------------------------------------------------------------------------------------------------------

# Prepares CORPUS into OUT with tiny batches and shards and WORKERS processes, and kills itself with
# SIGKILL right after the COUNT-th call of HOOK: DataWriter.write (between the writes of one batch),
# DataWriter.checkpoint (just after a batch was recorded), or _SplitWriter._finish_shard counting only the
# calls that finish a shard (a shard renamed into place, not yet recorded). Its last line of output lists
# its child processes as it is killed.
KILLED_PREPARATION = """
import os, signal, sys
from pathlib import Path
from llama_mini.data import pool, prepare_data, shards
from llama_mini.tokenizer import Tokenizer

corpus, out, tokenizer, hook, count, workers = sys.argv[1:]
pool.BATCH_CHARACTERS, pool.PARALLEL_MIN_BYTES = 200, 0
owner = shards._SplitWriter if hook == "_finish_shard" else shards.DataWriter
original, calls = getattr(owner, hook), [0]

def then_kill(self, *args):
    counts = hook != "_finish_shard" or self._file is not None
    result = original(self, *args)
    calls[0] += counts
    if calls[0] == int(count):
        children = [pid for file in Path("/proc/self/task").glob("*/children") for pid in file.read_text().split()]
        print("children:", *children, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, hook, then_kill)
prepare_data(corpus, out, Tokenizer(tokenizer), 0.2, 1, workers=int(workers), shard_tokens=50, log=print)
"""


def prepared_files(folder) -> dict[str, bytes]:
    """Every file in `folder` by name, the manifest's time of preparation and the checks' cache (which
    holds modification times) left out."""
    files = {path.name: path.read_bytes() for path in folder.iterdir() if path.name != CHECKED}
    manifest = json.loads(files[MANIFEST])
    manifest["provenance"]["prepared"] = None
    files[MANIFEST] = json.dumps(manifest).encode()
    return files


def test_a_killed_preparation_goes_on_from_where_it_stopped_to_the_same_bytes(
    monkeypatch, corpus, tmp_path, tokenizer
):
    monkeypatch.setattr(pool_module, "BATCH_CHARACTERS", 200)
    prepare_data(str(corpus), tmp_path / "whole", tokenizer, 0.2, 1, workers=1, shard_tokens=50)
    out = tmp_path / "out"
    script = [sys.executable, "-c", KILLED_PREPARATION, str(corpus), str(out), str(tokenizer.model_path)]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for run, (hook, count) in enumerate([("checkpoint", 5), ("write", 13), ("_finish_shard", 3)]):
        killed = subprocess.run(
            [*script, hook, str(count), "1"], capture_output=True, text=True, env=environment
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert ("going on with the interrupted preparation" in killed.stdout) == (run > 0)
    assert PROGRESS in os.listdir(out) and not (out / MANIFEST).exists()
    first_shard = (out / "train-000000.bin").stat().st_mtime_ns
    lines = []
    prepare_data(str(corpus), out, tokenizer, 0.2, 1, workers=1, shard_tokens=50, log=lines.append)
    assert re.fullmatch(
        r"data: going on with .* from document \d+ \([1-9]\d* finished shards kept\)", lines[1]
    )
    assert (out / "train-000000.bin").stat().st_mtime_ns == first_shard  # kept, not written again
    assert prepared_files(out) == prepared_files(tmp_path / "whole")  # no partial, temporary or progress file


def test_stale_temporary_files_are_removed_and_other_progress_is_not_continued(
    monkeypatch, corpus, tmp_path, tokenizer
):
    monkeypatch.setattr(pool_module, "BATCH_CHARACTERS", 200)
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_PREPARATION, str(corpus), str(out), str(tokenizer.model_path)]
        + ["write", "7", "1"],
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert killed.returncode == -signal.SIGKILL
    (out / ".train-000000.bin.k3j9x_2a.tmp").write_bytes(b"\0" * 100)  # an atomic_file's, from any version
    assert any(name.endswith(".partial") for name in os.listdir(out))
    lines = []
    prepare_data(str(corpus), out, tokenizer, 0.3, 1, workers=1, shard_tokens=50, log=lines.append)
    assert lines[1] == f"data: {out} holds an unfinished preparation of other data: preparing from the start"
    assert not [name for name in os.listdir(out) if name.startswith(".") or name == PROGRESS]


def test_a_shard_whose_size_changed_is_named_in_one_line_and_prepared_again(corpus, tmp_path, tokenizer):
    first, _ = prepare_data(str(corpus), tmp_path / "out", tokenizer, 0.2, seed=1, shard_tokens=100)
    tokens = first.read(0, len(first)).tolist()
    del first  # (its maps would see the shard cut short)
    shard = tmp_path / "out" / "train-000001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    lines = []
    again, _ = prepare_data(
        str(corpus), tmp_path / "out", tokenizer, 0.2, 1, shard_tokens=100, log=lines.append
    )
    assert lines[0] == (
        f"data: shard train-000001.bin has 190 bytes where {MANIFEST} records 200: it changed since "
        f"{tmp_path / 'out'} was prepared; preparing the data again"
    )
    assert lines[1].startswith("data: tokenizing") and shard.stat().st_size == 200
    assert again.read(0, len(again)).tolist() == tokens


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="lists a process's children from /proc")
def test_the_workers_of_a_killed_preparation_end_with_it(corpus, tmp_path, tokenizer):
    command = [sys.executable, "-c", KILLED_PREPARATION, str(corpus), str(tmp_path / "out")]
    command += [str(tokenizer.model_path), "checkpoint", "3", "2"]
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(tmp_path / "stdout", "w") as stdout:  # (a pipe would stay open as long as any worker lives)
        assert subprocess.run(command, stdout=stdout, env=environment).returncode == -signal.SIGKILL
    label, *workers = (tmp_path / "stdout").read_text().splitlines()[-1].split()
    workers = [int(pid) for pid in workers]
    try:
        assert label == "children:" and len(workers) == 2
        for _ in range(50):
            if not any(alive(pid) for pid in workers):
                break
            time.sleep(0.1)
        assert not any(alive(pid) for pid in workers)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
