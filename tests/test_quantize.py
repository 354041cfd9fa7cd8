"""Weight-only quantization (llama_mini.ops.quantize): each quantized layer equals the dequantize-then-multiply
formula written out here, greedy decoding of a small trained model keeps its tokens, and generate, serve and
eval take --quantize (int4 refused in one line where no kernel serves it)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llama_mini import cli
from llama_mini.checkpoint import save_pretrained
from llama_mini.generation import decode as decode_module
from llama_mini.generation import generate
from llama_mini.model.presets import get_preset
from llama_mini.model.transformer import Transformer
from llama_mini.ops import aot_step
from llama_mini.ops import quantize as quantize_module
from llama_mini.ops.quantize import Int4Linear, Int8Linear, quantize
from llama_mini.tokenizer import train_tokenizer

needs_int4 = pytest.mark.skipif(
    not quantize_module.int4_kernel_available("cpu"), reason="this torch has no CPU int4 kernel"
)


@pytest.mark.numerics
def test_int8_linear_equals_per_channel_dequantize_then_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False)
    x = torch.randn(3, 5, 96)
    layer = Int8Linear.from_linear(linear)
    w = linear.weight.detach()
    scale = w.abs().amax(dim=1) / 127  # one per output channel
    q = torch.round(w / scale[:, None]).clamp(-127, 127)
    assert torch.equal(layer.weight, q.to(torch.int8))
    assert layer.weight.dtype == torch.int8 and int(layer.weight.abs().max()) == 127
    reference = x @ (q * scale[:, None]).T
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)
    # and close to the float layer: each weight is off by at most half a step
    assert (q * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-7


@needs_int4
@pytest.mark.numerics
@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_linear_equals_grouped_dequantize_then_matmul(group_size):
    torch.manual_seed(1)
    linear = nn.Linear(256, 48, bias=False)
    x = torch.randn(2, 3, 256)
    layer = Int4Linear.from_linear(linear, group_size)
    # torch's int4 kernels: w = (q - 8) * scale + zero for each group of `group_size` inputs of a row
    groups = linear.weight.detach().reshape(48, 256 // group_size, group_size)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (high - low) / 15
    q = torch.round((groups - low) / scale).clamp(0, 15)
    zero = low + 8 * scale
    dequantized = ((q - 8) * scale + zero).reshape(48, 256)
    torch.testing.assert_close(layer(x), x @ dequantized.T, rtol=1e-4, atol=1e-4)
    assert (dequantized - linear.weight).abs().max() <= scale.max() / 2 + 1e-6


@pytest.fixture(scope="module")
def trained_model() -> tuple[Transformer, list[int]]:
    """The tiny preset fitted for 100 steps to a fixed sequence of 30 tokens, repeated, so its greedy
    continuation is learned (decisive), not a near-tie of random weights."""
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny"))
    sequence = torch.tensor([random.Random(0).randrange(3, 256) for _ in range(30)] * 2)[None]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        logits = model(sequence[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), sequence[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), sequence[0].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", pytest.param("int4", marks=needs_int4)])
def test_greedy_decoding_of_a_trained_model_keeps_most_tokens(scheme, trained_model):
    model, sequence = trained_model
    prompts = [sequence[:3], sequence[7:13]]
    reference = generate(model, prompts, 40, temperature=0, compile=False)
    quantized = quantize(copy.deepcopy(model), scheme, group_size=32)
    assert not any(
        type(module) is nn.Linear for name, module in quantized.named_modules() if name != "output"
    )
    assert type(quantized.output) is nn.Linear  # the output layer stays in float (module docstring)
    tokens = generate(quantized, prompts, 40, temperature=0, compile=False)
    same = sum(
        a == b for want, got in zip(reference, tokens, strict=True) for a, b in zip(want, got, strict=True)
    )
    assert same >= 0.9 * 80, (reference, tokens)


@pytest.mark.slow
@pytest.mark.numerics
@pytest.mark.skipif(not aot_step.aot_compile_available(), reason="AOTInductor needs torch >= 2.8")
@pytest.mark.skipif(
    not aot_step.cpp_compiler_available(), reason="building a compiled step needs a C++ compiler"
)
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_compiled_quantized_decode_step_equals_the_eager_quantized_model(scheme, trained_model, tmp_path):
    """The ahead-of-time step computes the quantized layers in its own loops (int8: the conversion fused
    into its dot products; llama_mini.ops.quantize): prefill eagerly, then one compiled step; its logits are the eager quantized
    model's logits for the whole sequence to float32 rounding (the same products, summed in another
    order), its ids their argmax."""
    model, sequence = trained_model
    quantized = quantize(copy.deepcopy(model), scheme, group_size=32)
    tokens = torch.tensor(sequence[:9])[None]
    quantized.setup_cache(1, max_seq_len=64, static=True)
    example = (torch.zeros((1, 1), dtype=torch.long), torch.tensor(0))
    step = aot_step.compiled_step(decode_module.decode_step, quantized, example, tmp_path)
    # the library reads the quantized weights themselves (bound by reference), not a float copy of them
    weight = {"int8": "weight", "int4": "packed"}[scheme]
    assert f"model.layers.0.attention.wq.{weight}" in step.names
    try:
        with torch.inference_mode(), step.bound_to(quantized) as run:
            decode_module.next_token_logits(quantized, tokens[:, :-1], 0)  # fills positions 0..7
            logits, ids = run(tokens[:, -1:].contiguous(), torch.tensor(8))
            expected = quantized(tokens)[:, -1]
    finally:
        quantized.clear_cache()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert ids.tolist() == expected.argmax(-1).tolist()
    with torch.inference_mode():  # and the quantized model is not the float one
        assert (expected - model(tokens)[:, -1]).abs().max() > 1e-4


def test_a_library_naming_tensors_the_model_lacks_is_refused_not_a_key_error(monkeypatch):
    """A library whose code reads a constant inductor made for itself (not saved: built without constants)
    cannot run bound to a model: refused with UnsupportedStep, which generation answers by falling back."""
    model = Transformer(get_preset("tiny")).eval()
    step = object.__new__(aot_step.CompiledStep)
    step.names = ["model.tok_embeddings.weight", "constant7"]
    with pytest.raises(aot_step.UnsupportedStep, match="constant7"):
        step.check_binds(step.tensors_of(model))
    step.names = ["model.tok_embeddings.weight"]
    step.check_binds(step.tensors_of(model))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quantize")
    rng = random.Random(0)
    words = ["the", "king", "queen", "and", "of", "my", "lord", "once", "upon", "a", "time"]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(200)]
    tokenizer = train_tokenizer(["\n".join(lines) + "\n"], folder / "tokenizer.model", 300)
    torch.manual_seed(0)
    model = Transformer(get_preset("tiny", vocab_size=tokenizer.vocab_size))
    save_pretrained(model, folder / "model", tokenizer_path=folder / "tokenizer.model")
    (folder / "text.txt").write_text("\n".join(lines[:20]) + "\n")
    return folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_with_int8_prints_text(checkpoint, capsys, tmp_path):
    argv = ["generate", "--checkpoint", checkpoint / "model", "--prompt", "the king", "--max-new-tokens", "8"]
    argv += ["--temperature", "0", "--no-compile", "--compile-cache", tmp_path, "--no-stream"]
    code, out, err = run_cli(capsys, *argv, "--quantize", "int8")
    assert code == 0, err
    assert out.startswith("the king")


def test_eval_with_int8_scores_within_half_a_percent(checkpoint, capsys):
    argv = ["eval", checkpoint / "model", "--data", checkpoint / "text.txt"]
    scores = []
    for scheme in ("none", "int8"):
        code, out, err = run_cli(capsys, *argv, "--quantize", scheme)
        assert code == 0, err
        line = next(line for line in out.splitlines() if line.strip().startswith("bits per byte"))
        scores.append(float(line.split()[-1]))
    assert abs(scores[1] - scores[0]) <= 0.005 * scores[0], scores


def test_serve_builds_an_app_with_int8_layers(checkpoint):
    pytest.importorskip("fastapi")
    from llama_mini.serve.command import ServeConfig, build_app

    app, _ = build_app(
        checkpoint / "model", ServeConfig(), quantization=quantize_module.QuantizeSettings(quantize="int8")
    )
    assert app is not None


def test_int4_without_a_kernel_is_one_line_and_exit_2(checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(quantize_module, "int4_kernel_available", lambda device: False)
    argv = ["generate", "--checkpoint", checkpoint / "model", "--prompt", "the", "--quantize", "int4"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--quantize int4" in err and "int8" in err
