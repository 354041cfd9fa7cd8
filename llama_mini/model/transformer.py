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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llama_mini.errors import ConfigError
from llama_mini.ffn import FEED_FORWARDS, FeedForward, build_feed_forward
from llama_mini.loss import linear_cross_entropy

__all__ = [
    "IGNORE_INDEX",
    "ROPE_SCALING_KEYS",
    "Attention",
    "FeedForward",
    "KVCache",
    "ModelArgs",
    "RMSNorm",
    "Transformer",
    "TransformerBlock",
    "apply_rotary_emb",
    "count_parameters",
    "cross_entropy",
    "llama3_scaled_frequencies",
    "precompute_freqs_cis",
    "repeat_kv",
    "training_flops_per_token",
]

IGNORE_INDEX = -100  # target id that the loss skips (padding); the same default as F.cross_entropy

# Llama 3.1's RoPE frequency scaling settings, under Hugging Face's names (see llama3_scaled_frequencies).
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    """Every size and choice of the model. Validated when built; `llama_mini.presets` has named shapes.

    The defaults are a small model that trains in minutes on a laptop CPU.
    """

    dim: int = 192  # width of the residual stream
    n_layers: int = 4
    n_heads: int = 4  # query heads; head_dim = dim // n_heads
    n_kv_heads: int | None = None  # key/value heads for grouped-query attention; None = n_heads (MHA)
    vocab_size: int = 4096
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # widens the FFN hidden size (Llama 2-70B, Llama 3)
    hidden_dim: int | None = None  # exact FFN hidden size; None = derive it by LLaMA's rule
    norm_eps: float = 1e-5  # RMSNorm's epsilon
    rope_theta: float = 10000.0  # RoPE base: larger means slower-turning angles, longer reach
    # Llama 3.1's RoPE frequency scaling: a dict with the ROPE_SCALING_KEYS, or None for plain RoPE
    rope_scaling: dict[str, float] | None = None
    max_seq_len: int = 256  # longest sequence: size of the RoPE table and of the KV cache
    dropout: float = 0.0  # on attention probabilities and on each residual branch, in training only
    tie_embeddings: bool = False  # share one matrix between tok_embeddings and output
    ffn: str = "swiglu"  # feed-forward variant, a name in ffn.FEED_FORWARDS
    swish_beta: float = 1.0  # beta of ffn="swish"
    swish_beta_trainable: bool = False  # learn beta (one scalar per layer) instead of fixing it

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_dim is not None and (not isinstance(self.hidden_dim, int) or self.hidden_dim <= 0):
            problems.append(f"hidden_dim must be a positive integer or None, got {self.hidden_dim!r}")
        if self.ffn_dim_multiplier is not None and not self.ffn_dim_multiplier > 0:
            problems.append(f"ffn_dim_multiplier must be positive or None, got {self.ffn_dim_multiplier!r}")
        if not self.norm_eps > 0:
            problems.append(f"norm_eps must be positive, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            problems.append(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            problems += _rope_scaling_problems(self.rope_scaling)
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.ffn not in FEED_FORWARDS:
            problems.append(f"ffn must be one of {', '.join(FEED_FORWARDS)}, got {self.ffn!r}")
        if problems:  # report the basic problems before the divisibility checks that depend on them
            raise ConfigError("invalid model config: " + "; ".join(problems))
        if self.dim % self.n_heads:
            problems.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        elif (self.dim // self.n_heads) % 2:
            problems.append(
                f"head_dim = dim / n_heads = {self.dim // self.n_heads} must be even for RoPE's pairs"
            )
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
        if self.rope_scaling is not None:
            # Our own copy: a preset's dict is shared by every ModelArgs made from it, and must not change.
            self.rope_scaling = dict(self.rope_scaling)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelArgs:
        """Build from a dict such as a saved config; unknown keys are an error, not silently dropped."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown model config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)


def _rope_scaling_problems(scaling: Any) -> list[str]:
    """What is wrong with a `rope_scaling` value, one message per problem (empty if nothing)."""
    keys = ", ".join(ROPE_SCALING_KEYS)
    if not isinstance(scaling, dict):
        return [f"rope_scaling must be a dict with {keys}, or None; got {scaling!r}"]
    problems = []
    missing = [key for key in ROPE_SCALING_KEYS if key not in scaling]
    if missing:
        problems.append(f"rope_scaling is missing {', '.join(missing)}; it needs all of {keys}")
    unknown = sorted(set(scaling) - set(ROPE_SCALING_KEYS))
    if unknown:
        problems.append(f"rope_scaling has unknown key(s) {', '.join(map(str, unknown))}; known: {keys}")
    for key in ROPE_SCALING_KEYS:
        value = scaling.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in scaling and not (number and math.isfinite(value) and value > 0):
            problems.append(f"rope_scaling[{key!r}] must be a positive number, got {value!r}")
    if not problems and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        problems.append(
            f"rope_scaling's high_freq_factor ({scaling['high_freq_factor']}) must be greater than its "
            f"low_freq_factor ({scaling['low_freq_factor']})"
        )
    return problems


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


def precompute_freqs_cis(
    dim: int, end: int, theta: float = 10000.0, scaling: dict[str, float] | None = None
) -> torch.Tensor:
    """The rotation table for RoPE: cos and sin of every (position, frequency) angle, (end, dim/2, 2).

    RoPE splits each head's `dim` features into dim/2 pairs and turns pair i at position m by the angle
    m * theta^(-2i/dim): fast-turning pairs resolve nearby tokens, slow ones far-away tokens. Meta's code
    stores cis(angle) = cos(angle) + i sin(angle) as a complex tensor named `freqs_cis`; we keep the name
    but store [cos, sin] as a real last axis of size 2, so torch.compile, MPS and `Module.to(dtype)`
    (which silently drops imaginary parts) all work. Angles are computed in float32: a position times a
    frequency needs more precision than bf16's 8 bits of mantissa. `scaling` (ModelArgs.rope_scaling)
    applies Llama 3.1's frequency scaling, `llama3_scaled_frequencies`, before the angles are taken.
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
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate queries (B, T, H, D) and keys (B, T, H_kv, D) by their positions' angles, (T, D/2, 2).

    Pairing: Meta's adjacent pairs, features (2i, 2i+1) of each head form one 2-D point, rotated as
        (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)
    which is multiplication by cis(angle) when the pair is read as the complex number x0 + i x1.
    (Hugging Face pairs feature i with i + D/2 instead; the two agree up to a fixed permutation of the
    rows of wq and wk, which checkpoint conversion applies.) Because both q and k are rotated by their own
    positions, q_m . k_n depends on m - n only: attention sees relative positions.
    """
    return _rotate_pairs(xq, freqs_cis), _rotate_pairs(xk, freqs_cis)


def _rotate_pairs(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, heads, D/2, 2), in float32
    x0, x1 = pairs.unbind(-1)  # each (B, T, heads, D/2)
    cos = freqs_cis[..., 0].unsqueeze(1)  # (T, 1, D/2): broadcast over heads (and batch)
    sin = freqs_cis[..., 1].unsqueeze(1)
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)  # (B, T, heads, D), back in x's dtype


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


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, for incremental decoding: (B, H_kv, max_seq_len, D).

    Preallocated at its full size. `update` writes the new positions in place and returns the filled
    prefix, which grows by one position per decode step. `update_static` returns the whole buffer instead,
    so that every decode step has the same tensor shapes: what a CUDA graph, recorded once and replayed
    for every token, needs. The positions not yet written are then masked out by the caller.
    """

    def __init__(
        self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None
    ):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write xk, xv (B, H_kv, T, D) at start_pos.. and return the keys, values of 0..start_pos+T."""
        batch, _, seq_len, _ = xk.shape
        end = start_pos + seq_len
        self.k_cache[:batch, :, start_pos:end] = xk
        self.v_cache[:batch, :, start_pos:end] = xv
        return self.k_cache[:batch, :, :end], self.v_cache[:batch, :, :end]

    def update_static(
        self, positions: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write xk, xv (B, H_kv, T, D) at `positions` (T,) and return the whole (B, H_kv, max_seq_len, D)."""
        batch = xk.shape[0]
        self.k_cache[:batch].index_copy_(2, positions, xk)
        self.v_cache[:batch].index_copy_(2, positions, xv)
        return self.k_cache[:batch], self.v_cache[:batch]


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE and grouped-query attention: (B, T, dim) -> (B, T, dim).

    q = x wq (H heads), k = x wk, v = x wv (H_kv heads each); rotate q and k by RoPE;
    out_h = softmax(q_h k_g^T / sqrt(D) + causal mask) v_g  for query head h and its kv head g = h // n_rep;
    concatenate the heads and project with wo. No biases, as in LLaMA.
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
        self.cache: KVCache | None = None  # set by Transformer.setup_cache for incremental decoding

    def forward(
        self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        xq = self.wq(x).view(batch, seq_len, self.n_heads, self.head_dim)
        xk = self.wk(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)

        # SDPA wants heads before positions: (B, heads, T, D).
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        keys, values, mask = self._keys_values_and_mask(xk, xv, start_pos)  # keys, values (B, H_kv, S, D)
        keys, values = repeat_kv(keys, self.n_rep), repeat_kv(values, self.n_rep)  # (B, H, S, D)
        out = F.scaled_dot_product_attention(
            xq,
            keys,
            values,
            attn_mask=mask,
            is_causal=mask is None and seq_len > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, D); softmax is done in float32 inside SDPA's kernels
        out = out.transpose(1, 2).reshape(batch, seq_len, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(out))

    def _keys_values_and_mask(
        self, xk: torch.Tensor, xv: torch.Tensor, start_pos: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The keys and values the T new queries attend to, and the causal mask (None: SDPA's is_causal).

        - No cache (training, full recomputation): the T new positions themselves; is_causal masks them.
        - Cache, start_pos an int: positions 0..start_pos+T-1 from the cache. Query i (position
          start_pos + i) may read keys 0..start_pos + i: a lower-triangular mask shifted right by
          start_pos. With nothing cached yet (start_pos 0), is_causal does that; a single new query may
          read every key, so needs no mask at all.
        - Cache, start_pos a 0-d tensor: the whole max_seq_len cache, with a mask that hides the positions
          after each query's own. Every step then has the same shapes, whatever the position (static
          shapes for CUDA graphs), at the cost of attending over the whole buffer.
        """
        seq_len = xk.shape[2]
        if self.cache is None:
            return xk, xv, None
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(seq_len, device=xk.device)  # (T,)
            keys, values = self.cache.update_static(positions, xk, xv)
            key_positions = torch.arange(keys.shape[2], device=xk.device)  # (max_seq_len,)
            return keys, values, key_positions[None, :] <= positions[:, None]  # (T, max_seq_len)
        keys, values = self.cache.update(start_pos, xk, xv)  # (B, H_kv, start_pos + T, D)
        if start_pos == 0 or seq_len == 1:
            return keys, values, None
        allowed = torch.ones(seq_len, keys.shape[2], dtype=torch.bool, device=xk.device)
        return keys, values, allowed.tril(diagonal=start_pos)  # (T, start_pos + T): True where it may look


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
        self, x: torch.Tensor, freqs_cis: torch.Tensor, start_pos: int | torch.Tensor = 0
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos)
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

        # Tokens per chunk of the training loss (forward with targets); 0 = the plain loss over all the
        # logits at once. A speed/memory setting, not part of the model: training sets it.
        self.loss_chunk_size = 0

        # Not a parameter and not saved: recomputed from the config. Kept float32 (see `_apply`).
        self.register_buffer("freqs_cis", self._rope_table(), persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each block adds the outputs of wo and w2 to the residual stream, so their
        # weights start smaller by 1/sqrt(2 * n_layers) and the stream's variance stays near 1 at any depth.
        for name, param in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * args.n_layers))

    def _rope_table(self) -> torch.Tensor:
        args = self.args
        return precompute_freqs_cis(args.head_dim, args.max_seq_len, args.rope_theta, args.rope_scaling)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # N(0, 0.02) for every matrix (GPT-2, llama2.c); RMSNorm weights stay at 1.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def _apply(self, fn, recurse=True):
        # `.to()`, `.half()`, `.to_empty()` and friends all pass through here. `model.to(torch.bfloat16)`
        # would cast the cos/sin table too (off by up to ~4e-3 in bf16, enough to blur positions), and
        # `to_empty()` after building on the meta device leaves it uninitialised. So after any of them,
        # rebuild the table in float32 on the buffer's new device; it is small and cheap to compute.
        super()._apply(fn, recurse)
        self.freqs_cis = self._rope_table().to(self.freqs_cis.device)
        return self

    def setup_cache(
        self, max_batch_size: int, dtype: torch.dtype | None = None, max_seq_len: int | None = None
    ) -> None:
        """Give every attention layer a KV cache for up to `max_batch_size` sequences of `max_seq_len`
        positions (default: the model's whole context; generation asks for what a request needs, since
        a model trained on 128K positions would otherwise hold, and under static shapes read, 128K)."""
        weight = self.tok_embeddings.weight
        context = self.args.max_seq_len
        max_seq_len = context if max_seq_len is None else min(max_seq_len, context)
        for layer in self.layers:
            layer.attention.cache = KVCache(
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

    @classmethod
    def from_pretrained(
        cls, path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Transformer:
        """Load a checkpoint folder: llama_mini's own, Hugging Face Llama, or Meta's original format."""
        from llama_mini.checkpoint import load_pretrained  # imported here: checkpoint.py imports this module

        return load_pretrained(path, device=device, dtype=dtype)

    def save_pretrained(self, path, dtype: torch.dtype | None = None, tokenizer_path=None) -> None:
        """Write a Hugging Face Llama folder (config.json, model.safetensors, ...) that transformers loads.

        `tokenizer_path` (a SentencePiece tokenizer.model) is copied in, with the files transformers needs.
        """
        from llama_mini.checkpoint import save_pretrained

        save_pretrained(self, path, dtype=dtype, tokenizer_path=tokenizer_path)

    def forward(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, T) at positions start_pos .. start_pos + T - 1 -> logits (B, T, vocab_size).

        start_pos is an int, or, for decoding with static shapes (CUDA graphs), a 0-d int64 tensor on the
        model's device: the attention layers then read their whole KV cache (see `Attention`), and the
        length is not checked here (that would need the tensor's value on the CPU at every step).

        With `targets` (B, T), the next-token ids, the model returns the mean cross-entropy (a float32
        scalar) instead of the logits: training's path. The loss then compiles together with the model,
        and with `loss_chunk_size` > 0 the (B, T, vocab_size) logits are never built at all: the loss
        is computed `loss_chunk_size` tokens at a time (see llama_mini.loss).
        """
        h = self.hidden_states(tokens, start_pos)
        if targets is None:
            return self.output(h)  # (B, T, vocab_size)
        if self.loss_chunk_size > 0:
            return linear_cross_entropy(h, self.output.weight, targets, self.loss_chunk_size)
        return cross_entropy(self.output(h), targets)

    def hidden_states(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0) -> torch.Tensor:
        """The model up to the output layer: tokens (B, T) -> final normalised hidden states (B, T, dim).

        `output` turns them into logits. Generation uses the two apart, to score only the last position.
        """
        batch, seq_len = tokens.shape
        if isinstance(start_pos, torch.Tensor):
            positions = start_pos + torch.arange(seq_len, device=tokens.device)
            freqs_cis = self.freqs_cis.index_select(0, positions)  # (T, D/2, 2)
        else:
            if start_pos + seq_len > self.args.max_seq_len:
                raise ConfigError(
                    f"sequence of {start_pos + seq_len} positions is longer than max_seq_len "
                    f"({self.args.max_seq_len}); use a shorter input or a model with a larger max_seq_len"
                )
            freqs_cis = self.freqs_cis[
                start_pos : start_pos + seq_len
            ]  # (T, D/2, 2): these positions' angles
        h = self.dropout(self.tok_embeddings(tokens))  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, freqs_cis, start_pos)
        return self.norm(h)


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean next-token cross-entropy in nats: logits (B, T, V), targets (B, T) -> scalar float32.

    The log-softmax runs in float32 even under bf16 autocast: over a large vocabulary the normaliser
    sums many small exponentials. Targets equal to `ignore_index` (padding) are skipped.
    """
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index
    )


# ---------------------------------------------------------------------------------------------------------
# Sizes and costs
# ---------------------------------------------------------------------------------------------------------


def count_parameters(model: Transformer) -> dict[str, int]:
    """Parameters by part: embedding, output, attention, feed_forward, norms, plus total and non_embedding.

    A tied output matrix is the embedding matrix, so it is counted once, under embedding (output = 0).
    `non_embedding` leaves out the token-embedding table (a lookup, no arithmetic).
    """
    counts = {"embedding": 0, "output": 0, "attention": 0, "feed_forward": 0, "norms": 0}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if name.startswith("tok_embeddings."):
            part = "embedding"
        elif name.startswith("output."):
            part = "output"
        elif ".attention." in name:
            part = "attention"
        elif ".feed_forward." in name:
            part = "feed_forward"
        else:  # attention_norm, ffn_norm and the final norm
            part = "norms"
        counts[part] += param.numel()
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embedding"]
    return counts


def training_flops_per_token(model: Transformer, seq_len: int | None = None) -> int:
    """Training FLOPs per token: 6N + 12 * n_layers * dim * seq_len (Kaplan et al. 2020; PaLM appendix B).

    N counts the parameters that do a multiply-add per token: every one but the embedding lookup, with
    the output projection counted even when tied to the embedding (it is still a matmul). 6 = 2 FLOPs per
    multiply-add x (1 forward + 2 backward). The second term is attention's q.k and p.v products, which
    have no parameters: 2 matmuls x 2 FLOPs x 3 passes x n_layers x dim x seq_len.
    """
    args = model.args
    seq_len = args.max_seq_len if seq_len is None else seq_len
    counts = count_parameters(model)
    matmul_params = counts["non_embedding"] + (args.vocab_size * args.dim if args.tie_embeddings else 0)
    return 6 * matmul_params + 12 * args.n_layers * args.dim * seq_len
