"""Bits per byte of a corpus (llama_mini.eval.corpus), proven against transformers' Llama scoring the same
windows one at a time, against the formula written out, and against what training logged."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from llama_mini.checkpoint import load_model, save_pretrained
from llama_mini.errors import ConfigError, DataError
from llama_mini.eval.corpus import CorpusScore, bits_per_byte, document_windows
from llama_mini.tokenizer import Tokenizer
from tests.test_checkpoint import load_hf, our_model

DOCUMENTS = [
    "the quick brown fox jumps over the lazy dog 3 times, and once upon a time there was a little girl",
    "once upon a time",
    "   ",  # blank: skipped
    "lily ran. " * 12 + "the end, with a naïve café at the end: ünïcødé bytes count as bytes",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sentencepiece_model):
    """A tiny perturbed model (context 64) saved as a Hugging Face folder with its tokenizer."""
    folder = tmp_path_factory.mktemp("checkpoint")
    save_pretrained(our_model(seed=3), folder, tokenizer_path=sentencepiece_model)
    return folder


def reference_nats(hf_model, ids: list[int], context: int, stride: int) -> float:
    """The windows written out independently: the target at position j (1 .. L-1) is scored by the first
    window whose last target is at or after j; window k's last target is min(context + k*stride, L - 1)
    and it reads the `context` ids before that target (fewer at the start of the document)."""
    last = len(ids) - 1
    ends = []
    end = min(context, last)
    while True:
        ends.append(end)
        if end == last:
            break
        end = min(end + stride, last)
    total, previous = 0.0, 0
    for end in ends:
        start = max(0, end - context)
        inputs = torch.tensor([ids[start:end]])
        logits = hf_model(inputs).logits[0].double()  # (end - start, V)
        for j in range(previous + 1, end + 1):  # targets of this window
            total -= torch.log_softmax(logits[j - 1 - start], dim=-1)[ids[j]].item()
        previous = end
    return total


@pytest.mark.parametrize("context, stride, batch_size", [(64, 32, 8), (16, 5, 3), (12, 12, 1), (10, 3, 4)])
def test_bits_per_byte_equals_transformers_scoring_each_window(checkpoint, context, stride, batch_size):
    tokenizer = Tokenizer(checkpoint)
    model = load_model(checkpoint)
    reference = load_hf(checkpoint)
    score = bits_per_byte(model, tokenizer, DOCUMENTS, context, stride, batch_size)

    texts = [text for text in DOCUMENTS if text.strip()]
    encoded = [tokenizer.encode(text, bos=True, eos=True) for text in texts]
    assert max(map(len, encoded)) > 2 * context or context == 64  # the small contexts slide several windows
    with torch.no_grad():
        nats = sum(reference_nats(reference, ids, context, stride) for ids in encoded)
    size = sum(len(text.encode("utf-8")) for text in texts)
    assert score.documents == 3
    assert score.bytes == size and size > sum(map(len, texts))  # bytes, not characters
    assert score.tokens == sum(len(ids) - 1 for ids in encoded)
    assert score.nats == pytest.approx(nats, rel=2e-5)
    assert score.bits_per_byte == pytest.approx(nats / math.log(2) / size, rel=2e-5)
    assert score.nats_per_token == pytest.approx(nats / score.tokens, rel=2e-5)
    assert score.perplexity == pytest.approx(math.exp(nats / score.tokens), rel=2e-5)


def test_windows_score_every_token_once_with_the_context_they_promise():
    ids = list(range(100, 130))  # L = 30: targets 1 .. 29
    windows = list(document_windows(ids, context=8, stride=3))
    targets = [t for window in windows for t in window.targets]
    assert targets == ids[1:]
    for window in windows:
        assert len(window.inputs) <= 8
        # the scored positions are the window's last ones, each followed by its target
        tail = window.inputs[len(window.inputs) - window.scored :]
        assert [i + 1 for i in tail] == window.targets
    assert [len(w.inputs) for w in windows] == [8] * len(windows)
    assert [w.scored for w in windows] == [8, 3, 3, 3, 3, 3, 3, 3]
    assert list(document_windows([5, 6], context=8, stride=3))[0].targets == [6]


def test_a_document_within_the_context_is_one_full_forward(checkpoint):
    tokenizer = Tokenizer(checkpoint)
    model = load_model(checkpoint)
    text = DOCUMENTS[0]
    ids = torch.tensor([tokenizer.encode(text, bos=True, eos=True)])
    with torch.no_grad():
        nats = F.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:], reduction="sum").item()
    score = bits_per_byte(model, tokenizer, [text], context=64, stride=1)
    assert score.nats == pytest.approx(nats, rel=1e-5)


def test_empty_corpus_and_bad_windows_are_clear_errors(checkpoint):
    tokenizer = Tokenizer(checkpoint)
    model = load_model(checkpoint)
    with pytest.raises(DataError, match="no text to score"):
        bits_per_byte(model, tokenizer, ["", " \n"])
    with pytest.raises(ConfigError, match="--context must be between 1 and the model's context"):
        bits_per_byte(model, tokenizer, ["a"], context=65)
    with pytest.raises(ConfigError, match="--stride must be between 1 and the context"):
        bits_per_byte(model, tokenizer, ["a"], context=16, stride=17)


def test_score_dictionary_has_the_documented_keys():
    score = CorpusScore(documents=2, tokens=10, bytes=20, nats=10 * math.log(3))
    written = json.loads(json.dumps(score.as_dict()))
    assert written["perplexity"] == pytest.approx(3.0)
    assert written["bits_per_byte"] == pytest.approx(10 * math.log(3) / math.log(2) / 20)
    assert {"bits_per_byte", "nats_per_token", "perplexity", "tokens", "bytes", "documents"} <= set(written)
