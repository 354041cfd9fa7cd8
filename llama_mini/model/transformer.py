"""A LLaMA-style decoder-only Transformer, readable top to bottom.

The parts, in the order a token meets them:

    tokens (B, T) int64
      -> tok_embeddings                                    (B, T, dim)
      -> n_layers x TransformerBlock:
             h = x + Attention(RMSNorm(x))                 causal self-attention, RoPE, GQA, KV cache
             x = h + FeedForward(RMSNorm(h))               SwiGLU (or another variant from ffn.py)
      -> norm (RMSNorm) -> output (a linear layer)         (B, T, vocab_size) logits

Names follow Meta's reference code (`wq`, `wk`, `wv`, `wo`, `w1`..`w3`, `attention_norm`, `ffn_norm`,
`tok_embeddings`, `output`), so this file, the LLaMA paper and Meta's checkpoints line up. Shapes use
B = batch, T = sequence length, H = query heads, H_kv = key/value heads, D = head_dim = dim / H.

The model computes logits and nothing else. The training loss (plain or chunked) is in
llama_mini/ops/loss.py, the fused kernels and compilation in llama_mini/ops/fast_paths.py, and they are
applied to a built model from outside, so this file reads the same whichever fast paths are on. Its
settings are `ModelArgs` (args.py); the feed-forward family is in ffn.py, the KV caches in cache.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs
from llama_mini.model.cache import KVCache, StaticKVCache
from llama_mini.model.ffn import FeedForward, build_feed_forward

__all__ = [
    "Attention",
    "FeedForward",
    "ModelArgs",
    "RMSNorm",
    "RotaryEmbedding",
    "Transformer",
    "TransformerBlock",
    "apply_rotary_emb",
    "llama3_scaled_frequencies",
    "precompute_rotations",
    "repeat_kv",
]


# ---------------------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich 2019): (..., dim) -> (..., dim).

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight

    Unlike LayerNorm it does not subtract the mean and has no bias. The mean of squares is computed in
    float32 (at least) even when x is bf16/fp16: summing many squares in 8 mantissa bits loses precision.
    The result is cast back to x's dtype before the learned per-channel scale, as in Meta's code.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 -> float32; float64 stays
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ---------------------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE, Su et al. 2021)
# ---------------------------------------------------------------------------------------------------------


def precompute_rotations(
    dim: int, end: int, theta: float = 10000.0, scaling: dict[str, float] | None = None
) -> torch.Tensor:
    """The rotation table for RoPE: cos and sin of every (position, frequency) angle, (end, dim/2, 2).

    RoPE splits each head's `dim` features into dim/2 pairs and turns pair i at position m by the angle
    m * theta^(-2i/dim): fast-turning pairs resolve nearby tokens, slow ones far-away tokens. Meta's code
    stores cis(angle) = cos(angle) + i sin(angle) as a complex tensor named `freqs_cis`; we store the same
    rotations as real numbers, [cos, sin] on a last axis of size 2 (hence the name `rotations`), so
    torch.compile, MPS and `Module.to(dtype)` (which silently drops imaginary parts) all work. Angles are
    computed in float32: a position times a frequency needs more precision than bf16's 8 bits of mantissa.
    `scaling` (ModelArgs.rope_scaling) applies Llama 3.1's frequency scaling, `llama3_scaled_frequencies`,
    before the angles are taken.
    """
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    if scaling is not None:
        freqs = llama3_scaled_frequencies(freqs, **scaling)
    positions = torch.arange(end, dtype=torch.float32)  # (end,)
    angles = torch.outer(positions, freqs)  # (end, dim/2): angle of pair i at position m
    return torch.stack([angles.cos(), angles.sin()], dim=-1)  # (end, dim/2, 2)


def llama3_scaled_frequencies(
    freqs: torch.Tensor,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """Llama 3.1's RoPE frequency scaling (rope type "llama3"): frequencies (dim/2,) -> (dim/2,).

    Llama 3 was pre-trained on `original_max_position_embeddings` positions (8192), then taught 128K. A
    pair whose wavelength 2 pi / freq is longer than that context never turned a full circle in
    pre-training; further out it would reach angles the model never saw. Dividing its frequency by
    `factor` stretches it, so positions up to factor x the original context turn it no further than
    pre-training did (position interpolation). Fast pairs, which turn many times within a few tokens and
    encode local order, are left untouched; between the two, a smooth blend. With L = original context:

        wavelength = 2 pi / freq
        wavelength < L / high_freq_factor:  freq                                (fast: unchanged)
        wavelength > L / low_freq_factor:   freq / factor                       (slow: stretched)
        otherwise:                          (1 - s) * freq / factor + s * freq    (a blend), with
        s = (L / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)

    s is 0 at the slow end and 1 at the fast end, so the pieces join continuously. The slow pairs turn
    differently from position 1 on, so a model trained with scaling needs it at every length, not only
    past L. The same rule as Meta's `apply_scaling` and transformers' "llama3" RoPE; in float32.
    """
    wavelengths = 2 * math.pi / freqs
    long_wavelength = original_max_position_embeddings / low_freq_factor  # longer ones are divided
    short_wavelength = original_max_position_embeddings / high_freq_factor  # shorter ones are kept
    smooth = (original_max_position_embeddings / wavelengths - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    scaled = torch.where(wavelengths > long_wavelength, freqs / factor, blended)
    return torch.where(wavelengths < short_wavelength, freqs, scaled)


def apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, rotations: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, T, H, D) and keys (B, T, H_kv, D) by their positions' angles, (T, D/2, 2).

    Pairing: Meta's adjacent pairs, features (2i, 2i+1) of each head form one 2-D point, rotated as
        (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)
    which is multiplication by cis(angle) when the pair is read as the complex number x0 + i x1.
    (Hugging Face pairs feature i with i + D/2 instead; the two agree up to a fixed permutation of the
    rows of wq and wk, which checkpoint conversion applies.) Because both q and k are rotated by their own
    positions, q_m . k_n depends on m - n only: attention sees relative positions.
    """
    return _rotate_pairs(xq, rotations), _rotate_pairs(xk, rotations)


def _rotate_pairs(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, heads, D/2, 2), in float32
    x0, x1 = pairs.unbind(-1)  # each (B, T, heads, D/2)
    # (T, 1, D/2), broadcast over heads and batch; or (B, T, 1, D/2) when each row has its own positions
    # (a SlotKVCache's continuous batching): broadcast over heads.
    cos = rotations[..., 0].unsqueeze(-2)
    sin = rotations[..., 1].unsqueeze(-2)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)  # (B, T, heads, D), back in x's dtype


class RotaryEmbedding(nn.Module):
    """RoPE's table for this model, `rotations` (max_seq_len, D/2, 2), and its rows for given positions.

    positions (T,) int64, or an int start plus T -> rotations[positions] (T, D/2, 2). Not a parameter and
    not saved: the table is rebuilt from the config. It must stay float32 whatever the weights' dtype, and
    that is the one thing this module adds to a plain buffer: `.to()`, `.half()`, `.cuda()` and
    `.to_empty()` all pass through `_apply`, where `model.to(torch.bfloat16)` would round the table (off by
    up to ~4e-3 in bf16, enough to blur positions) and `to_empty()` after a build on the meta device would
    leave it uninitialised; so after any of them the table is computed again, in float32, on its new device.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim, self.max_seq_len = args.head_dim, args.max_seq_len
        self.theta, self.scaling = args.rope_theta, args.rope_scaling
        self.register_buffer("rotations", self.table(), persistent=False)

    def table(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The whole table, computed afresh (see `precompute_rotations`)."""
        table = precompute_rotations(self.head_dim, self.max_seq_len, self.theta, self.scaling)
        return table.to(device) if device is not None else table

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.rotations[positions]  # (T, D/2, 2), or (B, T, D/2, 2) for positions (B, T)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.rotations = self.table(self.rotations.device)
        return self


# ---------------------------------------------------------------------------------------------------------
# Attention: causal self-attention with grouped-query attention and a KV cache
# ---------------------------------------------------------------------------------------------------------


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D), each key/value head repeated n_rep times in place.

    Grouped-query attention (Ainslie et al. 2023) lets n_rep consecutive query heads share one key/value
    head, so query head h reads kv head h // n_rep: the repeat is interleaved (kv0, kv0, kv1, kv1, ...),
    not tiled (kv0, kv1, kv0, kv1). Checkpoints depend on that order.
    """
    if n_rep == 1:
        return x
    return torch.repeat_interleave(x, n_rep, dim=1)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE and grouped-query attention: (B, T, dim) -> (B, T, dim).

    q = x wq (H heads), k = x wk, v = x wv (H_kv heads each); rotate q and k by RoPE;
    out_h = softmax(q_h k_g^T / sqrt(D) + causal mask) v_g  for query head h and its kv head g = h // n_rep;
    concatenate the heads and project with wo. No biases, as in LLaMA.

    While decoding, `cache` (set by `Transformer.setup_cache`) holds the keys and values of the positions
    already seen: the new ones are written to it, and the queries attend to all of them (cache.py).
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.n_rep = args.n_heads // args.n_kv_heads  # query heads per kv head
        self.head_dim = args.head_dim
        self.dropout = args.dropout
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.resid_dropout = nn.Dropout(args.dropout)
        self.cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, rotations: torch.Tensor, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        xq = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        xk = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, rotations)

        # SDPA wants heads before positions: (B, heads, T, D).
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        if self.cache is not None:  # decoding: attend to every cached position too
            keys, values, mask = self.cache.update(xk, xv, start_pos)  # (B, H_kv, S, D), (T, S) or None
        else:  # training, full recomputation: the T positions attend to each other, causally
            keys, values, mask = xk, xv, None
        keys, values = repeat_kv(keys, self.n_rep), repeat_kv(values, self.n_rep)  # (B, H, S, D)
        out = F.scaled_dot_product_attention(
            xq,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and seq_len > 1,  # no mask: causal among the T positions (S == T)
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D); softmax is done in float32 inside SDPA's kernels
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(out))


# ---------------------------------------------------------------------------------------------------------
# The block and the whole model
# ---------------------------------------------------------------------------------------------------------


class TransformerBlock(nn.Module):
    """One pre-norm residual block: (B, T, dim) -> (B, T, dim).

    h   = x + attention(attention_norm(x))
    out = h + feed_forward(ffn_norm(h))

    Normalising the input of each branch (not the sum, as the original Transformer did) keeps the
    residual stream an untouched sum of branch outputs, which trains stably without warm-up tricks.
    The feed-forward is `FeedForward` (SwiGLU) by default, or the variant that `args.ffn` names.
    """

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = build_feed_forward(args)
        self.ffn_dropout = nn.Dropout(args.dropout)

    def forward(
        self, x: torch.Tensor, rotations: torch.Tensor, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rotations, start_pos)
        return h + self.ffn_dropout(self.feed_forward(self.ffn_norm(h)))


class Transformer(nn.Module):
    """The decoder-only language model: int64 tokens (B, T) -> logits (B, T, vocab_size).

    `model(tokens)` gives next-token logits at every position. For incremental decoding, call
    `setup_cache(batch_size)` once, then `model(prompt)` and `model(next_token, start_pos=t)` with t the
    number of positions already fed; the logits equal those of recomputing the whole sequence.
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.dropout = nn.Dropout(args.dropout)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            # One (vocab_size, dim) matrix both looks up input tokens and scores output tokens.
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(args)
        self.init_weights()

    def init_weights(self) -> None:
        """Draw every weight matrix afresh, by the rule `args.weight_init` names; RMSNorm weights start at 1.

        "scaled" (the default) sets the scale of each matrix's outputs at the start, whatever the width.
        Every branch reads a unit-RMS input (RMSNorm), so a matrix drawn from N(0, gain^2 / fan_in) gives
        outputs of std `gain` (fan_in: the matrix's input width, dim or the FFN's hidden size for w2):

            wq, wk, wv        gain INIT_ATTENTION_GAIN = 0.2     attention starts nearly uniform
            w1, w3            gain INIT_FFN_GAIN = 1             the FFN's hidden units start at unit scale
            wo, w2            gain INIT_RESIDUAL_GAIN = 0.2, / sqrt(2 * n_layers)
            tok_embeddings    N(0, INIT_EMBEDDING_STD = 0.02)
            output            gain INIT_OUTPUT_GAIN = 0.5: the first logits' std (tied: the one matrix)

        wo and w2 write into the residual stream, which sums 2 * n_layers branch outputs: the extra
        1 / sqrt(2 * n_layers) keeps that sum's variance the same at any depth (GPT-2's rule).

        Why the FFN's gain matters most: a gated hidden unit act(w1 x) * w3 x is the product of two
        projections, so its scale at the start is the product of theirs, and so is the effect of an
        optimizer step on it. GPT-2's constant N(0, 0.02) was chosen for width 768; at width 96 it gives
        each projection outputs of std 0.2 and a SwiGLU unit about 0.02, 7 times smaller than a ReLU unit
        (docs/STUDY.md, "Why the initialisation matters more for gated FFNs"). The constants were chosen
        by training the FFN ablation's model with every variant over a grid of them (bench/init_sweep.py;
        docs/ABLATION.md, "The initialisation").

        "gpt2" is GPT-2's rule: N(0, 0.02) for every matrix, and 0.02 / sqrt(2 * n_layers) for wo and w2,
        whatever the width (docs/ABLATION.md compares the two rules).
        Loading a checkpoint replaces every weight: the rule matters only when training from scratch.
        """
        stds = init_stds(self)
        for name, param in self.named_parameters():
            if name in stds:
                nn.init.normal_(param, mean=0.0, std=stds[name])
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """tokens (B, T) at positions start_pos .. start_pos + T - 1 -> logits (B, T, vocab_size).

        start_pos is an int, or, for decoding with static shapes (a StaticKVCache), a 0-d int64 tensor on
        the model's device, or, for rows at different positions (a SlotKVCache), an int64 tensor (B, 1):
        row b's tokens then sit at start_pos[b] ..
        """
        return self.output(self.hidden_states(tokens, start_pos))

    def hidden_states(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """The model up to the output layer: tokens (B, T) -> final normalised hidden states (B, T, dim).

        `output` turns them into logits. The training loss and generation use the two apart: the chunked
        loss never builds all the logits, and generation scores only the last position.
        """
        batch, seq_len = tokens.shape
        if seq_len > self.args.max_seq_len:
            raise ConfigError(
                f"sequence of {seq_len} positions is longer than max_seq_len ({self.args.max_seq_len}); "
                "use a shorter input or a model with a larger max_seq_len"
            )
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, dim)
        positions = start_pos + torch.arange(seq_len, device=tokens.device)  # (T,), or (B, T) per row
        rotations = self.rope(positions)  # (T, D/2, 2) or (B, T, D/2, 2): these positions' angles
        for layer in self.layers:
            h = layer(h, rotations, start_pos)
        return self.norm(h)

    # ------------------------------------------------------------------------------- decoding

    def setup_cache(
        self,
        max_batch_size: int,
        dtype: torch.dtype | None = None,
        max_seq_len: int | None = None,
        static: bool = False,
    ) -> None:
        """Give every attention layer a KV cache for up to `max_batch_size` sequences of `max_seq_len`
        positions (default: the model's whole context; generation asks for what a request needs, since a
        model trained on 128K positions would otherwise hold, and under static shapes read, 128K).
        `static`: a StaticKVCache, whose steps all have the same shapes (start_pos then a 0-d tensor)."""
        weight = self.tok_embeddings.weight
        context = self.args.max_seq_len
        max_seq_len = context if max_seq_len is None else min(max_seq_len, context)
        cache_class = StaticKVCache if static else KVCache
        for layer in self.layers:
            layer.attention.cache = cache_class(
                max_batch_size,
                max_seq_len,
                self.args.n_kv_heads,
                self.args.head_dim,
                dtype=dtype or weight.dtype,
                device=weight.device,
            )

    def clear_cache(self) -> None:
        """Remove the KV caches (back to full recomputation, as in training)."""
        for layer in self.layers:
            layer.attention.cache = None


# ---------------------------------------------------------------------------------------------------------
# The initialisation: Transformer.init_weights draws each matrix from N(0, init_stds(model)[name])
# ---------------------------------------------------------------------------------------------------------

# The constants of the "scaled" rule, chosen by bench/init_sweep.py (docs/ABLATION.md, "The
# initialisation"): the ablation's model trained with each FFN variant over a grid of them. A gain is the
# std of a projection's outputs at the start, for the unit-RMS inputs that RMSNorm gives every branch.
INIT_ATTENTION_GAIN = 0.2  # wq, wk, wv ~ N(0, gain / sqrt(fan_in))
INIT_FFN_GAIN = 1.0  # w1, w3 ~ N(0, gain / sqrt(fan_in))
INIT_RESIDUAL_GAIN = 0.2  # wo, w2 ~ N(0, gain / sqrt(fan_in) / sqrt(2 * n_layers))
INIT_EMBEDDING_STD = 0.02  # tok_embeddings ~ N(0, std), at any width
INIT_OUTPUT_GAIN = 0.5  # output ~ N(0, gain / sqrt(dim)): the first logits' std
GPT2_STD = 0.02  # the "gpt2" rule's std for every matrix


def init_stds(
    model: Transformer,
    init: str | None = None,
    *,
    attention_gain: float = INIT_ATTENTION_GAIN,
    ffn_gain: float = INIT_FFN_GAIN,
    residual_gain: float = INIT_RESIDUAL_GAIN,
    embedding_std: float = INIT_EMBEDDING_STD,
    output_gain: float = INIT_OUTPUT_GAIN,
) -> dict[str, float]:
    """The standard deviation each weight matrix of `model` starts from, by parameter name.

    `init` is a rule of ModelArgs.weight_init (default: the model's own); the other arguments are the "scaled"
    rule's constants, given here so that bench/init_sweep.py measures this very rule at other values.
    Only the matrices are listed: RMSNorm weights start at 1, and swish's trainable beta at its setting.
    """
    args = model.args
    init = init or args.weight_init
    depth = 1 / math.sqrt(2 * args.n_layers)  # wo and w2: 2 * n_layers branches add to the stream
    gains = {"wq": attention_gain, "wk": attention_gain, "wv": attention_gain, "w1": ffn_gain,
             "w3": ffn_gain, "wo": residual_gain * depth, "w2": residual_gain * depth}  # fmt: skip
    stds = {}
    for name, param in model.named_parameters():  # a tied matrix is listed once, as tok_embeddings
        if param.dim() != 2:
            continue
        if init == "gpt2":
            stds[name] = GPT2_STD * (depth if name.endswith(("wo.weight", "w2.weight")) else 1.0)
        elif name == "tok_embeddings.weight" and not args.tie_embeddings:
            stds[name] = embedding_std
        elif name in ("tok_embeddings.weight", "output.weight"):
            stds[name] = output_gain / math.sqrt(args.dim)
        else:
            fan_in = param.shape[1]  # nn.Linear's weight is (out_features, in_features)
            stds[name] = gains[name.split(".")[-2]] / math.sqrt(fan_in)
    return stds
