"""KV caches for incremental decoding: the keys and values of the positions already seen.

Decoding one token at a time, attention at position t needs the keys and values of positions 0..t. They
do not change once computed (causal attention: a position never sees later ones), so each attention layer
keeps them in a cache instead of recomputing the whole prefix at every step. Both caches here are
preallocated, (B, H_kv, max_seq_len, D), and have one interface, which `Attention` calls:

    keys, values, mask = cache.update(xk, xv, start_pos)

It writes the new positions' keys and values and returns those every new query may attend to, with the
causal mask; mask None means plain causal attention among equally many queries and keys (SDPA's
is_causal), or, for a single query, no mask at all. The two caches differ in what they return:

    KVCache        the filled prefix 0 .. start_pos + T - 1 (start_pos an int): shapes grow by one
                   position per decoding step; the cheapest for eager decoding.
    StaticKVCache  the whole buffer with a mask over the positions not yet written (start_pos a 0-d
                   tensor while decoding): every step has the same shapes, so one compiled step serves
                   every token (a torch.compile graph, a CUDA graph recorded once and replayed, or the
                   ahead-of-time step of llama_mini.ops.aot_step), at the cost of attending over the
                   whole buffer.
    SlotKVCache    one row per independent sequence, each at its own position (start_pos a (B, 1)
                   tensor): the continuous batching of llama_mini.serve, where requests join and leave
                   the batch between decode steps. Returns the rows' keys up to the furthest one's end,
                   with a mask per row.
    StaticSlotKVCache  the same over the whole buffer: every step has the same shapes, for a compiled
                   batched step.
"""

from __future__ import annotations

import torch
from torch import nn

from llama_mini.errors import ConfigError

__all__ = ["KVCache", "SlotKVCache", "StaticKVCache", "StaticSlotKVCache"]


class KVCache(nn.Module):
    """The filled prefix of a preallocated (B, H_kv, max_seq_len, D) buffer: start_pos is an int."""

    def __init__(
        self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None
    ):
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch_size(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def update(
        self, xk: torch.Tensor, xv: torch.Tensor, start_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Write xk, xv (B, H_kv, T, D) at start_pos..; return the keys and values of 0..start_pos+T-1
        (B, H_kv, start_pos + T, D) and the causal mask (T, start_pos + T), or None where SDPA needs none.
        """
        batch, _, seq_len, _ = xk.shape
        end = start_pos + seq_len
        if end > self.max_seq_len:
            raise ConfigError(
                f"sequence of {end} positions is longer than the KV cache ({self.max_seq_len}); use a "
                "shorter input or a larger cache (Transformer.setup_cache)"
            )
        self.k_cache[:batch, :, start_pos:end] = xk
        self.v_cache[:batch, :, start_pos:end] = xv
        keys, values = self.k_cache[:batch, :, :end], self.v_cache[:batch, :, :end]
        if start_pos == 0 or seq_len == 1:
            # Nothing cached before (queries and keys are the same T positions): plain causal attention.
            # A single new query may read every key: no mask at all.
            return keys, values, None
        # Query i sits at position start_pos + i and may read keys 0 .. start_pos + i: a lower triangle
        # shifted right by start_pos. True where it may look.
        allowed = torch.ones(seq_len, end, dtype=torch.bool, device=xk.device)
        return keys, values, allowed.tril(diagonal=start_pos)


class StaticKVCache(KVCache):
    """The whole preallocated buffer under a position mask. While decoding, start_pos is a 0-d int64
    tensor on the cache's device, so every step has the same shapes (and no Python int to recompile for);
    an int works too (the eager prefill passes 0)."""

    def update(
        self, xk: torch.Tensor, xv: torch.Tensor, start_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write xk, xv (B, H_kv, T, D) at positions start_pos..; return the whole (B, H_kv, max_seq_len, D)
        keys and values and the mask (T, max_seq_len), True where query i (at position start_pos + i) may
        read key position j, that is j <= start_pos + i: it hides each query's future and the positions not
        yet written (stale entries of an earlier request included)."""
        batch, _, seq_len, _ = xk.shape
        positions = start_pos + torch.arange(seq_len, device=xk.device)  # (T,)
        self.k_cache[:batch].index_copy_(2, positions, xk)
        self.v_cache[:batch].index_copy_(2, positions, xv)
        key_positions = torch.arange(self.max_seq_len, device=xk.device)  # (max_seq_len,)
        return self.k_cache[:batch], self.v_cache[:batch], key_positions[None, :] <= positions[:, None]


class SlotKVCache(KVCache):
    """Rows that each sit at their own position: start_pos is an int64 tensor (B, 1), and row b's T new
    positions are start_pos[b] .. start_pos[b] + T - 1 (the model's RoPE rotates each row by its own).

    A server's scheduler keeps one row (a "slot") per running request and decodes them all in one forward
    pass, whatever their lengths; rows 0 .. B-1 are the ones fed. It fills a row from a prefilled cache
    (`copy_row_from`) and keeps the running rows first (`move_row`), so a step reads a slice, not a gather.
    """

    def update(
        self, xk: torch.Tensor, xv: torch.Tensor, start_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write xk, xv (B, H_kv, T, D) at each row's positions; return the keys and values of positions
        0 .. S-1 for rows 0 .. B-1, (B, H_kv, S, D) with S the furthest row's end, and the mask (B, 1, T, S),
        True where query i of row b (at position p = start_pos[b] + i) may read key position j, that is
        j <= p. It hides each row's future and whatever an earlier, longer request left beyond it."""
        batch, _, seq_len, _ = xk.shape
        positions = start_pos + torch.arange(seq_len, device=xk.device)  # (B, T)
        end = int(positions.max()) + 1
        if end > self.max_seq_len:
            raise ConfigError(
                f"sequence of {end} positions is longer than the KV cache ({self.max_seq_len}); use a "
                "shorter input or a larger cache"
            )
        rows = torch.arange(batch, device=xk.device)[:, None]  # (B, 1), broadcast against positions
        # Indexing dims 0 and 2 with (B, T) index tensors selects (B, T, H_kv, D): the positions go first.
        self.k_cache[rows, :, positions] = xk.transpose(1, 2)
        self.v_cache[rows, :, positions] = xv.transpose(1, 2)
        key_positions = torch.arange(end, device=xk.device)  # (S,)
        mask = key_positions <= positions[:, :, None]  # (B, T, S)
        return self.k_cache[:batch, :, :end], self.v_cache[:batch, :, :end], mask[:, None]

    @classmethod
    def gathered(cls, source: KVCache, rows: torch.Tensor, length: int, max_seq_len: int) -> SlotKVCache:
        """A cache of len(rows) rows and max_seq_len positions whose row b holds positions 0 .. length-1 of
        `source`'s row rows[b]: several sequences that go on from one prefilled prefix (the choices of a
        question after its passage, llama_mini.eval.harness). A row whose own prefix is shorter than
        `length` starts its positions at its prefix's end and overwrites what lies beyond it."""
        _, n_kv_heads, _, head_dim = source.k_cache.shape
        cache = cls(len(rows), max_seq_len, n_kv_heads, head_dim, source.k_cache.dtype, source.k_cache.device)
        cache.k_cache[:, :, :length] = source.k_cache[rows, :, :length]
        cache.v_cache[:, :, :length] = source.v_cache[rows, :, :length]
        return cache

    def copy_row_from(self, row: int, source: KVCache, length: int, source_row: int = 0) -> None:
        """Make row `row` hold positions 0 .. length-1 of `source`'s row `source_row` (a prefilled cache)."""
        self.k_cache[row, :, :length] = source.k_cache[source_row, :, :length]
        self.v_cache[row, :, :length] = source.v_cache[source_row, :, :length]

    def move_row(self, source: int, target: int, length: int) -> None:
        """Copy positions 0 .. length-1 of row `source` into row `target` (filling the gap a finished
        request left, so the running rows stay 0 .. B-1)."""
        self.k_cache[target, :, :length] = self.k_cache[source, :, :length]
        self.v_cache[target, :, :length] = self.v_cache[source, :, :length]


class StaticSlotKVCache(SlotKVCache):
    """A SlotKVCache that always returns the whole buffer under its per-row mask, (B, H_kv, max_seq_len, D)
    and (B, 1, T, max_seq_len): no shape depends on the positions, so one compiled step (llama_mini.ops.
    aot_step) serves every decode step of B rows."""

    def update(
        self, xk: torch.Tensor, xv: torch.Tensor, start_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, _, seq_len, _ = xk.shape
        positions = start_pos + torch.arange(seq_len, device=xk.device)  # (B, T)
        rows = torch.arange(batch, device=xk.device)[:, None]
        self.k_cache[rows, :, positions] = xk.transpose(1, 2)
        self.v_cache[rows, :, positions] = xv.transpose(1, 2)
        key_positions = torch.arange(self.max_seq_len, device=xk.device)
        mask = key_positions <= positions[:, :, None]  # (B, T, max_seq_len)
        return self.k_cache[:batch], self.v_cache[:batch], mask[:, None]
