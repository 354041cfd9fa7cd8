"""Fast by default: the eager step with less overhead (generation/eager.py) computes what the model's
forward computes, and the default decode (compile=None with a compile cache) decodes eagerly while a
compiled step is built in the background, then switches to it between two positions with the KV cache
carried over (generation/steps.py, generation/background.py).

The switch is tested with a stand-in for the background build whose "compiled" step is the model's own
decode_step run the way a compiled step runs it (a 0-d position tensor over the whole static cache), so it
needs no compiler and takes milliseconds; one slow test builds the real step in a child process.
"""

import contextlib

import pytest
import torch
from test_generation import tiny_model

from llama_mini.generation import decode as decode_module
from llama_mini.generation import generate, steps
from llama_mini.generation.background import PendingStep, start_build
from llama_mini.generation.decode import eager_step
from llama_mini.generation.eager import eager_logits
from llama_mini.model.cache import KVCache, StaticKVCache
from llama_mini.ops import aot_step

pytestmark = pytest.mark.numerics
needs_aot = pytest.mark.skipif(not aot_step.aot_compile_available(), reason="AOTInductor needs torch >= 2.8")

PROMPTS = [[1, 17, 42, 99, 5, 8, 61], [1, 250, 3]]


# ------------------------------------------------------------------------------------- the eager step


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"]
)
def test_eager_step_logits_equal_a_full_recomputation(dtype, tolerance):
    model = tiny_model().to(dtype)  # tiny: grouped-query attention (4 heads, 2 kv heads)
    tokens = torch.randint(0, model.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        expected = model(tokens)  # no cache: every position recomputed from the whole prefix
        model.setup_cache(2, max_seq_len=32)
        run = eager_step(model)
        assert run is not None
        decode_module.decode_step(model, tokens[:, :6], 0)  # the prefill
        for position in range(6, 20):
            logits, ids = run(tokens[:, position : position + 1], position)
            scale = expected[:, position].abs().max().item()
            assert (logits.float() - expected[:, position].float()).abs().max().item() <= tolerance * scale
            assert torch.equal(ids, logits.argmax(dim=-1))
    model.clear_cache()


def test_eager_step_is_not_used_for_models_it_does_not_cover():
    model = tiny_model()
    model.layers[1].attention_norm = torch.nn.LayerNorm(model.args.dim)  # not an RMSNorm
    assert eager_step(model) is None
    assert eager_step(tiny_model().train()) is None
    covered = tiny_model()
    covered.setup_cache(1, max_seq_len=16, static=True)  # another cache: the model's forward runs instead
    assert eager_logits(covered)(torch.tensor([[3]]), 0) is None
    hooked = tiny_model()  # FSDP gathers a block's weights in a forward pre-hook, which the step would skip
    hooked.layers[1].register_forward_pre_hook(lambda module, inputs: None)
    assert eager_step(hooked) is None


def test_generate_takes_the_eager_step_and_gives_the_same_tokens(monkeypatch):
    model = tiny_model()
    plain = generate(model, PROMPTS, 12, temperature=0, compile=False)
    calls = []
    real = eager_step

    def spy(model):
        run = real(model)
        return lambda tokens, position: calls.append(position) or run(tokens, position)

    monkeypatch.setattr(decode_module, "eager_step", spy)
    assert generate(model, PROMPTS, 12, temperature=0, compile=False) == plain
    assert calls  # the decode steps went through it
    monkeypatch.setattr(decode_module, "eager_step", lambda model: None)  # the model's forward instead
    assert generate(model, PROMPTS, 12, temperature=0, compile=False) == plain


# ------------------------------------------------------------------------------------- the switch


class StandInBuild:
    """A background build that is ready after `after` polls, and whose step runs the model's decode_step
    as a compiled step does: tokens (B, 1) and a 0-d position over the whole static KV cache."""

    key = "stand-in"

    def __init__(self, after: int, fails: bool = False):
        self.after, self.fails, self.polls, self.compiled_positions = after, fails, 0, []
        self.compiled_threads: set[int] = set()
        self.threads_while_building: set[int] = set()

    def state(self) -> str:
        self.threads_while_building.add(torch.get_num_threads())
        self.polls += 1
        if self.polls <= self.after:
            return "building"
        return "failed" if self.fails else "ready"

    def load(self, model):
        assert all(type(layer.attention.cache) is StaticKVCache for layer in model.layers)
        return self

    @contextlib.contextmanager
    def bound_to(self, model):
        def run(tokens, position):
            assert position.dim() == 0
            self.compiled_positions.append(int(position))
            self.compiled_threads.add(torch.get_num_threads())
            return list(decode_module.decode_step(model, tokens, position))

        yield run


@pytest.fixture
def two_threads():
    """torch on 2 threads for the test (whatever the machine has), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


@pytest.fixture
def builds(monkeypatch):
    """Background builds requested by generation, as stand-ins ready after 3 polls; every poll asks."""
    started = []

    def start(step, model, example_inputs, folder):
        started.append(StandInBuild(after=3))
        return started[-1]

    monkeypatch.setattr(steps, "start_background_build", start)
    monkeypatch.setattr(steps._SwitchingRun, "POLL_SECONDS", 0.0)
    return started


@needs_aot
def test_default_switches_to_the_built_step_mid_request_with_the_same_tokens(builds, tmp_path, two_threads):
    threads = two_threads
    model = tiny_model()
    eager = generate(model, PROMPTS, 16, temperature=0, compile=False)
    assert generate(model, PROMPTS, 16, temperature=0, compile_cache=tmp_path) == eager
    (build,) = builds
    # While it builds, decoding runs one thread fewer; the step runs with the thread count it was built for.
    assert build.threads_while_building == {threads, threads - 1} and build.compiled_threads == {threads}
    assert torch.get_num_threads() == threads
    # Eager for the first positions, the built step from the 4th decode step on, to the end.
    first = min(len(prompt) for prompt in PROMPTS)
    assert build.compiled_positions == list(range(first + 3, max(map(len, PROMPTS)) + 16 - 1))


@needs_aot
def test_default_switch_carries_the_kv_cache_over_logits_equal_eager(builds, tmp_path):
    model = tiny_model()
    options = steps.DecodeOptions(compile_cache=str(tmp_path))
    tokens = torch.randint(0, model.args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        expected = model(tokens)[0]  # every position recomputed without a cache
        with steps.step_for(model, decode_module.decode_step, options, 1, 24, eager_step) as run:
            decode_module.decode_step(model, tokens[:, :4], 0)
            for position in range(4, 23):
                logits, _ = run(tokens[:, position : position + 1], position)
                assert torch.allclose(logits[0], expected[position], atol=1e-5, rtol=1e-5)
    assert builds[0].compiled_positions == list(range(7, 23))  # after the switch, positions 7 ..
    assert model.layers[0].attention.cache is None  # the request made the cache, and removed it


@needs_aot
def test_default_keeps_decoding_eagerly_when_the_build_fails(monkeypatch, tmp_path):
    failing = StandInBuild(after=2, fails=True)
    monkeypatch.setattr(steps, "start_background_build", lambda *args: failing)
    monkeypatch.setattr(steps._SwitchingRun, "POLL_SECONDS", 0.0)
    model = tiny_model()
    eager = generate(model, PROMPTS, 10, temperature=0, compile=False)
    assert generate(model, PROMPTS, 10, temperature=0, compile_cache=tmp_path) == eager
    assert failing.polls == 3 and failing.compiled_positions == []  # asked until it failed, then no more


@needs_aot
def test_explicit_flags_and_no_cache_folder_start_no_background_build(builds, tmp_path):
    model = tiny_model()
    generate(model, PROMPTS, 4, temperature=0, compile=False, compile_cache=tmp_path)
    generate(model, PROMPTS, 4, temperature=0)  # the library's default: no compile cache
    assert builds == []


def test_recast_caches_share_the_buffers():
    model = tiny_model()
    model.setup_cache(2, max_seq_len=16)
    buffers = [layer.attention.cache.k_cache for layer in model.layers]
    steps._recast_caches(model, static=True)
    assert all(type(layer.attention.cache) is StaticKVCache for layer in model.layers)
    assert all(
        layer.attention.cache.k_cache is buffer for layer, buffer in zip(model.layers, buffers, strict=True)
    )
    steps._recast_caches(model, static=False)
    assert all(type(layer.attention.cache) is KVCache for layer in model.layers)
    assert all(layer.attention.cache.v_cache.shape == (2, 2, 16, 16) for layer in model.layers)


# ------------------------------------------------------------------------------------- the real build


@pytest.mark.slow
@needs_aot
@pytest.mark.skipif(not aot_step.cpp_compiler_available(), reason="building a step needs a C++ compiler")
def test_a_step_built_in_a_child_process_takes_over_mid_request(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_MINI_BACKGROUND_BUILDS", "1")
    monkeypatch.setattr(steps._SwitchingRun, "POLL_SECONDS", 0.0)
    started = []

    def start(*args):
        started.append(start_build(*args))
        return started[-1]

    monkeypatch.setattr(steps, "start_background_build", start)
    model = tiny_model()
    eager = generate(model, PROMPTS[:1], 40, temperature=0, compile=False)
    stream = decode_module.iter_new_tokens(model, PROMPTS[:1], 40, temperature=0, compile_cache=tmp_path)
    new = [next(stream)[1] for _ in range(5)]  # eager while the child builds
    (pending,) = started
    assert isinstance(pending, PendingStep)
    pending._child.wait(timeout=600)
    assert pending.state() == "ready", (tmp_path / f".{pending.key}.log").read_text()
    bound = []
    real = aot_step.CompiledStep.bound_to
    monkeypatch.setattr(aot_step.CompiledStep, "bound_to", lambda self, m: bound.append(1) or real(self, m))
    new += [token for _, token in stream]  # the next poll finds the step: compiled from here on
    assert bound == [1]
    assert new == eager[0]
    # The next request loads it at once: no child is started.
    started.clear()
    assert generate(model, PROMPTS[:1], 40, temperature=0, compile_cache=tmp_path) == eager
    assert started == []


# ------------------------------------------------------------------------------------- quantized models


@needs_aot
@pytest.mark.parametrize(("scheme", "group_size"), [("int8", 128), ("int4", 32)])
def test_the_child_rebuilds_a_quantized_model_as_the_step_the_parent_waits_for(
    tmp_path, monkeypatch, scheme, group_size
):
    """`--quantize` with the default: the child quantizes its own random weights as the parent's model was
    quantized, which gives the same step key (shapes, dtypes, modules); the child builds it (the compiler is
    stood in for here: the real build is the slow test above, on a float model)."""
    from llama_mini.generation import background
    from llama_mini.ops.quantize import quantize

    monkeypatch.setenv("LLAMA_MINI_BACKGROUND_BUILDS", "1")
    model = quantize(tiny_model(), scheme, group_size)
    steps.ensure_cache(model, 1, 32, static=True)
    inputs = (torch.zeros((1, 1), dtype=torch.long), torch.tensor(0))
    launched, built = [], []
    monkeypatch.setattr(
        background.subprocess, "Popen", lambda command, **kwargs: launched.append(command[-1])
    )
    pending = start_build(decode_module.decode_step, model, inputs, tmp_path)
    assert pending is not None and len(launched) == 1  # a child was started for it, with its spec

    def compiled_step(function, rebuilt, example_inputs, folder):
        built.append(aot_step.artifact_key(function, rebuilt, example_inputs))

    monkeypatch.setattr(background.aot_step, "compiled_step", compiled_step)
    assert background.build(launched[0]) == 0
    assert built == [pending.key]
    assert not (tmp_path / f"{pending.key}{background.UNBUILDABLE_SUFFIX}").exists()


def test_while_a_build_runs_decoding_leaves_it_a_core_and_takes_it_back_after():
    """CoreForBuilds: one torch thread fewer while a child builds (every core busy with a thread of ours
    would make each parallel operation wait for the one sharing its core with the compiler), the count
    put back once the build is over and at release()."""
    from llama_mini.generation.background import CoreForBuilds

    class Pending:
        def __init__(self, states):
            self.states = iter(states)

        def state(self):
            return next(self.states)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        core = CoreForBuilds([Pending(["building", "building", "ready"]), None])
        core.POLL_SECONDS = 0.0
        seen = []
        for _ in range(4):
            core()
            seen.append(torch.get_num_threads())
        assert seen == [2, 2, 3, 3]
        core = CoreForBuilds([Pending(["building"] * 5)])
        core()
        assert torch.get_num_threads() == 2
        core.release()  # the request ended before the build did
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
