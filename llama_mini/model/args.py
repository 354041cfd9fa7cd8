"""ModelArgs: every size and choice of the model, validated when built.

Each field is declared once with its default and help text (llama_mini.settings); train.py's model flags,
config files and the ablation runner are all made from these declarations. `llama_mini.model.presets`
holds named shapes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from llama_mini.errors import ConfigError
from llama_mini.settings import choice_problems, from_dict, setting

__all__ = [
    "FEED_FORWARD_NAMES",
    "ROPE_SCALING_KEYS",
    "FeedForwardName",
    "InitName",
    "ModelArgs",
]

# The feed-forward variants, in the order of Shazeer's Table 1 (non-gated first): the one list of their
# names; llama_mini.model.ffn pairs each with the class that computes it (FEED_FORWARDS).
FeedForwardName = Literal["relu", "gelu", "swish", "glu", "bilinear", "reglu", "geglu", "swiglu"]
FEED_FORWARD_NAMES: tuple[str, ...] = FeedForwardName.__args__

# The initialisation rules (Transformer.init_weights): "scaled" (the default) scales every matrix with its
# fan-in; "gpt2" is GPT-2's constant N(0, 0.02) (docs/ABLATION.md compares the two).
InitName = Literal["scaled", "gpt2"]

# Llama 3.1's RoPE frequency scaling settings, under Hugging Face's names (see llama3_scaled_frequencies).
ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass
class ModelArgs:
    """Every size and choice of the model. The defaults are a small model that trains in minutes on a
    laptop CPU."""

    dim: int = setting(192, "width of the residual stream (model width)")
    n_layers: int = setting(4, "Transformer blocks")
    # 3 heads of 64 at the default dim (4 of 48 before issue 28: the same loss, a slower CPU attention kernel)
    n_heads: int = setting(3, "query heads; head_dim = dim / n_heads")
    n_kv_heads: int | None = setting(
        None, "key/value heads for grouped-query attention; none = n_heads (multi-head attention)"
    )
    vocab_size: int = setting(4096, "vocabulary size; training takes it from the tokenizer", flag=False)
    multiple_of: int = setting(256, "round the FFN hidden size up to a multiple of this")
    ffn_dim_multiplier: float | None = setting(
        None, "widen the FFN hidden size by this factor (Llama 2-70B, Llama 3)"
    )
    hidden_dim: int | None = setting(None, "exact FFN hidden size; none = LLaMA's rule from dim")
    norm_eps: float = setting(1e-5, "RMSNorm's epsilon")
    rope_theta: float = setting(10000.0, "RoPE base: larger turns the angles slower and reaches further")
    rope_scaling: dict[str, float] | None = setting(
        None,
        "stretch RoPE's slow frequencies for long contexts, as Llama 3.1 does: a table of "
        + ", ".join(ROPE_SCALING_KEYS),
        flag=False,
    )
    max_seq_len: int = setting(256, "context length in tokens: the RoPE table's and the KV cache's size")
    dropout: float = setting(0.0, "dropout on attention probabilities and residual branches, in training")
    tie_embeddings: bool = setting(False, "share one matrix between tok_embeddings and output")
    ffn: FeedForwardName = setting("swiglu", "feed-forward variant (llama_mini/model/ffn.py)")
    swish_beta: float = setting(1.0, "beta of --ffn swish")
    swish_beta_trainable: bool = setting(False, "learn swish's beta (one scalar per layer)")
    weight_init: InitName = setting(
        "scaled",
        "initial weights, used only when training from scratch: scaled (std gain / sqrt(fan-in), "
        "Transformer.init_weights) or gpt2 (GPT-2's N(0, 0.02) for every matrix)",
    )

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = choice_problems(self)
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
        return from_dict(cls, values, "the model config")


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
