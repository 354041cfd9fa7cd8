"""Evaluation beyond the run's own split during training: --eval-data's held-out corpora (llama_mini/train/
held_out.py) scored as llama-mini eval scores them, and --eval-tasks skipped in one line without lm-eval."""

import json
import sys

import pytest
from test_training import cli_flags, corpus_dir, tokenizer_path  # noqa: F401 (fixtures)

import train as train_cli
from llama_mini.checkpoint import load_model
from llama_mini.eval.corpus import bits_per_byte
from llama_mini.tokenizer import Tokenizer
from llama_mini.train.config import TrainConfig
from llama_mini.train.held_out import corpus_name, read_held_out
from llama_mini.train.run_folder import METRICS


def run_cli(argv, capsys):
    code = train_cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def evaluations(out):
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [line for line in lines if line["type"] == "eval"]


def test_held_out_corpora_are_logged_as_llama_mini_eval_scores_them(
    corpus_dir, tokenizer_path, tmp_path, capsys
):
    poems = tmp_path / "poems.txt"
    poems.write_text("the quiet river runs to the sea\n\nand the sea runs nowhere at all\n")
    notes = tmp_path / "notes.jsonl"
    notes.write_text(
        "".join(json.dumps({"text": f"note {i}: the king has a river"}) + "\n" for i in range(3))
    )
    out = tmp_path / "run"
    # eval steps x batch x context = 10 x 2 x 16 tokens of each held-out corpus: all of these small ones
    flags = cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=2, eval_interval=1, eval_steps=10)
    code, stdout, err = run_cli([*flags, "--eval-data", poems, "--eval-data", notes], capsys)
    assert code == 0, err
    records = evaluations(out)
    assert [record["step"] for record in records] == [1, 2]
    assert all({"val_bpb/poems", "val_bpb/notes"} <= set(record) for record in records)
    assert (
        "bits/byte, poems " in stdout + err and ", notes " in stdout + err
    )  # the evaluation line names them

    # The independent computation: the step-2 checkpoint, scored by bits_per_byte on the same documents
    model, tokenizer = load_model(out / "step-0000002"), Tokenizer(out / "step-0000002")
    documents = [poems.read_text()]  # a .txt file is one document
    expected = bits_per_byte(model, tokenizer, documents, 16, 8, batch_size=2).bits_per_byte
    assert records[-1]["val_bpb/poems"] == pytest.approx(expected, rel=1e-5)  # float32 sums of a few windows
    documents = [f"note {i}: the king has a river" for i in range(3)]
    expected = bits_per_byte(model, tokenizer, documents, 16, 8, batch_size=2).bits_per_byte
    assert records[-1]["val_bpb/notes"] == pytest.approx(expected, rel=1e-5)


def test_a_held_out_corpus_keeps_its_first_documents_up_to_an_evaluations_tokens(tokenizer_path, tmp_path):
    notes = tmp_path / "notes.jsonl"
    notes.write_text(
        "".join(json.dumps({"text": f"note {i}: the king has a river"}) + "\n" for i in range(50))
    )
    tokenizer = Tokenizer(tokenizer_path)
    per_note = len(tokenizer.encode("note 0: the king has a river")) + 2  # with bos and eos
    config = TrainConfig(eval_data=[str(notes)], text_field="text")
    (corpus,) = read_held_out(config, tokenizer, budget_tokens=5 * per_note)
    assert corpus.name == "notes" and len(corpus.documents) in (5, 6)  # stops once the budget is reached
    assert corpus.documents[0] == "note 0: the king has a river"


def test_a_held_out_source_that_does_not_exist_is_one_line(corpus_dir, tokenizer_path, tmp_path, capsys):
    flags = cli_flags(corpus_dir, tokenizer_path, out=tmp_path / "run", max_steps=1)
    code, _, err = run_cli([*flags, "--eval-data", tmp_path / "nowhere.txt"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert err.startswith(
        f"error: --eval-data: corpus {tmp_path / 'nowhere.txt'} not found: pass --eval-data "
    )
    assert not (tmp_path / "run").exists()  # refused before any work: the folder it made (and its lock) gone


def test_eval_tasks_without_lm_eval_are_skipped_in_one_line(
    corpus_dir, tokenizer_path, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    out = tmp_path / "run"
    flags = cli_flags(corpus_dir, tokenizer_path, out=out, max_steps=2, eval_interval=1)
    code, _, err = run_cli([*flags, "--eval-tasks", "hellaswag"], capsys)
    assert code == 0, err
    assert err.count("note: --eval-tasks skipped: lm-eval is not installed") == 1  # once, not per evaluation
    assert len(evaluations(out)) == 2


def test_corpus_names_are_short_and_unique():
    taken = set()
    names = []
    for spec in ("data/poems.txt", "hf:roneneldan/TinyStories", "other/poems.txt", "folder/"):
        names.append(corpus_name(spec, taken))
        taken.add(names[-1])
    assert names == ["poems", "roneneldan_TinyStories", "poems_2", "folder"]
