"""The same checks on every device this machine has: the CPU always, a CUDA GPU where one is visible.

On a CPU-only machine these run on the CPU, so the checks themselves stay tested; on a GPU machine each runs
on CUDA too, with CUDA's defaults (bf16 autocast, torch.compile, fused AdamW, SDPA's CUDA kernels, CUDA-graph
decoding, the int4 kernel's packed layout), against references computed in float32 or float64 on the CPU.
bench/gpu_suite.sh's `tests` part runs this file first. Tolerances follow the dtype of the last rounding:
float32 where the device computes in float32, bf16's where its default autocast does.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_fast_paths import corpus_and_tokenizer  # noqa: F401 (a fixture)
from test_generation import PROMPTS, tiny_model
from test_training import TINY_MODEL, make_config, stop_after

from llama_mini.generation import generate
from llama_mini.ops.fast_paths import apply_fast_paths, attention_backend, choose_fast_paths
from llama_mini.ops.loss import NextTokenLoss
from llama_mini.ops.quantize import Int4Linear, Int8Linear, int4_kernel_available
from llama_mini.runtime import autocast, resolve_dtype
from llama_mini.train import METRICS, TrainConfig, Trainer, make_optimizer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Relative tolerance of a loss computed under the device's default autocast against float32's.
AUTOCAST_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}

pytestmark = pytest.mark.parametrize("device", DEVICES)


def test_the_model_gives_the_float64_logits(device):
    model = tiny_model()
    tokens = torch.tensor([PROMPTS[0] * 3])
    with torch.no_grad():
        expected = model.double()(tokens)
        got = model.float().to(device)(tokens.to(device)).cpu()
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)


def test_a_training_step_on_the_default_fast_paths_follows_the_float32_step(device):
    """Three optimizer steps with what a run on this device gets by default (its autocast dtype, compile,
    fused AdamW, SwiGLU kernel, loss), against the plain float32 steps of the same weights on the CPU."""
    device = torch.device(device)
    dtype = resolve_dtype("auto", device, training=True)
    paths = choose_fast_paths(device, tokens_per_micro_batch=4 * 32, vocab_size=256, dtype=dtype, steps=3)
    config = TrainConfig(max_steps=3, eval_interval=3, lr=1e-2, warmup_steps=0)
    tokens = torch.randint(3, 256, (4, 33), generator=torch.Generator().manual_seed(5))
    losses = {}
    for name, where, step_dtype in (("plain", torch.device("cpu"), torch.float32), ("fast", device, dtype)):
        model = tiny_model().to(where)
        fast = name == "fast"
        loss_module = apply_fast_paths(model, paths) if fast else NextTokenLoss(model)
        optimizer = make_optimizer(model, config, fused=paths.fused_adamw if fast else False)
        scaler = torch.amp.GradScaler(where.type) if step_dtype == torch.float16 else None
        x, y = tokens[:, :-1].to(where), tokens[:, 1:].to(where)
        losses[name] = []
        for _ in range(3):
            with autocast(where, step_dtype), attention_backend(paths.attention if fast else "auto"):
                loss = loss_module(x, y)
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad()
            losses[name].append(float(loss.detach()))
    assert losses["plain"][-1] < losses["plain"][0]  # it learns: the steps are not empty
    assert losses["fast"] == pytest.approx(losses["plain"], rel=AUTOCAST_RTOL[dtype])


def test_kv_cached_greedy_decoding_gives_the_tokens_of_whole_recomputation(device):
    model = tiny_model().to(device)
    expected = []
    with torch.no_grad():
        for prompt in PROMPTS:
            tokens = list(prompt)
            for _ in range(12):
                tokens.append(int(model(torch.tensor([tokens], device=device))[0, -1].argmax()))
            expected.append(tokens[len(prompt) :])
    assert generate(model, PROMPTS, 12, temperature=0) == expected
    if device == "cuda":  # compiled, replayed as CUDA graphs
        assert generate(model, PROMPTS, 12, temperature=0, compile=True) == expected


def test_int8_and_int4_layers_equal_their_dequantized_weights(device):
    torch.manual_seed(2)
    linear = torch.nn.Linear(256, 64, bias=False)
    x = torch.randn(3, 256)
    w = linear.weight.detach()
    scale = w.abs().amax(dim=1) / 127
    int8_reference = x @ (torch.round(w / scale[:, None]).clamp(-127, 127) * scale[:, None]).T
    got = Int8Linear.from_linear(linear.to(device))(x.to(device)).cpu()
    torch.testing.assert_close(got, int8_reference, rtol=1e-4, atol=1e-4)

    if not int4_kernel_available(device):
        pytest.skip(f"this torch has no int4 kernel for {device}")
    # the CUDA kernel takes bf16 weights and activations: its result is bf16's
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    groups = w.to(dtype).float().reshape(64, 256 // 32, 32)  # the weights as the layer is given them
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = (high - low) / 15
    q = torch.round((groups - low) / step).clamp(0, 15)  # w ~ (q - 8) * step + zero, zero = low + 8 * step
    dequantized = ((q - 8) * step + low + 8 * step).reshape(64, 256)
    layer = Int4Linear.from_linear(linear.to(device, dtype), 32)
    got = layer(x.to(device, dtype)).float().cpu()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, x @ dequantized.T, rtol=tolerance, atol=tolerance)


def test_a_run_with_the_devices_defaults_stops_and_resumes_where_it_stopped(
    device, corpus_and_tokenizer, tmp_path
):
    """train.py's Trainer with --device DEVICE and every other default of the device (--dtype auto, the fast
    paths): interrupted after step 3 and resumed, it gives the losses of a run never stopped. Exactly on
    a CPU; on a GPU within 1e-3, since some CUDA kernels (the embedding's backward) add in any order, and
    bf16 rounds those float32 differences up now and then (a lost optimizer state or a shifted batch moves
    the losses by 1e-2 and more)."""
    corpus, tokenizer = corpus_and_tokenizer
    settings = dict(max_steps=8, eval_interval=4, device=device, dtype="auto")
    Trainer(
        make_config(corpus, tokenizer, tmp_path / "whole", **settings), TINY_MODEL, show_progress=False
    ).run()
    broken = Trainer(
        make_config(corpus, tokenizer, tmp_path / "broken", **settings), TINY_MODEL, show_progress=False
    )
    assert broken.device.type == device
    stop_after(broken, 3)
    assert broken.run().step == 3
    resumed = make_config(corpus, tokenizer, tmp_path / "broken", **settings)
    Trainer(resumed, {}, resume=True, show_progress=False).run()

    def losses(out):
        lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
        return [line["loss"] if line["type"] == "train" else line["val_loss"] for line in lines]

    expected = losses(tmp_path / "whole")
    assert len(expected) == 10  # 8 steps, 2 evaluations
    if device == "cpu":
        assert losses(tmp_path / "broken") == expected
    else:
        assert losses(tmp_path / "broken") == pytest.approx(expected, rel=1e-3)
