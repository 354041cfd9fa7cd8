"""lm-evaluation-harness with llama_mini's model class, against the harness's own Hugging Face backend
(`lm_eval --model hf`) on the same folder: the same per-request log-likelihoods (float32 tolerance), the
same generations and the same accuracies. The tasks are written here (YAML over local .jsonl files), so
the tests run offline."""

from __future__ import annotations

import json
import tempfile
import textwrap

import pytest

from tests.test_checkpoint import our_model

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model through protobuf")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llama_mini.checkpoint import save_pretrained  # noqa: E402
from llama_mini.errors import ConfigError  # noqa: E402
from llama_mini.eval.harness import LlamaMiniLM  # noqa: E402

pytestmark = pytest.mark.slow

TASKS = ["tiny_choice", "tiny_rolling", "tiny_generate"]

QUESTIONS = [
    ("the quick brown fox", ["jumps over the lazy dog", "little girl named lily", "times", "once upon"]),
    ("once upon a time there was", ["a little girl", "the lazy fox", "brown dog 7", "over"]),
    ("the lazy", ["dog", "girl named lily jumps", "quick quick quick", "upon a time"]),
    ("lily", ["jumps over", "named the fox", "was a time", "the quick brown girl"]),
    ("", ["the quick", "dog 12 times", "a", "little lily"]),  # an empty context: the prefix token alone
    ("over the lazy dog 3", ["times", "once", "brown", "little"]),
]
TEXTS = [
    "the quick brown fox jumps over the lazy dog 42 times. " * 4,  # longer than the context: 2+ windows
    "once upon a time there was a little girl named lily",
    "the lazy dog",
]
PROMPTS = ["the quick brown", "once upon a time there", "lily", "the lazy dog jumps over the"]


def write_tasks(folder) -> None:
    data = folder / "data"
    data.mkdir()
    with open(data / "choice.jsonl", "w") as out:
        for number, (question, choices) in enumerate(QUESTIONS):
            out.write(json.dumps({"question": question, "choices": choices, "answer": number % 4}) + "\n")
    with open(data / "rolling.jsonl", "w") as out:
        for text in TEXTS:
            out.write(json.dumps({"text": text}) + "\n")
    with open(data / "generate.jsonl", "w") as out:
        for prompt in PROMPTS:
            out.write(json.dumps({"prompt": prompt, "answer": " jumps"}) + "\n")
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'choice.jsonl'}\n"
        + textwrap.dedent("""\
            output_type: multiple_choice
            doc_to_text: "{{question}}"
            doc_to_target: answer
            doc_to_choice: "{{choices}}"
            target_delimiter: " "
            metric_list:
              - metric: acc
              - metric: acc_norm
            """)
    )
    (folder / "tiny_rolling.yaml").write_text(
        f"task: tiny_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'rolling.jsonl'}\n"
        + textwrap.dedent("""\
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: byte_perplexity
              - metric: bits_per_byte
            """)
    )
    (folder / "tiny_generate.yaml").write_text(
        f"task: tiny_generate\n{common}dataset_kwargs:\n  data_files:\n    test: {data / 'generate.jsonl'}\n"
        + textwrap.dedent("""\
            output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            generation_kwargs:
              until: ["dog", "\\n"]
              max_gen_toks: 12
              do_sample: false
            metric_list:
              - metric: exact_match
            """)
    )


@pytest.fixture(scope="module")
def offline():
    """No downloads, and the harness's datasets cached in a temporary folder."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="datasets-"))
    yield
    monkeypatch.undo()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sentencepiece_model):
    """A tiny perturbed model with context 32 (the first rolling text, about 60 tokens, spans windows; the
    generations fit), saved with its tokenizer as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("model")
    save_pretrained(
        our_model(seed=5, max_seq_len=32, vocab_size=64), folder, tokenizer_path=sentencepiece_model
    )
    return folder


@pytest.fixture(scope="module")
def evaluated(offline, folder, tmp_path_factory):
    """Both backends' simple_evaluate results on the same folder and tasks (module scope: run once)."""
    tasks = tmp_path_factory.mktemp("tasks")
    write_tasks(tasks)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    common = dict(tasks=TASKS, task_manager=manager, log_samples=True, bootstrap_iters=0)
    ours = simple_evaluate(model=LlamaMiniLM(str(folder), device="cpu", dtype="fp32", batch_size=3), **common)
    reference = simple_evaluate(
        model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu", batch_size=3, **common
    )
    return ours, reference


def responses(result, task):
    samples = sorted(result["samples"][task], key=lambda sample: sample["doc_id"])
    return [sample["resps"] for sample in samples]


def test_multiple_choice_log_likelihoods_equal_the_hf_backends(evaluated):
    ours, reference = (responses(result, "tiny_choice") for result in evaluated)
    assert len(ours) == len(QUESTIONS)
    for mine, theirs in zip(ours, reference, strict=True):
        assert len(mine) == 4
        for [(log_probability, greedy)], [(expected, expected_greedy)] in zip(mine, theirs, strict=True):
            assert log_probability == pytest.approx(expected, rel=1e-5, abs=1e-4)
            assert greedy == expected_greedy
            assert log_probability < 0


def test_multiple_choice_accuracies_equal_the_hf_backends(evaluated):
    ours, reference = (result["results"]["tiny_choice"] for result in evaluated)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours[metric] == reference[metric]


def test_rolling_log_likelihoods_and_bits_per_byte_equal_the_hf_backends(evaluated):
    ours, reference = (responses(result, "tiny_rolling") for result in evaluated)
    assert len(ours) == len(TEXTS)
    for [[mine]], [[theirs]] in zip(ours, reference, strict=True):
        assert mine == pytest.approx(theirs, rel=1e-5)
    ours, reference = (result["results"]["tiny_rolling"] for result in evaluated)
    for metric in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert ours[metric] == pytest.approx(reference[metric], rel=1e-5)


def test_generations_equal_the_hf_backends(evaluated):
    ours, reference = (responses(result, "tiny_generate") for result in evaluated)
    assert ours == reference
    assert any(text for [[text]] in ours)  # something was generated


def test_bench_eval_times_both_backends_and_finds_their_scores_equal(offline, folder, tmp_path):
    from bench import eval as bench_eval

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(TEXTS * 3) + " " + " ".join(PROMPTS * 5))
    argv = ["--checkpoint", folder, "--data", corpus, "--questions", 3, "--context-words", 6]
    argv += [
        "--choice-words",
        3,
        "--documents",
        1,
        "--repeats",
        1,
        "--batch-size",
        2,
        "--json",
        tmp_path / "b.json",
    ]
    payload = bench_eval.main([str(item) for item in argv])
    assert [row["backend"] for row in payload["rows"]] == ["llama_mini", "hf"]
    assert payload["agree"] and all(row["model's requests s"] > 0 for row in payload["rows"])
    assert json.loads((tmp_path / "b.json").read_text())["rows"][1]["speed vs hf"] == pytest.approx(1.0)


def test_the_model_class_is_registered_and_built_from_an_argument_string(folder):
    from lm_eval.api.registry import get_model

    assert get_model("llama_mini") is LlamaMiniLM
    lm = get_model("llama_mini").create_from_arg_string(
        f"pretrained={folder},dtype=fp32,device=cpu", {"batch_size": 4, "device": None}
    )
    assert (lm.batch_size, lm.max_length, lm.prefix_token_id, lm.eot_token_id) == (4, 32, 1, 2)
    assert lm.tok_encode("the lazy dog")[0] == 1  # bos first, as the tokenizer adds it
    assert lm.tok_encode("<s>the lazy dog") == lm.tok_encode("the lazy dog")  # its text read as bos
    with pytest.raises(ConfigError, match="LlamaMiniLM has no setting 'batchsize'"):
        get_model("llama_mini").create_from_arg_string(f"pretrained={folder},batchsize=4")
