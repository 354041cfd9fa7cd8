"""Named model shapes: a tiny one for tests, llama2.c's TinyStories models, and published LLaMA sizes.

`get_preset("stories15m")` returns a `ModelArgs`; keyword overrides change single fields
(`get_preset("stories15m", vocab_size=4096)`). The published shapes come from each release's
params.json / config.json; their weights can be loaded or inspected on the meta device without
allocating them (`torch.device("meta")`).
"""

from __future__ import annotations

from typing import Any, Literal

from llama_mini.errors import ConfigError
from llama_mini.model.args import ModelArgs

# The names below, as a type: settings that take a preset (TrainConfig.preset) offer exactly these choices.
PresetName = Literal[
    "tiny", "stories260k", "stories15m", "stories42m", "stories110m", "llama-7b", "llama2-7b", "llama3-8b",
    "llama3.2-1b",
]  # fmt: skip

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a few thousand parameters, with grouped-query attention (4 query heads share 2 kv heads).
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=64),
    # Karpathy's llama2.c models trained on TinyStories (its model.py ties the embeddings).
    "stories260k": dict(
        dim=64,
        n_layers=5,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=512,
        multiple_of=4,
        max_seq_len=512,
        tie_embeddings=True,
    ),
    "stories15m": dict(
        dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32, max_seq_len=256, tie_embeddings=True
    ),
    "stories42m": dict(
        dim=512,
        n_layers=8,
        n_heads=8,
        vocab_size=32000,
        multiple_of=32,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    "stories110m": dict(
        dim=768,
        n_layers=12,
        n_heads=12,
        vocab_size=32000,
        multiple_of=32,
        max_seq_len=1024,
        tie_embeddings=True,
    ),
    # Meta's releases, as in their params.json (max_seq_len is the context length they were trained at).
    "llama-7b": dict(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6, max_seq_len=2048
    ),
    "llama2-7b": dict(
        dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-5, max_seq_len=4096
    ),
    "llama3-8b": dict(
        dim=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=1024,
        ffn_dim_multiplier=1.3,
        norm_eps=1e-5,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    # Llama 3.2 1B: 128K positions through Llama 3.1's RoPE frequency scaling, as in its config.json
    # (factor 32, where Llama 3.1 has 8). Scaling divides the slow frequencies by the factor, so it changes
    # the angles at every position, not only past the original 8192.
    "llama3.2-1b": dict(
        dim=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        vocab_size=128256,
        multiple_of=256,
        ffn_dim_multiplier=1.5,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=dict(
            factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
        ),
        max_seq_len=131072,
        tie_embeddings=True,
    ),
}


def get_preset(name: str, **overrides: Any) -> ModelArgs:
    """The `ModelArgs` of preset `name`, with any fields in `overrides` replaced."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelArgs(**{**PRESETS[name], **overrides})
