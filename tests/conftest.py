"""Fixtures shared by several test modules, and the `numerics` marker.

The tests in NUMERICAL_MODULES compare floating-point results: each against an independent reference (a
formula in float64, transformers, a recomputation) within a tolerance set by the dtype of the last rounding,
or bit for bit where the same kernels run the same shapes in the same order (a save/load round trip, exact
resume, the same forward pass twice). `make test` runs them a second time with one thread and PyTorch's
unvectorised CPU kernels (ATEN_CPU_CAPABILITY=default), so that a tolerance which silently assumed one CPU's
vector width, one thread count or one summation order fails here rather than on a user's machine.
"""

import os
from pathlib import Path

import pytest

NUMERICAL_MODULES = {
    "test_checkpoint.py",
    "test_convert.py",
    "test_eval_command.py",
    "test_eval_corpus.py",
    "test_eval_harness.py",
    "test_fast_paths.py",
    "test_ffn.py",
    "test_generation.py",
    "test_kernels.py",
    "test_loss.py",
    "test_model.py",
    "test_serve_scheduler.py",
    "test_training.py",
}

# Commands and servers run by the tests decode eagerly without starting background compilers
# (llama_mini/generation/background.py); the tests of that module turn it back on where they need it.
os.environ.setdefault("LLAMA_MINI_BACKGROUND_BUILDS", "0")


def pytest_configure(config):
    """Under ATEN_CPU_CAPABILITY=default (the second pass), inductor would also generate scalar C++, and in
    torch 2.13 some of its scalar kernels do not compile (they still name at::vec types). Compiled code keeps
    the machine's vector width then: the eager references it is compared with run unvectorised, which is
    the other summation order this pass is for."""
    if os.environ.get("ATEN_CPU_CAPABILITY") != "default":
        return
    from torch._inductor import config as inductor_config
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    widest = valid_vec_isa_list()  # widest first
    if widest:
        inductor_config.cpp.simdlen = widest[0].bit_width()


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).name in NUMERICAL_MODULES:
            item.add_marker(pytest.mark.numerics)


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
