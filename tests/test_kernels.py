"""The SwiGLU kernels compute silu(a) * b and its gradients, and the fused ones save two tensors, not three.

Every kernel is checked against the formula h = a * sigmoid(a) * b evaluated in float64, with its gradients
from float64 autograd. The Triton kernels run on CPU tensors under Triton's interpreter, which must be on
before llama_mini.ops.kernels is imported: those checks run in a subprocess with TRITON_INTERPRET=1 (this file
imported there for its helpers), and the tests here assert on what it returns.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from llama_mini.errors import ConfigError
from llama_mini.ops import kernels
from llama_mini.ops.kernels import SWIGLU_KERNELS, best_swiglu_kernel, swiglu, triton_available

SHAPE = (3, 7, 1001)  # 21,021 elements: not a multiple of the Triton block (1024), so the tail is masked
# (dtype, how the kernel rounds) -> tolerance against float64. "fused": float32 arithmetic, one rounding to
# nearest at the end, at most half an ulp; "eager": a rounding after each operation (silu, the product, each
# step of backward); "interpreter": Triton's interpreter, which converts float32 to bf16 by truncation (a
# GPU rounds to nearest), so up to one ulp. atol covers derivatives near zero, where relative error is large.
TOLERANCES = {
    (torch.float32, "fused"): dict(rtol=1e-6, atol=1e-6),  # a few float32 ulps (2**-23 each)
    (torch.float32, "eager"): dict(rtol=1e-6, atol=1e-6),
    (torch.float32, "interpreter"): dict(rtol=1e-6, atol=1e-6),
    (torch.bfloat16, "fused"): dict(rtol=2**-8, atol=1e-5),  # 8 significant bits: half an ulp is 2**-8
    (torch.bfloat16, "eager"): dict(rtol=2**-6, atol=1e-5),
    (torch.bfloat16, "interpreter"): dict(rtol=2**-7, atol=1e-5),
    (torch.float16, "fused"): dict(rtol=2**-11, atol=1e-5),  # 11 significant bits: half an ulp is 2**-11
    (torch.float16, "eager"): dict(rtol=2**-9, atol=1e-5),
    (torch.float16, "interpreter"): dict(rtol=2**-11, atol=1e-5),  # rounds to nearest in fp16
}


def make_inputs(dtype: torch.dtype, shape=SHAPE, seed: int = 0):
    """Gate, value and an upstream gradient; the first 64 gates run from -30 to 30, where sigmoid saturates."""
    generator = torch.Generator().manual_seed(seed)
    gate = 3 * torch.randn(shape, generator=generator)
    gate.view(-1)[:64] = torch.linspace(-30, 30, 64)
    value = torch.randn(shape, generator=generator)
    upstream = torch.randn(shape, generator=generator)
    return gate.to(dtype), value.to(dtype), upstream.to(dtype)


def run_kernel(kernel: str, gate, value, upstream):
    """h = swiglu(gate, value) and the gradients of <upstream, h> with respect to gate and value."""
    gate, value = gate.clone().requires_grad_(), value.clone().requires_grad_()
    out = swiglu(gate, value, kernel)
    d_gate, d_value = torch.autograd.grad(out, (gate, value), upstream)
    return out.detach(), d_gate, d_value


def formula_in_float64(gate, value, upstream):
    """The same three results from a * sigmoid(a) * b written out, in float64 from the same inputs."""
    a = gate.double().requires_grad_()
    b = value.double().requires_grad_()
    out = a / (1 + torch.exp(-a)) * b
    d_gate, d_value = torch.autograd.grad(out, (a, b), upstream.double())
    return out.detach(), d_gate, d_value


def assert_matches_formula(results, inputs, rounding: str):
    """`rounding`: "eager", "fused" or "interpreter", which picks the tolerance for the inputs' dtype."""
    dtype = inputs[0].dtype
    tolerance = TOLERANCES[(dtype, rounding)]
    names = ("h", "d_gate", "d_value")
    for name, got, expected in zip(names, results, formula_in_float64(*inputs), strict=True):
        assert got.dtype == dtype, name
        torch.testing.assert_close(
            got.double(), expected, **tolerance, msg=lambda m, name=name: f"{name}: {m}"
        )


def saved_bytes(kernel: str, shape=(4, 8, 32)) -> int:
    """Bytes of the tensors that autograd keeps for backward when running the kernel forward."""
    gate = torch.randn(shape, requires_grad=True)
    value = torch.randn(shape, requires_grad=True)
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        swiglu(gate, value, kernel)
    return sum(sizes)


def hidden_sized_bytes(shape=(4, 8, 32)) -> int:
    return torch.Size(shape).numel() * 4  # float32


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_NAMES = ["float32", "bfloat16", "float16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
@pytest.mark.parametrize("kernel", ["eager", "compiled"])
def test_kernel_equals_swiglu_formula_in_float64(kernel, dtype):
    inputs = make_inputs(dtype)
    assert_matches_formula(run_kernel(kernel, *inputs), inputs, "eager" if kernel == "eager" else "fused")


def test_compiled_backward_passes_gradcheck_in_float64():
    gate = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: swiglu(a, b, "compiled"), (gate, value))


def test_compiled_kernel_makes_non_contiguous_inputs_contiguous():
    gate, value, upstream = make_inputs(torch.float32, shape=(64, 5))
    gate, value = gate.t(), value.t()  # (5, 64), strides (1, 5)
    assert not gate.is_contiguous()
    results = run_kernel("compiled", gate, value, upstream.t())
    assert_matches_formula(results, (gate, value, upstream.t()), "fused")


@pytest.mark.parametrize("kernel,tensors", [("eager", 3), ("compiled", 2)])
def test_autograd_saves_hidden_sized_tensors(kernel, tensors):
    # eager: silu saves a, the product saves silu(a) and b. compiled: a and b only.
    assert saved_bytes(kernel) == tensors * hidden_sized_bytes()


def test_compiled_kernel_does_not_recompile_for_new_token_counts():
    torch._dynamo.reset()
    counters.clear()
    run_kernel("compiled", *make_inputs(torch.float32, shape=(2, 5, 32)))
    graphs = counters["stats"]["unique_graphs"]
    for tokens in (11, 7, 64):
        run_kernel("compiled", *make_inputs(torch.float32, shape=(2, tokens, 32)))
    assert graphs == 2  # forward and backward
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_kernel_inside_torch_compile_matches_eager():
    torch.manual_seed(0)
    w1, w3 = torch.nn.Linear(16, 40, bias=False), torch.nn.Linear(16, 40, bias=False)
    w2 = torch.nn.Linear(40, 16, bias=False)
    parameters = [w1.weight, w2.weight, w3.weight]
    x = torch.randn(2, 5, 16)
    upstream = torch.randn(2, 5, 16)

    def feed_forward(x):
        return w2(swiglu(w1(x), w3(x), "compiled"))

    def output_and_gradients(fn):
        inputs = x.clone().requires_grad_()
        out = fn(inputs)
        return out.detach(), *torch.autograd.grad(out, [inputs, *parameters], upstream)

    eager = output_and_gradients(lambda x: w2(swiglu(w1(x), w3(x), "eager")))
    compiled = output_and_gradients(torch.compile(feed_forward, fullgraph=True))  # no graph break
    for got, expected in zip(compiled, eager, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_unknown_kernel_name_raises_config_error_naming_the_choices():
    gate = torch.randn(2, 3)
    with pytest.raises(ConfigError, match="eager, compiled, triton"):
        swiglu(gate, gate, "fused")
    assert SWIGLU_KERNELS == ("eager", "compiled", "triton")


def test_fused_kernels_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        swiglu(torch.randn(2, 3), torch.randn(3), "compiled")


@pytest.mark.skipif(kernels._TRITON_INTERPRETED, reason="this process runs Triton's interpreter")
def test_triton_kernel_on_cpu_without_interpreter_raises_config_error():
    gate = torch.randn(2, 3)
    with pytest.raises(ConfigError, match="CUDA") as error:
        swiglu(gate, gate, "triton")
    assert "'eager' or 'compiled'" in str(error.value)


def test_triton_kernel_without_triton_installed_raises_config_error(monkeypatch):
    monkeypatch.setattr(kernels, "triton", None)  # as if `import triton` had failed
    assert not triton_available()
    with pytest.raises(ConfigError, match="needs the triton package") as error:
        swiglu(torch.randn(2, 3), torch.randn(2, 3), "triton")
    assert "'eager' or 'compiled'" in str(error.value)


def test_best_kernel_is_eager_on_cpu_and_compiled_on_cuda():
    assert best_swiglu_kernel(torch.device("cpu")) == "eager"
    assert best_swiglu_kernel(torch.device("mps")) == "eager"
    assert best_swiglu_kernel(torch.device("cuda")) == "compiled"


# ---------------------------------------------------------------------------------------------------------
# Triton, under the interpreter, in a subprocess.
# ---------------------------------------------------------------------------------------------------------


def triton_measurements() -> dict:
    """Everything the Triton tests assert on; runs in the TRITON_INTERPRET=1 subprocess."""
    results = {"available": triton_available()}
    for dtype in DTYPES:
        inputs = make_inputs(dtype)
        results[str(dtype)] = (inputs, run_kernel("triton", *inputs))
    gate, value, upstream = make_inputs(torch.float32, shape=(64, 5))
    non_contiguous = (gate.t(), value.t(), upstream.t())
    results["non-contiguous"] = (non_contiguous, run_kernel("triton", *non_contiguous))
    results["saved bytes"] = saved_bytes("triton")

    gate, value, upstream = make_inputs(torch.float32, shape=(3, 100))
    gate_before, value_before = gate.clone(), value.clone()
    gate.requires_grad_()
    value.requires_grad_()
    swiglu(gate, value, "triton").backward(upstream)
    results["inputs unchanged"] = torch.equal(gate, gate_before) and torch.equal(value, value_before)

    # backend="eager": dynamo's tracing only, enough to see it step around the Triton call (a graph break)
    compiled = torch.compile(lambda a, b: 2 * swiglu(a, b, "triton"), backend="eager")
    results["inside torch.compile"] = (compiled(gate, value), 2 * swiglu(gate, value, "eager"))
    return results


SUBPROCESS = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import test_kernels
torch.save(test_kernels.triton_measurements(), sys.argv[2])
"""


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    pytest.importorskip("triton")
    path = tmp_path_factory.mktemp("triton") / "results.pt"
    environment = {**os.environ, "TRITON_INTERPRET": "1"}
    folder = str(Path(__file__).parent)
    process = subprocess.run(
        [sys.executable, "-c", SUBPROCESS, folder, str(path)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    return torch.load(path, weights_only=False)


def test_triton_is_available_under_the_interpreter(triton_results):
    assert triton_results["available"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_NAMES)
def test_triton_kernel_equals_swiglu_formula_in_float64(triton_results, dtype):
    inputs, results = triton_results[str(dtype)]
    assert_matches_formula(results, inputs, "interpreter")


def test_triton_kernel_makes_non_contiguous_inputs_contiguous(triton_results):
    inputs, results = triton_results["non-contiguous"]
    assert not inputs[0].is_contiguous()
    assert_matches_formula(results, inputs, "interpreter")


def test_triton_kernel_saves_two_hidden_sized_tensors(triton_results):
    assert triton_results["saved bytes"] == 2 * hidden_sized_bytes()


def test_triton_backward_leaves_gate_and_value_unchanged(triton_results):
    assert triton_results["inputs unchanged"]


def test_triton_kernel_runs_inside_torch_compile(triton_results):
    got, expected = triton_results["inside torch.compile"]
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", ["compiled", "triton"])
def test_fused_kernel_matches_eager_in_bfloat16_on_cuda(kernel):
    if kernel == "triton" and not triton_available():
        pytest.skip("triton is not installed")
    inputs = [tensor.cuda() for tensor in make_inputs(torch.bfloat16, shape=(8, 129, 1001))]
    fused = run_kernel(kernel, *inputs)
    eager = run_kernel("eager", *inputs)
    for got, expected in zip(fused, eager, strict=True):
        torch.testing.assert_close(got, expected)  # bf16 defaults: rtol 1.6e-2, atol 1e-5
    assert_matches_formula([tensor.cpu() for tensor in fused], [tensor.cpu() for tensor in inputs], "fused")
