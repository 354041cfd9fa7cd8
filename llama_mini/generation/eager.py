"""The eager decode step with less per-token overhead: one new position of a plain model, written for T = 1.

    logits_of = eager_logits(model)         # None where the model is not one this covers
    logits = logits_of(tokens (B, 1), position)     # (B, V); None for a call it does not cover

At batch 1 a small model's decode step is a few hundred small operations, and eager PyTorch spends most of
the step dispatching them from Python rather than computing (docs/BENCHMARKS.md, "Fast by default").
`decode_step` runs the model's own forward, which serves every case (training, prompts of any length, three
kinds of KV cache); for one new position after a KVCache's filled prefix, most of its work is bookkeeping:
position tensors, a row gather of the RoPE table, float conversions that change nothing in float32, masks
that are None. This step does the same arithmetic with the bookkeeping taken out:

    RoPE       the model's table read as complex numbers (a view, no copy), one complex product per
               tensor: (x0 + i x1)(cos + i sin), the rotation `apply_rotary_emb` writes out in real terms;
    RMSNorm    torch's fused rms_norm, the same formula, where the weights are float32 (otherwise the
               model's own module, which rounds where Meta's code does);
    the cache  the new key and value written straight into its buffers, and attention over the filled
               prefix 0 .. position, as KVCache.update returns it (one query needs no mask).

Everything else is the model's own modules (the linear layers, the feed-forward variant), so quantized or
LoRA-wrapped linear layers run as they do in the model. The logits equal `decode_step`'s within float
rounding (tests/test_generation_fast_default.py). decode.py's `eager_step` runs it, and `decode_step` for
anything it does not cover (the prefill included).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llama_mini.model.cache import KVCache
from llama_mini.model.transformer import Attention, RMSNorm, Transformer, repeat_kv

__all__ = ["eager_logits"]


def eager_logits(model: Transformer) -> Callable[[torch.Tensor, int], torch.Tensor | None] | None:
    """logits_of(tokens (B, 1), position: int) -> next-token logits (B, V) for `model` in eval mode with
    KVCaches (None for a call with more tokens, a tensor position or another cache), or None where this
    does not cover the model at all."""
    if not _covered(model):
        return None
    rotations = torch.view_as_complex(model.rope.rotations)  # (max_seq_len, D/2): cos + i sin

    def logits_of(tokens: torch.Tensor, position: int) -> torch.Tensor | None:
        cache = model.layers[0].attention.cache
        if tokens.shape[1] != 1 or type(cache) is not KVCache or not isinstance(position, int):
            return None
        return _one_position(model, tokens, position, rotations[position])

    return logits_of


def _covered(model: Transformer) -> bool:
    rotations = getattr(getattr(model, "rope", None), "rotations", None)
    return (
        isinstance(model, Transformer)
        and not model.training
        and rotations is not None
        and rotations.dtype == torch.float32
        and rotations.is_contiguous()
        and all(type(layer.attention) is Attention for layer in model.layers)
        and all(type(norm) is RMSNorm for norm in _norms(model))
        and not any(_hooked(module) for module in _skipped(model))
    )


def _skipped(model: Transformer) -> list:
    """The modules whose forward this step does the work of instead of calling."""
    return [model, *model.layers, *(layer.attention for layer in model.layers), *_norms(model)]


def _hooked(module: torch.nn.Module) -> bool:
    """Whether `module` has forward hooks, which calling around its forward would skip: FSDP's, which
    gather each block's weights before its forward (a sample during an FSDP run), or a user's."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _norms(model: Transformer) -> list:
    return [model.norm, *(norm for layer in model.layers for norm in (layer.attention_norm, layer.ffn_norm))]


def _norm(module: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm(x): torch's fused kernel where x and the weight are float32 (the same formula), else the
    module, which computes in float32 and rounds before the weight."""
    if x.dtype == torch.float32 and module.weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.eps)
    return module(x)


def _rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (B, heads, D) turned by one position's rotation (D/2,) complex, in float32, back in x's dtype."""
    wide = x if x.dtype == torch.float32 else x.float()
    pairs = torch.view_as_complex(wide.unflatten(-1, (-1, 2)))  # (B, heads, D/2): x0 + i x1
    rotated = torch.view_as_real(pairs * rotation).flatten(-2)
    return rotated if x.dtype == torch.float32 else rotated.type_as(x)


def _one_position(
    model: Transformer, tokens: torch.Tensor, position: int, rotation: torch.Tensor
) -> torch.Tensor:
    """The model's forward for tokens (B, 1) at `position`, kept as (B, features) tensors throughout (one
    position: the linear layers run as plain matrix products, and the heads' views need no transposes)."""
    batch = tokens.shape[0]
    h = model.tok_embeddings(tokens[:, 0])  # (B, dim)
    for layer in model.layers:
        attention: Attention = layer.attention
        heads, kv_heads, head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        x = _norm(layer.attention_norm, h)
        xq = _rotate(attention.wq(x).view(batch, heads, head_dim), rotation)
        xk = _rotate(attention.wk(x).view(batch, kv_heads, head_dim), rotation)
        cache = attention.cache
        cache.k_cache[:batch, :, position] = xk  # (B, H_kv, D) at this position
        cache.v_cache[:batch, :, position] = attention.wv(x).view(batch, kv_heads, head_dim)
        keys = repeat_kv(cache.k_cache[:batch, :, : position + 1], attention.n_rep)  # (B, H, S, D)
        values = repeat_kv(cache.v_cache[:batch, :, : position + 1], attention.n_rep)
        out = F.scaled_dot_product_attention(xq.unsqueeze(2), keys, values)  # (B, H, 1, D)
        h = h + attention.wo(out.reshape(batch, heads * head_dim))
        h = h + layer.feed_forward(_norm(layer.ffn_norm, h))
    h = _norm(model.norm, h)  # (B, dim)
    if h.device.type == "cpu" and type(model.output) is torch.nn.Linear:
        return (model.output.weight @ h.T).T  # the product MKL runs fastest (decode.next_token_logits)
    return model.output(h)
