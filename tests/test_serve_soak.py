"""`llama-mini serve` as a process: a bounded soak (many clients at once, some leaving early: every finished
answer right, no slot left held, no memory growth after warm-up), the request log, and SIGTERM."""

import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_serve_api import base_checkpoint  # noqa: F401 - a fixture

from llama_mini.checkpoint import load_model
from llama_mini.generation import decode_continuation, generate
from llama_mini.tokenizer import Tokenizer

pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "once upon a time",
    "the quick brown fox",
    "lily",
    "the lazy dog",
    "a girl",
    "the fox jumps",
    "times",
]


class ServerProcess:
    """`python -m llama_mini.cli serve CHECKPOINT --port 0`; the port is read from its first line."""

    def __init__(self, checkpoint, *flags, environment: dict | None = None):
        # One thread: the tiny model gains nothing from more, and on a busy machine threads that wait for each
        # other at every operation make each step many times slower.
        environment = {
            **os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(environment or {})
        }  # fmt: skip
        self.headers = {"Content-Type": "application/json"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_mini.cli", "serve", str(checkpoint), "--port", "0", *flags],
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            cwd=ROOT,
        )
        self.lines: list[str] = []
        first = self.process.stderr.readline()
        self.lines.append(first)
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        assert found, f"no address in {first!r}"
        self.port = int(found.group(1))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line)

    def request(self, method, path, body=None, timeout=60):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        connection.request(
            method,
            path,
            body=None if body is None else json.dumps(body),
            headers={"Content-Type": "application/json"},
        )
        return connection, connection.getresponse()

    def health(self) -> dict:
        connection, response = self.request("GET", "/health")
        state = json.loads(response.read())
        connection.close()
        return state

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(30)
        self.reader.join(5)
        return code


@pytest.fixture(scope="module")
def expected(base_checkpoint):  # noqa: F811
    """The greedy continuation of each prompt after k tokens, from the library: (prompt, k) -> text."""
    model, tokenizer = load_model(base_checkpoint), Tokenizer(base_checkpoint)
    ids = [tokenizer.encode(prompt, bos=True) for prompt in PROMPTS]
    answers = {}
    for k in (4, 8, 16):
        new = generate(model, ids, k, temperature=0, eos_id=tokenizer.eos_ids)
        for prompt, prompt_ids, new_ids in zip(PROMPTS, ids, new, strict=True):
            answers[prompt, k] = decode_continuation(tokenizer, prompt_ids, new_ids)
    return answers


def one_request(server: ServerProcess, rng: random.Random, expected: dict, results: list) -> None:
    prompt, k = rng.choice(PROMPTS), rng.choice((4, 8, 16))
    stream, leave_early = rng.random() < 0.6, rng.random() < 0.25
    body = {"prompt": prompt, "max_tokens": k, "temperature": 0, "stream": stream}
    connection, response = server.request("POST", "/v1/completions", body)
    assert response.status == 200
    if leave_early:  # read a little (or nothing) and hang up
        if stream:
            response.readline()
        connection.sock.close()
        connection.close()
        results.append("left")
        return
    if stream:
        text = ""
        for event in response.read().decode().split("\n\n"):
            if event.startswith("data: ") and event != "data: [DONE]":
                text += json.loads(event[6:])["choices"][0]["text"]
    else:
        text = json.loads(response.read())["choices"][0]["text"]
    connection.close()
    results.append(text == expected[prompt, k] or (prompt, k, text))


@pytest.mark.slow
def test_a_soak_of_many_clients_leaves_right_answers_no_held_slots_and_flat_memory(base_checkpoint, expected):  # noqa: F811
    server = ServerProcess(base_checkpoint, "--max-batch-size", "6", "--max-queue", "200")
    try:

        def wave(count: int, seed: int) -> list:
            results, rng = [], random.Random(seed)
            rngs = [random.Random(rng.random()) for _ in range(16)]

            def client(index: int) -> None:
                for _ in range(count // 16):
                    one_request(server, rngs[index], expected, results)

            threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            return results

        warm = wave(32, seed=0)  # warm-up: allocator pools and caches reach their working size
        deadline = time.monotonic() + 20
        while server.health()["active"] and time.monotonic() < deadline:
            time.sleep(0.05)
        before = server.rss_bytes()
        results = wave(112, seed=1)
        deadline = time.monotonic() + 20
        while (state := server.health())["active"] or state["waiting"]:
            assert time.monotonic() < deadline, f"slots still held after the soak: {state}"
            time.sleep(0.05)
        after = server.rss_bytes()
    finally:
        assert server.stop() == 0
    everything = warm + results
    wrong = [r for r in everything if r not in (True, "left")]
    assert len(everything) == 144 and not wrong, wrong[:3]
    assert 10 <= everything.count("left") <= 80  # some did leave early, most finished
    assert after - before < 32 * 2**20, f"memory grew by {(after - before) / 2**20:.1f} MiB after warm-up"


@pytest.mark.slow
def test_sigterm_ends_the_streams_and_exits_cleanly_and_each_request_is_logged(base_checkpoint):  # noqa: F811
    server = ServerProcess(base_checkpoint)
    connection, response = server.request(
        "POST", "/v1/completions", {"prompt": "lily", "max_tokens": 40, "stream": True}
    )
    assert response.status == 200 and response.readline().startswith(b"data: ")
    server.process.send_signal(signal.SIGTERM)
    rest = response.read().decode()  # the stream is finished (or cut), not left hanging
    connection.close()
    assert server.stop() == 0
    assert rest.endswith("data: [DONE]\n\n") or rest == ""
    log = "".join(server.lines)
    assert re.search(r'"POST /v1/completions" 200 prompt_tokens=\d+ completion_tokens=\d+ \d+\.\d+s', log), (
        log
    )
    assert "Traceback" not in log
