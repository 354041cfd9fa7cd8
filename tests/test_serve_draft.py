"""`llama-mini serve --draft`: speculative decoding in the server. The scheduler's rounds against
llama_mini.generation's plain greedy decoding (end ids and max_tokens inside a round, sequences that join
and leave), then the HTTP API through the official openai client against the same server without a draft:
the same text, stream, stop strings, usage and log-probabilities; and a draft with another tokenizer is
refused in one line before the server starts."""

import json
import random
import threading

import pytest
import torch
from test_generation import tiny_model

from llama_mini.checkpoint import save_pretrained
from llama_mini.generation import SamplingConfig, generate
from llama_mini.ops.quantize import Int8Linear, QuantizeSettings
from llama_mini.serve.scheduler import Finished, NewToken, Scheduler, SequenceRequest
from llama_mini.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from test_serve_api import QUESTION, ServerThread, chat_checkpoint  # noqa: E402, F401

from llama_mini.serve.command import ServeConfig, build_app  # noqa: E402

PROMPTS = [[1, 17, 42, 99, 5, 8, 61, 200, 3], [1, 250], [1, 7, 7, 7, 7, 120]]
TEXTS = ["once upon a time", "the quick brown fox"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: the models are tiny, and on a shared machine threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------
# The scheduler's rounds
# ---------------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.tokens, self.logprobs, self.finished = [], [], None

    def __call__(self, event):
        if isinstance(event, NewToken):
            assert self.finished is None
            self.tokens.append(event.token_id)
            self.logprobs.append(event.logprobs)
        elif isinstance(event, Finished):
            assert self.finished is None
            self.finished = event


def run(scheduler: Scheduler, requests: list[SequenceRequest], steps_between: int = 0) -> list[Recorder]:
    """Submit the requests `steps_between` scheduler steps apart and step until every one has finished."""
    recorders = []
    for request in requests:
        recorders.append(Recorder())
        scheduler.submit(request, recorders[-1])
        for _ in range(steps_between):
            scheduler.step()
    for _ in range(500):
        if all(recorder.finished is not None for recorder in recorders):
            return recorders
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("draft_seed", [None, 5], ids=["the-model-itself", "another-model"])
def test_greedy_rounds_give_plain_greedy_tokens(model, draft_seed):
    """The model as its own draft (every proposal accepted: K + 1 tokens a round, max_tokens reached inside
    a round) and another random model (rejections roll both caches back) give generate's greedy tokens."""
    draft = model if draft_seed is None else tiny_model(draft_seed, n_layers=1)
    scheduler = Scheduler(model, max_batch_size=4, draft=draft, draft_tokens=3)
    for prompt in PROMPTS:
        request = SequenceRequest(tuple(prompt), 11, top_logprobs=2)
        (recorder,) = run(scheduler, [request])
        assert recorder.tokens == generate(model, [prompt], 11, temperature=0)[0]
        assert recorder.finished.reason == "length"
    # 11 tokens: the first from the prefill, then rounds of up to 4
    if draft_seed is None:
        assert scheduler.accepted == scheduler.drafted > 0 and scheduler.rounds == 3 * len(PROMPTS)
    else:
        assert scheduler.accepted < scheduler.drafted and scheduler.rounds >= 10 * len(PROMPTS) // 4


@pytest.mark.numerics
def test_log_probabilities_of_a_round_equal_the_plain_steps(model):
    request = SequenceRequest(tuple(PROMPTS[0]), 9, top_logprobs=3)
    (plain,) = run(Scheduler(model), [request])
    speculative = Scheduler(model, draft=model, draft_tokens=4)
    (drafted,) = run(speculative, [request])
    assert speculative.rounds == 2 and drafted.tokens == plain.tokens
    for mine, reference in zip(drafted.logprobs, plain.logprobs, strict=True):
        assert mine.logprob == pytest.approx(reference.logprob, abs=1e-4)
        assert [i for i, _ in mine.top] == [i for i, _ in reference.top]
        assert [lp for _, lp in mine.top] == pytest.approx([lp for _, lp in reference.top], abs=1e-4)


def test_an_end_id_inside_a_round_stops_the_sequence_there(model):
    greedy = generate(model, [PROMPTS[2]], 12, temperature=0)[0]
    end = greedy[6]  # the seventh token: inside the second round of K = 4
    first = greedy.index(end)
    sampling = SamplingConfig(temperature=0.0, eos_id=end)
    scheduler = Scheduler(model, draft=model, draft_tokens=4)
    (recorder,) = run(scheduler, [SequenceRequest(tuple(PROMPTS[2]), 12, sampling)])
    assert recorder.tokens == greedy[:first] and recorder.finished.reason == "stop"
    assert scheduler.rounds >= 1


def test_sequences_decode_together_and_speculate_when_alone(model):
    """Three sequences of different lengths: batched steps while several run, rounds once one is left,
    whose draft catches up on the text it missed; each gets generate's greedy tokens."""
    draft = tiny_model(5, n_layers=1)
    scheduler = Scheduler(model, max_batch_size=4, draft=draft, draft_tokens=2)
    lengths = [4, 20, 8]
    requests = [SequenceRequest(tuple(p), n) for p, n in zip(PROMPTS, lengths, strict=True)]
    recorders = run(scheduler, requests, steps_between=1)
    for prompt, length, recorder in zip(PROMPTS, lengths, recorders, strict=True):
        assert recorder.tokens == generate(model, [prompt], length, temperature=0)[0]
    assert 0 < scheduler.rounds < scheduler.steps  # some steps batched, some speculative


def test_a_seeded_sample_draws_as_without_a_draft(model):
    """A seeded sample never speculates: the same draws as a server without a draft, whatever runs."""
    sampling = SamplingConfig(temperature=0.9, top_p=0.95, seed=11)
    request = SequenceRequest(tuple(PROMPTS[0]), 10, sampling)
    (plain,) = run(Scheduler(model), [request])
    speculative = Scheduler(model, draft=model)
    (drafted,) = run(speculative, [request])
    assert drafted.tokens == plain.tokens and speculative.rounds == 0
    unseeded = run(speculative, [SequenceRequest(tuple(PROMPTS[0]), 10, sampling.replace(seed=None))])
    assert len(unseeded[0].tokens) == 10 and speculative.rounds > 0


def test_past_the_drafts_context_the_sequence_goes_on_without_it(model):
    draft = tiny_model(5, n_layers=1, max_seq_len=16)
    scheduler = Scheduler(model, draft=draft, draft_tokens=3)
    (recorder,) = run(scheduler, [SequenceRequest(tuple(PROMPTS[0]), 30)])
    assert recorder.tokens == generate(model, [PROMPTS[0]], 30, temperature=0)[0]
    assert 0 < scheduler.rounds < scheduler.steps


# ---------------------------------------------------------------------------------------------------------
# The server, through the openai client
# ---------------------------------------------------------------------------------------------------------


def save_model(folder, tokenizer_path, seed: int = 0, **overrides):
    overrides.setdefault("vocab_size", Tokenizer(tokenizer_path).vocab_size)
    model = tiny_model(seed, **overrides)
    save_pretrained(model, folder, tokenizer_path=tokenizer_path)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, sentencepiece_model):
    """The model, a one-layer draft with its tokenizer, a draft with another tokenizer of the same size, and
    one with a larger vocabulary."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("serve_draft")
    rng = random.Random(0)
    words = ["THE", "KING", "QUEEN", "AND", "OF", "MY", "LORD", "THEE", "ONCE", "UPON", "A", "TIME"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]),
        model_prefix=str(folder / "other"),
        vocab_size=64,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return {
        "model": save_model(folder / "model", sentencepiece_model),
        "draft": save_model(folder / "draft", sentencepiece_model, seed=3, n_layers=1),
        "other": save_model(folder / "other_draft", folder / "other.model", seed=3, n_layers=1),
        "wide": save_model(folder / "wide", sentencepiece_model, seed=3, n_layers=1, vocab_size=72),
    }


@pytest.fixture(scope="module")
def servers(checkpoints):
    """The model served without a draft, with itself as its draft (long rounds) and with the one-layer
    draft (rejections)."""
    started = {}
    drafts = {"plain": None, "itself": checkpoints["model"], "draft": checkpoints["draft"]}
    try:
        for name, draft in drafts.items():
            config = ServeConfig(
                max_batch_size=4, draft=None if draft is None else str(draft), draft_tokens=3
            )
            started[name] = ServerThread(build_app(checkpoints["model"], config)[0])
        yield started
    finally:
        for server in started.values():
            server.stop()


def complete(server, **settings):
    return server.client().completions.create(model="model", temperature=0, **settings)


@pytest.mark.parametrize("name", ["itself", "draft"])
def test_greedy_completions_equal_the_server_without_a_draft(servers, name):
    plain, drafted = servers["plain"], servers[name]
    before = drafted.health()["draft"]
    for prompt in TEXTS:
        for max_tokens in (7, 20):
            settings = dict(prompt=prompt, max_tokens=max_tokens)
            reference = complete(plain, **settings)
            answer = complete(drafted, **settings)
            assert answer.choices[0].text == reference.choices[0].text
            assert answer.choices[0].finish_reason == reference.choices[0].finish_reason
            assert answer.usage == reference.usage
            chunks = list(complete(drafted, **settings, stream=True, stream_options={"include_usage": True}))
            assert "".join(c.choices[0].text for c in chunks[:-1]) == reference.choices[0].text
            assert chunks[-2].choices[0].finish_reason == reference.choices[0].finish_reason
            assert chunks[-1].usage == reference.usage
    after = drafted.health()["draft"]
    assert after["rounds"] > before["rounds"]
    if name == "itself":  # every proposal accepted: several tokens arrive in one round, and stream
        assert after["accepted"] - before["accepted"] == after["drafted"] - before["drafted"] > 0
    else:
        assert after["accepted"] - before["accepted"] < after["drafted"] - before["drafted"]
    assert "draft" not in plain.health()


def test_stop_strings_cut_a_round_where_they_begin(servers):
    plain, drafted = servers["plain"], servers["itself"]
    text = complete(plain, prompt=TEXTS[0], max_tokens=16).choices[0].text
    stop = text[5:7]
    reference = complete(plain, prompt=TEXTS[0], max_tokens=16, stop=[stop])
    assert reference.choices[0].text == text[: text.index(stop)]
    answer = complete(drafted, prompt=TEXTS[0], max_tokens=16, stop=[stop])
    assert answer.choices[0] == reference.choices[0] and answer.usage == reference.usage
    streamed = complete(drafted, prompt=TEXTS[0], max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reference.choices[0].text


@pytest.mark.numerics
def test_streamed_log_probabilities_equal_the_server_without_a_draft(servers):
    body = {"prompt": TEXTS[1], "max_tokens": 9, "temperature": 0, "logprobs": 2, "stream": True}
    streams = []
    for name in ("plain", "itself"):
        status, _, payload = servers[name].request("POST", "/v1/completions", body)
        assert status == 200
        events = payload.decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        streams.append([json.loads(event.removeprefix("data: ")) for event in events[:-2]])
    plain, drafted = ([c["choices"][0] for c in chunks] for chunks in streams)
    assert [c["text"] for c in drafted] == [c["text"] for c in plain]
    scores = [[c["logprobs"] for c in chunks if c["logprobs"]] for chunks in (plain, drafted)]
    assert len(scores[0]) == len(scores[1]) == 9
    for mine, reference in zip(scores[1], scores[0], strict=True):
        assert mine["tokens"] == reference["tokens"] and mine["text_offset"] == reference["text_offset"]
        assert mine["token_logprobs"] == pytest.approx(reference["token_logprobs"], abs=1e-4)


def test_clients_at_once_each_get_the_greedy_answer_of_the_server_without_a_draft(servers):
    """Three requests together decode as a batch; the longest finishes alone, speculatively."""
    requests = [(TEXTS[0], 4), (TEXTS[1], 24), ("lily", 10)]
    expected = [complete(servers["plain"], prompt=p, max_tokens=n).choices[0].text for p, n in requests]
    drafted = servers["draft"]
    answers = [None] * len(requests)

    def ask(index):
        prompt, max_tokens = requests[index]
        answers[index] = complete(drafted, prompt=prompt, max_tokens=max_tokens).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert answers == expected
    drafted.wait_idle()


def test_a_greedy_chat_equals_the_server_without_a_draft(chat_checkpoint):  # noqa: F811
    messages = [{"role": "user", "content": QUESTION}]
    answers = []
    for draft in (None, str(chat_checkpoint)):
        server = ServerThread(build_app(chat_checkpoint, ServeConfig(draft=draft, draft_tokens=3))[0])
        try:
            client = server.client()
            whole = client.chat.completions.create(
                model="chat", messages=messages, max_tokens=14, temperature=0
            )
            chunks = list(
                client.chat.completions.create(
                    model="chat",
                    messages=messages,
                    max_tokens=14,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
            answers.append((whole.choices[0].message.content, whole.usage, streamed, chunks[-1].usage))
            assert streamed == whole.choices[0].message.content and chunks[-1].usage == whole.usage
            if draft is not None:
                assert server.health()["draft"]["rounds"] > 0
        finally:
            server.stop()
    assert answers[1] == answers[0]


def test_quantize_converts_the_model_and_not_the_draft(checkpoints):
    """As generate --draft: --quantize int8 serves the int8 model, the draft in its own dtype, and greedy
    answers are the int8 model's."""
    texts = []
    for draft in (None, str(checkpoints["draft"])):
        app, _ = build_app(
            checkpoints["model"],
            ServeConfig(draft=draft),
            quantization=QuantizeSettings("int8"),
        )
        scheduler = app.state.scheduler
        assert isinstance(scheduler.model.layers[0].attention.wq, Int8Linear)
        if draft is not None:
            assert not any(isinstance(m, Int8Linear) for m in scheduler.draft.modules())
        server = ServerThread(app)
        try:
            texts.append(complete(server, prompt=TEXTS[0], max_tokens=16).choices[0].text)
        finally:
            server.stop()
    assert texts[1] == texts[0]


@pytest.mark.parametrize(
    ("draft", "message"),
    [
        ("other", "has another tokenizer than the model's"),
        ("wide", "vocabulary has 72 tokens but the model's 64"),
    ],
)
def test_a_draft_with_another_tokenizer_is_refused_in_one_line(checkpoints, capsys, draft, message):
    from llama_mini.cli import main

    code = main(["serve", str(checkpoints["model"]), "--draft", str(checkpoints[draft]), "--port", "0"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and message in captured.err and "serving" not in captured.err
    assert captured.err.startswith("error: --draft ")


def test_draft_tokens_below_one_is_refused(checkpoints, capsys):
    from llama_mini.cli import main

    code = main(
        ["serve", str(checkpoints["model"]), "--draft", str(checkpoints["draft"]), "--draft-tokens", "0"]
    )
    assert code == 2 and "--draft-tokens must be >= 1, got 0" in capsys.readouterr().err
