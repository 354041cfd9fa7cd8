"""The output layer and its cross-entropy in one step, without ever holding the full logits.

The model ends in logits = h W^T followed by a mean cross-entropy in float32:

    h       (N, dim)   final hidden states, N = batch x sequence tokens
    W       (V, dim)   the output matrix (possibly the embedding matrix, tied)
    logits  (N, V)     z_i = h_i W^T
    loss    scalar     (1 / n_valid) sum_i [logsumexp(z_i) - z_i[y_i]]   over the n_valid non-ignored targets

Memory. The plain path (`F.linear` then `F.cross_entropy`) holds N x V float32 logits, then log_softmax's
output of the same size, which it saves for backward, and in backward the N x V gradient of the logits:
each 4 N V bytes, 2.1 GB at N = 16384, V = 32000 and 8.4 GB at V = 128256 (Llama 3), usually the largest
tensors of a training step (under bf16 autocast also the bf16 logits and their gradient, 2 N V bytes each).
`linear_cross_entropy` walks the tokens in chunks of `chunk_size` rows and holds at most chunk_size x V
float32 logits at a time (4 chunk_size V bytes, 0.5 GB at chunk 4096, V = 32000; under autocast also the
chunk's bf16 logits), reusing that buffer for their gradient. What it keeps from forward to backward is
grad_hidden (N x dim) and grad_weight (V x dim), the sizes of the inputs themselves.

Why the gradient may be computed in the forward pass. The loss is a scalar and the last operation of the
graph, so by the chain rule anything computed from it only reaches h and W as

    d total / d h = grad_output * d loss / d h,     d total / d W = grad_output * d loss / d W,

with grad_output a scalar (1 for loss.backward(), 1 / grad_accum for accumulated steps, a loss scale).
The forward pass therefore computes d loss / d h and d loss / d W right after each chunk's loss, while its
logits are still at hand, and backward only multiplies them by grad_output. For one chunk,

    d loss / d z_i = (softmax(z_i) - onehot(y_i)) / n_valid     (a zero row for an ignored target)
    grad_hidden[chunk] = (d loss / d z) W          grad_weight += (d loss / d z)^T h[chunk]

Cost. The same FLOPs as the plain path, 6 N V dim: the logits matmul and the two gradient matmuls, with the
two gradient matmuls done in forward instead of backward (so the forward takes about three times as long
and the backward almost nothing). The gradient work is wasted if backward never runs, so when no gradient
can be needed (torch.no_grad, or neither input requires grad) only the loss is computed. Double backward
is not supported: the saved gradients are constants.

Precision. The matmuls run in the inputs' dtype, or in the autocast dtype under torch.autocast (as
nn.Linear would); the logits are then cast to float32, and logsumexp, softmax and the loss sum are float32
(all of them float64 for float64 inputs, as in `cross_entropy`). grad_weight is summed over chunks in
float32 (float64 for float64 inputs) and cast to the weight's dtype at the end, so float32 master weights
under bf16 autocast get a float32 gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llama_mini.errors import ConfigError

__all__ = [
    "CHUNKED_LOSS_MIN_BYTES",
    "IGNORE_INDEX",
    "LinearCrossEntropy",
    "NextTokenLoss",
    "chunked_loss_pays",
    "cross_entropy",
    "linear_cross_entropy",
]

# The target id that the loss skips (padding, the prompts of chat data): F.cross_entropy's default.
IGNORE_INDEX = -100

# chunked_loss_pays: from this size of the plain path's float32 logits, the chunked loss was faster on a CPU
CHUNKED_LOSS_MIN_BYTES = 8 * 2**20


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Mean next-token cross-entropy in nats: logits (B, T, V), targets (B, T) -> scalar.

    The log-softmax runs in float32 at least, even under bf16 autocast: over a large vocabulary the
    normaliser sums many small exponentials. float64 logits stay float64 (as in RMSNorm), so a float64
    model's loss is float64 too. Targets equal to `ignore_index` (padding) are skipped.
    """
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> float32
    return F.cross_entropy(wide.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


class NextTokenLoss(nn.Module):
    """The training objective around a model: (tokens, targets) (B, T) -> mean next-token cross-entropy.

        chunk_size 0:   cross_entropy(model.output(h), targets)                   the plain path
        chunk_size > 0: linear_cross_entropy(h, model.output.weight, targets)     never all the logits

    with h = model.hidden_states(tokens). The model itself returns logits only; this module is what
    training calls, compiles and wraps in DDP, so the loss is compiled together with the model and the
    gradient synchronisation sees the whole step. It holds the model as a submodule: its parameters are the
    model's (under the prefix "model.").
    """

    def __init__(self, model: nn.Module, chunk_size: int = 0):
        super().__init__()
        if chunk_size < 0:
            raise ConfigError(f"chunk_size must not be negative (0 = the plain loss), got {chunk_size}")
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, tokens: Tensor, targets: Tensor) -> Tensor:
        hidden = self.model.hidden_states(tokens)  # (B, T, dim)
        if self.chunk_size > 0:
            return linear_cross_entropy(hidden, self.model.output.weight, targets, self.chunk_size)
        return cross_entropy(self.model.output(hidden), targets)


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int = 4096, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean cross-entropy of the logits hidden W^T: hidden (..., dim), weight (V, dim), targets (...) -> ().

    Equal to `F.cross_entropy((hidden @ weight.T).float().reshape(-1, V), targets.reshape(-1),
    ignore_index=ignore_index)`, float32, but computed `chunk_size` tokens at a time, never holding more than
    chunk_size x V logits (see the module docstring). Targets equal to `ignore_index` are skipped; if every
    target is ignored the loss is 0 / 0 = nan and the gradients are zero, exactly as F.cross_entropy gives.
    Under torch.autocast the matmuls run in the autocast dtype, like nn.Linear.
    """
    if chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"expected hidden (..., dim), weight (vocab, dim) and targets (...) with the same leading shape; "
            f"got hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, targets {tuple(targets.shape)}"
        )
    compute_dtype = _compute_dtype(hidden, weight)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, ignore_index, compute_dtype)
    loss, _, _ = _loss_and_gradients(
        hidden, weight, targets, chunk_size, ignore_index, compute_dtype, need_hidden=False, need_weight=False
    )
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """linear_cross_entropy's autograd Function: forward computes the loss and its gradients.

    Inputs are already flat: hidden (N, dim), weight (V, dim), targets (N,). Forward returns the scalar loss
    and saves d loss / d hidden and d loss / d weight (only those that an input requiring grad needs);
    backward multiplies them by the scalar grad_output.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        chunk_size: int,
        ignore_index: int,
        compute_dtype: torch.dtype,
    ) -> Tensor:
        loss, grad_hidden, grad_weight = _loss_and_gradients(
            hidden,
            weight,
            targets,
            chunk_size,
            ignore_index,
            compute_dtype,
            need_hidden=ctx.needs_input_grad[0],
            need_weight=ctx.needs_input_grad[1],
        )
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output
        if grad_weight is not None:
            grad_weight = grad_weight * grad_output
        return grad_hidden, grad_weight, None, None, None, None


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the matmuls: the autocast dtype under torch.autocast, else the inputs' common dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:  # as h @ W.T would: no silent casting outside autocast
        raise ValueError(f"hidden is {hidden.dtype} but weight is {weight.dtype}; cast one or use autocast")
    return hidden.dtype


def _loss_and_gradients(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int,
    ignore_index: int,
    compute_dtype: torch.dtype,
    need_hidden: bool,
    need_weight: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The mean loss and, where asked, its gradients w.r.t. hidden (N, dim) and weight (V, dim)."""
    n_tokens = hidden.shape[0]
    hidden_compute, weight_compute = hidden.to(compute_dtype), weight.to(compute_dtype)
    valid = targets != ignore_index
    n_valid = valid.sum()
    safe_targets = torch.where(valid, targets, 0)  # any in-range id for ignored rows, which are masked out
    # d loss / d loss_i: 1 / n_valid for counted tokens, 0 for ignored ones (clamped: no 0 / 0 if none count)
    accumulate_dtype = torch.promote_types(compute_dtype, torch.float32)
    token_weight = valid.to(accumulate_dtype) / n_valid.clamp(min=1)

    loss_sum = torch.zeros((), dtype=accumulate_dtype, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if need_weight else None
    )
    # one float32 (float64 for float64 inputs) (chunk, V) buffer for every chunk's logits, then their
    # exponentials, then their gradient
    logits_buffer = torch.empty(
        min(chunk_size, n_tokens), weight.shape[0], dtype=accumulate_dtype, device=hidden.device
    )
    for start in range(0, n_tokens, chunk_size):
        end = min(start + chunk_size, n_tokens)
        hidden_chunk, chunk_targets = hidden_compute[start:end], safe_targets[start:end, None]
        logits = logits_buffer[: end - start]
        if compute_dtype == accumulate_dtype:
            torch.mm(hidden_chunk, weight_compute.T, out=logits)
        else:  # the matmul in bf16/fp16, its result cast to float32
            logits.copy_(hidden_chunk @ weight_compute.T)
        target_logits = logits.gather(1, chunk_targets).squeeze(1)
        # logsumexp by hand so that its exponentials, exp(z - max), are kept in the logits' buffer for softmax
        row_max = logits.amax(dim=-1, keepdim=True)
        exp_logits = logits.sub_(row_max).exp_()
        sum_exp = exp_logits.sum(dim=-1, keepdim=True)
        logsumexp = (sum_exp.log() + row_max).squeeze(1)
        loss_sum = loss_sum + torch.where(valid[start:end], logsumexp - target_logits, 0.0).sum()
        if not (need_hidden or need_weight):
            continue
        # (softmax - onehot) * token_weight, with softmax = exp(z - max) / sum_exp, in the same buffer
        chunk_weight = token_weight[start:end, None]
        grad_logits = exp_logits.mul_(chunk_weight / sum_exp)
        grad_logits = grad_logits.scatter_add_(1, chunk_targets, -chunk_weight).to(compute_dtype)
        if need_hidden:
            grad_hidden[start:end] = grad_logits @ weight_compute
        if need_weight:
            if compute_dtype == accumulate_dtype:
                grad_weight.addmm_(grad_logits.T, hidden_chunk)
            else:  # a bf16/fp16 product, summed in float32
                grad_weight += grad_logits.T @ hidden_chunk
    loss = loss_sum / n_valid  # nan when every target is ignored, as F.cross_entropy
    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    return loss, grad_hidden, grad_weight


def chunked_loss_pays(n_tokens: int, vocab_size: int) -> bool:
    """Whether training should use linear_cross_entropy rather than the plain logits + cross-entropy.

    Chunked when the plain path's float32 logits, n_tokens x vocab_size x 4 bytes, would reach
    CHUNKED_LOSS_MIN_BYTES (8 MiB), on every device: from there the chunked path is faster on a CPU, as it
    skips allocating and passing over three N x V tensors, and below it the two tie (bench/loss.py;
    docs/BENCHMARKS.md, "The chunked output layer + cross-entropy on a CPU"). On a GPU the memory saving
    holds as on a CPU; its speed there waits for a GPU measurement.
    """
    return n_tokens * vocab_size * 4 >= CHUNKED_LOSS_MIN_BYTES
