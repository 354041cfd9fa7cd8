"""Fixtures shared by several test modules."""

import pytest


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    """A small sentencepiece BPE model (64 pieces, LLaMA's special ids) trained directly with sentencepiece,
    independently of llama_mini.tokenizer."""
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("tokenizer")
    text = [f"the quick brown fox jumps over the lazy dog {i} times" for i in range(100)]
    text += ["once upon a time there was a little girl named lily"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=64,
        model_type="bpe",
        bos_id=1,
        eos_id=2,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"
