"""The serving scheduler: a batched decode step over rows at different positions (SlotKVCache) against each
sequence decoded alone, and continuous batching (joining, leaving, cancelling, chunked prefill) against
llama_mini.generation's own greedy and seeded decoding."""

import time

import pytest
import torch
from test_generation import tiny_model

from llama_mini.generation import SamplingConfig, generate, next_token_logits
from llama_mini.model.cache import KVCache, SlotKVCache
from llama_mini.serve.scheduler import (
    Finished,
    NewToken,
    PromptScored,
    QueueFull,
    Scheduler,
    SequenceRequest,
)

PROMPTS = [[1, 17, 42, 99, 5, 8, 61, 200, 3], [1, 250], [1, 7, 7, 7, 7, 120], [1, 33, 12]]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


class Recorder:
    """Collects one sequence's events."""

    def __init__(self):
        self.tokens, self.finished, self.prompt = [], None, None

    def __call__(self, event):
        if isinstance(event, NewToken):
            self.tokens.append(event.token_id)
        elif isinstance(event, PromptScored):
            self.prompt = event.logprobs
        else:
            assert isinstance(event, Finished) and self.finished is None
            self.finished = event


def run_until_done(scheduler: Scheduler, recorders: list[Recorder], limit: int = 500) -> None:
    for _ in range(limit):
        if all(r.finished is not None for r in recorders):
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


@torch.no_grad()
def test_a_batched_step_over_rows_at_different_positions_equals_each_row_alone(model):
    """Rows prefilled to different lengths, then one decode step for all: each row's logits equal a decode
    step of that sequence alone in a plain KVCache, within float32 rounding of the batched products."""
    args = model.args
    shape = (args.n_kv_heads, args.head_dim, torch.float32)
    slots = [SlotKVCache(len(PROMPTS), args.max_seq_len, *shape) for _ in model.layers]
    alone_logits, next_ids = [], []
    for row, prompt in enumerate(PROMPTS):
        caches = [KVCache(1, args.max_seq_len, *shape) for _ in model.layers]
        for layer, cache in zip(model.layers, caches, strict=True):
            layer.attention.cache = cache
        first = next_token_logits(model, torch.tensor([prompt]), 0).argmax(-1)  # (1,)
        next_ids.append(int(first))
        alone_logits.append(next_token_logits(model, first[:, None], len(prompt))[0])  # decode alone
        for slot, cache in zip(slots, caches, strict=True):
            slot.copy_row_from(row, cache, len(prompt))
    for layer, slot in zip(model.layers, slots, strict=True):
        layer.attention.cache = slot
    tokens = torch.tensor(next_ids)[:, None]
    positions = torch.tensor([[len(p)] for p in PROMPTS])
    batched = next_token_logits(model, tokens, positions)  # (B, V)
    model.clear_cache()
    reference = torch.stack(alone_logits)
    scale = reference.abs().max()
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5 * scale)
    assert batched.argmax(-1).tolist() == reference.argmax(-1).tolist()


def test_greedy_sequences_joining_at_different_steps_equal_generate(model):
    """Prompts arrive while others decode, prompts are prefilled in chunks of 3: each sequence's tokens
    equal llama_mini.generation's greedy decoding of it alone."""
    scheduler = Scheduler(model, max_batch_size=3, prefill_chunk=3)
    recorders = [Recorder() for _ in PROMPTS]
    scheduler.submit(SequenceRequest(tuple(PROMPTS[0]), 20), recorders[0])
    for _ in range(5):
        scheduler.step()
    for prompt, recorder in zip(PROMPTS[1:], recorders[1:], strict=True):
        scheduler.submit(SequenceRequest(tuple(prompt), 20), recorder)  # one waits: 3 slots for 4
        scheduler.step()
    run_until_done(scheduler, recorders)
    expected = generate(model, PROMPTS, 20, temperature=0)
    assert [r.tokens for r in recorders] == expected
    assert all(r.finished.reason == "length" for r in recorders)
    assert scheduler.active == 0


def test_a_seeded_sample_equals_generate_with_that_seed_whatever_runs_beside_it(model):
    sampling = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    alone = generate(model, [PROMPTS[0]], 15, sampling.replace(seed=[1234]))[0]
    scheduler = Scheduler(model, max_batch_size=4)
    recorders = [Recorder() for _ in range(3)]
    scheduler.submit(
        SequenceRequest(tuple(PROMPTS[1]), 15, SamplingConfig(temperature=1.0, seed=5)), recorders[1]
    )
    scheduler.submit(SequenceRequest(tuple(PROMPTS[0]), 15, sampling), recorders[0])
    scheduler.submit(SequenceRequest(tuple(PROMPTS[2]), 15), recorders[2])
    run_until_done(scheduler, recorders)
    assert recorders[0].tokens == alone
    other = Recorder()
    scheduler.submit(SequenceRequest(tuple(PROMPTS[0]), 15, sampling.replace(seed=99)), other)
    run_until_done(scheduler, [other])
    assert other.tokens != alone


def test_an_eos_id_ends_the_sequence_and_is_not_emitted(model):
    greedy = generate(model, [PROMPTS[0]], 10, temperature=0)[0]
    eos = greedy[4]
    scheduler = Scheduler(model)
    recorder = Recorder()
    scheduler.submit(
        SequenceRequest(tuple(PROMPTS[0]), 10, SamplingConfig(temperature=0, eos_id=eos)), recorder
    )
    run_until_done(scheduler, [recorder])
    assert recorder.tokens == greedy[: greedy.index(eos)] and recorder.finished.reason == "stop"


def test_cancelling_frees_the_slot_and_the_other_rows_go_on_unchanged(model):
    scheduler = Scheduler(model, max_batch_size=4)
    recorders = [Recorder() for _ in PROMPTS]
    sequences = [
        scheduler.submit(SequenceRequest(tuple(p), 20), r) for p, r in zip(PROMPTS, recorders, strict=True)
    ]
    while scheduler.active < 4 or scheduler.waiting:
        scheduler.step()
    for _ in range(3):
        scheduler.step()
    sequences[1].cancel()  # a middle row: the last row moves into its place
    scheduler.step()
    assert scheduler.active == 3 and recorders[1].finished.reason == "cancelled"
    run_until_done(scheduler, recorders)
    expected = generate(model, PROMPTS, 20, temperature=0)
    for index in (0, 2, 3):
        assert recorders[index].tokens == expected[index]
    assert recorders[1].tokens == expected[1][: len(recorders[1].tokens)]
    assert scheduler.active == 0


def test_prompt_log_probabilities_equal_the_full_forward_pass(model):
    scheduler = Scheduler(model, prefill_chunk=4)  # three chunks for nine tokens
    recorder = Recorder()
    scheduler.submit(SequenceRequest(tuple(PROMPTS[0]), 0, top_logprobs=2, prompt_logprobs=True), recorder)
    run_until_done(scheduler, [recorder])
    with torch.no_grad():
        logprobs = model(torch.tensor([PROMPTS[0]]))[0].log_softmax(-1)  # (T, V), no cache
    assert recorder.prompt[0] is None and len(recorder.prompt) == len(PROMPTS[0])
    for position, scored in enumerate(recorder.prompt[1:]):
        expected = logprobs[position, PROMPTS[0][position + 1]]
        assert scored.logprob == pytest.approx(float(expected), abs=1e-5)
        top = logprobs[position].topk(2)
        assert [i for i, _ in scored.top] == top.indices.tolist()
    assert recorder.tokens == [] and recorder.finished.reason == "length"


def test_a_full_queue_refuses_new_sequences(model):
    scheduler = Scheduler(model, max_batch_size=1, max_queue=2)
    scheduler.submit_many([SequenceRequest((1, 2), 5)] * 2, [Recorder(), Recorder()])
    with pytest.raises(QueueFull, match="at most 2 may wait"):
        scheduler.submit(SequenceRequest((1, 2), 5), Recorder())


def test_the_thread_serves_submissions_and_stop_cancels_what_is_left(model):
    scheduler = Scheduler(model, max_batch_size=2)
    scheduler.start()
    done = Recorder()
    scheduler.submit(SequenceRequest(tuple(PROMPTS[1]), 8), done)
    deadline = time.monotonic() + 30
    while done.finished is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done.tokens == generate(model, [PROMPTS[1]], 8, temperature=0)[0]
    long = Recorder()
    scheduler.submit(SequenceRequest(tuple(PROMPTS[0]), 50), long)
    scheduler.stop()
    assert long.finished is not None and long.finished.reason in ("cancelled", "length")


@pytest.mark.slow
def test_a_compiled_decode_step_gives_the_same_tokens(model, monkeypatch):
    """`serve --compile`'s step: next_token_logits through torch.compile (traced by dynamo here and run
    eagerly, so no C++ compiler runs) decodes what the eager step decodes."""
    import torch._dynamo

    from llama_mini.serve.command import compiled_decode_step

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: real_compile(function, backend="eager"))
    torch._dynamo.reset()
    scheduler = Scheduler(model, max_batch_size=3, decode_step=compiled_decode_step())
    recorders = [Recorder() for _ in PROMPTS[:3]]
    for prompt, recorder in zip(PROMPTS[:3], recorders, strict=True):
        scheduler.submit(SequenceRequest(tuple(prompt), 12), recorder)
    run_until_done(scheduler, recorders)
    torch._dynamo.reset()
    assert [r.tokens for r in recorders] == generate(model, PROMPTS[:3], 12, temperature=0)


def test_each_step_feeds_at_most_prefill_chunk_prompt_tokens_across_prompts(model):
    """A 9-token prompt with chunks of 4 takes three steps (4 + 4 + 1), and the step that feeds its last
    token starts a 2-token prompt with the budget left; short prompts start together."""
    scheduler = Scheduler(model, max_batch_size=4, prefill_chunk=4)
    long, short, tiny = Recorder(), Recorder(), Recorder()
    scheduler.submit(SequenceRequest(tuple(PROMPTS[0]), 5), long)
    scheduler.submit(SequenceRequest(tuple(PROMPTS[1]), 5), short)
    fed = []
    for _ in range(3):
        scheduler.step()
        fed.append((len(long.tokens), len(short.tokens)))
    # Both start in the third step: a first token from the prompt, a second from that step's decode.
    assert fed == [(0, 0), (0, 0), (2, 2)]
    scheduler.submit_many([SequenceRequest((1, 5), 3)] * 2, [tiny, Recorder()])
    scheduler.step()
    assert len(tiny.tokens) == 2 and scheduler.active == 4  # both short prompts started in one step


@pytest.mark.slow
def test_decode_steps_compiled_ahead_of_time_give_the_same_tokens(model, tmp_path):
    """`serve --compile` on a CPU: steps for 1 and 2 rows built by AOTInductor over a StaticSlotKVCache.
    Three sequences through two slots (so both steps run) decode what generate decodes."""
    from llama_mini.ops import aot_step

    if not aot_step.aot_compile_available():
        pytest.skip("ahead-of-time compilation needs torch >= 2.8 and a C++ compiler")
    scheduler = Scheduler(model, max_batch_size=2, compiled_in=str(tmp_path))
    assert scheduler._compiled.sizes == [1, 2] and len(list(tmp_path.glob("*.pt2"))) == 2
    recorders = [Recorder() for _ in PROMPTS[:3]]
    for prompt, recorder in zip(PROMPTS[:3], recorders, strict=True):
        scheduler.submit(SequenceRequest(tuple(prompt), 12), recorder)
    run_until_done(scheduler, recorders)
    scheduler.stop()
    assert [r.tokens for r in recorders] == generate(model, PROMPTS[:3], 12, temperature=0)
    # serve's default (saved_only) finds them all saved now: it loads them, and builds nothing.
    loaded = Scheduler(model, max_batch_size=2, compiled_in=str(tmp_path), saved_only=True)
    assert loaded._compiled is not None and len(list(tmp_path.glob("*.pt2"))) == 2
    loaded.stop()


def test_by_default_a_server_without_saved_steps_decodes_eagerly_while_they_build(
    model, tmp_path, monkeypatch
):
    """serve's default on a CPU (saved_only): no step saved, so eager steps over eager slot caches at once,
    and a background build asked for each batch size (a stand-in here); the tokens are generate's."""
    from llama_mini.ops import aot_step
    from llama_mini.serve import scheduler as scheduler_module

    if not aot_step.aot_compile_available():
        pytest.skip("ahead-of-time compilation needs torch >= 2.8")
    asked = []
    monkeypatch.setattr(scheduler_module, "start_build", lambda step, m, inputs, folder: asked.append(inputs))
    scheduler = Scheduler(model, max_batch_size=2, compiled_in=str(tmp_path), saved_only=True)
    assert scheduler._compiled is None and [inputs[0].shape[0] for inputs in asked] == [1, 2]
    assert all(type(slot) is SlotKVCache for slot in scheduler._slots)
    recorders = [Recorder() for _ in PROMPTS[:3]]
    for prompt, recorder in zip(PROMPTS[:3], recorders, strict=True):
        scheduler.submit(SequenceRequest(tuple(prompt), 12), recorder)
    run_until_done(scheduler, recorders)
    assert [r.tokens for r in recorders] == generate(model, PROMPTS[:3], 12, temperature=0)
