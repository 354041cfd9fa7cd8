"""The compiled CPU decode step (llama_mini.ops.aot_step, used by generation with compile=True or a saved
step): the same tokens and logits as eager decoding, sampled rows and eos lists included; one saved library
serving every checkpoint of a shape, loaded instead of rebuilt; the compile switch's three settings; and the
graph rewrite of matrix-vector products, checked on its own without a compiler.

Building a step runs the C++ compiler (about 10 s per shape on two cores): the tests share two builds, one
for a ragged batch of four rows and one for a single row, through one compile-cache folder.
"""

import pytest
import torch
from test_generation import tiny_model  # decisive logits: greedy tokens that do not hang on rounding
from torch.fx.experimental.proxy_tensor import make_fx

from llama_mini.generation import decode as decode_module
from llama_mini.generation import generate, iter_new_tokens, row_seed, steps
from llama_mini.ops import aot_step

pytestmark = [
    pytest.mark.numerics,
    pytest.mark.skipif(not aot_step.aot_compile_available(), reason="AOTInductor needs torch >= 2.8"),
]
needs_compiler = pytest.mark.skipif(
    not aot_step.cpp_compiler_available(), reason="building a compiled step needs a C++ compiler"
)

PROMPTS = [[1, 17, 42, 99, 5, 8, 61, 200, 3], [1, 250], [1, 7, 7, 7, 7, 120], [1]]  # ragged, BOS first


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cache_folder(tmp_path_factory, model):
    """A compile cache holding the single-row step of `model` (the ragged batch's is added by the first
    test that runs it), so that tests which must not build find it whatever order they run in."""
    folder = tmp_path_factory.mktemp("compiled")
    if aot_step.cpp_compiler_available():
        generate(model, [PROMPTS[0]], 1, temperature=0, compile=True, compile_cache=folder)
    return folder


@pytest.fixture
def no_builds(monkeypatch):
    """Any attempt to build a step fails the test: what runs must be loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a step was built")

    monkeypatch.setattr(aot_step, "_build", refuse)


@pytest.fixture
def steps_run(monkeypatch):
    """The compiled steps entered by generation, in order (a spy on CompiledStep.bound_to)."""
    entered = []
    real = aot_step.CompiledStep.bound_to

    def spy(self, model):
        entered.append(self.key)
        return real(self, model)

    monkeypatch.setattr(aot_step.CompiledStep, "bound_to", spy)
    return entered


def forget_loaded_steps(monkeypatch):
    """As in a new process: no step loaded yet (the folder still holds them)."""
    monkeypatch.setattr(aot_step, "_LOADED", {})


# ------------------------------------------------------------------------------------- equal to eager


@pytest.mark.slow
@needs_compiler
def test_compiled_greedy_equals_eager_on_a_ragged_batch(model, cache_folder, steps_run):
    eager = generate(model, PROMPTS, 12, temperature=0)
    assert generate(model, PROMPTS, 12, temperature=0, compile=True, compile_cache=cache_folder) == eager
    assert len(steps_run) == 1  # the compiled step did run
    assert list(cache_folder.glob("*.pt2"))  # and was saved for later runs
    assert all(layer.attention.cache is None for layer in model.layers)  # its KV cache removed again


@pytest.mark.slow
@needs_compiler
def test_compiled_step_logits_equal_full_recomputation(model, cache_folder):
    """Prefill eagerly, then one compiled step: its logits are the model's logits for the whole sequence,
    to float32 rounding (the step sums its products in another order), and its ids are their argmax."""
    sequence = torch.tensor(PROMPTS[0])[None]  # (1, 9)
    model.setup_cache(1, max_seq_len=256, static=True)
    example = (torch.zeros((1, 1), dtype=torch.long), torch.tensor(0))
    step = aot_step.compiled_step(decode_module.decode_step, model, example, cache_folder)
    try:
        with torch.inference_mode(), step.bound_to(model) as run:
            decode_module.next_token_logits(model, sequence[:, :-1], 0)  # fills positions 0..7
            logits, ids = run(sequence[:, -1:].contiguous(), torch.tensor(8))
            expected = model(sequence)[:, -1]
    finally:
        model.clear_cache()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert ids.tolist() == expected.argmax(-1).tolist()


@pytest.mark.slow
@needs_compiler
def test_compiled_sampling_and_penalty_equal_eager_with_the_same_seeds(model, cache_folder, steps_run):
    for settings in (
        dict(temperature=1.0, top_k=50, top_p=0.95, seed=123),
        dict(temperature=0.7, seed=[row_seed(5, row) for row in range(4)], repetition_penalty=1.3),
        dict(temperature=0, repetition_penalty=1.5),
    ):
        eager = generate(model, PROMPTS, 10, **settings)
        assert generate(model, PROMPTS, 10, compile=True, compile_cache=cache_folder, **settings) == eager
    assert len(steps_run) == 3  # each ran the compiled step


@pytest.mark.slow
@needs_compiler
def test_compiled_decoding_stops_rows_at_any_of_the_eos_ids(model, cache_folder, steps_run):
    free = generate(model, PROMPTS, 10, temperature=0)
    eos_ids = [free[1][3], free[2][5]]
    stopped = generate(
        model, PROMPTS, 10, temperature=0, eos_id=eos_ids, compile=True, compile_cache=cache_folder
    )
    assert stopped == generate(model, PROMPTS, 10, temperature=0, eos_id=eos_ids)
    assert stopped[1] == free[1][: free[1].index(eos_ids[0])] and len(stopped[1]) <= 3
    assert len(steps_run) == 1


# ------------------------------------------------------------------------------------- saved and reused


@pytest.mark.slow
@needs_compiler
def test_a_saved_step_is_loaded_in_a_new_process_not_rebuilt(model, cache_folder, monkeypatch, steps_run):
    eager = generate(model, [PROMPTS[0]], 8, temperature=0)
    assert generate(model, [PROMPTS[0]], 8, temperature=0, compile=True, compile_cache=cache_folder) == eager
    forget_loaded_steps(monkeypatch)
    monkeypatch.setattr(aot_step, "_build", lambda *args: pytest.fail("rebuilt a saved step"))
    assert generate(model, [PROMPTS[0]], 8, temperature=0, compile=True, compile_cache=cache_folder) == eager
    assert len(steps_run) == 2 and len(aot_step._LOADED) == 1  # the second run loaded the step from disk


@pytest.mark.slow
@needs_compiler
def test_a_step_this_process_has_is_saved_into_a_new_cache_folder_not_rebuilt(
    model, cache_folder, monkeypatch, tmp_path, steps_run
):
    """A step built or loaded earlier in the process (here from cache_folder; or built with no folder,
    as the benchmarks do) is copied into a cache folder asked for later, so a new process finds it."""
    eager = generate(model, [PROMPTS[0]], 6, temperature=0)
    assert generate(model, [PROMPTS[0]], 6, temperature=0, compile=True, compile_cache=cache_folder) == eager
    monkeypatch.setattr(aot_step, "_build", lambda *args: pytest.fail("rebuilt a step this process has"))
    other = tmp_path / "other"
    assert generate(model, [PROMPTS[0]], 6, temperature=0, compile=True, compile_cache=other) == eager
    copied = [path.name for path in other.glob(f"*{aot_step.ARTIFACT_SUFFIX}")]
    assert len(copied) == 1 and (cache_folder / copied[0]).is_file()  # the same step, by its key
    forget_loaded_steps(monkeypatch)  # as in a new process: only the folder has it
    assert generate(model, [PROMPTS[0]], 6, temperature=0, compile=True, compile_cache=other) == eager
    assert len(steps_run) == 3


@pytest.mark.slow
@needs_compiler
def test_one_saved_step_serves_another_checkpoint_of_the_same_shape(
    model, cache_folder, no_builds, monkeypatch, steps_run
):
    """The weights are not in the library: a second model of the same shape runs with its own weights."""
    other = tiny_model(seed=7)
    forget_loaded_steps(monkeypatch)
    ours = generate(other, [PROMPTS[0]], 12, temperature=0, compile=True, compile_cache=cache_folder)
    assert len(steps_run) == 1
    assert ours == generate(other, [PROMPTS[0]], 12, temperature=0)
    assert ours != generate(model, [PROMPTS[0]], 12, temperature=0)


@pytest.mark.slow
@needs_compiler
def test_interleaved_generators_on_two_models_each_decode_with_their_own_weights(
    model, cache_folder, steps_run
):
    """Two generators sharing one loaded step, advanced in turn: each rebinds its own model's tensors."""
    other = tiny_model(seed=7)
    expected = [generate(m, [PROMPTS[2]], 10, temperature=0)[0] for m in (model, other)]
    streams = [
        iter_new_tokens(m, [PROMPTS[2]], 10, temperature=0, compile=True, compile_cache=cache_folder)
        for m in (model, other)
    ]
    got = [[], []]
    for _ in range(10):
        for index, tokens in enumerate(streams):
            got[index].append(next(tokens)[1])
    for tokens in streams:
        tokens.close()  # ends the loop: the KV caches it set up are removed
    assert len(steps_run) == 2 and len(set(steps_run)) == 1  # one step, entered by both
    assert got == expected


def test_the_saved_steps_name_changes_with_what_the_code_depends_on(model):
    example = (torch.zeros((1, 1), dtype=torch.long), torch.tensor(0))
    key = aot_step.artifact_key(decode_module.decode_step, model, example)
    same_shape = tiny_model(seed=3)
    assert aot_step.artifact_key(decode_module.decode_step, same_shape, example) == key  # weights: no
    changed = {
        "batch": (model, (torch.zeros((2, 1), dtype=torch.long), example[1])),
        "dtype": (tiny_model().to(torch.bfloat16), example),
        "shape": (tiny_model(n_layers=3), example),
        "norm eps": (tiny_model(norm_eps=1e-6), example),
    }
    keys = {
        name: aot_step.artifact_key(decode_module.decode_step, m, inputs)
        for name, (m, inputs) in changed.items()
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        keys["threads"] = aot_step.artifact_key(decode_module.decode_step, model, example)
    finally:
        torch.set_num_threads(threads)
    assert len(set(keys.values()) | {key}) == len(keys) + 1, keys


def test_the_decode_step_and_the_functions_it_calls_share_the_file_its_name_hashes():
    """A saved step is named after the source file of the function compiled (artifact_key), so a change to
    next_token_logits or greedy_ids must change that file: they live beside decode_step."""
    import inspect

    step_file = inspect.getsourcefile(decode_module.decode_step)
    for function in (decode_module.next_token_logits, decode_module.greedy_ids):
        assert inspect.getsourcefile(function) == step_file, function.__name__
    called = {
        name
        for name in decode_module.decode_step.__code__.co_names
        if callable(getattr(decode_module, name, None))
    }
    assert called == {"next_token_logits", "greedy_ids"}  # a new callee: add it to the loop above


# ------------------------------------------------------------------------------------- the compile switch


@pytest.mark.slow
@needs_compiler
def test_compile_none_uses_a_saved_step_and_false_never_does(
    model, cache_folder, no_builds, steps_run, tmp_path, monkeypatch
):
    eager = generate(model, [PROMPTS[0]], 6, temperature=0)
    # None with an empty folder: eager, with a build started in the background (a stand-in here: nothing
    # is built in this process, no_builds); with no folder: eager, and nothing built at all.
    background = []
    monkeypatch.setattr(steps, "start_background_build", lambda *args: background.append(args))
    assert generate(model, [PROMPTS[0]], 6, temperature=0, compile=None, compile_cache=tmp_path) == eager
    assert len(background) == 1
    assert generate(model, [PROMPTS[0]], 6, temperature=0, compile=None) == eager
    assert steps_run == [] and len(background) == 1
    # None with the folder that holds the step (the fixture saved it): that step runs.
    assert generate(model, [PROMPTS[0]], 6, temperature=0, compile=None, compile_cache=cache_folder) == eager
    assert len(steps_run) == 1
    # False: eager even though the folder holds one.
    assert generate(model, [PROMPTS[0]], 6, temperature=0, compile=False, compile_cache=cache_folder) == eager
    assert len(steps_run) == 1


def test_a_step_that_cannot_be_built_falls_back_to_torch_compile_with_a_warning(model, monkeypatch, tmp_path):
    """The fallback's torch.compile runs with the eager backend here (no C++ build): what is checked is that
    the step goes through torch.compile, with the CPU's options, and decodes the eager tokens."""

    def no_compiler(*args):
        raise RuntimeError("no C++ compiler found")

    real_compile = torch.compile
    compiled_functions = []

    def compile_eagerly(function, **options):
        compiled_functions.append((function, options))
        return real_compile(function, backend="eager")

    forget_loaded_steps(monkeypatch)
    monkeypatch.setattr(aot_step, "_build", no_compiler)
    monkeypatch.setattr(torch, "compile", compile_eagerly)
    steps._compiled_step.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C.. compiler found.*using torch.compile"):
            compiled = generate(model, PROMPTS, 6, temperature=0, compile=True, compile_cache=tmp_path)
    finally:
        steps._compiled_step.cache_clear()
    assert compiled_functions == [
        (decode_module.decode_step, {"options": {"post_grad_custom_pre_pass": aot_step.matvec_pass()}})
    ]
    assert compiled == generate(model, PROMPTS, 6, temperature=0)


# ------------------------------------------------------------------------------------- the graph rewrite


def test_matvec_rewrite_turns_small_products_into_the_same_sums():
    """Products with at most MATVEC_MAX_ROWS rows (or columns) become multiply-and-sum; a larger one stays a
    matrix product; every result is the same to float32 rounding, and a bf16 product stays bf16."""
    torch.manual_seed(0)

    def products(x, h, big, weight):
        return x @ weight.T, weight @ h.T, big @ weight.T

    rows = aot_step.MATVEC_MAX_ROWS
    inputs = (torch.randn(3, 40), torch.randn(1, 40), torch.randn(rows + 1, 40), torch.randn(96, 40))
    graph_module = make_fx(products, tracing_mode="fake")(*inputs)
    assert aot_step.rewrite_matvecs(graph_module.graph) == 2
    graph_module.recompile()
    remaining = [node for node in graph_module.graph.nodes if node.target is torch.ops.aten.mm.default]
    assert len(remaining) == 1  # the one with MATVEC_MAX_ROWS + 1 rows and 96 columns
    for ours, expected in zip(graph_module(*inputs), products(*inputs), strict=True):
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)

    half = (inputs[1].to(torch.bfloat16), inputs[3].to(torch.bfloat16))
    graph_module = make_fx(lambda x, weight: x @ weight.T, tracing_mode="fake")(*half)
    assert aot_step.rewrite_matvecs(graph_module.graph) == 1
    graph_module.recompile()
    result = graph_module(*half)
    assert result.dtype == torch.bfloat16
    torch.testing.assert_close(result, half[0] @ half[1].T, rtol=1.6e-2, atol=1e-2)


def test_a_build_is_announced_before_the_wait(model, tmp_path, monkeypatch, capsys):
    """The first --compile for a model shape waits for the C++ compiler: one line says so first, and
    where the step will be kept (the build itself is stopped here, which falls back to torch.compile)."""
    started = []

    def build(function, model, example_inputs, path):
        started.append(path)
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(aot_step, "_build", build)
    monkeypatch.setattr(aot_step, "_LOADED", {})  # as in a new process: no step built by an earlier test
    monkeypatch.setattr(torch, "compile", lambda step, **options: step)  # the fallback, kept cheap
    model.clear_cache()
    with pytest.warns(RuntimeWarning, match="no compiler in this test"):
        generate(model, [[1, 2, 3]], 2, temperature=0, compile=True, compile_cache=str(tmp_path))
    err = capsys.readouterr().err
    assert started and started[0].parent == tmp_path
    assert f"compiling the decode step for this model shape ahead of time, once: saved as {started[0]}" in err
    model.clear_cache()
