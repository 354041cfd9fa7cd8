"""`llama-mini serve` through the official openai client (and raw HTTP where the client hides the bytes): a
tiny random checkpoint served on 127.0.0.1 in a thread; answers against generate.py's and the library's,
streaming, concurrency, disconnects and every kind of bad input."""

import contextlib
import http.client
import io
import json
import socket
import threading
import time

import pytest
import torch
from test_chat_sft import CHATML_TEMPLATE, byte_level_bpe, contents, conversations
from test_generation import tiny_model

from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.generation import command as generate_command
from llama_mini.generation import decode_continuation, generate
from llama_mini.tokenizer import Tokenizer, chat_stop_ids, encode_chat

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from llama_mini.serve.command import ServeConfig, build_app  # noqa: E402

CONTEXT = 64  # the tiny preset's
PROMPT = "once upon a time"
QUESTION = "Tell me about the sea."


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1, a free port, in a daemon thread; stop() ends it."""

    def __init__(self, app):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.listener]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused", **options):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **options)

    def request(self, method: str, path: str, body=None, headers=None) -> tuple[int, dict, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        connection.request(
            method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
        )
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, dict(response.getheaders()), payload

    def health(self) -> dict:
        return json.loads(self.request("GET", "/health")[2])

    def wait_idle(self, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while (state := self.health())["active"] or state["waiting"]:
            assert time.monotonic() < deadline, f"slots still held: {state}"
            time.sleep(0.05)
        return state

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def save_model(folder, tokenizer_path) -> None:
    model = tiny_model(vocab_size=Tokenizer(tokenizer_path).vocab_size)
    save_pretrained(model, folder, tokenizer_path=tokenizer_path)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, sentencepiece_model):
    folder = tmp_path_factory.mktemp("serve_base") / "base"
    save_model(folder, sentencepiece_model)
    return folder


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A random tiny model whose tokenizer.json has the ChatML template (end of turn <|im_end|>)."""
    folder = tmp_path_factory.mktemp("serve_chat")
    byte_level_bpe(contents(conversations(40))).save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHATML_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    save_model(folder / "chat", folder / "tokenizer.json")
    return folder / "chat"


@contextlib.contextmanager
def serving(checkpoint, **settings):
    app, _ = build_app(checkpoint, ServeConfig(**settings))
    server = ServerThread(app)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def base(base_checkpoint):
    with serving(base_checkpoint, max_batch_size=4, max_queue=64, max_body_bytes=20_000) as server:
        yield server


@pytest.fixture(scope="module")
def chat(chat_checkpoint):
    with serving(chat_checkpoint, max_batch_size=4) as server:
        yield server


@pytest.fixture(scope="module")
def library(base_checkpoint):

    return load_model(base_checkpoint), Tokenizer(base_checkpoint)


def generate_py(capsys, monkeypatch, checkpoint, *flags, stdin: str | None = None) -> str:
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = generate_command.main(["--checkpoint", str(checkpoint), "--no-stream", *map(str, flags)])
    out = capsys.readouterr().out
    assert code == 0
    return out


# ---------------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------------


def test_models_lists_the_served_checkpoint_and_health_counts_slots(base):
    assert [model.id for model in base.client().models.list()] == ["base"]
    assert base.health() == {"status": "ok", "active": 0, "waiting": 0}


def test_a_greedy_completion_equals_generate_py(base, base_checkpoint, capsys, monkeypatch):
    out = generate_py(
        capsys, monkeypatch, base_checkpoint, "--prompt", PROMPT, "--temperature", 0, "--max-new-tokens", 12
    )
    response = base.client().completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert PROMPT + choice.text + "\n" == out
    assert choice.finish_reason in ("length", "stop")
    assert response.usage.completion_tokens <= 12 and response.usage.prompt_tokens == len(
        Tokenizer(base_checkpoint).encode(PROMPT, bos=True)
    )


def test_a_streamed_completion_joins_to_the_same_text(base):
    client = base.client()
    whole = client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0).choices[0]
    chunks = list(
        client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0, stream=True)
    )
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.text
    assert chunks[-1].choices[0].finish_reason == whole.finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


def test_a_seeded_sample_is_repeatable_and_equals_generate_py_with_that_seed(
    base, base_checkpoint, capsys, monkeypatch
):
    settings = dict(model="base", prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.95, seed=7)
    client = base.client()
    first = client.completions.create(**settings).choices[0].text
    assert client.completions.create(**settings).choices[0].text == first
    flags = ["--prompt", PROMPT, "--temperature", 0.9, "--top-p", 0.95, "--seed", 7, "--max-new-tokens", 10]
    assert PROMPT + first + "\n" == generate_py(capsys, monkeypatch, base_checkpoint, *flags)
    two = client.completions.create(**{**settings, "n": 2}).choices
    assert [c.index for c in two] == [0, 1] and two[0].text == first and two[1].text != first


def test_several_prompts_and_token_id_prompts(base, library):
    model, tokenizer = library
    ids = tokenizer.encode(PROMPT, bos=True)
    response = base.client().completions.create(
        model="base", prompt=[ids, ids[:4]], max_tokens=6, temperature=0
    )
    expected = generate(model, [ids, ids[:4]], 6, temperature=0, eos_id=tokenizer.eos_ids)
    assert [c.text for c in response.choices] == [
        decode_continuation(tokenizer, p, e) for p, e in zip([ids, ids[:4]], expected, strict=True)
    ]


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(base, library):
    """What lm-evaluation-harness's local-completions sends: token ids, echo, logprobs, max_tokens 1."""
    model, tokenizer = library
    ids = tokenizer.encode(PROMPT, bos=True)
    response = base.client().completions.create(
        model="base", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1
    )
    logprobs = response.choices[0].logprobs
    with torch.no_grad():
        reference = model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V)
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == len(ids) + 1
    for position, token in enumerate(ids[1:]):
        assert logprobs.token_logprobs[position + 1] == pytest.approx(
            float(reference[position, token]), abs=1e-4
        )
    greedy = int(reference[-1].argmax())
    assert logprobs.token_logprobs[-1] == pytest.approx(float(reference[-1, greedy]), abs=1e-4)
    assert max(logprobs.top_logprobs[-1].values()) == pytest.approx(logprobs.token_logprobs[-1], abs=1e-6)
    assert response.choices[0].text.startswith(tokenizer.decode(ids))


def test_echo_puts_the_prompt_first_streamed_or_not(base):
    client = base.client()
    settings = dict(model="base", prompt=PROMPT, max_tokens=5, temperature=0)
    plain = client.completions.create(**settings).choices[0].text
    assert client.completions.create(**settings, echo=True).choices[0].text == PROMPT + plain
    chunks = client.completions.create(**settings, echo=True, stream=True)
    assert "".join(chunk.choices[0].text for chunk in chunks) == PROMPT + plain
    unbounded = client.completions.create(**{**settings, "max_tokens": None})  # as far as the context goes
    assert unbounded.choices[0].text.startswith(plain)


def test_stop_strings_cut_the_text_before_them(base):
    client = base.client()
    text = (
        client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    )
    stop = text[3:5]
    cut = client.completions.create(
        model="base", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "zzz"]
    )
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="base", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text[: text.index(stop)]


def test_a_greedy_chat_reply_equals_generate_py_chat(chat, chat_checkpoint, capsys, monkeypatch):
    out = generate_py(
        capsys,
        monkeypatch,
        chat_checkpoint,
        "--chat",
        "--temperature",
        0,
        "--max-new-tokens",
        12,
        stdin=QUESTION + "\n",
    )
    response = chat.client().chat.completions.create(
        model="chat", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=0
    )
    assert response.choices[0].message.content + "\n" == out
    assert response.choices[0].message.role == "assistant"


def test_the_chat_reply_is_the_templates_prompt_continued_until_end_of_turn(chat, chat_checkpoint):

    tokenizer, model = Tokenizer(chat_checkpoint), load_model(chat_checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    prompt = encode_chat(tokenizer, messages, add_generation_prompt=True).ids
    new = generate(model, [prompt], 20, temperature=0, eos_id=chat_stop_ids(tokenizer))[0]
    response = chat.client().chat.completions.create(
        model="chat", messages=messages, max_completion_tokens=20, temperature=0
    )
    assert response.choices[0].message.content == decode_continuation(tokenizer, prompt, new).lstrip()
    assert response.usage.prompt_tokens == len(prompt) and response.usage.completion_tokens == len(new)
    assert response.choices[0].finish_reason == ("length" if len(new) == 20 else "stop")


def test_a_streamed_chat_is_server_sent_events_ending_with_done_and_usage(chat):
    body = {
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logprobs": True,
        "top_logprobs": 3,
    }
    status, headers, payload = chat.request("POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = payload.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-2])
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 8
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    whole = chat.client().chat.completions.create(
        model="chat", messages=body["messages"], max_tokens=8, temperature=0
    )
    assert text == whole.choices[0].message.content
    scored = [c["choices"][0]["logprobs"]["content"][0] for c in chunks[:-1] if c["choices"][0]["logprobs"]]
    assert len(scored) == chunks[-1]["usage"]["completion_tokens"]
    for entry in scored:
        assert (
            len(entry["top_logprobs"]) == 3 and entry["logprob"] <= entry["top_logprobs"][0]["logprob"] + 1e-6
        )
        assert entry["logprob"] <= 0


def test_eight_clients_at_once_each_get_their_own_greedy_answer(base, library):
    model, tokenizer = library
    prompts = [PROMPT, "the quick brown fox", "lily", "the lazy dog", "once", "a", "the fox jumps", "girl"]
    answers = [None] * len(prompts)

    def ask(index):
        client = base.client()
        answers[index] = (
            client.completions.create(model="base", prompt=prompts[index], max_tokens=10, temperature=0)
            .choices[0]
            .text
        )

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    expected = generate(model, ids, 10, temperature=0, eos_id=tokenizer.eos_ids)
    assert answers == [decode_continuation(tokenizer, p, e) for p, e in zip(ids, expected, strict=True)]
    base.wait_idle()


def test_a_client_that_goes_away_is_cancelled_and_frees_its_slot(base, monkeypatch):
    scheduler = base.app.state.scheduler
    step = scheduler.step
    # 20 ms a step: a 48-token answer takes about a second, so a cancelled one stops far short of it.
    monkeypatch.setattr(scheduler, "step", lambda: time.sleep(0.02) or step())
    first = scheduler.steps
    connection = http.client.HTTPConnection("127.0.0.1", base.port, timeout=30)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 48, "temperature": 0, "stream": True})
    connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    base.wait_idle()
    assert scheduler.steps - first < 30
    # a plain (non-streamed) request whose client leaves is cancelled too (it polls for the client)
    first = scheduler.steps
    raw = socket.create_connection(("127.0.0.1", base.port))
    body = json.dumps({"prompt": PROMPT, "max_tokens": 48, "temperature": 0}).encode()
    raw.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    time.sleep(0.1)
    raw.close()
    base.wait_idle()
    assert scheduler.steps - first < 35


# ---------------------------------------------------------------------------------------------------------
# Bad input, limits, keys
# ---------------------------------------------------------------------------------------------------------


def error_of(server, body, path="/v1/completions", headers=None):
    status, _, payload = server.request("POST", path, body, headers)
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return status, error


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        (b"{not json", None, "not valid JSON"),
        ([1, 2], None, "must be a JSON object"),
        ({"prompt": "x", "max_tokens": "10"}, "max_tokens", "valid integer"),
        ({"prompt": "x", "temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"prompt": "x", "top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "x", "logprobs": 9}, "logprobs", "less than or equal to 5"),
        ({"prompt": "x", "stream": "yes"}, "stream", "valid boolean"),
        ({"prompt": 5}, "prompt", "prompt must be a string"),
        ({"prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
        ({"prompt": "x", "logit_bias": {"5": 1}}, "logit_bias", "not supported"),
        ({"prompt": "x", "mirostat": 2}, "mirostat", "unknown parameter 'mirostat'"),
        ({"prompt": "x", "max_tokens": 80}, "max_tokens", "do not fit the model's context of 64"),
        ({"prompt": "fox " * 70}, "prompt", "the model's context is 64 tokens"),
    ],
)
def test_bad_completion_requests_get_400_in_openais_error_shape(base, body, param, words):
    status, error = error_of(base, body)
    assert status == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"messages": []}, "messages", "at least 1 item"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages", "role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages", "content"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
            "tools",
            "not supported",
        ),
        (
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
            "needs logprobs",
        ),
        (
            {"messages": [{"role": "user", "content": "sea " * 80}]},
            "messages",
            "the model's context is 64 tokens",
        ),
    ],
)
def test_bad_chat_requests_get_400(chat, body, param, words):
    status, error = error_of(chat, body, "/v1/chat/completions")
    assert status == 400 and error["param"] == param and words in error["message"]


def test_the_openai_client_raises_bad_request_for_a_too_long_prompt(base):
    with pytest.raises(openai.BadRequestError, match="context"):
        base.client().completions.create(model="base", prompt="fox " * 70, max_tokens=5)


def test_a_body_over_the_limit_gets_413(base):
    status, error = error_of(base, {"prompt": "x" * 30_000})
    assert status == 413 and "larger than 20000 bytes" in error["message"]


def test_unknown_routes_get_404_and_no_request_reads_a_file(base):
    for path in ("/v1/nothing", "/static/..%2F..%2Fapi.py", "/static/index.html", "/static/%2Fetc%2Fpasswd"):
        status, _, payload = base.request("GET", path)
        assert status == 404 and "error" in json.loads(payload)
    status, headers, payload = base.request("GET", "/static/chat.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")


def test_an_api_key_is_required_when_the_server_has_one(base_checkpoint):
    with serving(base_checkpoint, api_key="s3cret") as server:
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
        status, headers, _ = server.request("GET", "/v1/models")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert [m.id for m in server.client(api_key="s3cret").models.list()] == ["base"]
        assert server.request("GET", "/health")[0] == 200 and server.request("GET", "/")[0] == 200


def test_a_full_queue_answers_429_with_retry_after(base_checkpoint):
    with serving(base_checkpoint, max_batch_size=1, max_queue=1) as server:
        scheduler = server.app.state.scheduler
        gate, step = threading.Event(), scheduler.step
        scheduler.step = lambda: gate.wait(30) and step()  # hold the scheduler: requests stay queued
        waiting = threading.Thread(
            target=server.request, args=("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
        )
        waiting.start()
        deadline = time.monotonic() + 10
        while server.health()["waiting"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, headers, payload = server.request(
            "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 5}
        )
        assert status == 429 and headers["retry-after"] == "1"
        assert json.loads(payload)["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            server.client().completions.create(model="base", prompt=PROMPT, max_tokens=5)
        gate.set()
        waiting.join(30)
        server.wait_idle()


def test_the_serve_command_refuses_bad_flags_in_one_line(capsys, tmp_path):
    from llama_mini.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port must be in 0..65535" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-batch", "2"]) == 2  # a flag's prefix is not the flag
    assert "unrecognized arguments: --max-batch" in capsys.readouterr().err
