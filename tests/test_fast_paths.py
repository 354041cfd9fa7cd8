"""Fast paths: each computes what its plain path computes, each can be turned off, defaults per device."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from test_training import TINY_MODEL, make_config, synthetic_corpus
from torch._dynamo.utils import counters

import train as train_cli
from llama_mini import runtime
from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.ffn import GEGLU, FeedForward
from llama_mini.model.transformer import Transformer
from llama_mini.ops import fast_paths
from llama_mini.ops.fast_paths import (
    CPU_COMPILE_MIN_STEPS,
    LOSS_CHUNK_SIZE,
    FastPaths,
    FusedSwiGLU,
    apply_fast_paths,
    attention_backend,
    choose_fast_paths,
    use_swiglu_kernel,
)
from llama_mini.ops.loss import NextTokenLoss
from llama_mini.runtime import resolve_dtype
from llama_mini.tokenizer import train_tokenizer
from llama_mini.train import METRICS, TrainConfig, Trainer, make_optimizer

CPU = torch.device("cpu")


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(**{"vocab_size": 97, **TINY_MODEL, **overrides}))


# ------------------------------------------------------------------------------- applying them


def test_compiled_model_with_the_cuda_defaults_equals_the_plain_eager_model():
    """The combination a CUDA run gets by default (compile, chunked loss, fused SwiGLU kernel), on a CPU."""
    paths = FastPaths(compile=False, fused_adamw=False, attention="auto", swiglu_kernel="compiled",
                      loss_chunk_size=24)  # fmt: skip
    # fullgraph: no graph break in the model, the loss or the kernel
    assert_trains_as_the_plain_model(paths, wrap=lambda loss: torch.compile(loss, fullgraph=True))


def assert_trains_as_the_plain_model(paths: FastPaths, wrap=lambda loss: loss) -> None:
    """A tiny model with `paths` applied (and `wrap`ped) gives the plain eager loss of the same weights and
    the same gradients, to float32 rounding in another order. Dynamo starts afresh, its counters at 0."""
    plain, fast = tiny_model(), tiny_model()
    tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(3))
    x, y = tokens[:, :-1], tokens[:, 1:]
    torch._dynamo.reset()
    counters.clear()
    loss = wrap(apply_fast_paths(fast, paths))(x, y)
    loss.backward()
    expected = NextTokenLoss(plain)(x, y)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    for (name, reference), param in zip(plain.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(param.grad, reference.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_swiglu_computes_the_feed_forward_formula_with_the_same_weights():
    model = tiny_model().double()
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    names_before = [name for name, _ in model.named_parameters()]
    weights_before = [id(param) for param in model.parameters()]
    with torch.no_grad():
        expected = model(tokens)
        assert use_swiglu_kernel(model, "compiled") == TINY_MODEL["n_layers"]
        assert all(type(layer.feed_forward) is FusedSwiGLU for layer in model.layers)
        torch.testing.assert_close(model(tokens), expected, rtol=1e-12, atol=1e-12)  # float64 arithmetic
    assert [name for name, _ in model.named_parameters()] == names_before  # checkpoints unaffected
    assert [id(param) for param in model.parameters()] == weights_before  # the same tensors, not copies
    use_swiglu_kernel(model, "eager")
    assert all(type(layer.feed_forward) is FeedForward for layer in model.layers)


# ------------------------------------------------------------------------------- choosing the fast paths


def test_cpu_defaults_are_the_plain_paths_except_where_measured_faster():
    paths = choose_fast_paths(CPU, tokens_per_micro_batch=16 * 256, vocab_size=4096)
    assert paths.compile is False and paths.fused_adamw is False
    assert paths.attention == "auto" and paths.swiglu_kernel == "eager"
    assert paths.loss_chunk_size in (0, LOSS_CHUNK_SIZE)


def test_cpu_compiles_by_default_only_long_bf16_runs_where_a_compiler_is_installed(monkeypatch):
    """bf16 autocast on a CPU (AMX's default) compiles from CPU_COMPILE_MIN_STEPS steps, where the first
    step's compilation is won back; float32 (3% faster compiled), short runs and no C++ compiler do not."""
    bf16 = torch.bfloat16
    monkeypatch.setattr(fast_paths, "cpu_compile_works", lambda: True)
    assert choose_fast_paths(CPU, 4096, 4096, dtype=bf16, steps=CPU_COMPILE_MIN_STEPS).compile is True
    assert choose_fast_paths(CPU, 4096, 4096, dtype=bf16, steps=CPU_COMPILE_MIN_STEPS - 1).compile is False
    assert choose_fast_paths(CPU, 4096, 4096, steps=10 * CPU_COMPILE_MIN_STEPS).compile is False
    assert choose_fast_paths(CPU, 4096, 4096, dtype=bf16, compile=False, steps=10**6).compile is False
    assert choose_fast_paths(CPU, 4096, 4096, compile=True).compile is True  # asked: always
    monkeypatch.setattr(fast_paths, "cpu_compile_works", lambda: False)
    assert choose_fast_paths(CPU, 4096, 4096, dtype=bf16, steps=10**6).compile is False


def forget_instruction_set_answers():
    """Clear inductor's per-process caches of its instruction-set checks (the base class's and subclasses')."""
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.valid_vec_isa_list.cache_clear()
    for cls in {klass for isa in cpu_vec_isa.supported_vec_isa_list for klass in type(isa).__mro__}:
        for cached in (vars(cls).get("__bool__"), vars(cls).get("_VecISA__bool__impl")):
            if hasattr(cached, "cache_clear"):
                cached.cache_clear()


@pytest.mark.skipif(
    fast_paths.platform.machine() not in ("x86_64", "AMD64"), reason="inductor checks instruction sets on x86"
)
def test_the_cpu_instruction_sets_are_checked_together_and_inductor_reuses_the_answers(monkeypatch):
    """check_cpu_instruction_sets runs inductor's own check (bool(isa)) for every instruction set the CPU
    reports, concurrently; inductor's later questions find the answers cached instead of building again."""
    cpu_vec_isa = pytest.importorskip("torch._inductor.cpu_vec_isa")  # torch >= 2.5 lays the checks out so

    reported = cpu_vec_isa.x86_isa_checker()
    expected = [i for i in cpu_vec_isa.supported_vec_isa_list if all(f in reported for f in str(i).split())]
    built, running, overlapped = [], [], []
    lock = threading.Lock()

    def slow_build(isa, code):  # stands in for a g++ build and a dlopen: 0.3 s
        with lock:
            running.append(isa)
            overlapped.append(len(running) > 1)
        time.sleep(0.3)
        with lock:
            running.remove(isa)
            built.append(str(isa))
        return True

    forget_answers = forget_instruction_set_answers
    forget_answers()
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", slow_build)
    with cpu_vec_isa.config.patch({"cpp.vec_isa_ok": None}):  # None: check, do not trust
        try:
            started = time.perf_counter()
            fast_paths.check_cpu_instruction_sets().join()
            took = time.perf_counter() - started
            assert set(built) == {str(isa) for isa in expected}  # (some sets build more than one program)
            if len(expected) > 1:
                assert any(overlapped) and took < 0.3 * len(built) - 0.1
            builds = len(built)
            assert [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()] == [str(isa) for isa in expected]
            assert len(built) == builds  # inductor's own list found every answer made
        finally:
            forget_answers()  # the real checks again for later tests


@pytest.mark.skipif(
    fast_paths.platform.machine() not in ("x86_64", "AMD64"), reason="inductor checks instruction sets on x86"
)
def test_a_failing_instruction_set_check_stays_quiet_in_the_background(monkeypatch):
    """An error inside inductor's check (a lock timeout, say) ends the background thread quietly: no
    traceback on the user's terminal; inductor asks again itself at the first compile and reports there."""
    cpu_vec_isa = pytest.importorskip("torch._inductor.cpu_vec_isa")

    def broken_build(isa, code):
        raise RuntimeError("the build broke")

    uncaught = []
    monkeypatch.setattr(threading, "excepthook", uncaught.append)
    forget_instruction_set_answers()
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", broken_build)
    with cpu_vec_isa.config.patch({"cpp.vec_isa_ok": None}):
        try:
            fast_paths.check_cpu_instruction_sets().join()
        finally:
            forget_instruction_set_answers()
    assert uncaught == []


def test_a_cpu_that_cannot_compile_is_found_before_a_default_compiles(monkeypatch, tmp_path):
    """cpu_compile_works: no C++ compiler, or no Python.h for inductor's kernels to include, gives False
    instead of an error at a run's first step."""
    headers = tmp_path / "include"
    headers.mkdir()
    monkeypatch.setattr(fast_paths.sysconfig, "get_path", lambda name: str(headers))
    for has_header, has_compiler in ((True, True), (True, False), (False, True)):
        (headers / "Python.h").unlink(missing_ok=True)
        if has_header:
            (headers / "Python.h").write_text("")
        monkeypatch.setattr(fast_paths, "cpp_compiler_available", lambda value=has_compiler: value)
        fast_paths.cpu_compile_works.cache_clear()
        assert fast_paths.cpu_compile_works() is (has_header and has_compiler)
    fast_paths.cpu_compile_works.cache_clear()


def test_training_takes_bf16_on_a_cpu_with_amx_and_generation_keeps_float32(monkeypatch):
    cpu = torch.device("cpu")
    for amx in (True, False):
        monkeypatch.setattr(runtime, "cpu_has_bf16_matrix_units", lambda amx=amx: amx)
        assert resolve_dtype("auto", cpu, training=True) == (torch.bfloat16 if amx else torch.float32)
        assert resolve_dtype("auto", cpu) == torch.float32
        assert resolve_dtype("fp32", cpu, training=True) == torch.float32  # asked: kept
    assert resolve_dtype("auto", torch.device("mps"), training=True) == torch.float32


def test_cuda_defaults_turn_on_compile_and_the_fused_optimizer():
    paths = choose_fast_paths(torch.device("cuda"), tokens_per_micro_batch=16 * 1024, vocab_size=32000)
    assert paths.compile and paths.fused_adamw
    assert paths.swiglu_kernel in ("compiled", "triton")


def test_fp16_training_keeps_the_plain_loss_unless_asked():
    """The chunked loss's gradients exist before fp16's loss scale multiplies them: no default there."""
    cuda = torch.device("cuda")
    assert choose_fast_paths(cuda, 16 * 1024, 32000, dtype=torch.bfloat16).loss_chunk_size == LOSS_CHUNK_SIZE
    assert choose_fast_paths(cuda, 16 * 1024, 32000, dtype=torch.float16).loss_chunk_size == 0
    assert (
        choose_fast_paths(cuda, 16 * 1024, 32000, dtype=torch.float16, loss_chunk_size=256).loss_chunk_size
        == 256
    )


def test_attention_kernels_that_cannot_run_on_the_device_are_refused_up_front():
    with pytest.raises(
        ConfigError, match="--attention cudnn needs a CUDA GPU; on cpu choose auto, flash, math"
    ):
        choose_fast_paths(CPU, 16, 97, attention="cudnn")
    with pytest.raises(ConfigError, match="--attention flash runs in bf16 or fp16 on CUDA"):
        choose_fast_paths(torch.device("cuda"), 16, 97, dtype=torch.float32, attention="flash")
    assert (
        choose_fast_paths(torch.device("cuda"), 16, 97, dtype=torch.bfloat16, attention="flash").attention
        == "flash"
    )


def test_explicit_settings_win_over_the_defaults():
    paths = choose_fast_paths(
        torch.device("cuda"),
        16,
        32000,
        compile=False,
        fused_adamw=False,
        attention="math",
        swiglu_kernel="eager",
        loss_chunk_size=0,
    )
    assert (paths.compile, paths.fused_adamw, paths.attention, paths.swiglu_kernel) == (
        False,
        False,
        "math",
        "eager",
    )
    assert paths.loss_chunk_size == 0


@pytest.mark.parametrize(
    "settings, message",
    [(dict(attention="fast"), "unknown --attention 'fast'"), (dict(swiglu_kernel="cuda"), "--swiglu-kernel")],
)
def test_unknown_fast_path_names_are_clear_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        choose_fast_paths(CPU, 16, 97, **settings)


def test_apply_fast_paths_wraps_the_model_in_its_loss_and_compiles_only_when_asked():
    model = tiny_model()
    paths = choose_fast_paths(CPU, 16, 97, swiglu_kernel="compiled", loss_chunk_size=8)
    loss = apply_fast_paths(model, paths)  # compile is off on a CPU by default
    assert type(loss) is NextTokenLoss and loss.model is model and loss.chunk_size == 8
    assert all(layer.feed_forward.kernel == "compiled" for layer in model.layers)
    assert all(layer._compiled_call_impl is None for layer in model.layers)
    compiled = apply_fast_paths(model, choose_fast_paths(CPU, 16, 97, compile=True))
    assert type(compiled) is NextTokenLoss and compiled.model is model and compiled.chunk_size == 0
    assert type(model.layers[0].feed_forward) is FeedForward
    assert all(layer._compiled_call_impl is not None for layer in model.layers)  # each block, in place


@pytest.mark.slow
def test_compiled_blocks_share_one_graph_and_train_as_the_eager_model():
    """--compile compiles block by block (compile_blocks): one graph serves every layer, and the loss and
    gradients are the eager model's."""
    paths = FastPaths(compile=True, fused_adamw=False, attention="auto", swiglu_kernel="eager",
                      loss_chunk_size=24)  # fmt: skip
    assert_trains_as_the_plain_model(paths)
    # Dynamo passes a module's weights to its graph as inputs (torch >= 2.5), so alike blocks share it;
    # an older torch specialises each graph on its block's weights: one per block
    shared = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)
    expected_graphs = 1 if shared else TINY_MODEL["n_layers"]
    assert TINY_MODEL["n_layers"] > 1 and counters["stats"]["unique_graphs"] == expected_graphs


def test_swiglu_kernel_is_set_on_swiglu_feed_forwards_only():
    swiglu_model = tiny_model()
    assert use_swiglu_kernel(swiglu_model, "triton") == TINY_MODEL["n_layers"]
    assert all(layer.feed_forward.kernel == "triton" for layer in swiglu_model.layers)
    geglu_model = tiny_model(ffn="geglu")
    assert use_swiglu_kernel(geglu_model, "compiled") == 0
    assert type(geglu_model.layers[0].feed_forward) is GEGLU
    with pytest.raises(ConfigError, match="unknown SwiGLU kernel"):
        use_swiglu_kernel(swiglu_model, "fastest")


# ------------------------------------------------------------------------------- attention kernels


def sdpa_kernels_run(backend: str, model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, set]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        with attention_backend(backend):
            logits = model(tokens)
    names = {event.key for event in profile.key_averages() if "attention" in event.key}
    return logits, names


def test_math_attention_equals_pytorchs_choice_and_really_runs_the_math_kernel():
    model = tiny_model().eval()
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        auto_logits, auto_kernels = sdpa_kernels_run("auto", model, tokens)
        math_logits, math_kernels = sdpa_kernels_run("math", model, tokens)
        flash_logits, flash_kernels = sdpa_kernels_run("flash", model, tokens)
    torch.testing.assert_close(math_logits, auto_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flash_logits, auto_logits, rtol=1e-5, atol=1e-5)
    assert any("math" in name for name in math_kernels), math_kernels
    assert not any("flash" in name for name in math_kernels), math_kernels
    assert any("flash" in name for name in flash_kernels), flash_kernels


# ------------------------------------------------------------------------------- the optimizer


def test_fused_adamw_takes_the_steps_of_the_for_each_adamw():
    config = TrainConfig(max_steps=10, eval_interval=10, lr=1e-2)
    models = [tiny_model(), tiny_model()]
    optimizers = [
        make_optimizer(models[0], config, fused=False),
        make_optimizer(models[1], config, fused=True),
    ]
    assert optimizers[1].defaults["fused"] and not optimizers[0].defaults["fused"]
    tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        for model, optimizer in zip(models, optimizers, strict=True):
            NextTokenLoss(model)(tokens[:, :-1], tokens[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad()
    for (name, plain), fused in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def corpus_and_tokenizer(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("corpus")
    texts = synthetic_corpus()
    for index, text in enumerate(texts):
        (folder / f"doc{index:02d}.txt").write_text(text)
    tokenizer = folder.parent / "tokenizer.model"
    train_tokenizer(texts, tokenizer, vocab_size=300)
    return folder, tokenizer


def train_losses(corpus_and_tokenizer, out: Path, **fast_paths) -> list[float]:
    corpus, tokenizer = corpus_and_tokenizer
    config = make_config(corpus, tokenizer, out, max_steps=4, eval_interval=4, **fast_paths)
    Trainer(config, TINY_MODEL, show_progress=False).run()
    lines = [json.loads(line) for line in (out / METRICS).read_text().splitlines()]
    return [line["loss"] if line["type"] == "train" else line["val_loss"] for line in lines]


def test_training_with_fast_paths_on_follows_the_plain_run(corpus_and_tokenizer, tmp_path):
    plain = train_losses(
        corpus_and_tokenizer,
        tmp_path / "plain",
        loss_chunk_size=0,
        swiglu_kernel="eager",
        fused_adamw=False,
        attention="math",
    )
    fast = train_losses(
        corpus_and_tokenizer,
        tmp_path / "fast",
        loss_chunk_size=24,  # 4 x 32 tokens per micro-batch: chunks of 24 and a last one of 8
        swiglu_kernel="compiled",
        fused_adamw=True,
        attention="flash",
    )
    assert len(plain) == 5  # 4 training steps and one evaluation
    assert fast == pytest.approx(plain, rel=1e-4)


def test_a_cpu_run_that_compiles_checks_the_instruction_sets_before_its_data(
    corpus_and_tokenizer, tmp_path, monkeypatch
):
    """build_run starts the instruction-set checks before the tokenizer and the data (which they overlap)
    when the run will compile on a CPU, asked or by default, and not otherwise."""
    from llama_mini.train import build

    events = []
    monkeypatch.setattr(build, "check_cpu_instruction_sets", lambda: events.append("checks"))
    prepare = build.prepare_tokenizer
    monkeypatch.setattr(
        build, "prepare_tokenizer", lambda *a, **k: events.append("tokenizer") or prepare(*a, **k)
    )
    monkeypatch.setattr(fast_paths, "cpu_compile_works", lambda: True)
    corpus, tokenizer = corpus_and_tokenizer
    runs = {  # settings: whether the run compiles
        "asked": (dict(compile=True), True),
        "bf16-default": (dict(dtype="bf16", max_steps=fast_paths.CPU_COMPILE_MIN_STEPS), True),
        "bf16-short": (dict(dtype="bf16", max_steps=fast_paths.CPU_COMPILE_MIN_STEPS - 1), False),
        "fp32-default": (dict(max_steps=fast_paths.CPU_COMPILE_MIN_STEPS), False),
        "off": (dict(compile=False, dtype="bf16", max_steps=fast_paths.CPU_COMPILE_MIN_STEPS), False),
    }
    for name, (settings, compiles) in runs.items():
        events.clear()
        trainer = Trainer(make_config(corpus, tokenizer, tmp_path / name, **settings), TINY_MODEL)
        assert trainer.fast_paths.compile is compiles, name
        assert events == (["checks", "tokenizer"] if compiles else ["tokenizer"]), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["--attention", "fast"], "error: argument --attention: invalid choice: 'fast'"),
        (["--swiglu-kernel", "cuda"], "error: argument --swiglu-kernel: invalid choice: 'cuda'"),
        (["--loss-chunk-size", "-5"], "error: --loss-chunk-size must not be negative (0 = off), got -5"),
        (["--swiglu-kernel", "triton", "--device", "cpu"], "error: the 'triton' SwiGLU kernel runs on CUDA"),
        (["--attention", "efficient", "--device", "cpu"], "error: --attention efficient needs a CUDA GPU"),
    ],
)
def test_cli_fast_path_mistakes_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(train_cli.main([*args, "--out", str(tmp_path / "o")]))
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    assert captured.err.startswith(message), captured.err
    assert captured.err.count("\n") == 1


def test_cli_help_lists_every_fast_path_switch(capsys):
    assert train_cli.main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for switch in ("--no-compile", "--no-fused-adamw", "--attention", "--swiglu-kernel", "--loss-chunk-size"):
        assert switch in help_text
