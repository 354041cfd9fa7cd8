"""Data preparation at scale: MB/s and peak memory of `train.py --data corpus.txt` by corpus size and workers.

    python bench/data_prep.py                                    # 25, 100, 400 MB x 1, 2 workers; resume
    python bench/data_prep.py --sizes 25 100 400 2000 --workers 1 2 --json out.json
    python bench/data_prep.py --tokenize-only --sizes 100 --workers 1 2    # the tokenizing step alone
    python bench/data_prep.py --tokenize-only --corpus FILE.txt           # ... of a text file of yours

Each measurement runs, as its own process tree, what `train.py --data CORPUS --data-workers N` does before
its first step (llama_mini.train.data_feed with the default settings): train a 4096-piece tokenizer on the
tokenizer sample, then tokenize the corpus into shards,

    python bench/data_prep.py --child CORPUS OUT N

holding /tmp/llama_mini_cpu.lock while it runs (as `flock /tmp/llama_mini_cpu.lock COMMAND` would, but with
the clock started once the lock is held), so runs on a shared machine take turns with other CPU-heavy work.
Each is run --repeats times and the run with the fastest preparation is reported. It reports:

    wall s          the whole child: imports, tokenizer sample and training, tokenization
    prepare MB/s    the corpus's UTF-8 bytes / the seconds of tokenizing it into shards (prepare_data's log)
    peak RSS MB     the largest sum, over the process tree, of each process's resident set, sampled every
                    0.2 s (it counts pages shared by processes, such as torch's libraries, once per process)
    peak PSS MB     the same with proportional set sizes (shared pages divided among their users): the
                    memory the tree really holds

then, on the largest corpus, `train.py --data CORPUS --max-steps 2 --eval-interval 1` and its `--resume`:
seconds from the start of `train.py --out RUN --resume --max-steps 3` to its first training step's line in
metrics.jsonl. The corpora are synthetic English-like text
(paragraphs of sentences of Zipf-distributed words), made once into --work and reused.

--tokenize-only times the tokenizing step alone, without the tokenizer's training, the split or the
writing: a tokenizer is trained once per corpus (as above, on its tokenizer sample), then for each
--workers value a child process, holding the lock, runs llama_mini.data.pool.encoded_batches over
`open_source(corpus).documents()` and reports

    tokenize MB/s   the corpus's UTF-8 bytes / the seconds from the first document read to the last batch
                    tokenized
    workers CPU s   the CPU seconds of the worker processes (getrusage(RUSAGE_CHILDREN)), and the
    main CPU s      main process's own (reading the corpus, handing out batches, receiving the tokens)

and the ratio of MB/s with 2 workers to 1: what parallel tokenization gains where nothing else runs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LOCK = "/tmp/llama_mini_cpu.lock"


def synthetic_corpus(path: Path, megabytes: float, seed: int = 0) -> Path:
    """A text file of `megabytes` MB of paragraphs (blank-line separated) of pseudo-English sentences,
    the same for the same arguments; written once (a `.done` file marks it complete)."""
    done = path.with_suffix(".done")
    if done.exists() and path.exists():
        return path
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    frequency = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.2, 2.0,
                          2.0, 1.9, 1.0, 1.5, 1.0, 0.8, 0.15, 0.1, 0.15, 0.07])  # fmt: skip
    frequency /= frequency.sum()
    words = ["".join(rng.choice(letters, size=rng.integers(1, 11), p=frequency)) for _ in range(20_000)]
    zipf = 1 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    sentences = []
    for _ in range(100_000):
        text = " ".join(words[i] for i in rng.choice(len(words), size=rng.integers(4, 25), p=zipf))
        sentences.append(text[0].upper() + text[1:] + rng.choice([".", ".", ".", "?", "!"]))
    target, written = int(megabytes * 1e6), 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        while written < target:
            paragraphs = []
            for _ in range(2000):
                picks = rng.integers(0, len(sentences), size=rng.integers(2, 12))
                paragraphs.append(" ".join(sentences[i] for i in picks) + "\n\n")
            chunk = "".join(paragraphs)[: target - written]
            file.write(chunk)
            written += len(chunk)
    done.write_text("complete\n")
    return path


def _tree(root: int) -> list[int]:
    """`root` and all its descendants, from each thread's /proc/PID/task/TID/children."""
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            try:
                stack.extend(int(child) for child in children.read_text().split())
            except OSError:  # the process or thread ended meanwhile
                pass
    return found


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) if it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = dict(re.findall(r"^(Rss|Pss):\s+(\d+) kB", rollup, re.MULTILINE))
    return int(values.get("Rss", 0)) * 1024, int(values.get("Pss", 0)) * 1024


def run_measured(command: list[str], on_poll=None) -> dict:
    """Run `command` holding LOCK; its wall seconds, stderr, and the peak RSS and PSS of its process tree."""
    with open(LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _run_measured(command, on_poll)


def _run_measured(command: list[str], on_poll=None) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)
    reader.start()
    peak_rss = peak_pss = 0
    while process.poll() is None:
        sizes = [_memory(pid) for pid in _tree(process.pid)]
        peak_rss = max(peak_rss, sum(rss for rss, _ in sizes))
        peak_pss = max(peak_pss, sum(pss for _, pss in sizes))
        if on_poll is not None:
            on_poll(time.perf_counter() - started)
        time.sleep(0.2)
    reader.join()
    wall = time.perf_counter() - started
    text = "".join(stderr)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{text[-3000:]}")
    return {"wall_s": wall, "peak_rss_mb": peak_rss / 1e6, "peak_pss_mb": peak_pss / 1e6, "stderr": text}


def prepare_rate(stderr: str) -> tuple[float, float]:
    """(seconds, MB/s) of tokenizing, from train.py's "data: ... in X s (Y MB/s)" line."""
    match = re.search(r"^data: .* in ([\d.]+) s \(([\d.]+) MB/s\)$", stderr, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no data preparation line in:\n{stderr[-2000:]}")
    return float(match.group(1)), float(match.group(2))


def seconds_to_first_resumed_step(run: Path) -> tuple[float, dict]:
    """Resume `run` for one more step; seconds until metrics.jsonl gains its first new training line."""
    metrics = run / "metrics.jsonl"
    before = metrics.read_text().count("\n")
    first: list[float] = []

    def poll(elapsed: float) -> None:
        if not first:
            lines = metrics.read_text().splitlines()[before:]
            if any(json.loads(line).get("type") == "train" for line in lines if line.strip()):
                first.append(elapsed)

    command = [sys.executable, "train.py", "--out", str(run), "--resume", "--max-steps", "3",
               "--log-interval", "1", "--device", "cpu"]  # fmt: skip
    result = run_measured(command, on_poll=poll)
    return (first[0] if first else float("nan")), result


def child(corpus: str, out: Path, workers: int) -> None:
    """What train.py does before its first step, with its default settings (llama_mini.train.data_feed)."""
    sys.path.insert(0, str(REPO))
    from llama_mini.data import prepare_data, tokenizer_sample
    from llama_mini.tokenizer import train_tokenizer
    from llama_mini.train import TrainConfig

    config = TrainConfig(data=corpus, data_workers=workers)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    sample = tokenizer_sample(
        corpus, round(config.tokenizer_sample_mb * 1e6), config.val_fraction, config.split_seed, log=log
    )
    tokenizer = train_tokenizer(sample, out / "tokenizer.model", config.vocab_size)
    del sample
    prepare_data(
        corpus, out / "data", tokenizer, config.val_fraction, config.split_seed, workers=workers, log=log
    )


def tokenize_child(corpus: str, tokenizer_path: str, workers: int) -> None:
    """Tokenize `corpus` with llama_mini's pipeline alone and print one JSON line of rates and CPU times."""
    sys.path.insert(0, str(REPO))
    import resource

    from llama_mini.data.pool import document_batches, encoded_batches
    from llama_mini.data.sources import open_source
    from llama_mini.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_path)
    source = open_source(corpus)

    def cpu_seconds(who: int) -> float:
        usage = resource.getrusage(who)
        return usage.ru_utime + usage.ru_stime

    main_before = cpu_seconds(resource.RUSAGE_SELF)
    started = time.perf_counter()
    size = 0
    batches = document_batches(source.documents(), [0])
    for encoded in encoded_batches(batches, tokenizer, seed=0, workers=workers, chat=False):
        size += int(encoded.sizes.sum())
    seconds = time.perf_counter() - started  # the pool has been shut down: its workers are reaped
    main = cpu_seconds(resource.RUSAGE_SELF) - main_before
    result = {"seconds": seconds, "bytes": size, "workers_cpu_s": cpu_seconds(resource.RUSAGE_CHILDREN)}
    print(json.dumps({**result, "main_cpu_s": main}))


def tokenize_only(args: argparse.Namespace, work: Path) -> list[dict]:
    """The --tokenize-only rows: for each corpus size, each --workers value (see the module docstring)."""
    rows = []
    sizes = [Path(args.corpus).stat().st_size / 1e6] if args.corpus else args.sizes
    for size in sizes:
        corpus = Path(args.corpus) if args.corpus else synthetic_corpus(work / f"corpus-{size:g}MB.txt", size)
        tokenizer = work / f"tokenizer-{corpus.stem}-{args.vocab_size}.model"
        if not tokenizer.exists():  # trained as train.py trains one, on the corpus's tokenizer sample
            sys.path.insert(0, str(REPO))
            from llama_mini.data import tokenizer_sample
            from llama_mini.tokenizer import train_tokenizer

            train_tokenizer(tokenizer_sample(str(corpus)), tokenizer, args.vocab_size)
        for workers in args.workers:
            best = None
            for _ in range(args.repeats):
                command = [sys.executable, "bench/data_prep.py", "--tokenize-child"]
                command += [str(corpus), str(tokenizer), str(workers)]
                with open(args.lock if args.lock != "none" else os.devnull, "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # (a lock on /dev/null is nobody's)
                    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
                if finished.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} failed:\n{finished.stderr[-3000:]}")
                result = json.loads(finished.stdout.strip().splitlines()[-1])
                if best is None or result["seconds"] < best["seconds"]:
                    best = result
            rows.append(
                {
                    "corpus MB": size,
                    "workers": workers,
                    "tokenize s": round(best["seconds"], 2),
                    "tokenize MB/s": round(best["bytes"] / 1e6 / best["seconds"], 2),
                    "workers CPU s": round(best["workers_cpu_s"], 2),
                    "main CPU s": round(best["main_cpu_s"], 2),
                }
            )
            print(rows[-1], flush=True)
    by = {(row["corpus MB"], row["workers"]): row for row in rows}
    for size in sizes:
        if (size, 1) in by and (size, 2) in by:
            ratio = by[size, 2]["tokenize MB/s"] / by[size, 1]["tokenize MB/s"]
            print(f"{size:g} MB, tokenizing alone: 2 workers / 1 worker = {ratio:.2f}x MB/s")
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        corpus, out, workers = argv[1:4]
        child(corpus, Path(out), int(workers))
        return 0
    if argv[:1] == ["--tokenize-child"]:
        corpus, tokenizer, workers = argv[1:4]
        tokenize_child(corpus, tokenizer, int(workers))
        return 0
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[25, 100, 400], help="corpus sizes, MB")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--data-workers values")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest is reported")
    parser.add_argument("--work", default="/tmp/llama_mini_bench_data", help="folder for corpora and runs")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--tokenize-only", action="store_true", help="time the tokenizing step alone")
    parser.add_argument("--vocab-size", type=int, default=4096, help="--tokenize-only: the tokenizer's size")
    parser.add_argument("--lock", default=LOCK, help="--tokenize-only: the lock to hold (none: no lock)")
    parser.add_argument("--corpus", help="--tokenize-only: this text file instead of the synthetic corpora")
    args = parser.parse_args(argv)

    work = Path(args.work)
    if args.tokenize_only:
        rows = tokenize_only(args, work)
        if args.json:
            Path(args.json).write_text(json.dumps({**_run_info(), "results": rows}, indent=2))
        return 0
    rows = []
    for size in args.sizes:
        corpus = synthetic_corpus(work / f"corpus-{size:g}MB.txt", size)
        for workers in args.workers:
            run = work / f"run-{size:g}MB-{workers}w"
            best = None
            for _ in range(args.repeats):  # a shared machine is noisy: keep the fastest preparation
                subprocess.run(["rm", "-rf", str(run)], check=True)
                command = [
                    sys.executable,
                    "bench/data_prep.py",
                    "--child",
                    str(corpus),
                    str(run),
                    str(workers),
                ]
                result = run_measured(command)
                result["prepare"] = prepare_rate(result["stderr"])
                if best is None or result["prepare"][0] < best["prepare"][0]:
                    best = result
            result, (seconds, rate) = best, best["prepare"]
            rows.append(
                {
                    "corpus MB": size,
                    "workers": workers,
                    "wall s": round(result["wall_s"], 1),
                    "prepare s": seconds,
                    "prepare MB/s": rate,
                    "peak RSS MB": round(result["peak_rss_mb"]),
                    "peak PSS MB": round(result["peak_pss_mb"]),
                }
            )
            print(rows[-1], flush=True)
    resume = None
    if args.sizes:
        run = work / "run-resume"
        subprocess.run(["rm", "-rf", str(run)], check=True)
        corpus = work / f"corpus-{max(args.sizes):g}MB.txt"
        command = [sys.executable, "train.py", "--data", str(corpus), "--out", str(run), "--max-steps", "2",
                   "--eval-interval", "1", "--device", "cpu", "--sample-tokens", "0"]  # fmt: skip
        first = run_measured(command)
        resume, result = seconds_to_first_resumed_step(run)
        print(f"train.py on {corpus.name}: {first['wall_s']:.1f} s; its --resume reached its first training "
              f"step after {resume:.1f} s (whole command {result['wall_s']:.1f} s)", flush=True)  # fmt: skip
    info = _run_info()
    print(f"\n{info}\n")
    columns = list(rows[0]) if rows else []
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[column]:,}" if isinstance(row[column], int) else str(row[column])
                                for column in columns) + " |")  # fmt: skip
    by = {(row["corpus MB"], row["workers"]): row for row in rows}
    for size in args.sizes:
        if (size, 1) in by and (size, 2) in by:
            ratio = by[size, 2]["prepare MB/s"] / by[size, 1]["prepare MB/s"]
            print(f"{size:g} MB: 2 workers / 1 worker = {ratio:.2f}x MB/s")
    for workers in args.workers:
        small, large = by.get((min(args.sizes), workers)), by.get((max(args.sizes), workers))
        if small and large:
            print(f"{workers} worker(s): peak RSS at {max(args.sizes):g} MB / at {min(args.sizes):g} MB = "
                  f"{large['peak RSS MB'] / small['peak RSS MB']:.2f}x, PSS "
                  f"{large['peak PSS MB'] / small['peak PSS MB']:.2f}x")  # fmt: skip
    if args.json:
        Path(args.json).write_text(
            json.dumps({**info, "rows": rows, "resume_first_step_s": resume}, indent=2)
        )
    return 0


def _run_info() -> dict:
    """The machine, date, commit and torch version the numbers come from."""
    from importlib.metadata import version

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    cpu = re.search(
        r"^Model name:\s+(.*)$", subprocess.run(["lscpu"], capture_output=True, text=True).stdout, re.M
    )
    return {
        "device": f"{cpu.group(1) if cpu else 'CPU'}, {os.cpu_count()} cores",
        "date": date.today().isoformat(),
        "commit": commit.stdout.strip(),
        "torch": version("torch"),
    }


if __name__ == "__main__":
    sys.exit(main())
