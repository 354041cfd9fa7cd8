"""`llama-mini eval`: bits per byte from the command line, a run folder's own validation split against what
its training logged, lm-evaluation-harness through the command, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest

from llama_mini import cli
from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.data.sources import open_source
from llama_mini.data.split import split_documents
from llama_mini.eval import bits_per_byte
from llama_mini.eval.corpus import split_of
from llama_mini.tokenizer import Tokenizer, train_tokenizer
from llama_mini.train import TrainConfig, Trainer
from tests.test_checkpoint import our_model
from tests.test_eval_harness import write_tasks

SENTENCES = [
    "The king speaks of the crown.",
    "A fool laughs at the storm.",
    "My lord waits for sweet music.",
    "The queen dreams of a rose.",
    "This knight fights for his honour.",
    "Her maid weeps for the night.",
]


def short_documents(count: int = 10) -> list[str]:
    """Documents of two or three sentences: a validation document fits one small context."""
    return [
        " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(2 + i % 2)) + f" Act {i}."
        for i in range(count)
    ]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(["eval", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sentencepiece_model):
    folder = tmp_path_factory.mktemp("checkpoint")
    save_pretrained(our_model(seed=4, vocab_size=64), folder, tokenizer_path=sentencepiece_model)
    return folder


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 4-step run whose validation split is one document of exactly max_seq_len + 1 tokens (with its
    bos and eos), so every window training evaluates is that whole document."""
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    corpus.mkdir()
    for number, text in enumerate(short_documents()):
        (corpus / f"doc{number:02d}.txt").write_text(text)
    tokenizer = train_tokenizer(short_documents() * 4, root / "tokenizer.model", vocab_size=300)
    documents = list(open_source(str(corpus)).documents())
    _, [val] = split_documents(documents, 0.1, seed=1337)
    context = len(tokenizer.encode(val, bos=True, eos=True)) - 1
    config = TrainConfig(
        data=str(corpus),
        out=str(root / "out"),
        tokenizer=str(root / "tokenizer.model"),
        max_steps=4,
        batch_size=2,
        lr=3e-3,
        warmup_steps=1,
        eval_interval=4,
        eval_steps=2,
        log_interval=1,
        sample_tokens=0,
        device="cpu",
        dtype="fp32",  # as llama-mini eval computes (auto would train in bf16 on a CPU with AMX)
    )
    model = dict(dim=32, n_layers=2, n_heads=2, multiple_of=16, max_seq_len=context)
    Trainer(config, model, show_progress=False).run()
    return root / "out", context, val


def test_a_run_folders_own_validation_split_reproduces_the_logged_loss_and_bits_per_byte(tiny_run, capsys):
    out, context, val = tiny_run
    manifest = json.loads((out / "data" / "prepared.json").read_text())
    assert manifest["splits"]["val"]["tokens"] == context + 1  # one window: the whole split
    [logged] = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line
    ]

    code, printed, err = run_cli([out, "--output", out / "bpb.json", "--device", "cpu"], capsys)
    assert code == 0, err
    record = json.loads((out / "bpb.json").read_text())
    assert record["split"] == "val" and record["documents"] == 1
    assert record["tokens"] == context and record["bytes"] == len(val.encode("utf-8"))
    # The same window: the same loss per token as the training log's.
    assert record["nats_per_token"] == pytest.approx(logged["val_loss"], rel=1e-5)
    # Training's bits per byte counts the split's tokens (bos included): context + 1 where the window
    # scores context targets (llama_mini.eval.corpus's docstring).
    assert logged["val_bpb"] == pytest.approx(record["bits_per_byte"] * (context + 1) / context, rel=1e-5)
    assert record["bits_per_byte"] == pytest.approx(
        record["nats_per_token"] * context / math.log(2) / record["bytes"], rel=1e-12
    )
    assert f"{record['bits_per_byte']:.4f}" in printed and "val split" in printed


def test_split_of_streams_the_documents_training_splits_off(tiny_run):
    out, _, val = tiny_run
    documents = list(open_source(str(out.parent / "corpus")).documents())
    assert list(split_of(documents, "val", 0.1, 1337)) == [val]
    assert list(split_of(documents, "train", 0.1, 1337)) == [text for text in documents if text != val]


def test_data_flag_scores_a_file_as_bits_per_byte_does(checkpoint, tmp_path, capsys):
    corpus = tmp_path / "notes.jsonl"
    texts = ["the quick brown fox", "once upon a time there was a little girl named lily " * 3]
    corpus.write_text("".join(json.dumps({"body": text, "other": 1}) + "\n" for text in texts))
    argv = [checkpoint, "--data", corpus, "--text-field", "body", "--context", 16, "--stride", 4]
    code, printed, err = run_cli([*argv, "--batch-size", 2, "--output", tmp_path / "out.json"], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "out.json").read_text())
    expected = bits_per_byte(load_model(checkpoint), Tokenizer(checkpoint), texts, 16, 4)
    assert record["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert (record["documents"], record["tokens"], record["bytes"]) == (2, expected.tokens, expected.bytes)
    assert record["split"] == "all" and record["context"] == 16 and record["stride"] == 4
    for name in ("documents", "tokens", "bytes", "nats per token", "perplexity", "bits per byte"):
        assert name in printed


@pytest.mark.slow
def test_tasks_run_the_harness_and_write_its_results_beside_a_runs_checkpoint(tiny_run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out, _, _ = tiny_run
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    argv = [
        out,
        "--tasks",
        "tiny_choice",
        "--include-path",
        tasks,
        "--limit",
        4,
        "--output",
        tmp_path / "r.json",
    ]
    code, printed, err = run_cli(argv, capsys)
    assert code == 0, err
    results = json.loads((tmp_path / "r.json").read_text())
    assert results == json.loads((out / "lm_eval_best.json").read_text())
    accuracy = results["results"]["tiny_choice"]["acc,none"]
    assert accuracy in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 questions
    assert "tiny_choice" in printed and "acc" in printed
    assert "WARNING" not in err  # the harness's own warnings stay out of the way


@pytest.mark.parametrize(
    "argv, message",
    [
        (["/no/such/folder", "--data", "x.txt"], "error: checkpoint folder /no/such/folder does not exist"),
        (["{checkpoint}", "--data", "/no/such/corpus.txt"], "error: corpus /no/such/corpus.txt not found"),
        (["{checkpoint}", "--data", "{empty}"], "error: the corpus holds no text to score"),
        (["{checkpoint}"], "error: {checkpoint} is not a run folder, so it has no corpus of its own"),
        (["{checkpoint}", "--tasks", "a", "--limit", "0"], "error: --limit must be a number of examples > 0"),
        (
            ["{checkpoint}", "--tasks", "a", "--data", "x"],
            "error: pass --data (bits per byte of a corpus) or",
        ),
        (
            ["{checkpoint}", "--tasks", "a", "--include-path", "/no/dir"],
            "error: --include-path /no/dir is not a",
        ),
        (["{bare}", "--data", "{empty}"], "error: checkpoint {bare} has no tokenizer"),
        (["{checkpoint}", "--data", "{empty}", "--stride", "0"], "error: --stride must be between 1 and"),
        (
            ["{checkpoint}", "--data", "x", "--num-fewshot", "2"],
            "error: --num-fewshot is a setting of --tasks",
        ),
        (["{checkpoint}", "--dat", "x"], "error: unrecognized arguments: --dat x"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(argv, message, checkpoint, tmp_path, capsys):
    bare = tmp_path / "bare"
    save_pretrained(our_model(), bare)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    names = {"checkpoint": checkpoint, "bare": bare, "empty": empty}
    code, _, err = run_cli([item.format(**names) for item in argv], capsys)
    assert code == 2
    assert err.startswith(message.format(**names)), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.slow
def test_an_unknown_task_is_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    code, _, err = run_cli([checkpoint, "--tasks", "tiny_choice,hellaswagg", "--include-path", tasks], capsys)
    assert code == 2
    assert err.startswith("error: unknown task 'hellaswagg': not among lm-evaluation-harness's tasks or in")
    assert err.count("\n") == 1
