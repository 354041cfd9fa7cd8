"""Serving throughput: `llama-mini serve` beside llama.cpp's OpenAI server, at 1 and 8 streaming clients.

    python bench/serve.py                                  # stories15m shape, vocab 4096, 1 and 8 clients
    python bench/serve.py --clients 1 4 8 16 --new-tokens 64 --json serve.json
    python bench/serve.py --device cuda --dtype bf16 --clients 1 8 64 --servers llama_mini   # a GPU

On a machine shared with other jobs, run it under `flock /tmp/llama_mini_cpu.lock` (the lock the other CPU
benchmarks here take), so that they take turns.

One model, random weights (speed does not depend on them; bench/decode_cpu.py's `spread_weights_`, so
greedy text does not end at once), saved as a checkpoint folder and exported to an f32 GGUF file with
`llama-mini convert`, so both servers run the same numbers in float32:

    llama_mini   python -m llama_mini.cli serve FOLDER --max-batch-size 8 (continuous batching)
    llama_mini compiled    the same with --compile: decode steps for 1, 2, 4 and 8 rows compiled ahead of
                 time (built on the first run, kept in the compile cache)
    llama.cpp    python -m llama_cpp.server --model FILE.gguf (llama-cpp-python[server]), with
                 --interrupt_requests False (its default, True, cuts a running stream off when another
                 request arrives); skipped, with a note, when it is not installed

Each server runs alone, as a process of its own, with --threads threads (default: every core). For each
client count C, C threads each send --requests-per-client streamed /v1/completions requests one after
another (temperature 0, a prompt of --prompt-tokens random tokens' text, --new-tokens tokens at most,
stream_options.include_usage) and read every event. A warm-up request precedes the timed ones. Reported
per (server, C):

    tokens/s        all completion tokens the server reported (usage) / wall time from the first request
                    sent to the last stream ended: the aggregate throughput
    x 1 client      that, divided by the same server's 1-client tokens/s: what concurrency buys
    TTFT p50, p95   seconds from sending a request to its first token's event
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.decode_cpu import spread_weights_, tokenizer_for  # noqa: E402
from bench.timing import print_table, run_info, write_json  # noqa: E402
from llama_mini import Transformer, get_preset  # noqa: E402
from llama_mini.checkpoint import save_pretrained  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SERVERS = ("llama_mini", "llama_mini compiled", "llama.cpp")
# A server's start may take this long on a busy machine (compiled: building its steps the first time).
START_SECONDS = 900


class Server:
    """A server process on 127.0.0.1:port; `stop()` ends it."""

    def __init__(self, command: list[str], port: int, log: Path):
        self.port, self.log = port, open(log, "w")  # noqa: SIM115 - closed in stop()
        environment = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + START_SECONDS
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {' '.join(command)} (see {log})")
            time.sleep(0.5)

    def _answers(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            connection.request("GET", "/v1/models")
            ok = connection.getresponse().status == 200
            connection.close()
            return ok
        except OSError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stream_one(port: int, model: str, prompt: str, new_tokens: int) -> tuple[float, int, float]:
    """One streamed completion: (seconds to the first token, completion tokens, seconds in all)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": new_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens, events = None, None, 0
    while True:
        line = response.readline()
        if not line:
            break
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0].get("text"):
            events += 1
            if first is None:
                first = time.perf_counter() - start
    connection.close()
    # A server that sends no usage chunk: count its text events (one per token for both servers here).
    return (
        first if first is not None else float("nan"),
        tokens if tokens is not None else events,
        (time.perf_counter() - start),
    )


def load(port: int, model: str, prompts: list[str], clients: int, requests: int, new_tokens: int) -> dict:
    """`clients` threads, each streaming `requests` completions in turn: tokens/s and TTFT percentiles."""
    results: list[tuple[float, int, float]] = []
    lock = threading.Lock()

    failures: list[BaseException] = []

    def client(index: int) -> None:
        try:
            for r in range(requests):
                outcome = stream_one(port, model, prompts[(index * requests + r) % len(prompts)], new_tokens)
                with lock:
                    results.append(outcome)
        except Exception as error:  # noqa: BLE001 - reported below, after the other clients end
            failures.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} clients failed; the first: {failures[0]}")
    first_tokens = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_second": tokens / wall,
        "ttft_p50": statistics.median(first_tokens),
        "ttft_p95": first_tokens[min(len(first_tokens) - 1, round(0.95 * (len(first_tokens) - 1)))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--preset", default="stories15m")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="each server's CPU threads")
    parser.add_argument(
        "--device", default="cpu", help="llama_mini's device (llama.cpp's build is the CPU's)"
    )
    parser.add_argument("--dtype", default="fp32", help="llama_mini's weights: fp32 (as llama.cpp's) or bf16")
    parser.add_argument(
        "--servers", nargs="+", choices=SERVERS, default=list(SERVERS), help="which servers to measure"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    load_before = os.getloadavg()[0]
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_args = get_preset(args.preset, vocab_size=args.vocab_size)
        torch.manual_seed(0)
        model = spread_weights_(Transformer(model_args), seed=0)
        tokenizer = tokenizer_for(model_args.vocab_size, scratch)
        folder, gguf_path = scratch / "model", scratch / "model.gguf"
        save_pretrained(model, folder, tokenizer_path=tokenizer.model_path)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "llama_mini.cli",
                "convert",
                str(folder),
                str(gguf_path),
                "--dtype",
                "f32",
            ],
            check=True,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.DEVNULL,
        )
        # Prompts of --prompt-tokens tokens: random ids decoded, which the tokenizer reads back about as long.
        generator = torch.Generator().manual_seed(1)
        prompts = [
            tokenizer.decode(
                torch.randint(3, tokenizer.vocab_size, (args.prompt_tokens,), generator=generator).tolist()
            )
            for _ in range(16)
        ]

        for name in args.servers:
            port = free_port()
            if name.startswith("llama_mini"):
                batch = max(args.clients)
                command = [sys.executable, "-m", "llama_mini.cli", "serve", str(folder), "--port", str(port),
                           "--max-batch-size", str(batch), "--dtype", args.dtype, "--device", args.device,
                           "--threads", str(args.threads)]  # fmt: skip
                if name == "llama_mini compiled":
                    command.append("--compile")
            else:
                try:
                    import llama_cpp.server  # noqa: F401
                except ImportError:
                    notes.append("llama.cpp skipped: pip install 'llama-cpp-python[server]' to include it")
                    continue
                command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host",
                           "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
                           "--n_threads_batch", str(args.threads), "--interrupt_requests", "False",
                           "--n_ctx", str(model_args.max_seq_len), "--model_alias", "model"]  # fmt: skip
            server = Server(command, port, scratch / f"{name}.log")
            try:
                stream_one(port, "model", prompts[0], 8)  # warm-up
                single = None
                for clients in args.clients:
                    result = load(port, "model", prompts, clients, args.requests_per_client, args.new_tokens)
                    single = result["tokens_per_second"] if clients == 1 else single
                    rows.append(
                        {
                            "server": name,
                            "clients": clients,
                            "tokens/s": result["tokens_per_second"],
                            "x 1 client": result["tokens_per_second"] / single if single else float("nan"),
                            "TTFT p50 (s)": result["ttft_p50"],
                            "TTFT p95 (s)": result["ttft_p95"],
                            "tokens": result["tokens"],
                        }
                    )
                    print(rows[-1], flush=True)
            finally:
                server.stop()

    millions = sum(p.numel() for p in model.parameters()) / 1e6
    shape = (
        f"dim {model_args.dim}, {model_args.n_layers} layers, vocab {model_args.vocab_size}, {millions:.1f}M"
    )
    print(
        f"\n{args.preset} shape ({shape}), random weights, fp32; {args.requests_per_client} streamed requests"
        f" per client of up to {args.new_tokens} tokens; load average before {load_before:.1f}, after "
        f"{os.getloadavg()[0]:.1f}"
    )
    print_table(rows)
    by_server = {(row["server"], row["clients"]): row["tokens/s"] for row in rows}
    for clients in args.clients:
        for ours in SERVERS[:2]:
            if (ours, clients) in by_server and ("llama.cpp", clients) in by_server:
                ratio = by_server[ours, clients] / by_server["llama.cpp", clients]
                print(f"{clients} clients: {ours} / llama.cpp tokens/s = {ratio:.2f}")
    for note in notes:
        print(f"note: {note}")
    info = run_info(torch.device("cpu"))
    print(f"\n{info}")
    write_json(args.json, {**info, "results": rows, "notes": notes, "args": vars(args)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
