"""Generation: how the next token is chosen (sampling.py), the KV-cached decode loop over ragged batches
(decode.py), which decode step runs, eager or compiled, and its KV cache (steps.py; the lean eager step,
eager.py; the compiled step built in the background, background.py), text as tokens arrive
(streaming.py), and the command line (command.py with its prompt policy, prompts.py; `llama-mini
generate`, generate.py)."""

from llama_mini.generation.decode import (
    GenerationStats,
    generate,
    iter_new_tokens,
    next_token_logits,
)
from llama_mini.generation.prompts import fit_to_context
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
from llama_mini.generation.steps import CACHE_LENGTH_MULTIPLE, DecodeOptions
from llama_mini.generation.streaming import decode_continuation, stream

__all__ = [
    "CACHE_LENGTH_MULTIPLE",
    "DecodeOptions",
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
