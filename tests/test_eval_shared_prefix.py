"""The harness model class scores requests that share a context (a multiple-choice question's choices) by
running that context once and each continuation from its KV cache: the log-likelihoods and greedy flags
equal a recomputation of every request whole, without a cache, and the shared context really runs once.
(tests/test_eval_harness.py compares whole tasks with the harness's hf backend.)"""

from __future__ import annotations

import random

import pytest
import torch

from tests.test_checkpoint import our_model

pytest.importorskip("lm_eval")

from llama_mini.eval.harness import LlamaMiniLM  # noqa: E402
from llama_mini.tokenizer import Tokenizer  # noqa: E402

CONTEXT = 32  # the model's max_seq_len: some requests below are longer and are cut from the left


@pytest.fixture(scope="module")
def model():
    return our_model(seed=3, max_seq_len=CONTEXT, vocab_size=64)  # 4 query heads on 2 kv heads


def harness(model, sentencepiece_model, batch_size: int) -> LlamaMiniLM:
    return LlamaMiniLM(model=model, tokenizer=Tokenizer(sentencepiece_model), batch_size=batch_size)


def questions(count: int, seed: int = 0) -> list[tuple[None, list[int], list[int]]]:
    """Requests as the harness makes them for multiple choice: 4 continuations of 1-6 tokens after each
    context of 1-40 tokens (a 1-token context shares nothing: only the continuation's positions remain)."""
    generator = random.Random(seed)
    requests = []
    for _ in range(count):
        context = [generator.randrange(3, 64) for _ in range(generator.randint(1, 40))]
        for _ in range(4):
            continuation = [generator.randrange(3, 64) for _ in range(generator.randint(1, 6))]
            requests.append((None, context, continuation))
    return requests


def recomputed(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """ln p(continuation | context) from one whole forward pass, no cache, summed in float64."""
    tokens = (context + continuation)[-(CONTEXT + 1) :]
    count = min(len(continuation), CONTEXT)
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0, -count:].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(tokens[-count:])
    chosen = log_probs.gather(1, targets[:, None]).sum()
    return float(chosen), bool((log_probs.argmax(dim=-1) == targets).all())


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_shared_contexts_give_the_log_likelihoods_of_whole_recomputation(
    model, sentencepiece_model, batch_size
):
    requests = questions(12)
    context = list(range(3, 20))
    with torch.no_grad():
        greedy_token = int(model(torch.tensor([context]))[0, -1].argmax())
    requests += [(None, context, [greedy_token]), (None, context, [5, 6]), (None, context, [5, 6])]  # twice
    results = harness(model, sentencepiece_model, batch_size)._loglikelihood_tokens(
        requests, disable_tqdm=True
    )
    assert len(results) == len(requests)
    for (_, context, continuation), (log_probability, greedy) in zip(requests, results, strict=True):
        expected, expected_greedy = recomputed(model, context, continuation)
        assert log_probability == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert greedy == expected_greedy
    assert results[-3][1]  # the model's own choice: the greedy flag is not always False


def test_a_questions_context_runs_once_for_its_four_choices(model, sentencepiece_model, monkeypatch):
    """6 questions, each a 20-token context and 4 choices of 3 tokens, at batch size 4: a pass runs at most 4
    prefixes (the contexts but their last token: 19 positions), once each, then their 16 rows of 3 tokens
    (48 tokens, less than 4 whole rows of 22)."""
    lm = harness(model, sentencepiece_model, batch_size=4)
    generator = random.Random(1)
    requests = []
    for _ in range(6):
        context = [generator.randrange(3, 64) for _ in range(20)]
        requests += [(None, context, [generator.randrange(3, 64) for _ in range(3)]) for _ in range(4)]
    fed = []
    hidden_states = model.hidden_states
    monkeypatch.setattr(
        model,
        "hidden_states",
        lambda tokens, *rest: fed.append(tokens.numel()) or hidden_states(tokens, *rest),
    )
    results = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert fed == [4 * 19, 16 * 3, 2 * 19, 8 * 3]  # whole, it would be 24 rows of 22 positions: 528
    assert all(layer.attention.cache is None for layer in model.layers)  # the caches are gone again
    _, context, continuation = requests[5]
    assert results[5][0] == pytest.approx(recomputed(model, context, continuation)[0], rel=1e-5, abs=1e-5)


@pytest.mark.skipif(
    not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance: torch >= 2.6"
)
def test_the_cached_passes_run_a_trained_models_compiled_blocks_eagerly(sentencepiece_model):
    """--eval-tasks during a run that compiled its blocks: the KV-cached passes, whose shapes change with
    every batch, run the blocks eagerly instead of compiling them again and again."""
    from torch._dynamo.utils import counters

    from llama_mini.ops.fast_paths import compile_blocks

    model = our_model(seed=4, max_seq_len=CONTEXT, vocab_size=64)
    expected = [recomputed(model, context, continuation) for _, context, continuation in questions(2)]
    compile_blocks(model)
    counters.clear()
    results = harness(model, sentencepiece_model, 8)._loglikelihood_tokens(questions(2), disable_tqdm=True)
    assert counters["stats"]["unique_graphs"] == 0  # nothing was compiled
    assert [score for score, _ in results] == pytest.approx(
        [score for score, _ in expected], rel=1e-5, abs=1e-5
    )
