"""llama_mini's lm-evaluation-harness model class against the harness's own `hf` backend, in one process.

    python bench/eval.py                                   # the demo model (out/demo), 100 questions
    python bench/eval.py --checkpoint runs/mine --questions 400 --batch-size 16 --json out.json

Both backends load the same checkpoint folder (a run folder's best/), in float32 on the same device, and
run `simple_evaluate` on the same two tasks with the same batch size:

    bench_choice    multiple choice: a passage of --context-words words of the corpus, then 4 candidate
                    continuations of --choice-words words (the true one and three from elsewhere); acc,
                    acc_norm. Each question is 4 loglikelihood requests sharing their context.
    bench_rolling   loglikelihood_rolling of --documents documents (word_perplexity, bits_per_byte)

The tasks are written to a temporary folder from --data (default: the demo's corpus, Shakespeare), so no
dataset is downloaded. Each backend's model is loaded first, outside the timing. Two times are taken:
the whole `simple_evaluate` (building the requests, running them, the metrics: the harness's own share is
the same for both), and the model's own, inside the backend's request methods (loglikelihood,
loglikelihood_rolling; also each on its own). The backends alternate --repeats times and each keeps its
fastest run (on a shared machine single runs vary widely). The scores
must agree (the script says whether they do).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.timing import print_table, run_info, write_json  # noqa: E402
from llama_mini.checkpoint import resolve_checkpoint  # noqa: E402
from llama_mini.data.sources import load_documents  # noqa: E402
from llama_mini.eval.command import quiet_harness  # noqa: E402

TASKS = ["bench_choice", "bench_rolling"]
REQUEST_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def time_requests(lm, spent: dict[str, float]) -> None:
    """Wrap `lm`'s request methods so that the seconds spent in each are added to spent[its name]."""
    for name in REQUEST_METHODS:
        method = getattr(lm, name)

        def timed(*args, method=method, name=name, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        setattr(lm, name, timed)


def write_tasks(folder: Path, documents: list[str], args: argparse.Namespace) -> None:
    """The two tasks' .jsonl data and YAML files (see the module docstring), drawn with a fixed seed."""
    rng = random.Random(0)
    words = [word for document in documents for word in document.split()]
    span = args.context_words + args.choice_words
    questions = []
    for _ in range(args.questions):
        start = rng.randrange(len(words) - span)
        context = " ".join(words[start : start + args.context_words])
        choices = [" ".join(words[start + args.context_words : start + span])]
        while len(choices) < 4:
            other = rng.randrange(len(words) - args.choice_words)
            choices.append(" ".join(words[other : other + args.choice_words]))
        answer = rng.randrange(4)
        choices[0], choices[answer] = choices[answer], choices[0]
        questions.append({"context": context, "choices": choices, "answer": answer})
    (folder / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    texts = [{"text": text[: args.document_chars]} for text in documents[: args.documents]]
    (folder / "rolling.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    header = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
    (folder / "bench_choice.yaml").write_text(
        "task: bench_choice\n"
        + header.format(folder / "choice.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_target: answer\n"
        + "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "bench_rolling.yaml").write_text(
        "task: bench_rolling\n"
        + header.format(folder / "rolling.jsonl")
        + "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        + "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--checkpoint", default="out/demo", help="checkpoint or run folder (default: out/demo)"
    )
    parser.add_argument("--data", default="shakespeare", help="corpus the tasks are drawn from")
    parser.add_argument("--questions", type=int, default=100, help="multiple-choice questions")
    parser.add_argument("--context-words", type=int, default=60, help="words of each question's passage")
    parser.add_argument("--choice-words", type=int, default=12, help="words of each candidate continuation")
    parser.add_argument("--documents", type=int, default=4, help="documents of the rolling task")
    parser.add_argument("--document-chars", type=int, default=20_000, help="characters kept of each")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each backend")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llama_mini.eval.harness import LlamaMiniLM

    folder = resolve_checkpoint(args.checkpoint)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tasks, quiet_harness():
        write_tasks(Path(tasks), load_documents(args.data), args)
        manager = TaskManager(include_path=tasks, include_defaults=False)
        backends = {
            "llama_mini": LlamaMiniLM(
                str(folder), device=args.device, dtype="fp32", batch_size=args.batch_size
            ),
            "hf": HFLM(
                pretrained=str(folder), dtype="float32", device=args.device, batch_size=args.batch_size
            ),
        }
        seconds = {name: float("inf") for name in backends}
        # per backend: the fastest run's seconds in all request methods, and in each
        model_seconds = {name: {"all": float("inf")} for name in backends}
        spent = {name: dict.fromkeys(REQUEST_METHODS, 0.0) for name in backends}
        for name, lm in backends.items():
            time_requests(lm, spent[name])
        results = {}
        for _ in range(args.repeats):
            for name, lm in backends.items():
                spent[name].update(dict.fromkeys(REQUEST_METHODS, 0.0))
                start = time.perf_counter()
                output = simple_evaluate(
                    model=lm, tasks=TASKS, task_manager=manager, log_samples=False, bootstrap_iters=0
                )
                seconds[name] = min(seconds[name], time.perf_counter() - start)
                if sum(spent[name].values()) < model_seconds[name]["all"]:
                    model_seconds[name] = {"all": sum(spent[name].values()), **spent[name]}
                results[name] = output["results"]

    rows = []
    for name in backends:
        choice, rolling = results[name]["bench_choice"], results[name]["bench_rolling"]
        rows.append(
            {
                "backend": name,
                "simple_evaluate s": seconds[name],
                "speed vs hf": seconds["hf"] / seconds[name],
                "model's requests s": model_seconds[name]["all"],
                "model speed vs hf": model_seconds["hf"]["all"] / model_seconds[name]["all"],
                "loglikelihood s": model_seconds[name]["loglikelihood"],
                "rolling s": model_seconds[name]["loglikelihood_rolling"],
                "acc": choice["acc,none"],
                "acc_norm": choice["acc_norm,none"],
                "bits_per_byte": rolling["bits_per_byte,none"],
            }
        )
    info = run_info(device)
    print(f"{folder}: {args.questions} questions x 4 choices + {args.documents} rolling documents, ")
    print(f"batch {args.batch_size}, fp32, {info['device']}, torch {info['torch']}, commit {info['commit']}")
    print_table(rows)
    agree = rows[0]["acc"] == rows[1]["acc"] and rows[0]["acc_norm"] == rows[1]["acc_norm"]
    close = abs(rows[0]["bits_per_byte"] - rows[1]["bits_per_byte"]) <= 1e-5 * rows[1]["bits_per_byte"]
    print(f"scores agree: {'yes' if agree and close else 'NO'}")
    payload = {**info, "checkpoint": str(folder), "args": vars(args), "rows": rows, "agree": agree and close}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
