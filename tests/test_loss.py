"""linear_cross_entropy equals the plain path, F.cross_entropy of the full logits, in loss and gradients,
while saving only the two gradients for backward instead of N x V tensors.

The reference is computed in float64 from the same float32 inputs; linear_cross_entropy runs in float32.
"""

import pytest
import torch
import torch.nn.functional as F

from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.transformer import Transformer
from llama_mini.ops.loss import (
    IGNORE_INDEX,
    NextTokenLoss,
    chunked_loss_pays,
    cross_entropy,
    linear_cross_entropy,
)

DIM, VOCAB = 16, 50
SHAPES = [(39,), (3, 13)]  # token shapes: flat, and (B, T); 39 tokens
CHUNK_SIZES = [1, 7, 16, 39, 100]  # one token, chunks that don't divide 39, exactly 39, larger than 39


def make_inputs(shape=(39,), dim=DIM, vocab=VOCAB, ignored_share=0.3, seed=0):
    """hidden (*shape, dim) and weight (vocab, dim) as float32 leaves, targets (*shape) with some ignored."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, dim, generator=generator).requires_grad_()
    weight = torch.randn(vocab, dim, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, shape, generator=generator)
    ignored = torch.rand(shape, generator=generator) < ignored_share
    return hidden, weight, targets.masked_fill(ignored, IGNORE_INDEX)


def plain_loss(hidden, weight, targets, ignore_index=IGNORE_INDEX):
    """The plain path: full logits, then F.cross_entropy in float32."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


def float64_loss(hidden, weight, targets, ignore_index=IGNORE_INDEX):
    """The plain path entirely in float64: the reference."""
    logits = hidden.double() @ weight.double().T
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


def loss_and_gradients(loss_fn, hidden, weight, targets, scale=1.0, **kwargs):
    """loss_fn's loss and the gradients of scale * loss w.r.t. hidden and weight."""
    loss = loss_fn(hidden, weight, targets, **kwargs)
    grad_hidden, grad_weight = torch.autograd.grad(scale * loss, (hidden, weight))
    return loss, grad_hidden, grad_weight


def assert_close_to_float64(actual, reference):
    for got, want in zip(actual, reference, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
def test_loss_and_gradients_equal_float64_plain_path(shape, chunk_size):
    hidden, weight, targets = make_inputs(shape)
    assert (targets == IGNORE_INDEX).any() and (targets != IGNORE_INDEX).any()
    chunked = loss_and_gradients(linear_cross_entropy, hidden, weight, targets, chunk_size=chunk_size)
    assert chunked[1].shape == hidden.shape and chunked[2].shape == weight.shape
    assert_close_to_float64(chunked, loss_and_gradients(float64_loss, hidden, weight, targets))


def test_custom_ignore_index_is_skipped():
    hidden, weight, targets = make_inputs(ignored_share=0.0)
    targets[::4] = 0  # token id 0 as padding
    chunked = loss_and_gradients(linear_cross_entropy, hidden, weight, targets, chunk_size=7, ignore_index=0)
    reference = loss_and_gradients(float64_loss, hidden, weight, targets, ignore_index=0)
    assert_close_to_float64(chunked, reference)


def test_upstream_gradient_scales_both_gradients():
    hidden, weight, targets = make_inputs()
    chunked = loss_and_gradients(linear_cross_entropy, hidden, weight, targets, scale=3.7, chunk_size=7)
    assert_close_to_float64(chunked, loss_and_gradients(float64_loss, hidden, weight, targets, scale=3.7))


def test_tied_weight_accumulates_embedding_and_output_gradients():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (3, 13), generator=generator)
    targets = torch.randint(0, VOCAB, (3, 13), generator=generator)
    initial = torch.randn(VOCAB, DIM, generator=generator)

    def tied_gradient(loss_fn, dtype, **kwargs):
        weight = initial.to(dtype, copy=True).requires_grad_()
        hidden = torch.tanh(F.embedding(tokens, weight))  # the same matrix as lookup table and output
        loss_fn(hidden, weight, targets, **kwargs).backward()
        return weight.grad

    chunked = tied_gradient(linear_cross_entropy, torch.float32, chunk_size=7)
    reference = tied_gradient(float64_loss, torch.float64)
    torch.testing.assert_close(chunked.double(), reference.double(), rtol=1e-5, atol=1e-6)


def saved_for_backward(fn):
    """Run fn() and return the (shape, bytes) of every tensor autograd saved for backward."""
    saved = []

    def pack(tensor):
        saved.append((tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = fn()
    return result, saved


def test_no_grad_path_gives_the_same_loss_and_saves_nothing():
    hidden, weight, targets = make_inputs()
    with torch.no_grad():
        loss, saved = saved_for_backward(lambda: linear_cross_entropy(hidden, weight, targets, chunk_size=7))
    assert saved == [] and loss.grad_fn is None
    torch.testing.assert_close(loss.double(), float64_loss(hidden, weight, targets).detach())


def test_inputs_without_grad_take_the_no_grad_path():
    hidden, weight, targets = make_inputs()
    hidden, weight = hidden.detach(), weight.detach()
    loss, saved = saved_for_backward(lambda: linear_cross_entropy(hidden, weight, targets, chunk_size=7))
    assert saved == [] and loss.grad_fn is None


def test_plain_path_saves_n_by_v_and_chunked_saves_only_the_gradients():
    n_tokens, dim, vocab = 64, 16, 1000
    hidden, weight, targets = make_inputs((n_tokens,), dim, vocab)
    _, plain_saved = saved_for_backward(lambda: plain_loss(hidden, weight, targets))
    assert ((n_tokens, vocab), n_tokens * vocab * 4) in plain_saved  # log_softmax's float32 output

    _, chunked_saved = saved_for_backward(
        lambda: linear_cross_entropy(hidden, weight, targets, chunk_size=16)
    )
    assert sorted(chunked_saved) == [((n_tokens, dim), n_tokens * dim * 4), ((vocab, dim), vocab * dim * 4)]


def test_frozen_weight_saves_only_grad_hidden():
    hidden, weight, targets = make_inputs()
    weight = weight.detach()
    loss, saved = saved_for_backward(lambda: linear_cross_entropy(hidden, weight, targets, chunk_size=7))
    assert saved == [((39, DIM), 39 * DIM * 4)]
    (grad_hidden,) = torch.autograd.grad(loss, hidden)
    (reference,) = torch.autograd.grad(float64_loss(hidden, weight, targets), hidden)
    torch.testing.assert_close(grad_hidden.double(), reference.double(), rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_matches_plain_path_under_autocast():
    hidden, weight, targets = make_inputs((3, 13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = loss_and_gradients(linear_cross_entropy, hidden, weight, targets, chunk_size=7)
        plain = loss_and_gradients(plain_loss, hidden, weight, targets)
    # float32 loss and float32 gradients for float32 inputs, as the plain path gives
    assert [tensor.dtype for tensor in chunked] == [tensor.dtype for tensor in plain] == [torch.float32] * 3
    # the same bf16 logits, so the float32 loss agrees closely; the gradients went through bf16 matmuls
    torch.testing.assert_close(chunked[0], plain[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(chunked[1:], plain[1:], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    # and it did run in bf16: further from the float32 loss than from the bf16 plain loss
    assert (chunked[0] - plain_loss(hidden, weight, targets)).abs() > (chunked[0] - plain[0]).abs()


def test_compiled_in_one_graph_matches_eager():
    hidden, weight, targets = make_inputs((3, 13))
    compiled = torch.compile(linear_cross_entropy, fullgraph=True)
    got = loss_and_gradients(compiled, hidden, weight, targets, chunk_size=16)
    eager = loss_and_gradients(linear_cross_entropy, hidden, weight, targets, chunk_size=16)
    for compiled_tensor, eager_tensor in zip(got, eager, strict=True):
        torch.testing.assert_close(compiled_tensor, eager_tensor, rtol=1e-5, atol=1e-6)


def test_all_targets_ignored_gives_what_f_cross_entropy_gives():
    hidden, weight, targets = make_inputs(ignored_share=1.0)
    chunked = loss_and_gradients(linear_cross_entropy, hidden, weight, targets, chunk_size=7)
    plain = loss_and_gradients(plain_loss, hidden, weight, targets)
    assert plain[0].isnan()  # mean over no tokens: 0 / 0
    for got, want in zip(chunked, plain, strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)  # nan loss, zero gradients


@pytest.mark.parametrize("chunk_size", [0, -1])
def test_nonpositive_chunk_size_raises_config_error(chunk_size):
    hidden, weight, targets = make_inputs()
    with pytest.raises(ConfigError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=chunk_size)


def test_mismatched_shapes_raise_value_error():
    hidden, weight, targets = make_inputs()
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(hidden, weight, targets[:-1])


def test_chunked_loss_pays_from_eight_mebibytes_of_logits():
    assert not chunked_loss_pays(256, 4096)  # 4 MiB of float32 logits: the two paths tie
    assert chunked_loss_pays(512, 4096)  # 8 MiB
    assert chunked_loss_pays(16 * 256, 32000)  # a stories15M micro-batch: 500 MiB


def test_cross_entropy_of_bf16_logits_is_float32_and_skips_ignored_targets():
    logits = torch.randn(2, 5, 11).bfloat16()
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = IGNORE_INDEX
    loss = cross_entropy(logits, targets)
    keep = targets != IGNORE_INDEX
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    expected = -log_probs[keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_cross_entropy_of_float64_logits_stays_float64():
    logits = torch.randn(3, 7, 13, dtype=torch.float64)
    targets = torch.randint(0, 13, (3, 7))
    loss = cross_entropy(logits, targets)
    expected = -torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).mean()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=0)


def tiny_model(**overrides) -> Transformer:
    """A two-layer model, the shape of test_training's TINY_MODEL."""
    torch.manual_seed(0)
    settings = dict(vocab_size=97, dim=32, n_layers=2, n_heads=2, max_seq_len=32, multiple_of=16)
    return Transformer(ModelArgs(**{**settings, **overrides}))


# ------------------------------------------------------------------------------- NextTokenLoss


@pytest.mark.parametrize("chunk", [0, 5, 64, 1000])
def test_next_token_loss_equals_cross_entropy_of_the_logits(chunk):
    model = tiny_model().double()
    tokens = torch.randint(0, 97, (3, 22), generator=torch.Generator().manual_seed(1))
    tokens[0, 5] = -100  # an ignored target
    x, y = tokens[:, :-1].clamp(min=0), tokens[:, 1:]

    expected = cross_entropy(model(x), y)
    expected.backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    loss = NextTokenLoss(model, chunk)(x, y)
    loss.backward()
    assert loss.dtype == torch.float64  # float64 logits keep float64, on both paths
    # float64 sums of the same terms in other orders: a few hundred ulps at most
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-10, atol=1e-14, msg=name)


def test_chunked_loss_path_never_builds_the_logits():
    """Saved for backward: the plain path keeps a (tokens, vocab) tensor; the chunked one none at all."""
    model = tiny_model(vocab_size=4096, max_seq_len=128)
    tokens = torch.randint(0, 4096, (4, 129))
    logits_elements = 4 * 128 * 4096

    def largest_saved(chunk: int) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            NextTokenLoss(model, chunk)(tokens[:, :-1], tokens[:, 1:])
        return max(sizes)

    assert largest_saved(0) >= logits_elements
    assert largest_saved(16) <= 4096 * 32  # at most the output matrix's gradient (dim 32)
