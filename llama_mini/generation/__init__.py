"""Generation: how the next token is chosen (sampling.py), the KV-cached decode loop over ragged batches
and streaming text (decode.py), and the command line (command.py; `llama-mini generate`, generate.py)."""

from llama_mini.generation.decode import (
    CACHE_LENGTH_MULTIPLE,
    GenerationStats,
    decode_continuation,
    fit_to_context,
    generate,
    iter_new_tokens,
    next_token_logits,
    stream,
)
from llama_mini.generation.sampling import (
    GenerationError,
    SamplingConfig,
    apply_repetition_penalty,
    apply_temperature,
    row_seed,
    sample_next,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "CACHE_LENGTH_MULTIPLE",
    "GenerationError",
    "GenerationStats",
    "SamplingConfig",
    "apply_repetition_penalty",
    "apply_temperature",
    "decode_continuation",
    "fit_to_context",
    "generate",
    "iter_new_tokens",
    "next_token_logits",
    "row_seed",
    "sample_next",
    "stream",
    "top_k_filter",
    "top_p_filter",
]
